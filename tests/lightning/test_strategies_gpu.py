"""The PEFT strategies on a CUDA device (skipped without one; one GPU runs each with devices=1).

These were written without a GPU at hand and have not run yet; the same code paths run on CPU
with 2 gloo ranks in ``test_strategies.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.lightning import strategies
from tests import optional, tiny
from tests.lightning.distributed import RankProbe, load_ranks
from tests.lightning.modules import TinyLM, token_loader

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


class SaveMemory(Callback):
    """Peak CUDA memory while saving a checkpoint, above what was allocated just before."""

    def __init__(self) -> None:
        self.extra = -1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.save_checkpoint(Path(trainer.default_root_dir) / "probed.ckpt")
        self.extra = torch.cuda.max_memory_allocated() - before


def _fit(root: Path, strategy: Any, epochs: int, ckpt_path: Path | None = None, callbacks: tuple = ()) -> None:
    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=root,
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            PEFTCallback("lora", r=4, verbose=False),
            ModelCheckpoint(dirpath=root, save_last=True),
            RankProbe(root),
            *callbacks,
        ],
    )
    t.fit(TinyLM(), token_loader(), ckpt_path=ckpt_path)


def _strategies() -> list[Any]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [
        pytest.param(lambda: strategies.PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}), id="peft_fsdp"),
        pytest.param(lambda: strategies.PEFTFSDP2Strategy(wrap_modules={LlamaDecoderLayer}), id="peft_fsdp2"),
        pytest.param(lambda: "peft_fsdp2_full", id="peft_fsdp2_full"),
        pytest.param(lambda: "peft_deepspeed_stage_2", id="peft_deepspeed_stage_2"),
        pytest.param(lambda: "peft_deepspeed_stage_3", id="peft_deepspeed_stage_3"),
    ]


@pytest.mark.parametrize("make", _strategies())
def test_fit_save_resume_on_cuda(tmp_path: Path, make: Any) -> None:
    if "deepspeed" in str(make()):
        optional.importorskip("deepspeed")
    memory = SaveMemory()
    _fit(tmp_path / "straight", make(), epochs=2, callbacks=(memory,))
    _fit(tmp_path / "first", make(), epochs=1)
    _fit(tmp_path / "resumed", make(), epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    straight = load_ranks(tmp_path / "straight", world_size=1)[0]
    for name, tensor in load_ranks(tmp_path / "resumed", world_size=1)[0].items():
        assert torch.equal(tensor, straight[name]), name
    # Saving allocates at most a copy of the adapter and its optimizer state, never the frozen model.
    frozen_bytes = sum(p.numel() * p.element_size() for p in tiny.build("llama").parameters())
    assert 0 <= memory.extra < frozen_bytes // 2
    checkpoint = tmp_path / "first" / "last.ckpt"
    if (checkpoint / "adapter_config.json").is_file() or checkpoint.is_file():
        bare = lp.load_adapter(tiny.build("llama"), checkpoint)
        assert lp.get_info(bare).method == "lora"
