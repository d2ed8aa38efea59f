"""PEFT under multi-process strategies, on CPU with 2 gloo ranks: DDP for every registered method,
FSDP1 and FSDP2 (sharded), DeepSpeed ZeRO-2/3 where installed; CUDA variants are marked ``gpu``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback, registry
from tests import tiny
from tests.lightning.distributed import (
    RankProbe,
    SaveProbe,
    facts,
    forked,
    fsdp1_full_state_dict,
    load_ranks,
)
from tests.lightning.modules import TinyLM, token_loader
from tests.methods.cases import CASES


def _fit(
    root: Path,
    strategy: Any,
    method: str = "lora",
    epochs: int = 1,
    ckpt_path: Path | None = None,
    module: L.LightningModule | None = None,
    callbacks: tuple = (),
) -> L.LightningModule:
    L.seed_everything(0)
    module = module or TinyLM()
    root.mkdir(parents=True, exist_ok=True)
    options = CASES[method].options("llama") | {"verbose": False}
    t = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            PEFTCallback(method, **options),
            ModelCheckpoint(dirpath=root, save_last=True),
            RankProbe(root),
            *callbacks,
        ],
    )
    t.fit(module, token_loader(n=16, batch_size=4), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("method", registry.methods())
def test_ddp_two_cpu_ranks(tmp_path: Path, method: str) -> None:
    """fit, adapter-only checkpoint, resume == straight run, identical ranks, only the adapter synced."""
    straight = tmp_path / "straight"
    _fit(straight, "ddp_fork", method, epochs=2)
    first = tmp_path / "first"
    _fit(first, "ddp_fork", method, epochs=1)
    resumed = tmp_path / "resumed"
    _fit(resumed, "ddp_fork", method, epochs=2, ckpt_path=first / "last.ckpt")

    rank0, rank1 = load_ranks(straight)
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    for name, tensor in load_ranks(resumed)[0].items():
        assert torch.equal(tensor, rank0[name]), f"resumed {name} differs from the uninterrupted run"

    for fact in facts(straight):
        assert fact["world_size"] == 2
        assert fact["frozen_grads"] == []
        assert fact["ddp_find_unused_parameters"] is False
        assert fact["ddp_synced_tensors"] == fact["trainable_tensors"]
        assert fact["ddp_synced_bytes"] == fact["trainable_bytes"]

    checkpoint = torch.load(first / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(rank0)
    assert checkpoint["global_step"] == 2  # 16 samples / (2 ranks x 4) per epoch


def _fsdp() -> Any:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_peft.lightning.strategies import PEFTFSDPStrategy

    return forked(PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}))


@pytest.mark.slow
def test_fsdp_two_cpu_ranks(tmp_path: Path) -> None:
    """FSDP1 on gloo: adapter units of their own, trainable-only checkpoint gathered without a frozen
    weight, exact resume, and the same adapter as DDP."""
    straight = tmp_path / "straight"
    _fit(straight, _fsdp(), epochs=2, callbacks=(SaveProbe(straight, stock=fsdp1_full_state_dict),))
    first = tmp_path / "first"
    _fit(first, _fsdp(), epochs=1)
    resumed = tmp_path / "resumed"
    _fit(resumed, _fsdp(), epochs=2, ckpt_path=first / "last.ckpt")
    ddp = tmp_path / "ddp"
    _fit(ddp, "ddp_fork", epochs=2)

    fsdp_adapter, ddp_adapter = load_ranks(straight)[0], load_ranks(ddp)[0]
    assert fsdp_adapter.keys() == ddp_adapter.keys()
    for name, tensor in fsdp_adapter.items():
        torch.testing.assert_close(tensor, ddp_adapter[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in load_ranks(resumed)[0].items():
        assert torch.equal(tensor, fsdp_adapter[name]), f"resumed {name} differs from the uninterrupted run"
    for fact in facts(straight):
        assert fact["fsdp_units"] > 8 and fact["fsdp_mixed_units"] == 0
        assert fact["frozen_grads"] == []

    checkpoint = torch.load(first / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(fsdp_adapter)
    assert {"optimizer_states", "loops", "callbacks"} <= set(checkpoint)
    assert (first / "last.ckpt").stat().st_size < 64 * 1024
    for saved in facts(straight, "save"):
        # The adapter units are the only ones unsharded: nothing gathered is larger than an adapter
        # tensor, and all gathered together is the adapter (plus its optimizer state) and no more.
        assert saved["peft"]["largest"] <= 2 * saved["largest_adapter_numel"]  # one unit: lora_A and lora_B
        assert saved["peft"]["gathered"] <= 3 * saved["trainable_numel"]  # weights, exp_avg, exp_avg_sq
        # Lightning's own FSDP state dict, under the same probe, unshards every frozen unit.
        assert saved["stock"]["largest"] >= 96 * 32 and saved["stock"]["gathered"] > 20 * saved["trainable_numel"]

    bare = lp.load_adapter(tiny.build("llama"), first / "last.ckpt")
    assert lp.get_info(bare).method == "lora"
