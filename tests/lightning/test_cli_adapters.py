"""``validate`` / ``predict`` with ``--adapters``, ``--adapter`` and ``--adapter_column``: several adapters on one base.

Two LoRA adapters are trained once per module on a tiny BERT: ``sentiment`` (labels neg/pos, the
serving config's) and ``spam`` (the same texts labelled ham/spam), then served together.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.lightning.cli import main
from lightning_peft.tasks import (
    CausalLM,
    CausalLMData,
    MultipleChoiceData,
    MultipleChoiceLM,
    Seq2SeqData,
    Seq2SeqLM,
    SequenceClassification,
    TaskModule,
    TextDataModule,
)
from tests.lightning.cli_tiny import tiny_config
from tests.tasks import hub

TEXTS = ["the movie was good", "the food was awful", "a lovely day", "it was ugly", "the weather is fine"]


def write_config(
    folder: Path, hub_dir: Path, rows: list[dict[str, str]], *, predict_file: Path | None = None, **model: Any
) -> Path:
    """A classification config over ``rows`` whose fit writes ``folder/ckpt/adapter.ckpt`` (LoRA r=4)."""
    return tiny_config(
        folder,
        hub_dir,
        rows=rows,
        name="config.yaml",
        model=model,
        data={"predict_file": None if predict_file is None else str(predict_file)},
        trainer={"max_epochs": None, "max_steps": 6, "enable_model_summary": False},
        checkpoint={"dirpath": str(folder / "ckpt"), "filename": "adapter"},
    )


def spam_rows(n: int = 24) -> list[dict[str, str]]:
    return [{"text": r["text"], "label": "spam" if r["label"] == "pos" else "ham"} for r in hub.classification_rows(n)]


def three_class_rows(n: int = 24) -> list[dict[str, str]]:
    return [{**r, "label": "meh"} if i % 3 == 2 else r for i, r in enumerate(hub.classification_rows(n))]


def fit(config: Path) -> Path:
    main(["fit", "--config", str(config)])
    return config.parent / "ckpt" / "adapter.ckpt"


@pytest.fixture(scope="module")
def served(hub_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The serving config (sentiment's, with a predict file naming each row's adapter) and the checkpoints."""
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning_peft"])
        patch.chdir(root)
        names = ["sentiment", "spam", "__base__", "spam", "sentiment"]
        predict = hub.write_csv(
            root / "predict.csv", [{"text": t, "adapter": n} for t, n in zip(TEXTS, names, strict=True)]
        )
        serving = write_config(root / "sentiment", hub_dir, hub.classification_rows(24), predict_file=predict)
        paths = {
            "config": serving,
            "sentiment": fit(serving),
            "spam": fit(write_config(root / "spam", hub_dir, spam_rows())),
            "three": fit(write_config(root / "three", hub_dir, three_class_rows())),
            "wide": fit(write_config(root / "wide", hub_dir, spam_rows(), num_labels=3)),
        }
        yield paths


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])
    monkeypatch.chdir(tmp_path)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def predictions(out: str) -> list[dict[str, Any]]:
    lines = out.splitlines()
    assert lines and all(line.startswith("{") for line in lines), f"stdout holds results only:\n{out}"
    return [json.loads(line) for line in lines]


def adapters_flag(paths: dict[str, Path], *names: str) -> str:
    return json.dumps({name: str(paths[name]) for name in names})


# --------------------------------------------------------------------------- serving


def test_predict_serves_each_row_through_the_adapter_its_column_names(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(served["config"])]
    both = ["--adapters", adapters_flag(served, "sentiment", "spam")]
    code, out, err = run(["predict", *config, *both, "--adapter_column", "adapter"], capsys)
    assert code == 0, err
    mixed = predictions(out)
    assert [p["adapter"] for p in mixed] == ["sentiment", "spam", "__base__", "spam", "sentiment"]
    assert [p["text"] for p in mixed] == TEXTS
    # The spam adapter names its own classes (recorded in its checkpoint); the others the config's.
    assert all(p["label"] in (("ham", "spam") if p["adapter"] == "spam" else ("neg", "pos")) for p in mixed)
    assert "note: --adapters: the config's PEFTCallback (lora) is not used" in err

    # Each row as a run of its adapter alone predicts: the same class and probability.
    for name in ("sentiment", "spam"):
        code, out, err = run(["predict", *config, "--adapters", adapters_flag(served, name)], capsys)
        assert code == 0, err
        alone = predictions(out)
        assert "adapter" not in alone[0]
        for row, (one, other) in enumerate(zip(mixed, alone, strict=True)):
            if one["adapter"] == name:
                assert one["label"] == other["label"] and one["score"] == pytest.approx(other["score"], abs=2e-4), row


