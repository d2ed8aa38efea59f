"""ForgettingProbe: the pure metrics against formulas written out, and the callback in Trainer runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from typing_extensions import override

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core.targeting import find_base_model
from lightning_peft.lightning.forgetting import (
    ForgettingProbe,
    ForgettingStats,
    measure_forgetting,
    next_token_kl,
    next_token_labels,
    next_token_log_probs,
    perplexity,
)
from lightning_peft.tasks import CausalLM, CausalLMData
from tests.lightning.modules import TinyLM, token_loader, trainer
from tests.tasks import hub

# --------------------------------------------------------------------------- pure functions

P = [0.7, 0.2, 0.1]
Q = [0.2, 0.5, 0.3]


def logits_of(*rows: list[float]) -> torch.Tensor:
    """(1, T, V) logits whose softmax at position t is rows[t] (log-probabilities are logits)."""
    return torch.tensor([rows]).log()


def test_perplexity_is_exp_of_the_mean_next_token_nll() -> None:
    # Position t predicts token t + 1: p_0(y_1 = 1) = 0.2, p_1(y_2 = 2) = 0.3; position 2 predicts nothing.
    logits = logits_of(P, Q, [1 / 3] * 3)
    labels = torch.tensor([[0, 1, 2]])
    assert perplexity(logits, labels).item() == pytest.approx(math.exp(-(math.log(0.2) + math.log(0.3)) / 2))


def test_padding_and_minus_100_labels_are_left_out() -> None:
    logits = torch.cat([logits_of(P, Q, Q), logits_of(Q, [0.01, 0.01, 0.98], P)])  # (2, 3, 3)
    ids = torch.tensor([[0, 1, 2], [0, 0, 2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last token is padding
    labels = next_token_labels(ids, mask)
    assert labels.tolist() == [[0, 1, 2], [0, 0, -100]]
    # Scored: row 0 -> 0.2 and 0.3; row 1 -> Q(0) = 0.2 only (its padded target is skipped).
    expected = math.exp(-(math.log(0.2) + math.log(0.3) + math.log(0.2)) / 3)
    assert perplexity(logits, labels).item() == pytest.approx(expected)
    # Labels given by the data (a prompt masked with -100) are used as they are.
    prompt_masked = torch.tensor([[0, -100, 2], [0, 0, -100]])
    assert next_token_labels(ids, mask, prompt_masked) is prompt_masked
    expected = math.exp(-(math.log(0.3) + math.log(0.2)) / 2)
    assert perplexity(logits, prompt_masked).item() == pytest.approx(expected)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q, strict=True) if pv > 0)


def test_kl_is_taken_under_the_first_distribution() -> None:
    labels = torch.tensor([[5, 0, 0]])  # positions 0 and 1 are scored (their next label is not -100)
    one_hot = [1.0, 0.0, 0.0]  # log 0 = -inf logits: 0 log 0 terms count as 0
    logits_p, logits_q = logits_of(P, one_hot, Q), logits_of(Q, Q, P)
    expected = (kl(P, Q) + math.log(1 / 0.2)) / 2
    assert expected == pytest.approx(
        (
            (0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3))
            + (1.0 * math.log(1.0 / 0.2))
        )
        / 2
    )
    assert next_token_kl(logits_p, logits_q, labels).item() == pytest.approx(expected)
    # The other direction differs (KL is not symmetric): KL(Q || P) for the first position alone.
    first_only = torch.tensor([[5, 0, -100]])
    assert next_token_kl(logits_of(Q, Q, Q), logits_of(P, P, P), first_only).item() == pytest.approx(kl(Q, P))
    assert kl(Q, P) != pytest.approx(kl(P, Q), rel=1e-2)
    assert next_token_kl(logits_p, logits_p, labels).item() == 0.0


def test_stats_are_token_weighted_over_batches() -> None:
    # Batch a scores 1 token, batch b scores 3: the mean is over 4 tokens, not over 2 batch means.
    a_adapter, a_base, a_labels = logits_of(P, Q), logits_of(Q, Q), torch.tensor([[0, 0]])
    b_adapter = logits_of(Q, Q, Q, Q)
    b_base = logits_of(P, P, P, P)
    b_labels = torch.tensor([[0, 1, 1, 2]])
    stats = ForgettingStats.from_logits(a_adapter, a_base, a_labels) + ForgettingStats.from_logits(
        b_adapter, b_base, b_labels
    )
    assert stats.tokens == 4
    nll_adapter = -(math.log(0.7) + math.log(0.5) + math.log(0.5) + math.log(0.3))
    nll_base = -(math.log(0.2) + math.log(0.2) + math.log(0.2) + math.log(0.1))
    assert stats.ppl_adapter == pytest.approx(math.exp(nll_adapter / 4))
    assert stats.ppl_base == pytest.approx(math.exp(nll_base / 4))
    assert stats.mean_kl == pytest.approx((kl(P, Q) + 3 * kl(Q, P)) / 4)
    assert stats.metrics("x") == {
        "x/ppl_adapter": stats.ppl_adapter,
        "x/ppl_base": stats.ppl_base,
        "x/kl": stats.mean_kl,
    }


def test_pure_functions_refuse_bad_shapes_and_empty_stats() -> None:
    with pytest.raises(ValueError, match=r"logits must be \(B, T, V\) and labels \(B, T\)"):
        next_token_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no scored tokens"):
        _ = ForgettingStats().ppl_adapter


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"exactly one of texts= .* or datamodule= .*got neither"),
        ({"texts": ["a b"], "datamodule": L.LightningDataModule()}, r"exactly one of texts=.*got both"),
        ({"texts": "one string"}, r"ForgettingProbe.texts must be a sequence of strings \(a list, not one string\)"),
        ({"texts": []}, r"ForgettingProbe.texts must be a non-empty sequence of strings; got \[\]"),
        ({"texts": ["ok", 3]}, r"ForgettingProbe.texts must be a sequence of strings only .*; got 3"),
        ({"texts": 5}, r"ForgettingProbe.texts must be a sequence of strings"),
        ({"datamodule": object()}, r"ForgettingProbe.datamodule must be a LightningDataModule"),
        ({"texts": ["a"], "every_n_epochs": 0}, r"ForgettingProbe.every_n_epochs must be a positive integer; got 0"),
        ({"texts": ["a"], "every_n_epochs": True}, r"every_n_epochs must be a positive integer; got True"),
        ({"texts": ["a"], "every_n_epochs": 1.5}, r"every_n_epochs must be a positive integer; got 1.5"),
        ({"texts": ["a"], "batch_size": 0}, r"ForgettingProbe.batch_size must be a positive integer; got 0"),
        ({"texts": ["a"], "max_length": -1}, r"ForgettingProbe.max_length must be a positive integer; got -1"),
        ({"texts": ["a"], "prefix": ""}, r"ForgettingProbe.prefix must be a non-empty string"),
        ({"texts": ["a"], "probe_at_start": 1}, r"ForgettingProbe.probe_at_start must be True or False; got 1"),
        ({"texts": ["a"], "cache_base": "yes"}, r"ForgettingProbe.cache_base must be True or False; got 'yes'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ForgettingProbe(**kwargs)


# --------------------------------------------------------------------------- in a Trainer


class Recorder(Logger):
    """Keeps every (step, metrics) that reaches a logger."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    @override
    def name(self) -> str:
        return "recorder"

    @property
    @override
    def version(self) -> int:
        return 0

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def values(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


#: General text held out from the question/answer training data (sentences over the test vocabulary).
GENERAL = [r["text"] for r in hub.classification_rows(12, seed=3)]


def qa_data(tmp_path: Path) -> CausalLMData:
    rows: list[dict[str, object]] = [{**r} for r in hub.qa_rows(repeat=2)]
    return CausalLMData(train_file=str(hub.write_jsonl(tmp_path / "qa.jsonl", rows)), batch_size=4, val_split=0)


def test_probe_logs_zero_drift_at_init_and_drift_after_training(hub_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = CausalLM(str(hub.save_model(hub_dir, "llama")), learning_rate=5e-2, schedule="constant")
    probe = ForgettingProbe(texts=GENERAL, batch_size=5, every_n_epochs=1)
    logger = Recorder()
    t = trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[PEFTCallback("lora", r=4, verbose=False), probe])
    t.fit(module, qa_data(tmp_path))

    assert [(h["step"], h["epoch"]) for h in probe.history] == [(0, 0), (3, 0), (6, 1)]  # start, epoch 1, epoch 2
    start, *after = probe.history
    # LoRA's B = 0 at init: the adapted model is the base, exactly.
    assert start["kl"] == 0.0 and start["ppl_adapter"] == start["ppl_base"]
    # Training at a high learning rate on other text moves the held-out predictions away from the base.
    assert 0 < after[0]["kl"] < after[1]["kl"]
    assert all(h["ppl_base"] == start["ppl_base"] for h in after)  # the base never changes (and is cached)
    assert after[1]["ppl_adapter"] != start["ppl_adapter"]

    # Every probe reached the logger, the baseline at step 0; the last one is in callback_metrics too.
    assert [s for s, _ in logger.values("forgetting/kl")] == [0, 2, 5]  # Lightning logs epoch ends at step - 1
    assert [v for _, v in logger.values("forgetting/kl")] == pytest.approx([h["kl"] for h in probe.history])
    assert {"forgetting/ppl_adapter", "forgetting/ppl_base", "forgetting/kl"} <= set(t.callback_metrics)
    assert t.callback_metrics["forgetting/kl"].item() == pytest.approx(after[1]["kl"])

    # The logged numbers are what a computation by hand gives: adapter on, then disabled.
    assert module.training  # modes were restored after each probe
    tok = module.tokenizer
    _, model = find_base_model(module)
    nll = {"adapter": 0.0, "base": 0.0}
    kl_total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for text in GENERAL:
            ids = torch.tensor([tok(text)["input_ids"]])
            with_adapter = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            with lp.disable_adapter(module):
                base = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            targets = ids[0, 1:]
            nll["adapter"] -= with_adapter.gather(-1, targets[:, None]).sum().item()
            nll["base"] -= base.gather(-1, targets[:, None]).sum().item()
            kl_total += (with_adapter.exp() * (with_adapter - base)).sum().item()
            count += len(targets)
    assert after[1]["ppl_adapter"] == pytest.approx(math.exp(nll["adapter"] / count), rel=1e-5)
    assert after[1]["ppl_base"] == pytest.approx(math.exp(nll["base"] / count), rel=1e-5)
    assert after[1]["kl"] == pytest.approx(kl_total / count, rel=1e-4, abs=1e-7)


def test_every_n_epochs_a_datamodule_and_no_base_cache(hub_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = CausalLM(str(hub.save_model(hub_dir, "llama")), learning_rate=5e-2)
    rows: list[dict[str, object]] = [{"text": text} for text in GENERAL]
    held_out = hub.write_jsonl(tmp_path / "general.jsonl", rows)
    # A task datamodule over plain text: its tokenizer is borrowed from the task module through the trainer.
    probe_data = CausalLMData(validation_file=str(held_out), text_column="text", batch_size=4)
    probe = ForgettingProbe(datamodule=probe_data, every_n_epochs=2, cache_base=False, prefix="general")
    t = trainer(tmp_path, max_epochs=3, callbacks=[PEFTCallback("lora", r=4, verbose=False), probe])
    t.fit(module, qa_data(tmp_path))
    assert [h["epoch"] for h in probe.history] == [0, 1]  # at start, and after the 2nd of 3 epochs
    assert probe.history[0]["kl"] == 0.0 and probe.history[1]["kl"] > 0
    assert probe.history[1]["ppl_base"] == pytest.approx(probe.history[0]["ppl_base"], rel=1e-6)
    assert "general/kl" in t.callback_metrics and probe.state_key == "ForgettingProbe{'prefix': 'general'}"
    assert probe.state_dict() == {"history": probe.history}


class Killed(Exception):
    pass


class KillAt(L.Callback):
    """Dies at the start of a step, as a preempted job would (after the checkpoint of that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @override
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Killed


def test_resumed_run_continues_the_history_exactly(hub_dir: Path, tmp_path: Path) -> None:
    folder = str(hub.save_model(hub_dir, "llama"))  # before seeding: a first save draws random weights

    def run(root: Path, *extra: L.Callback, ckpt: Path | None = None) -> ForgettingProbe:
        L.seed_everything(0)
        root.mkdir()
        module = CausalLM(folder, learning_rate=5e-2, schedule="constant")
        probe = ForgettingProbe(texts=GENERAL, batch_size=5)
        t = trainer(root, max_epochs=2, callbacks=[PEFTCallback("lora", r=4, verbose=False), probe, *extra])
        t.fit(module, qa_data(root), ckpt_path=ckpt)
        return probe

    whole = run(tmp_path / "whole").history
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(Killed):  # mid-epoch 2, after the probes of steps 0 and 3
        run(tmp_path / "killed", checkpoints, KillAt(4))
    (ckpt,) = (tmp_path / "ckpt").glob("*step=4.ckpt")
    resumed = run(tmp_path / "resumed", ckpt=ckpt)
    # The history came back from the checkpoint, the baseline is not taken again, and the numbers match.
    assert [h["step"] for h in resumed.history] == [0, 3, 6]
    assert resumed.history == [pytest.approx(h, rel=1e-5, abs=1e-8) for h in whole]


def test_measure_forgetting_without_a_trainer() -> None:
    module = TinyLM()
    lp.inject(module, "lora", r=4)
    (ids,) = next(iter(token_loader(shuffle=False)))
    before = measure_forgetting(module, [ids])  # a plain (B, T) id tensor is a batch
    assert before.mean_kl == 0.0 and before.tokens == ids.numel() - ids.shape[0]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.5)
    assert module.training  # modes restored
    after = measure_forgetting(module, [{"input_ids": ids}])
    assert after.mean_kl > 0 and after.ppl_base == pytest.approx(before.ppl_base)


def test_probe_needs_an_adapter_and_a_tokenizer(hub_dir: Path, tmp_path: Path) -> None:
    module = CausalLM(str(hub.save_model(hub_dir, "llama")))
    with pytest.raises(ValueError, match=r"CausalLM has no lightning_peft adapter.*add a PEFTCallback"):
        trainer(tmp_path, max_steps=1, callbacks=[ForgettingProbe(texts=GENERAL)]).fit(module, qa_data(tmp_path))
    no_tokenizer = ForgettingProbe(texts=GENERAL)
    with pytest.raises(
        ValueError, match=r"ForgettingProbe\(texts=...\) needs a tokenizer: pass tokenizer=, or give TinyLM"
    ):
        trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", verbose=False), no_tokenizer]).fit(
            TinyLM(), token_loader()
        )
    one_token = ForgettingProbe(texts=["good", "bad"], tokenizer=hub.tokenizer(), max_length=1)
    with pytest.raises(ValueError, match=r"ForgettingProbe: the held-out data has no token to score"):
        trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", verbose=False), one_token]).fit(
            CausalLM(str(hub.save_model(hub_dir, "llama"))), qa_data(tmp_path)
        )
