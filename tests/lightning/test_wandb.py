"""Weights & Biases, offline: the run directory holds the PEFT config, parameter counts and adapter-only artifacts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_peft.core import state
from lightning_peft.lightning.cli import main
from tests.tasks import hub

pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[2]
_BLOCK, _HEADER = 32768, 7


def read_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file.

    The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each
    with a header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:
            pos += room - _HEADER
            continue
        parts.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_offline_run_holds_peft_config_counts_and_adapter_only_artifacts(
    hub_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])
    monkeypatch.chdir(tmp_path)
    train = hub.write_csv(tmp_path / "train.csv", hub.classification_rows(24))
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "wandb.yaml"),  # the shipped W&B overlay, on a tiny task
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--model",
        "SequenceClassification",
        "--model.model_name_or_path",
        str(hub.save_model(hub_dir, "bert")),
        "--data",
        "TextClassificationData",
        "--data.train_file",
        str(train),
        "--data.batch_size",
        "8",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=PEFTCallback",
        "--trainer.callbacks.method",
        "LoRAConfig",
        "--trainer.callbacks.method.r",
        "4",
    ]
    cli = main(args)
    import wandb

    cli.trainer.logger.experiment.finish()
    wandb.teardown()  # stops the wandb service, which writes the run file in the background
    module = cli.model
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")

    config: dict[str, Any] = {}
    artifacts = []
    kinds = []
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind in ("run", "config"):  # the config given at init, then updates
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "artifact":
            artifacts.append(record.artifact)

    assert kinds[-1] == "exit", f"the run file is incomplete: {kinds}"
    # The PEFT method and its resolved options as plain JSON, with the parameter counts.
    peft = config["peft"]
    info = state.require_info(module)
    trainable, total = state.count_parameters(module)
    assert peft["method"] == "lora" and peft["config"] == info.config.to_dict()
    assert peft["config"]["r"] == 4 and peft["config"]["target_modules"] == ["query", "value"]
    assert (peft["trainable_params"], peft["total_params"]) == (trainable, total) and trainable < total / 10
    # The whole CLI config too, as the user gave it.
    (callback,) = [c for c in config["cli"]["trainer"]["callbacks"] if c["class_path"].endswith("PEFTCallback")]
    assert callback["init_args"]["method"]["init_args"]["r"] == 4
    assert config["cli"]["data"]["init_args"]["train_file"] == str(train)

    # The checkpoint artifact: adapter tensors (and optimizer state) only, never the frozen backbone.
    (artifact,) = artifacts
    assert artifact.type == "model" and "latest" in artifact.aliases
    (entry,) = artifact.manifest.contents
    checkpoint = torch.load(entry.local_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, _ in state.adapter_state(module)}
    backbone = sum(p.numel() * p.element_size() for p in module.model.parameters() if not p.requires_grad)
    adapter = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert adapter < backbone / 10 and entry.size == Path(entry.local_path).stat().st_size


def test_a_run_writes_only_under_its_log_dir_and_never_over_the_users_config(hub_dir: Path, tmp_path: Path) -> None:
    """``--config config.yaml --config configs/wandb.yaml`` in a folder holding the user's config.yaml.

    The resolved config goes beside the run's checkpoints, and W&B's files and the checkpoints
    under ``./lightning_logs``: nothing else appears in the working directory, and the user's
    config.yaml (comments and all) is byte-identical afterwards. Run as a user runs it, in a subprocess.
    """
    data = tmp_path / "data"
    data.mkdir()
    train = hub.write_csv(data / "train.csv", hub.classification_rows(16))
    work = tmp_path / "work"
    work.mkdir()
    user = work / "config.yaml"
    user.write_text(
        "# my task: tiny BERT, LoRA (these comments must survive)\n"
        "model:\n"
        "  class_path: lightning_peft.tasks.SequenceClassification\n"
        f"  init_args: {{model_name_or_path: {hub.save_model(hub_dir, 'bert')}}}\n"
        "data:\n"
        "  class_path: lightning_peft.tasks.TextClassificationData\n"
        f"  init_args: {{train_file: {train}, batch_size: 8, val_split: 0.25}}  # my data\n"
        "trainer:\n"
        "  accelerator: cpu\n"
        "  max_steps: 1\n"
        "  limit_val_batches: 1\n"
        "  enable_progress_bar: false\n"
        "  callbacks: [{class_path: lightning_peft.PEFTCallback, init_args: {method: lora}}]\n"
    )
    before = user.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "wandb-home"  # W&B's settings and caches, outside the working directory
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(home / var.lower())
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "lightning_peft", "fit", "--config", "config.yaml"]
    command += ["--config", str(ROOT / "configs" / "wandb.yaml")]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    assert user.read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml", "lightning_logs"]
    logs = work / "lightning_logs"
    (run_file,) = logs.glob("wandb/offline-run-*/run-*.wandb")
    run_id = run_file.stem.removeprefix("run-")
    run_dir = logs / "lightning-peft" / run_id  # W&B's project / run id, as ModelCheckpoint names it
    # The checkpoint, and beside it the same adapter as a peft folder (PEFTCallback(peft_dir=True)).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=1.peft"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == "lightning_logs"
    assert saved["data"]["init_args"]["train_file"] == str(train)
