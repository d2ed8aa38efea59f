"""``python -m lightning_peft``: every shipped config, --help, --print_config, runs and errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from lightning_peft import PEFTCallback, registry
from lightning_peft.core import state
from lightning_peft.lightning.cli import METHOD_HELP, PEFTLightningCLI, main
from lightning_peft.lightning.cli_help import CACHE_ENV
from lightning_peft.lightning.summary import PEFTModelSummary
from lightning_peft.tasks import datasets
from lightning_peft.tasks.sources import PACKAGES
from tests import optional
from tests.lightning import cli_tiny
from tests.tasks import hub

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BASE = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])  # LightningCLI warns when both argv and args are given
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and config.yaml land here
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "help-cache"))  # help texts: never the user's cache


def is_overlay(path: Path) -> bool:
    """A config that only adds to a task config (e.g. a logger): it has no model."""
    return "model" not in yaml.safe_load(path.read_text())


def config_args(path: Path) -> list[str]:
    return ["--config", str(BASE), "--config", str(path)] if is_overlay(path) else ["--config", str(path)]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def packages_needed(path: Path) -> list[str]:
    text = path.read_text() + (BASE.read_text() if is_overlay(path) else "")
    needed = [m for m in PACKAGES if f"package:{m}/" in text]
    needed += [package for name, (_, package) in datasets.NAMED.items() if f"dataset: {name}" in text]
    return [m for m in needed if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_print_config_round_trips(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, printed, err = run(["fit", *config_args(path), "--print_config"], capsys)
    assert code == 0, err
    again = Path("printed.yaml")
    again.write_text(printed)
    code, reprinted, err = run(["fit", "--config", str(again), "--print_config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(reprinted) == yaml.safe_load(printed)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_instantiates(path: Path) -> None:
    missing = packages_needed(path)
    if missing:
        pytest.skip(f"needs the offline packages {missing} (see the README's test command)")
    if "quantization:" in path.read_text() and not optional.installed("bitsandbytes"):
        pytest.skip(optional.reason("bitsandbytes"))
    cli = PEFTLightningCLI(args=config_args(path), run=False)  # builds model, data, trainer; loads no weights
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback)]
    assert callback.method.name in registry.methods()
    assert cli.model.model is None
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    assert any(isinstance(c, PEFTModelSummary) for c in cli.trainer.callbacks)


def test_every_registered_method_has_a_complete_config() -> None:
    for method in registry.all_methods():
        path = ROOT / "configs" / f"{method.name}.yaml"
        assert path.is_file(), f"registered method {method.name!r} has no configs/{method.name}.yaml"
        config = yaml.safe_load(path.read_text())
        (peft,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PEFTCallback")]
        spec = peft["init_args"]["method"]
        cls = method.config_cls
        assert spec["class_path"] == f"{cls.__module__}.{cls.__qualname__}"
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(spec["init_args"]) == fields, f"configs/{method.name}.yaml should spell out every option"


# --------------------------------------------------------------------------- help


def test_help_lists_every_method_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0
    for method in registry.all_methods():
        assert f"  {method.name}: {method.summary}" in out
        for field in dataclasses.fields(method.config_cls):
            assert f"    {field.name}: {field.type} = " in out
        assert METHOD_HELP.format(cls=method.config_cls.__name__) in out
    assert "    r: int = 8" in out and "    alpha: float = 16.0" in out


@pytest.mark.parametrize("method", registry.methods())
def test_the_documented_method_help_command_shows_type_and_default(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cls = registry.get(method).config_cls
    code, out, _ = run(METHOD_HELP.format(cls=cls.__name__).split()[3:], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for field in dataclasses.fields(cls):
        assert f"--method.{field.name} " in out
    if method == "lora":
        assert "--method.r R rank of the update" in flat and "(type: int, default: 8)" in flat


def test_the_readme_documents_the_method_help_command() -> None:
    assert METHOD_HELP.format(cls="LoRAConfig") in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- runs on a tiny model


@pytest.fixture
def tiny_config(hub_dir: Path, tmp_path: Path) -> Path:
    predict = tmp_path / "predict.txt"
    predict.write_text("the movie was good\nthe food was awful\n")
    return cli_tiny.tiny_config(
        tmp_path,
        hub_dir,
        data={"predict_file": str(predict), "test_split": 0.25},
        checkpoint={"dirpath": str(tmp_path / "ckpt"), "save_last": True},
    )


def test_fit_validate_test_predict(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = main(["fit", "--config", str(tiny_config)])
    out, _ = capsys.readouterr()
    assert "Trainable" in out and "Frozen params" in out  # the PEFT model summary
    assert any(isinstance(c, PEFTModelSummary) for c in cli.trainer.callbacks)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(saved) == {n for n, _ in state.adapter_state(cli.model)}  # adapter-only

    for command in ("validate", "test"):
        cli = main([command, "--config", str(tiny_config), "--ckpt_path", str(ckpt)])
        prefix = "val" if command == "validate" else "test"
        metrics = cli.trainer.callback_metrics
        assert {f"{prefix}_accuracy", f"{prefix}_f1", f"{prefix}_precision", f"{prefix}_recall"} <= set(metrics)
    capsys.readouterr()

    main(["predict", "--config", str(tiny_config), "--ckpt_path", str(ckpt)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["text"] for p in lines] == ["the movie was good", "the food was awful"]
    assert all(p["label"] in ("neg", "pos") for p in lines)


def test_generation_options_from_the_command_line_win_over_the_checkpoint(
    hub_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = hub.write_jsonl(tmp_path / "qa.jsonl", hub.qa_rows(repeat=2))
    common = [
        "--model=CausalLM",
        f"--model.model_name_or_path={hub.save_model(hub_dir, 'llama')}",
        "--model.max_new_tokens=3",
        "--data=CausalLMData",
        f"--data.train_file={data}",
        "--data.val_split=0.25",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=PEFTCallback",
    ]
    main(["fit", *common, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    (ckpt,) = tmp_path.glob("checkpoints/*.ckpt")
    capsys.readouterr()

    def longest_response(*extra: str) -> int:
        main(["predict", *common, f"--ckpt_path={ckpt}", *extra])
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert len(lines) == 3  # the validation records: 25 % of 12
        return max(len(p["response"].split()) for p in lines)

    assert longest_response() > 1  # max_new_tokens=3 from the fit config, saved nowhere
    assert longest_response("--model.max_new_tokens=1") <= 1


def test_method_options_from_the_command_line(tiny_config: Path) -> None:
    def callback(*extra: str) -> PEFTCallback:
        cli = PEFTLightningCLI(args=["--config", str(tiny_config), *extra], run=False)
        return next(c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback))

    assert callback().config.r == 4
    assert callback("--trainer.callbacks.method.r", "2").config.r == 2
    by_name = callback("--trainer.callbacks.method", "lora")
    assert by_name.method.name == "lora" and by_name.config.r == 8
    assert callback("--trainer.callbacks.method.target_modules", "[query]").config.target_modules == ["query"]


def test_the_model_summary_and_progress_bar_can_be_switched_off(tiny_config: Path) -> None:
    args = ["--config", str(tiny_config), "--trainer.enable_model_summary", "false"]
    cli = PEFTLightningCLI(args=args, run=False)  # the tiny config has enable_progress_bar: false
    assert not any(isinstance(c, (PEFTModelSummary, ProgressBar)) for c in cli.trainer.callbacks)
    own = ["--trainer.enable_progress_bar", "true", "--trainer.callbacks+=TQDMProgressBar"]
    cli = PEFTLightningCLI(args=["--config", str(tiny_config), *own], run=False)  # the user's own bar is kept
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)


# --------------------------------------------------------------------------- bad input


def test_a_config_key_that_does_not_exist(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(tiny_config.read_text())
    config["model"]["init_args"]["learning_rat"] = 0.1
    tiny_config.write_text(yaml.safe_dump(config))
    code, _, err = run(["fit", "--config", str(tiny_config)], capsys)
    assert code == 2 and "Option 'learning_rat' is not accepted" in err
    assert f"where: model, set in {tiny_config}" in err and "usage:" not in err


def test_a_method_option_that_does_not_exist(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["fit", "--config", str(tiny_config), "--trainer.callbacks.method.rank", "4"], capsys)
    assert code == 2 and "Option 'rank' is not accepted" in err
    assert "Not a valid subclass of Callback" not in err and "usage:" not in err


def test_a_bad_method_option_value(tiny_config: Path) -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig.r must be a positive integer; got 0"):
        PEFTLightningCLI(args=["--config", str(tiny_config), "--trainer.callbacks.method.r", "0"], run=False)


def test_a_model_path_that_does_not_exist(tiny_config: Path) -> None:
    args = ["--config", str(tiny_config), "--model.model_name_or_path", "./missing-model"]
    with pytest.raises(ValueError, match=r"model_name_or_path='\./missing-model' does not exist"):
        PEFTLightningCLI(args=args, run=False)


def test_an_architecture_without_default_targets(
    tiny_config: Path, hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", str(tiny_config), "--model.model_name_or_path", str(hub.save_model(hub_dir, "electra"))]
    code, _, err = run(args, capsys)  # found once the model is built, and still one message
    assert code == 2 and "error: lora has no default target_modules for architecture 'electra'" in err
    with pytest.raises(ValueError, match=r"lora has no default target_modules for architecture 'electra'"):
        main([*args, "--debug"])


# --------------------------------------------------------------------------- the entry point


def test_python_dash_m_is_light() -> None:
    """``python -m lightning_peft --help`` imports nothing heavy beyond what ``import lightning`` does.

    (Lightning's torchmetrics imports transformers' top level; models, tokenizers and wandb stay out.)
    """
    code = (
        "import sys, runpy, lightning\n"
        "heavy = lambda: {m for m in sys.modules if m.startswith(('transformers', 'wandb'))}\n"
        "before = heavy()\n"
        "sys.argv = ['lightning_peft', 'fit', '--help']\n"
        "try:\n    runpy.run_module('lightning_peft', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(heavy() - before))"
    )
    env = {**os.environ, CACHE_ENV: "0"}  # the parser itself, not a cached text
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, env=env
    ).stdout
    assert "PEFT methods" in out and "HEAVY []" in out


# --------------------------------------------------------------------------- what reaches the user


def test_only_the_named_third_party_noise_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Each dropped message is matched by logger or category and text; a warning or log line beside it stays."""
    import logging
    import warnings

    from lightning_peft.lightning.cli_output import NOISE_LOGS, NOISE_WARNINGS, set_quiet, silence_third_party_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_third_party_noise()
        for category, text in NOISE_WARNINGS:
            warnings.warn(f"{text} (the rest of the message)", category, stacklevel=1)
            warnings.warn(f"{text} (the rest of the message)", DeprecationWarning, stacklevel=1)  # another category
        warnings.warn("a warning about the user's run", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        *(f"{text} (the rest of the message)" for _, text in NOISE_WARNINGS),
        "a warning about the user's run",
    ]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        for _, text in NOISE_LOGS:
            rank_zero.info(f"{text} (the rest)")
        rank_zero.info("GPU available: False, used: False")
        set_quiet(True)
        rank_zero.info("an info line under --quiet")
        rank_zero.warning("a warning under --quiet")
        set_quiet(False)
        rank_zero.info("an info line again")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: False, used: False",
        "a warning under --quiet",
        "an info line again",
    ]