def test_adapter_picks_the_active_one_and_a_checkpoint_validates_as_with_ckpt_path(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(served["config"])]
    reference = main(["validate", *config, "--ckpt_path", str(served["sentiment"])]).trainer.callback_metrics
    cli = main(
        ["validate", *config, "--adapters", adapters_flag(served, "spam", "sentiment"), "--adapter", "sentiment"]
    )
    assert list(lp.adapters(cli.model)) == ["spam", "sentiment"]  # and no fresh one from the config's PEFTCallback
    assert lp.active_adapters(cli.model) == ["sentiment"]
    metrics = cli.trainer.callback_metrics
    assert set(reference) == set(metrics)
    for key, value in reference.items():
        torch.testing.assert_close(metrics[key], value, msg=key)

    code, out, err = run(["predict", *config, "--adapters", adapters_flag(served, "sentiment", "spam")], capsys)
    assert code == 0, err
    assert all(p["label"] in ("neg", "pos") for p in predictions(out))  # the first listed is active
    code, out, err = run(
        ["predict", *config, "--adapters", adapters_flag(served, "sentiment", "spam"), "--adapter", "spam"], capsys
    )
    assert code == 0, err
    assert all(p["label"] in ("ham", "spam") for p in predictions(out))


def test_the_serving_options_can_come_from_a_config_file(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    options = tmp_path / "serve.yaml"
    adapters = {"sentiment": str(served["sentiment"]), "spam": str(served["spam"])}
    options.write_text(yaml.safe_dump({"adapters": adapters, "adapter": "spam", "adapter_column": "adapter"}))
    code, out, err = run(["predict", "--config", str(served["config"]), "--config", str(options)], capsys)
    assert code == 0, err
    assert [p["adapter"] for p in predictions(out)] == ["sentiment", "spam", "__base__", "spam", "sentiment"]
    options.write_text(yaml.safe_dump({"adapters": {"a.b": str(served["spam"])}}))
    code, _, err = run(["predict", "--config", str(served["config"]), "--config", str(options)], capsys)
    assert code == 2 and f"where: adapters, set in {options}" in err


def test_a_wider_head_serves_beside_narrower_labels(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``num_labels`` above the label count: one head width for tasks of 2 and 3 classes."""
    saved = torch.load(served["wide"], weights_only=True)
    assert saved["hyper_parameters"]["num_labels"] == 3 and saved["hyper_parameters"]["labels"] == ["ham", "spam"]
    config = ["--config", str(served["config"]), "--model.num_labels", "3"]
    both = ["--adapters", adapters_flag(served, "three", "wide")]
    predict = Path("predict.csv")
    hub.write_csv(predict, [{"text": t, "adapter": "wide" if i % 2 else "three"} for i, t in enumerate(TEXTS)])
    code, out, err = run(
        ["predict", *config, *both, "--data.predict_file", str(predict), "--adapter_column", "adapter"], capsys
    )
    assert code == 0, err
    rows = predictions(out)
    assert all(p["label"] in (("ham", "spam") if p["adapter"] == "wide" else ("meh", "neg", "pos")) for p in rows)


def test_num_labels_below_the_label_count_is_refused(hub_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"SequenceClassification.num_labels must be None or an integer of at least 3; got 2"
    ):
        SequenceClassification(str(hub.save_model(hub_dir, "bert")), labels=["a", "b", "c"], num_labels=2)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "message", "where"),
    [
        (['{"a": "missing.ckpt"}'], "--adapters a='missing.ckpt': no adapter folder or checkpoint file", "adapters"),
        (
            ['{"a.b": "{sentiment}"}'],
            "--adapters 'a.b': the name must be a non-empty string without '.', '/'",
            "adapters",
        ),
        (
            ['{"__base__": "{sentiment}"}'],
            "other than '__base__' (which mixed_batch reads as the bare base model); got '__base__'",
            "adapters",
        ),
        (["{}"], "--adapters names no adapter", "adapters"),
        (['{"a": "{sentiment}"}', "--adapter", "b"], "--adapter 'b' is not one of the --adapters ('a')", "adapter"),
        (
            ['{"a": "{sentiment}"}', "--ckpt_path", "{sentiment}"],
            "--ckpt_path {sentiment} and --adapters both",
            "ckpt_path",
        ),
        (['{"a": "{three}"}'], "adapter 'a' ({three}) was trained with a head of 3 outputs", "adapters"),
        (['{"a": "{sentiment}"}', "--adapter_column", "missing"], "has no column 'missing'", "adapter_column"),
        (
            ['{"a": "{sentiment}"}', "--adapter_column", "adapter"],
            "names the adapter 'sentiment' in column",
            "adapter_column",
        ),
    ],
    ids=[
        "missing-file",
        "bad-name",
        "base-name",
        "empty",
        "unknown-active",
        "ckpt-path",
        "head-width",
        "no-column",
        "unknown-row",
    ],
)
def test_bad_adapter_options_are_one_message(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str, where: str | None
) -> None:
    def filled(text: str) -> str:
        for key, value in served.items():
            text = text.replace(f"{{{key}}}", str(value))
        return text

    args = ["predict", "--config", str(served["config"]), "--adapters", *map(filled, extra)]
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    assert filled(message) in err and "Traceback" not in err
    if where is not None:
        assert f"where: {where}, set by --{where}" in err


def test_serving_flags_without_adapters_and_a_file_that_is_no_adapter(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = ["--config", str(served["config"])]
    code, _, err = run(["predict", *config, "--adapter", "spam"], capsys)
    assert code == 2 and "--adapter spam picks among --adapters, which is not given" in err
    code, _, err = run(["predict", *config, "--adapter_column", "adapter"], capsys)
    assert code == 2 and "--adapter_column adapter picks among --adapters" in err
    code, _, err = run(
        ["validate", *config, "--adapters", adapters_flag(served, "spam"), "--adapter_column", "x"], capsys
    )
    assert code == 2 and "adapter_column" in err  # predict only
    code, _, err = run(["fit", *config, "--adapters", adapters_flag(served, "spam")], capsys)
    assert code == 2 and "adapters" in err  # validate and predict only
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, other)
    code, _, err = run(["predict", *config, "--adapters", json.dumps({"x": str(other)})], capsys)
    assert code == 2 and "holds no lightning_peft adapter" in err


def test_validate_refuses_an_active_adapter_trained_on_other_labels(
    served: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["validate", "--config", str(served["config"]), "--adapters", adapters_flag(served, "sentiment", "spam")]
    code, _, err = run([*args, "--adapter", "spam"], capsys)
    assert code == 2 and "validate scores adapter 'spam' on this config's data, whose labels are ['neg', 'pos']" in err
    assert "where: adapter, set by --adapter spam" in err


# --------------------------------------------------------------------------- every task module's predict_step


def _two_adapters(module: TaskModule) -> None:
    module.configure_model()
    for seed, name in enumerate(("a", "b")):
        lp.inject(module, "lora", adapter_name=name, r=4)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, tensor in state.adapter_state(module, name):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
    module.eval()


@pytest.mark.parametrize(
    ("task", "arch"), [("causal", "llama"), ("choice", "llama"), ("choice", "t5"), ("seq2seq", "t5")]
)
def test_each_task_module_predicts_each_row_through_its_adapter(
    hub_dir: Path, tmp_path: Path, task: str, arch: str
) -> None:
    """The datamodule carries the column into the batch; predict_step equals one run per adapter."""
    folder = str(hub.save_model(hub_dir, arch))
    names = ["a", "b", "__base__", "b", "a"]
    if task == "choice":
        rows = [{**r, "adapter": n} for r, n in zip(hub.choice_rows(repeat=1), names, strict=False)]
        dm: TextDataModule = MultipleChoiceData(predict_file=str(hub.write_jsonl(tmp_path / "p.jsonl", rows)))
        module: TaskModule = MultipleChoiceLM(folder)
    else:
        rows = [{"prompt": q, "source": q, "adapter": n} for (q, _), n in zip(hub.QUESTIONS, names, strict=False)]
        predict = str(hub.write_jsonl(tmp_path / "p.jsonl", rows))
        dm = CausalLMData(predict_file=predict) if task == "causal" else Seq2SeqData(predict_file=predict)
        module = (CausalLM if task == "causal" else Seq2SeqLM)(folder, max_new_tokens=4)
    dm.tokenizer_source, dm.adapter_column = module.source, "adapter"
    if task == "choice":
        dm.encoder_decoder = arch == "t5"
    _two_adapters(module)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["adapter"] == names
    plain = {k: v for k, v in batch.items() if k != "adapter"}
    with torch.no_grad():
        mixed = module.predict_step(batch, 0)
        with lp.disable_adapter(module):
            base = module.predict_step(plain, 0)
        alone = {"__base__": base}
        for name in ("a", "b"):
            lp.set_adapter(module, name)
            alone[name] = module.predict_step(plain, 0)
    assert [p["adapter"] for p in mixed] == names
    for row, (one, name) in enumerate(zip(mixed, names, strict=True)):
        assert same(one, alone[name][row]), (row, one, alone[name][row])
    assert any(not same(alone[name][row], base[row]) for row, name in enumerate(names) if name != "__base__")


def same(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Equal predictions, scores up to rounding (the mixed batch sums in another order)."""
    one = {k: v for k, v in one.items() if k != "adapter"}
    if one.keys() != other.keys():
        return False
    return all(
        one[k] == pytest.approx(other[k], abs=2e-4) if k in ("score", "scores") else one[k] == other[k] for k in one
    )
