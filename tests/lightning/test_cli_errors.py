"""Mistakes in the CLI's input: one message (what, the bad value, what is valid, where it was set), exit 2.

The six cases users hit fail before a model is built: the first runs ``python -m lightning_peft`` as
a subprocess (cwd = tmp_path), and all six run through its entry point in one further process (each
process costs the CLI's start, about 5 s); ``--debug`` and ``LIGHTNING_PEFT_DEBUG=1`` show the
traceback. The rest runs in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_peft.core.config import check_positive_int
from lightning_peft.lightning import cli, cli_errors
from lightning_peft.lightning.cli import (
    DEBUG_ENV,
    DEBUG_FLAG,
    SAVED_HEADER,
    PEFTLightningCLI,
    check_checkpoint,
    check_writable,
    clean_parse_error,
    locate_key,
    main,
    user_error,
    value_source,
)
from lightning_peft.tasks import SequenceClassification
from tests.lightning.cli_tiny import tiny_config
from tests.tasks import hub

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny(hub_dir: Path, tmp_path: Path) -> Path:
    """``tmp_path/tiny.yaml``: a one-step LoRA fit of a tiny BERT on ``tmp_path/train.csv``."""
    return tiny_config(
        tmp_path,
        hub_dir,
        rows=hub.classification_rows(16),
        trainer={"max_epochs": None, "max_steps": 1, "limit_val_batches": 1, "default_root_dir": None},
        method="lora",
    )


def run_python(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` in ``cwd``, this checkout first on the path, without the debug variable unless given."""
    environ = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ["PYTHON_PRETTY_ERRORS"] = "0"  # torchmetrics < 1.5 imports pretty_errors, which rewrites tracebacks
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**environ, **env}, timeout=600)


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_peft *args``, as a user runs it."""
    return run_python(cwd, "-m", "lightning_peft", *args, **env)


def run_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- the six cases, as a user runs them

METHOD_TYPO = ["fit", "--config", "tiny.yaml", "--trainer.callbacks.method", "lorra"]
CASES = {
    "method typo": (
        METHOD_TYPO,
        [
            "error: method must be one of 'lora', 'ia3',",
            "got 'lorra'.",
            "where: trainer.callbacks[0].init_args.method, set by --trainer.callbacks.method lorra on the command line",
        ],
    ),
    "missing data file, from a config file": (
        ["fit", "--config", "tiny.yaml", "--config", "bad.yaml"],
        [
            "error: TextClassificationData.train_file='missing.csv' does not exist.",
            "where: data.init_args.train_file, set in bad.yaml",
        ],
    ),
    "missing --ckpt_path": (
        ["validate", "--config", "tiny.yaml", "--ckpt_path", "missing.ckpt"],
        [
            "error: ckpt_path='missing.ckpt' does not exist (relative to ",
            "give the path of a .ckpt file",
            "where: ckpt_path, set by --ckpt_path missing.ckpt on the command line",
        ],
    ),
    "negative learning rate": (
        ["fit", "--config", "tiny.yaml", "--model.learning_rate", "-1"],
        [
            "error: SequenceClassification.learning_rate must be a positive number; got -1.0.",
            "where: model.init_args.learning_rate, set by --model.learning_rate -1 on the command line",
        ],
    ),
    "max_epochs -2": (
        ["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "-2"],
        [
            "error: `max_epochs` must be a non-negative integer or -1. You passed in -2.",
            "where: trainer.max_epochs, set by --trainer.max_epochs -2 on the command line",
        ],
    ),
    "text column not in the CSV": (
        ["fit", "--config", "tiny.yaml", "--data.text_column", "body"],
        [
            "error: TextClassificationData.text_column='body': train_file=",
            "has no column 'body'; its columns are: text, label.",
            "where: data.init_args.text_column, set by --data.text_column body on the command line",
        ],
    ),
}


#: Runs the CLI's entry point (what ``python -m lightning_peft`` calls) on each case in turn, in one
#: process: a marker line on stdout and stderr before each, and its exit status after.
DRIVER = """
import json, sys
from lightning_peft.cli import main
for index, args in enumerate(json.loads(sys.argv[1])):
    for stream in (sys.stdout, sys.stderr):
        print(f"=== case {index} ===", file=stream, flush=True)
    sys.argv = ["lightning_peft", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    print(f"=== exit {code} ===", file=sys.stderr, flush=True)
"""


def _check_one_message(name: str, code: int, out: str, err: str) -> None:
    args, expected = CASES[name]
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err and "Not a valid subclass" not in err, f"{name}:\n{err}"
    for part in expected:
        assert part in err, f"{name}: {part!r} not in:\n{err}"
    assert f"({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback)" in err
    # Each fails before the model is built (its summary would print "trainable params").
    assert "trainable params" not in out + err, name


def test_a_mistake_prints_one_message_without_a_traceback(tiny: Path, tmp_path: Path) -> None:
    """The first case through ``python -m lightning_peft`` itself; all six through its entry point in one process
    (each costs the CLI's start, about 5 s, in a process of its own)."""
    (tmp_path / "bad.yaml").write_text("data:\n  init_args:\n    train_file: missing.csv\n")
    first = next(iter(CASES))
    result = run_cli(tmp_path, *CASES[first][0])
    _check_one_message(first, result.returncode, result.stdout, result.stderr)
    start = time.perf_counter()
    cases = [CASES[name][0] for name in CASES]
    driven = run_python(tmp_path, "-c", DRIVER, json.dumps(cases))
    assert driven.returncode == 0, driven.stderr
    outs = driven.stdout.split("=== case ")[1:]
    errs = driven.stderr.split("=== case ")[1:]
    assert len(outs) == len(errs) == len(cases), driven.stderr
    for index, name in enumerate(CASES):
        err = errs[index]
        code = int(err.rsplit("=== exit ", 1)[1].split(" ===")[0])
        _check_one_message(name, code, outs[index], err.rsplit("=== exit ", 1)[0])
    print(f"{len(cases)} cases in one process: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_debug_shows_the_traceback(how: str, tiny: Path, tmp_path: Path) -> None:
    args, env = ([*METHOD_TYPO, DEBUG_FLAG], {}) if how == "flag" else (METHOD_TYPO, {DEBUG_ENV: "1"})
    result = run_cli(tmp_path, *args, **env)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: method must be one of 'lora'" in result.stderr  # the original, as the cause
    assert "CLIError" in result.stderr


# --------------------------------------------------------------------------- checked before the model is built


@pytest.fixture
def never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def configure_model(self: SequenceClassification) -> None:
        raise AssertionError("the model was built before the mistake was reported")

    monkeypatch.setattr(SequenceClassification, "configure_model", configure_model)


def test_a_checkpoint_folder_that_cannot_be_created_fails_before_the_model_is_built(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], never_built: None
) -> None:
    config = yaml.safe_load(tiny.read_text())
    dirpath = str(tmp_path / "train.csv" / "ckpt")  # inside a file: fails only at the first save otherwise
    config["trainer"]["callbacks"].insert(0, {"class_path": "ModelCheckpoint", "init_args": {"dirpath": dirpath}})
    tiny.write_text(yaml.safe_dump(config))
    code, err = run_in_process(["fit", "--config", str(tiny)], capsys)
    assert code == 2
    assert f"ModelCheckpoint.dirpath={dirpath!r} is inside {str(tmp_path / 'train.csv')!r}, which is a file" in err
    assert f"where: trainer.callbacks[0].init_args.dirpath, set in {tiny}" in err


def test_a_default_root_dir_that_is_a_file(tiny: Path, capsys: pytest.CaptureFixture[str], never_built: None) -> None:
    code, err = run_in_process(["fit", "--config", str(tiny), "--trainer.default_root_dir", "tiny.yaml"], capsys)
    assert code == 2
    assert "trainer.default_root_dir='tiny.yaml' is a file, not a folder; give a folder to write in." in err
    assert "set by --trainer.default_root_dir tiny.yaml on the command line" in err


def test_the_label_column_is_checked_for_predict_too(
    tiny: Path, capsys: pytest.CaptureFixture[str], never_built: None
) -> None:
    code, err = run_in_process(["predict", "--config", str(tiny), "--data.label_column", "topic"], capsys)
    assert code == 2 and "TextClassificationData.label_column='topic'" in err and "has no column 'topic'" in err


def test_ckpt_path_a_folder_names_the_checkpoints_in_it(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"ckpt_path='run' \(relative to .*\) is a folder, not a checkpoint"):
        check_checkpoint("run")
    with pytest.raises(IsADirectoryError, match=r"include .*last\.ckpt"):
        check_checkpoint(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IsADirectoryError, match=r"holds no \.ckpt file"):
        check_checkpoint("empty")
    check_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    check_checkpoint("s3://bucket/last.ckpt")  # remote: not checked here


def test_check_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    check_writable("x", tmp_path / "new" / "deeper")  # created later, by the run; nothing now
    assert not (tmp_path / "new").exists()
    with pytest.raises(NotADirectoryError, match=r"x='.*file' is a file, not a folder"):
        check_writable("x", tmp_path / "file")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(PermissionError, match=r"no permission to write in '.*locked'"):
            check_writable("x", tmp_path / "locked" / "ckpt")


# --------------------------------------------------------------------------- bugs keep their traceback


def test_an_error_that_is_not_a_mistake_in_the_input_keeps_its_traceback(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: PEFTLightningCLI) -> None:
        raise ValueError("a bug outside lightning_peft's checks")

    monkeypatch.setattr(PEFTLightningCLI, "_check_ready", broken)
    with pytest.raises(ValueError, match="a bug outside") as raised:
        main(["fit", "--config", str(tiny)])
    assert not isinstance(raised.value, cli.CLIError)


def test_user_error_tells_checks_from_bugs() -> None:
    with pytest.raises(ValueError) as check:
        check_positive_int("LoRAConfig", "r", 0)
    assert user_error(check.value) is check.value
    with pytest.raises(TypeError) as bug:  # a TypeError inside lightning_peft, but no `raise` of its own
        cli_errors._format_key(None)  # type: ignore[arg-type]
    assert user_error(bug.value) is None
    try:  # jsonargparse wraps the check: the check is shown
        try:
            check_positive_int("LoRAConfig", "r", 0)
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert str(user_error(outer)) == "LoRAConfig.r must be a positive integer; got 0."


# --------------------------------------------------------------------------- where a value was set


def test_value_source_names_the_last_file_or_flag_that_sets_the_key(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model:\n  init_args:\n    learning_rate: 1\ntrainer:\n  callbacks:\n  - x\n")
    (tmp_path / "b.yaml").write_text("fit:\n  model:\n    class_path: SequenceClassification\n")
    argv = ["fit", "--config", "a.yaml", "--model.learning_rate=2", "--config", "b.yaml"]
    # b.yaml sets the model's class only, which encloses the key: the flag set the key itself, last.
    assert value_source(argv, "model.init_args.learning_rate", "fit") == (
        "set by --model.learning_rate=2 on the command line"
    )
    assert value_source(argv[:3], "model.init_args.learning_rate", "fit") == "set in a.yaml"
    assert value_source(argv, "model", "fit") == "set in b.yaml"
    plus = [*argv, "--trainer.callbacks+=PEFTCallback", "--trainer.callbacks.method", "ia3"]
    assert value_source(plus, "trainer.callbacks[1].init_args.method", "fit") == (
        "set by --trainer.callbacks.method ia3 on the command line"
    )
    assert (
        value_source(plus, "trainer.callbacks[1]", "fit") == "set by --trainer.callbacks.method ia3 on the command line"
    )
    assert value_source(plus[:-2], "trainer.callbacks[1]", "fit") == (
        "set by --trainer.callbacks+=PEFTCallback on the command line"
    )
    assert value_source(["fit", "--config", "nofile.yaml"], "config", "fit") == (
        "set by --config nofile.yaml on the command line"
    )
    assert value_source(argv, "data.init_args.text_column", "fit") == (
        "not set by any --config file or flag: the default"
    )
    assert value_source(["fit", "--config", "{data: {init_args: {batch_size: 0}}}"], "data.batch_size", "fit") == (
        "set in a --config string"
    )


def test_locate_key_finds_the_key_a_message_is_about() -> None:
    config = {
        "model": {"class_path": "lightning_peft.tasks.SequenceClassification", "init_args": {"learning_rate": -1}},
        "trainer": {
            "max_epochs": -2,
            "callbacks": [{"class_path": "lightning_peft.PEFTCallback", "init_args": {"method": "lorra"}}],
        },
    }
    assert locate_key("SequenceClassification.learning_rate must be ...", config) == "model.init_args.learning_rate"
    assert locate_key("`max_epochs` must be a non-negative integer", config) == "trainer.max_epochs"
    assert locate_key("method must be one of ...", config) == "trainer.callbacks[0].init_args.method"
    assert locate_key("SequenceClassification: something", config) == "model"
    assert locate_key("LoRAConfig.learning_rate must be ...", config) is None  # no such object
    assert locate_key("lora has no default target_modules", config) is None


def test_a_method_option_checked_in_a_union_branch_names_its_key(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """jsonargparse raises a union's error from its first branch (``str``); the method config's check is another."""
    args = [
        "fit",
        "--config",
        str(tiny),
        "--trainer.callbacks.method",
        "LoRAConfig",
        "--trainer.callbacks.method.r",
        "0",
    ]
    code, err = run_in_process(args, capsys)
    assert code == 2 and "Traceback" not in err and "Not a valid subclass" not in err
    assert err.startswith("error: LoRAConfig.r must be a positive integer; got 0.\n")
    assert "where: trainer.callbacks[0].init_args.method.init_args.r, set by --trainer.callbacks.method.r 0" in err


def test_a_parse_error_is_one_message_without_the_usage(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_in_process(["fit", "--config", str(tiny), "--model.learning_rat", "1"], capsys)
    assert code == 2 and "usage:" not in err and "Traceback" not in err
    assert "Option 'learning_rat' is not accepted" in err and "Given value: learning_rat=1" in err
    assert "where: model, set by --model.learning_rat 1 on the command line" in err
    assert "python -m lightning_peft fit --help lists the options" in err
    assert "NoneType" not in err and "Given value type" not in err


def test_clean_parse_error_keeps_the_only_error() -> None:
    text = (
        'Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Not a valid subclass of Callback\n      Subclass types expect one of:\n      - a class path (str)\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: torch.nn.Linear"
    )
    # No class was recognised, so "not a valid subclass" is the problem itself and stays.
    assert clean_parse_error(text) == (
        'Parser key "trainer.callbacks":\n    - Not a valid subclass of Callback\n'
        "      Subclass types expect one of:\n      - a class path (str)\n  Given value: torch.nn.Linear"
    )


# --------------------------------------------------------------------------- nothing written over the user's files


def test_a_config_given_on_the_command_line_is_never_written_over(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a logger the log dir is default_root_dir, here the working directory holding the user's config.yaml."""
    user = tmp_path / "config.yaml"
    user.write_text("# my config: these comments must survive\n" + tiny.read_text())
    before = user.read_bytes()
    for _ in range(2):  # the second run rewrites the config the first one saved, and nothing else
        code, err = run_in_process(["fit", "--config", "config.yaml"], capsys)
        assert code == 0, err
    assert user.read_bytes() == before
    saved = tmp_path / "config-2.yaml"
    assert saved.read_text().startswith(f"# {SAVED_HEADER}\n")
    assert yaml.safe_load(saved.read_text())["trainer"]["max_steps"] == 1
    assert not (tmp_path / "config-3.yaml").exists()


# --------------------------------------------------------------------------- predict-time data


def test_predict_without_labels_anywhere_says_how_to_give_them(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], never_built: None
) -> None:
    """No checkpoint (which would record the labels) and no labelled data: the message names --data.labels."""
    (tmp_path / "new.txt").write_text("the movie was good\n")
    args = ["predict", "--config", str(tiny), "--data.train_file", "null", "--data.predict_file", "new.txt"]
    code, err = run_in_process(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert '--data.labels \'["neg", "pos"]\'' in err


def test_a_txt_file_has_one_column_named_text(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], never_built: None
) -> None:
    (tmp_path / "new.txt").write_text("the movie was good\n")
    args = ["predict", "--config", str(tiny), "--data.train_file", "null", "--data.predict_file", "new.txt"]
    code, err = run_in_process([*args, "--data.text_column", "body", "--model.labels", "[neg, pos]"], capsys)
    assert code == 2
    assert "predict_file='new.txt' has no column 'body'" in err
    assert "a .txt file gives one record per line, in one column named 'text'" in err
