"""``python -m lightning_peft`` as a shell user runs it: subprocesses, reading stdout, stderr and the files written.

The help tests record the help in one process that builds the parser (a snapshot file and the live
texts at several widths), then run the CLI as a fresh install would, with that file as its snapshot.
One tiny fit ((IA)^3 on a tiny BERT, Lightning's default logger and progress bar) makes the run
every test here uses as a user would use the quickstart's: ``validate`` / ``test`` / ``predict``
with its checkpoint, ``predict ... > out.jsonl``, ``--output`` and ``--quiet``, ``--help`` and
``--print_config``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_peft import PEFTCallback
from lightning_peft.lightning import cli_help, help_record, help_replay
from lightning_peft.lightning.cli import PEFTLightningCLI
from lightning_peft.lightning.cli_help import CACHE_ENV, SNAPSHOT_ENV
from lightning_peft.lightning.cli_output import NOISE_LOGS, NOISE_WARNINGS
from lightning_peft.lightning.help_snapshot import REQUESTS
from tests.lightning.cli_tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
NEW_TEXTS = ["the movie was good", "the food was awful", "what a lovely day"]
#: Text of the third-party messages that are not about the user's run (none may reach the user).
NOISE = [text for _, text in NOISE_LOGS] + [text for _, text in NOISE_WARNINGS] + ["dirpath has changed"]
pytestmark = pytest.mark.slow  # each test starts Python processes that import Lightning (seconds each)


def environment(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_PEFT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env[CACHE_ENV] = str(cache)
    return env


def cli(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_peft ARGS`` in ``cwd``, as a user types it."""
    command = [sys.executable, "-m", "lightning_peft", *args]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env=environment(cwd / "cache"), timeout=600, check=False
    )
    if check:
        assert result.returncode == 0, f"{shlex.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_no_noise(stderr: str) -> None:
    for text in NOISE:
        assert text not in stderr, f"third-party noise on stderr: {text!r}\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def run(hub_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fit with Lightning's default logger into ``<folder>/lightning_logs/version_0``: folder, config, checkpoint."""
    folder = tmp_path_factory.mktemp("user")
    defaults = {"logger": None, "enable_progress_bar": None, "log_every_n_steps": 1}  # Lightning's
    config = tiny_config(folder, hub_dir, trainer=defaults, method="ia3")
    (folder / "new.txt").write_text("".join(f"{text}\n" for text in NEW_TEXTS))
    fit = cli(folder, "fit", "--config", "tiny.yaml")
    assert_no_noise(fit.stderr)
    assert "fit finished in" in fit.stdout
    (bar,) = [line for line in fit.stderr.splitlines() if line.startswith("Epoch 0/0 ")]
    assert "val_recall" in bar  # stderr is a pipe here, as a log file: the final bar is one line, not a table
    (checkpoint,) = (folder / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    return {"folder": folder, "config": config, "checkpoint": checkpoint}


def versions(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "lightning_logs").iterdir())


def metrics(path: Path) -> dict[str, float]:
    (row,) = [r for r in csv.DictReader(path.open()) if any(v for k, v in r.items() if k != "step")]
    return {k: float(v) for k, v in row.items() if v and k != "step"}


# --------------------------------------------------------------------------- points 1 and 3


def test_validate_and_test_reuse_the_checkpoint_and_write_into_its_run(run: dict[str, Path]) -> None:
    folder, version = run["folder"], run["folder"] / "lightning_logs" / "version_0"
    fit_config = hashlib.sha256((version / "config.yaml").read_bytes()).hexdigest()
    ckpt = str(run["checkpoint"].relative_to(folder))
    validate = cli(folder, "validate", "--config", "tiny.yaml", "--ckpt_path", ckpt)
    test = cli(folder, "test", "--config", "tiny.yaml", "--ckpt_path", ckpt)
    for result in (validate, test):
        assert_no_noise(result.stderr)
    # Says plainly what it scores: the held-out validation split, the one the fit validated on.
    assert "validate: 6 records, the validation split (0.25 of train_file=" in validate.stderr
    assert "the records the checkpoint's fit validated on, none of which trained it" in validate.stderr
    assert (
        "test: the data has no test split (no test_file, test_split=0), so this tests the checkpoint on the "
        "validation split: 6 records"
    ) in test.stderr
    assert "--data.test_file" in test.stderr
    assert "Test metric" in test.stdout and "test_accuracy" in test.stdout  # the results table on stdout
    # Into the run it came from: no version_1, the fit's config untouched, no "dirpath has changed".
    assert versions(folder) == ["version_0"]
    assert hashlib.sha256((version / "config.yaml").read_bytes()).hexdigest() == fit_config
    assert (version / "config-test.yaml").is_file() and (version / "config-validate.yaml").is_file()
    scored = metrics(version / "test" / "metrics.csv")
    validated = metrics(version / "validate" / "metrics.csv")
    assert scored["test_accuracy"] == validated["val_accuracy"]  # the same records
    assert scored["test_loss"] == pytest.approx(validated["val_loss"], abs=1e-6)


