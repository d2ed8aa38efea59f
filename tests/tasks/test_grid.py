"""Every registered method x every task module, in a real Trainer: fit, validate, predict.

The methods come from the registry and the task modules from ``lightning_peft.tasks.__all__``, so
a new one joins the grid by itself; a task module needs a :class:`TaskCase` here (a tiny model and
data), and ``test_every_task_module_has_a_case`` fails until it has one. Each task runs on the tiny
models of :mod:`tests.tasks.hub` it lists, one per architecture family it supports, with and
without bias terms. A method whose case (``tests/methods/cases.py``) leaves out an architecture
cannot work there by design; that cell asserts the method's refusal, from :data:`REFUSALS`.

The image and audio tasks run on architectures outside those cases (ViT, ResNet, a plain CNN;
Whisper, wav2vec2, AST): their :class:`TaskCase` gives each method's options there (targets where
the method has no default, the new head in ``modules_to_save``) and the cells where a method
cannot apply, with the message it refuses with. Input-side methods (registry kind ``"input"``)
are refused on all of them: there are no token embeddings to put virtual tokens before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lightning_peft as lp
import lightning_peft.tasks as tasks
from lightning_peft import PEFTCallback, registry
from lightning_peft.tasks.base import TaskModule
from lightning_peft.tasks.data import TextDataModule
from tests.lightning.modules import trainer
from tests.methods.cases import CASES, Case
from tests.tasks import hub, media_hub

Record = dict[str, Any]
Prediction = dict[str, Any]

#: Every public task module, by name.
TASKS: dict[str, type[TaskModule]] = {
    name: cls
    for name in tasks.__all__
    if isinstance(cls := getattr(tasks, name), type) and issubclass(cls, TaskModule) and cls is not TaskModule
}


@dataclass(frozen=True)
class TaskCase:
    """How the grid runs one task module.

    Args:
        archs: the tiny models (``hub.save_model`` names) the task runs on.
        build: ``(model folder, data folder) -> (task module, datamodule)``.
        metrics: the validation metrics it must log (every logged one must be finite).
        check_prediction: asserts one prediction is of the expected form, given its record.
        check_metrics: further checks of the validation metrics (over a single batch).
        options: ``(method, arch) -> PEFT options`` for architectures outside ``tests/methods/cases.py``
            (``None``: the method's case options, and its case's archs decide support).
        refusals: with ``options``, ``{(method, arch): (error, message regex)}`` for the cells where the
            method cannot apply.
    """

    archs: tuple[str, ...]
    build: Callable[[Path, Path], tuple[TaskModule, Any]]
    metrics: frozenset[str]
    check_prediction: Callable[[Prediction, Record], None]
    check_metrics: Callable[[dict[str, float]], None] = field(default=lambda metrics: None)
    options: Callable[[str, str], dict[str, Any]] | None = None
    refusals: dict[tuple[str, str], tuple[type[Exception], str]] = field(default_factory=dict)


def _classification(model: Path, data: Path) -> tuple[TaskModule, TextDataModule]:
    train = hub.write_csv(data / "classes.csv", hub.classification_rows(12))
    return tasks.SequenceClassification(str(model)), tasks.TextClassificationData(
        train_file=str(train), batch_size=4, val_split=0.25
    )


def _check_class(prediction: Prediction, record: Record) -> None:
    assert prediction["text"] == record["text"]
    assert prediction["label"] in ("neg", "pos") and 0.5 <= prediction["score"] <= 1


def _causal_lm(model: Path, data: Path) -> tuple[TaskModule, TextDataModule]:
    train = hub.write_jsonl(data / "qa.jsonl", hub.qa_rows(repeat=2))
    return tasks.CausalLM(str(model), max_new_tokens=2), tasks.CausalLMData(
        train_file=str(train), batch_size=4, val_split=0.25
    )


def _seq2seq_lm(model: Path, data: Path) -> tuple[TaskModule, TextDataModule]:
    rows = [{"source": r["prompt"], "target": r["response"]} for r in hub.qa_rows(repeat=2)]
    train = hub.write_jsonl(data / "pairs.jsonl", rows)
    return tasks.Seq2SeqLM(str(model), max_new_tokens=2), tasks.Seq2SeqData(
        train_file=str(train), batch_size=4, val_split=0.25
    )


def _check_response(column: str) -> Callable[[Prediction, Record], None]:
    def check(prediction: Prediction, record: Record) -> None:
        assert prediction["prompt"] == record[column] and isinstance(prediction["response"], str)

    return check


def _perplexity_is_exp_loss(metrics: dict[str, float]) -> None:
    # Over one batch both average the same tokens' NLL: scoring the wrong positions (e.g. the
    # virtual tokens of prompt tuning) would break the equality.
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)


def _multiple_choice(model: Path, data: Path) -> tuple[TaskModule, TextDataModule]:
    train = hub.write_jsonl(data / "choices.jsonl", hub.choice_rows(repeat=2))
    return tasks.MultipleChoiceLM(str(model)), tasks.MultipleChoiceData(
        train_file=str(train), batch_size=4, val_split=0.25
    )


def _check_choice(prediction: Prediction, record: Record) -> None:
    assert prediction["prompt"] == record["prompt"]
    scores = prediction["scores"]
    assert len(scores) == len(record["choices"]) and all(math.isfinite(s) and s <= 0 for s in scores)
    assert prediction["answer"] == record["choices"][prediction["answer_index"]]
    assert prediction["answer_index"] == max(range(len(scores)), key=scores.__getitem__)


def _between(value: float, low: float, high: float) -> None:
    assert low <= value <= high


def _image(model: Path, data: Path) -> tuple[TaskModule, Any]:
    images = media_hub.write_image_folder(data / "images", per_class=6)
    name = "class:tests.tasks.media_hub.TinyCNN" if model.name == "cnn" else str(model)
    return tasks.ImageClassification(name), tasks.ImageClassificationData(
        train=str(images), batch_size=4, val_split=0.25
    )


def _audio(model: Path, data: Path) -> tuple[TaskModule, Any]:
    clips = media_hub.write_audio_folder(data / "clips", per_class=6)
    data_module = tasks.AudioClassificationData(train=str(clips), batch_size=4, val_split=0.25)
    return tasks.AudioClassification(str(model)), data_module


def _check_media(item: str, classes: tuple[str, ...]) -> Callable[[Prediction, Record], None]:
    def check(prediction: Prediction, record: Record) -> None:
        assert prediction[item] == record["source"] and prediction["label"] in classes
        assert 1 / len(classes) <= prediction["score"] <= 1

    return check


_QV = {"target_modules": ["q_proj", "v_proj"]}
_CONVS = {"target_modules": r".*layer\.\d+\.convolution"}  # ResNet's Conv2d layers (LoRA wraps convs)
#: Options beyond the method's case where its defaults do not reach an architecture: {method: {arch: options}}.
_MEDIA_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {"resnet": _CONVS, "cnn": {"target_modules": ["conv1", "conv2", "fc"]}, "wav2vec2": _QV, "ast": _QV},
    "adalora": {
        "vit": _QV,
        "whisper": _QV,
        "wav2vec2": _QV,
        "ast": _QV,
        "cnn": {"target_modules": ["fc"]},
        "resnet": _CONVS,
    },
    "ia3": {
        "cnn": {"target_modules": ["fc"], "feedforward_modules": ["fc"]},
        "resnet": {**_CONVS, "feedforward_modules": []},
        "wav2vec2": {"target_modules": ["k_proj", "v_proj", "output_dense"], "feedforward_modules": ["output_dense"]},
        "ast": {"target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
    },
    "bottleneck": {
        "cnn": {"target_modules": ["fc"]},
        "resnet": _CONVS,
        "wav2vec2": {"target_modules": ["output_dense"]},
        "ast": {"target_modules": ["fc2"]},
    },
}
#: The new head modules a task model adds on its backbone, trained in full beside every layer adapter.
_HEADS = {"whisper": ["projector", "classifier"], "wav2vec2": ["projector", "classifier"]}
_CONV_ONLY = r"it is a Conv2d.*which {} cannot wrap"


def _media_options(method: str, arch: str) -> dict[str, Any]:
    options = {**_case(method).options(arch), **_MEDIA_OPTIONS.get(method, {}).get(arch, {})}
    if registry.get(method).kind == "layer":
        options["modules_to_save"] = _HEADS.get(arch, ["classifier"])
    return options


def _media_refusals(
    archs: tuple[str, ...], extra: dict[tuple[str, str], tuple[type[Exception], str]]
) -> dict[tuple[str, str], tuple[type[Exception], str]]:
    """Input-side methods and trainable tokens on every arch (no token embeddings), and ``extra``."""
    embeddings = "{} needs a transformers model with token input embeddings"
    refusals = {
        (m.name, arch): (ValueError, embeddings.format(m.name))
        for m in registry.all_methods()
        if m.kind == "input" or m.name == "trainable_tokens"  # the rows it trains are token embeddings
        for arch in archs
    }
    return {**refusals, **extra}


TASK_CASES: dict[str, TaskCase] = {
    "SequenceClassification": TaskCase(
        archs=("bert", "llama"),  # an encoder's pooler and a decoder's last-token score head
        build=_classification,
        metrics=frozenset({"val_loss", "val_accuracy", "val_f1", "val_precision", "val_recall"}),
        check_prediction=_check_class,
    ),
    "CausalLM": TaskCase(
        archs=("llama", "gpt2"),
        build=_causal_lm,
        metrics=frozenset({"val_loss", "val_perplexity"}),
        check_prediction=_check_response("prompt"),
        check_metrics=_perplexity_is_exp_loss,
    ),
    "Seq2SeqLM": TaskCase(
        archs=("t5", "bart"),
        build=_seq2seq_lm,
        metrics=frozenset({"val_loss", "val_perplexity"}),
        check_prediction=_check_response("source"),
        check_metrics=_perplexity_is_exp_loss,
    ),
    "MultipleChoiceLM": TaskCase(
        archs=("llama", "t5", "bart"),  # decoder-only and encoder-decoder scoring
        build=_multiple_choice,
        metrics=frozenset({"val_loss", "val_accuracy"}),
        check_prediction=_check_choice,
        check_metrics=lambda metrics: _between(metrics["val_accuracy"], 0, 1),
    ),
    "ImageClassification": TaskCase(
        archs=("vit", "resnet", "cnn"),  # Linear layers, Conv2d layers, a plain torch CNN (class: path)
        build=_image,
        metrics=frozenset({"val_loss", "val_accuracy", "val_f1", "val_precision", "val_recall"}),
        check_prediction=_check_media("image", media_hub.IMAGE_CLASSES),
        options=_media_options,
        refusals=_media_refusals(
            ("vit", "resnet", "cnn"),
            {
                ("bottleneck", "resnet"): (TypeError, _CONV_ONLY.format("bottleneck")),  # adalora wraps Conv2d
                ("topk", "resnet"): (ValueError, r"TopKConfig.target_modules='all-linear' matched no module"),
                ("last_k", "cnn"): (ValueError, r"last_k found no list of repeated blocks in ImageClassification"),
            },
        ),
    ),
    "AudioClassification": TaskCase(
        archs=("whisper", "wav2vec2", "ast"),
        build=_audio,
        metrics=frozenset({"val_loss", "val_accuracy", "val_f1", "val_precision", "val_recall"}),
        check_prediction=_check_media("audio", tuple(media_hub.TONES)),
        options=_media_options,
        refusals=_media_refusals(
            ("whisper", "wav2vec2", "ast"),
            # wav2vec2's positional conv is weight-normed (a parametrized module): BitFit cannot wrap its bias.
            {("bitfit", "wav2vec2"): (TypeError, r"bitfit wraps the modules that hold bias terms, but .*pos_conv")},
        ),
    ),
}

#: What a method says when it is given an architecture its case leaves out, ``{task}`` being the
#: task module's class name (the callback injects into the whole LightningModule).
REFUSALS: dict[str, tuple[type[Exception], str]] = {
    "bitfit": (ValueError, r"bitfit found no bias term to train in {task}: this architecture has no biases"),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny models: each op is microseconds of math, and on shared cores a second intra-op thread
    # mostly waits for the first (a 41-step fit: 75 s with two threads on busy cores, 10 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(method: str) -> Case:
    return CASES.get(method, Case())  # a method without a case takes its defaults (test_common fails it)


GRID = [
    pytest.param(method, task, arch, id=f"{method}-{task}-{arch}")
    for method in registry.methods()
    for task in TASKS
    if task in TASK_CASES
    for arch in TASK_CASES[task].archs
]


def test_every_task_module_has_a_case() -> None:
    missing = sorted(set(TASKS) - set(TASK_CASES))
    assert not missing, f"task modules without a TaskCase in tests/tasks/test_grid.py: {missing}"
    assert set(TASK_CASES) <= set(TASKS), "a TaskCase for a task module that lightning_peft.tasks does not export"


def _trainer(root: Path, method: str, arch: str, case: TaskCase) -> L.Trainer:
    options = case.options(method, arch) if case.options is not None else _case(method).options(arch)
    callback = PEFTCallback(method, verbose=False, **options)
    return trainer(
        root, callbacks=[callback], limit_train_batches=2, limit_val_batches=1, max_epochs=1, enable_checkpointing=False
    )


def _save_model(root: Path, arch: str) -> Path:
    if arch == "cnn":  # a class: path, built by the task module; the folder only names it
        return root / "cnn"
    if arch in ("vit", "resnet"):
        return media_hub.save_vision_model(root, arch)
    if arch in ("whisper", "wav2vec2", "ast"):
        return media_hub.save_audio_model(root, arch)
    return hub.save_model(root, arch)


@pytest.mark.parametrize(("method", "task", "arch"), GRID)
def test_fit_validate_predict(method: str, task: str, arch: str, hub_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    case = TASK_CASES[task]
    module, data = case.build(_save_model(hub_dir, arch), tmp_path)
    run = _trainer(tmp_path, method, arch, case)
    refusal = case.refusals.get((method, arch)) if case.options is not None else None
    if case.options is None and arch not in _case(method).archs:
        assert method in REFUSALS, (
            f"{method} does not support {arch} (tests/methods/cases.py): add its message to REFUSALS"
        )
        refusal = REFUSALS[method]
    if refusal is not None:
        error, message = refusal
        with pytest.raises(error, match=message.format(task=task)):
            run.fit(module, data)
        return

    run.fit(module, data)  # with the sanity check: one validation batch before training
    assert run.global_step == 2 and lp.get_info(module).method == method

    metrics = run.validate(module, data, verbose=False)[0]
    assert case.metrics <= set(metrics), f"missing validation metrics: {sorted(case.metrics - set(metrics))}"
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    case.check_metrics(metrics)

    predictions = [p for batch in run.predict(module, data) for p in batch]
    records = data.records["predict"]
    assert len(predictions) == len(records)
    for prediction, record in zip(predictions, records, strict=True):
        case.check_prediction(prediction, record)
