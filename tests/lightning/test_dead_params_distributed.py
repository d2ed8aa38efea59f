"""PEFTCallback's gradient-flow check on two CPU ranks: DDP and FSDP2 keep a gradient per tensor
(checked), FSDP1 keeps flat ones (skipped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_peft import PEFTCallback
from lightning_peft.lightning.strategies import PEFTFSDP2Strategy, PEFTFSDPStrategy
from tests.lightning.distributed import forked
from tests.lightning.modules import token_loader
from tests.lightning.test_callback import DEAD, TARGETS, UnusedLayer


def _fit(root: Path, strategy: Any, **options: Any) -> L.Trainer:
    t = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False, **options)],
    )
    t.fit(UnusedLayer(), token_loader())
    return t


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dead_tensors_are_refused_on_every_rank(tmp_path: Path, strategy: str) -> None:
    # DDP would itself fail only at the second step ("Expected to have finished reduction"), without names.
    chosen = "ddp_fork" if strategy == "ddp" else forked(PEFTFSDP2Strategy(wrap_modules={LlamaDecoderLayer}))
    with pytest.raises(Exception, match=r"got no gradient in the first optimizer step") as err:
        _fit(tmp_path, chosen)
    assert DEAD in str(err.value)


@pytest.mark.slow
def test_ddp_with_unused_parameters_found_still_names_them(tmp_path: Path) -> None:
    # find_unused_parameters=True lets DDP go on; the tensors still have no gradient on any rank.
    with pytest.raises(Exception, match=r"got no gradient in the first optimizer step"):
        _fit(tmp_path, "ddp_fork_find_unused_parameters_true")


@pytest.mark.slow
def test_fsdp1_skips_the_check(tmp_path: Path) -> None:
    # Flat parameters: a dead tensor's gradient is a slice of its unit's flat gradient, never None.
    # (The debug note is checked without ranks in test_callback.py.)
    t = _fit(tmp_path, forked(PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})))
    assert t.state.finished