def test_a_validation_split_that_differs_from_the_fits_is_said(run: dict[str, Path]) -> None:
    args = ["validate", "--config", "tiny.yaml", "--ckpt_path", str(run["checkpoint"]), "--data.val_split", "0.5"]
    result = cli(run["folder"], *args)
    assert "not the split the checkpoint's fit validated on (it had val_split=0.25)" in result.stderr
    assert "some of these records may have trained it" in result.stderr


# --------------------------------------------------------------------------- points 2 and 5


def test_predict_into_a_file_is_json_lines_and_nothing_else(run: dict[str, Path]) -> None:
    """``predict ... > out.jsonl`` on new texts, without the training file: the labels come from the checkpoint."""
    folder = run["folder"]
    args = ["--config", "tiny.yaml", "--ckpt_path", str(run["checkpoint"]), "--data.train_file", "null"]
    args += ["--data.predict_file", "new.txt"]
    command = f"{shlex.quote(sys.executable)} -m lightning_peft predict {shlex.join(args)} > out.jsonl"
    result = subprocess.run(
        command, shell=True, cwd=folder, capture_output=True, text=True, env=environment(folder / "cache"), check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (folder / "out.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses
    assert [r["text"] for r in rows] == NEW_TEXTS
    assert all(r["label"] in ("neg", "pos") and 0 < r["score"] <= 1 for r in rows)
    assert "Predicting" in result.stderr  # the progress bar is on stderr
    assert_no_noise(result.stderr)
    assert versions(folder) == ["version_0"]

    quiet = cli(folder, "predict", *args, "--output", "quiet.jsonl", "--quiet")
    assert quiet.stdout == ""  # all in the file
    assert [json.loads(line) for line in (folder / "quiet.jsonl").read_text().splitlines()] == rows
    for loud in ("Seed set to", "Predicting", "lightning_peft: ia3", "GPU available", "Tokenizing", "examples/s"):
        assert loud not in quiet.stderr


# --------------------------------------------------------------------------- point 4: --help without Lightning

#: Terminal widths (``COLUMNS``) the recorded help is replayed at and compared with the live parser's.
WIDTHS = (50, 80, 137, 250)
HEAVY = {"torch", "lightning", "transformers", "jsonargparse"}
_RECORD = """
import json, sys
from pathlib import Path
from lightning_peft.lightning import help_snapshot
out = Path(sys.argv[1])
help_snapshot.write(out / "snapshot.json", programs=("__main__.py",))
widths = [int(c) for c in sys.argv[2].split(",")]
live = {" ".join(a): {c: help_snapshot.render(a, columns=c)[0] for c in widths} for a in help_snapshot.REQUESTS}
(out / "live.json").write_text(json.dumps(live))
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process that builds the parser: a snapshot file of every help request, and the live text at each width."""
    folder = tmp_path_factory.mktemp("help")
    subprocess.run(
        [sys.executable, "-c", _RECORD, str(folder), ",".join(map(str, WIDTHS))],
        cwd=folder,
        env=environment(folder / "unused"),
        check=True,
    )
    live = json.loads((folder / "live.json").read_text())
    return {"file": folder / "snapshot.json", "live": {k: {int(c): t for c, t in v.items()} for k, v in live.items()}}


def help_call(cwd: Path, snapshot: Path, columns: int) -> tuple[str, set[str]]:
    """``python -X importtime -m lightning_peft fit --help``: what it prints and the modules it imports."""
    env = {**environment(cwd / "cache"), SNAPSHOT_ENV: str(snapshot), "COLUMNS": str(columns)}
    command = [sys.executable, "-X", "importtime", "-m", "lightning_peft", "fit", "--help"]
    traced = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, check=True)
    trace = [line for line in traced.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in trace}
    assert "lightning_peft.lightning.cli_help" in imported  # the trace is read right
    return traced.stdout, imported


def test_the_snapshot_replays_the_live_help_at_every_width(recorded: dict[str, Any]) -> None:
    """Recorded once, at one width: at each width argparse wraps it exactly as the parser itself does."""
    data = json.loads(recorded["file"].read_text())
    helps = data["helps"]["python -m lightning_peft"]
    assert sorted(helps) == sorted(" ".join(argv) for argv in REQUESTS)
    for request, texts in recorded["live"].items():
        assert len(set(texts.values())) == len(WIDTHS)  # the widths do change the text
        for columns, text in texts.items():
            assert help_replay.replay(helps[request], columns - 2) == text, f"{request} at COLUMNS={columns}"
    assert "Available subcommands:" in recorded["live"]["--help"][80]
    assert "--trainer.max_epochs MAX_EPOCHS" in recorded["live"]["fit --help"][250]


def test_a_fresh_install_prints_help_from_the_snapshot_without_importing_lightning(
    recorded: dict[str, Any], tmp_path: Path
) -> None:
    """An empty user cache and a snapshot whose key matches: ``fit --help`` imports none of the heavy packages.

    That is what makes the first call fast (``python -m benchmarks.cli_help`` times it); a test
    asserts what is imported, not how long it takes.
    """
    text, imported = help_call(tmp_path, recorded["file"], 137)
    assert not HEAVY & imported
    assert text == recorded["live"]["fit --help"][137]
    assert not (tmp_path / "cache").exists()  # nothing was built, so nothing cached


def test_a_snapshot_of_another_environment_is_not_used_and_the_cache_replays_any_width(
    recorded: dict[str, Any], tmp_path: Path
) -> None:
    """One version edited in the snapshot's key: the parser builds (and caches); later calls, any width, do not."""
    data = json.loads(recorded["file"].read_text())
    assert cli_help.snapshot_mismatch(data) is None
    data["key"]["packages"]["torch"] = "0.0.1"
    assert cli_help.snapshot_mismatch(data) == f"torch 0.0.1 recorded, {cli_help._version('torch')} here"
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(data))
    first, imported = help_call(tmp_path, stale, 80)
    assert {"torch", "lightning", "jsonargparse"} <= imported  # the parser answered
    assert first == recorded["live"]["fit --help"][80]
    assert [p.suffix for p in (tmp_path / "cache").glob("help-*")] == [".json"]  # a snapshot, not one width's text
    for columns in (50, 80):
        text, imported = help_call(tmp_path, stale, columns)
        assert not HEAVY & imported
        assert text == recorded["live"]["fit --help"][columns]
    assert text.startswith("usage: python -m lightning_peft [options] fit ")
    assert ":class:" not in text and "``" not in text and ":func:" not in text
    assert 'Default: "auto"' in " ".join(text.split())  # was ``"auto"``


