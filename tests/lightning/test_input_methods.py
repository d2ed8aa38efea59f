"""The input-side methods in real Trainer runs: the loss falls on each family; resume is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from tests import tiny
from tests.lightning.modules import TinyLM, token_loader, trainer

OPTIONS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"num_virtual_tokens": 4, "init": "vocab"},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix_tuning": {"num_virtual_tokens": 4, "projection": True, "projection_hidden_size": 16},
}
#: One architecture per family, with the task the Trainer runs on it.
FAMILY = {"decoder": ("llama", "lm"), "encoder": ("bert", "classify"), "seq2seq": ("t5", "lm")}


class Task(L.LightningModule):
    """A tiny transformers model and its own loss; records every training loss.

    At the default initializer_range (0.02) a tiny random post-LN encoder all but ignores its
    context, so nothing before the input could move its loss; weights drawn 10x wider stand in for
    a pretrained backbone whose attention matters (T5 scales its own init and keeps it). Dropout is
    off, so the loss moves only by training.
    """

    def __init__(self, arch: str, task: str) -> None:
        super().__init__()
        self.model = tiny.build(arch, task).train()
        self.model.config.initializer_range = 0.2
        torch.manual_seed(0)
        self.model.apply(self.model._init_weights)
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


def batches(family: str) -> DataLoader:
    """One fixed batch of 8 over four tokens: next-token prediction, a label from the first token,
    or copying the first 4 tokens."""
    ids = torch.randint(3, 7, (8, tiny.SEQ), generator=torch.Generator().manual_seed(0))
    labels = {"decoder": ids, "encoder": (ids[:, 0] > 4).long(), "seq2seq": ids[:, :4]}[family]

    def collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        x, y = (torch.stack(t) for t in zip(*rows, strict=True))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}

    return DataLoader(TensorDataset(ids, labels), batch_size=8, collate_fn=collate)


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("method", list(OPTIONS))
def test_loss_decreases(tmp_path: Path, method: str, family: str) -> None:
    arch, task = FAMILY[family]
    module = Task(arch, task)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(tmp_path, max_steps=25, callbacks=[PEFTCallback(method, verbose=False, **OPTIONS[method])]).fit(
        module, batches(family)
    )
    first, last = module.losses[0], sum(module.losses[-3:]) / 3
    assert last < 0.95 * first, f"{method} on {arch}: loss {first:.3f} -> {last:.3f}"
    declared = {n for n, _ in state.adapter_parameters(module)}
    assert declared and all(n.startswith(f"model.{method}.") or ".trained." in n for n in declared)
    for name, param in module.named_parameters():
        if name not in declared:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), f"frozen {name} changed"


def _run(root: Path, method: str, epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = TinyLM()
    callbacks = [
        PEFTCallback(method, verbose=False, **OPTIONS[method], **RESUME_EXTRA[method]),
        ModelCheckpoint(dirpath=root, save_last=True),
    ]
    t = trainer(root, max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=2)
    t.fit(module, token_loader(shuffle=True), token_loader(n=8, shuffle=False), ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in lp.trainable_state_dict(module).items()}


#: Options that make a resumed run depend on restored RNG (dropout in the prompt encoder).
RESUME_EXTRA: dict[str, dict[str, Any]] = {
    "p_tuning": {"encoder": "lstm", "encoder_dropout": 0.2},
    "prefix_tuning": {},
}


@pytest.mark.parametrize("method", list(RESUME_EXTRA))
def test_resume_is_exact(tmp_path: Path, method: str) -> None:
    """fit 2N steps == fit N, stop, resume from the adapter-only checkpoint, fit N more."""
    straight = _run(tmp_path / "straight", method, epochs=2)
    _run(tmp_path / "first", method, epochs=1)
    checkpoint = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    assert all(k.startswith(f"model.{method}.") for k in checkpoint["state_dict"])
    resumed = _run(tmp_path / "second", method, epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_checkpoint_loads_into_the_bare_model_and_generates(tmp_path: Path) -> None:
    module = TinyLM()
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("prefix_tuning", num_virtual_tokens=4, verbose=False)])
    t.fit(module, token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    bare = lp.load_adapter(tiny.build("llama"), tmp_path / "a.ckpt")
    batch = tiny.inputs("llama")
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(bare.generate(**batch, **options), module.model.eval().generate(**batch, **options))