def test_a_snapshot_is_refused_on_any_difference_in_its_key(
    recorded: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "snapshot.json"
    monkeypatch.setenv(SNAPSHOT_ENV, str(path))
    monkeypatch.setenv("COLUMNS", "80")
    edits = {
        "python": lambda key: key.update(python="2.7"),
        "env": lambda key: key.update(env=[["JSONARGPARSE_DEBUG", "1"]]),
        "source": lambda key: key.update(source="0" * 64),
        "a package": lambda key: key["packages"].update(rich="0.1"),
        "an unrecorded package": lambda key: key["packages"].pop("transformers"),
        "a module absent then": lambda key: key["absent_modules"].append("json"),
        "a distribution absent then": lambda key: key["absent_distributions"].append("pytest"),
        "no absent list": lambda key: key.pop("absent_modules"),
    }
    original = json.loads(recorded["file"].read_text())
    path.write_text(json.dumps(original))
    assert cli_help.shipped_help(["fit", "--help"]) == recorded["live"]["fit --help"][80]  # as recorded, it is used
    for name, edit in edits.items():
        data = json.loads(json.dumps(original))
        edit(data["key"])
        path.write_text(json.dumps(data))
        assert cli_help.shipped_help(["fit", "--help"]) is None, name


def demo_parser(formatter: type) -> Any:
    """A parser beyond the CLI's: positional choices, a tuple metavar, nargs +, hidden help, an exclusive group."""
    import jsonargparse

    parser = jsonargparse.ArgumentParser(
        prog="demo", formatter_class=formatter, description="One.\nTwo ``x``, %(prog)s."
    )
    parser.add_argument("name", choices=["a", "b"], help="a positional with choices")
    parser.add_argument("--pair", nargs=2, metavar=("X", "Y"), help="a tuple metavar")
    parser.add_argument("--many", nargs="+", type=int, help="one or more :class:`~x.Y`, default %(default)s")
    parser.add_argument("--hidden", help=argparse.SUPPRESS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fast", action="store_true", help="fast")
    group.add_argument("--an-option-name-too-long-for-the-help-column", type=float, default=0.5, help="x " * 40)
    return parser


def test_the_recording_replays_another_parser_and_keeps_no_snapshot_it_cannot_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = demo_parser(help_record.recording_formatter())
    live = {}
    for columns in WIDTHS:
        monkeypatch.setenv("COLUMNS", str(columns))
        live[columns] = parser.format_help()
    snapshot = help_record.snapshot_for(live[80])
    assert snapshot is not None, help_record.why_not(live[80])
    for columns, text in live.items():
        assert help_replay.replay(snapshot, columns - 2) == text, columns
    assert "[--fast | --an-option-name-too-long" in live[250] and "--hidden" not in live[250]

    class Shouting(help_record.recording_formatter()):  # a change the record does not see
        def _format_usage(self, *args: Any) -> str:
            return super()._format_usage(*args).replace("usage:", "USAGE:")

    text = demo_parser(Shouting).format_help()
    assert text.startswith("USAGE: demo")
    assert help_record.snapshot_for(text) is None
    assert help_record.why_not(text) == "the replay differs from the text"


def test_the_shipped_snapshot_is_current() -> None:
    """The snapshot in the package was recorded from these sources (else it is never used: slow, never wrong)."""
    data = cli_help.load_snapshots(cli_help.SNAPSHOT_FILE)
    assert data is not None, f"no {cli_help.SNAPSHOT_FILE}: write it with {cli_help.SNAPSHOT_COMMAND}"
    assert data["key"]["source"] == cli_help.source_hash(), (
        f"{cli_help.SNAPSHOT_FILE.name} was recorded from other sources of lightning_peft; "
        f"regenerate it with: {cli_help.SNAPSHOT_COMMAND}"
    )
    assert sorted(data["helps"]) == ["lightning-peft", "python -m lightning_peft"]
    for helps in data["helps"].values():
        assert sorted(helps) == sorted(" ".join(argv) for argv in REQUESTS)
    mismatch = cli_help.snapshot_mismatch(data)
    if mismatch is not None:
        warnings.warn(f"the shipped help snapshot is not used on this stack: {mismatch}", UserWarning, stacklevel=1)


def test_print_config_prints_what_runs(hub_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path
    tiny_config(folder, hub_dir)  # LoRA as a class_path config
    printed = cli(folder, "fit", "--config", "tiny.yaml", "--trainer.callbacks.method.r", "16", "--print_config")
    config = yaml.safe_load(printed.stdout)
    peft = config["trainer"]["callbacks"][-1]
    assert list(peft) == ["class_path", "init_args"] and peft["class_path"] == "lightning_peft.PEFTCallback"
    method = peft["init_args"]["method"]
    assert list(method)[0] == "class_path" and method["class_path"] == "lightning_peft.methods.lora.LoRAConfig"
    assert method["init_args"]["r"] == 16
    # The subcommand's own options (ckpt_path, --quiet, ...) are not options of a parser without subcommands.
    config = {k: v for k, v in config.items() if k in ("seed_everything", "model", "data", "trainer", "optimizer")}
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])
    again = PEFTLightningCLI(args=config, run=False)  # builds what the printed config says
    (callback,) = [c for c in again.trainer.callbacks if isinstance(c, PEFTCallback)]
    assert callback.method.name == "lora" and callback.config.r == 16
