"""The PEFT strategies' own ``load_checkpoint`` refuses a checkpoint that does not fit (not a Lightning
checkpoint, no record, another shape, non-finite values) before it writes anything into the model.

One process: the checks run before any collective, and FSDP2's code paths work on an unsharded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.core.files import FileContentError
from lightning_peft.lightning import strategies
from tests.lightning.modules import TinyLM
from tests.peft_reference import randomize_adapter


def _attached(strategy: Any) -> tuple[Any, L.LightningModule]:
    module = lp.inject(TinyLM(), "lora", r=4)
    strategy.connect(module)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return strategy, module


def _adapter(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.adapter_state(module)}


def _assert_unchanged(module: L.LightningModule, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.adapter_state(module):
        assert torch.equal(tensor, before[name]), f"{name} changed"


def _checkpoint(path: Path, change: Any = None) -> Path:
    source = lp.inject(TinyLM(), "lora", r=4)
    randomize_adapter(source)
    sd = lp.trainable_state_dict(source)
    sd = type(sd)((k, v.clone()) for k, v in sd.items()) if change is None else change(sd)
    sd._metadata = lp.trainable_state_dict(source)._metadata
    torch.save({"state_dict": sd, "epoch": 0}, path)
    return path


def _nan(sd: Any) -> Any:
    out = type(sd)((k, v.clone()) for k, v in sd.items())
    out["model.model.layers.0.self_attn.v_proj.lora_B"][0, 0] = float("nan")
    return out


def _narrow(sd: Any) -> Any:
    out = type(sd)((k, v.clone()) for k, v in sd.items())
    out["model.model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(4, 31)
    return out


_NON_FINITE = (
    r"last\.ckpt holds non-finite values \(NaN or infinity\) in adapter tensor\(s\) "
    r"model\.model\.layers\.0\.self_attn\.v_proj\.lora_B \(1 of 64 values\)"
)
_SHAPE = (
    r"last\.ckpt does not fit this model's adapter: model\.model\.layers\.0\.self_attn\.q_proj\.lora_A "
    r"is \(4, 31\) there, \(4, 32\) here"
)


@pytest.mark.parametrize(("change", "message"), [(_nan, _NON_FINITE), (_narrow, _SHAPE)], ids=["non-finite", "shape"])
def test_a_full_checkpoint_that_does_not_fit_changes_nothing(tmp_path: Path, change: Any, message: str) -> None:
    strategy, module = _attached(strategies.PEFTFSDP2Strategy(save_distributed_checkpoint=False))
    before = _adapter(module)
    with pytest.raises(ValueError, match=message):
        strategy.load_checkpoint(_checkpoint(tmp_path / "last.ckpt", change))
    _assert_unchanged(module, before)


def test_a_file_that_is_not_a_lightning_checkpoint_is_named(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    strategy, _ = _attached(strategies.PEFTFSDPStrategy())
    with pytest.raises(FileContentError, match=r"list\.ckpt is not a Lightning checkpoint: it holds list"):
        strategy.load_checkpoint(tmp_path / "list.ckpt")


def _sharded(path: Path, record: bool = True, nan: bool = False) -> Path:
    from torch.distributed.checkpoint import save

    source = lp.inject(TinyLM(), "lora", r=4)
    randomize_adapter(source)
    adapter = {k: v.clone() for k, v in lp.trainable_state_dict(source).items()}
    if nan:
        adapter["model.model.layers.1.self_attn.q_proj.lora_A"][1, 1] = float("inf")
    save({"state_dict": adapter}, checkpoint_id=path)
    meta = {"epoch": 0} | ({state.METADATA_KEY: state.require_info(source).metadata()} if record else {})
    torch.save(meta, path / "meta.pt")
    return path


def test_a_sharded_checkpoint_loads_into_the_adapter(tmp_path: Path) -> None:
    strategy, module = _attached(strategies.PEFTFSDP2Strategy())
    strategy.load_checkpoint(_sharded(tmp_path / "ok.ckpt"))
    source = lp.inject(TinyLM(), "lora", r=4)
    randomize_adapter(source)
    for name, tensor in state.adapter_state(module):
        assert torch.equal(tensor, dict(state.adapter_state(source))[name]), name


def test_a_sharded_checkpoint_with_non_finite_values_changes_nothing(tmp_path: Path) -> None:
    strategy, module = _attached(strategies.PEFTFSDP2Strategy())
    before = _adapter(module)
    with pytest.raises(
        ValueError,
        match=r"nan\.ckpt holds non-finite values \(NaN or infinity\) in adapter tensor\(s\) "
        r"model\.model\.layers\.1\.self_attn\.q_proj\.lora_A \(1 values\)",
    ):
        strategy.load_checkpoint(_sharded(tmp_path / "nan.ckpt", nan=True))
    _assert_unchanged(module, before)


def test_a_sharded_checkpoint_without_a_record_is_refused(tmp_path: Path) -> None:
    strategy, _ = _attached(strategies.PEFTFSDP2Strategy())
    with pytest.raises(
        ValueError, match=r"carries no lightning_peft record \(meta\.pt has no 'lightning_peft' entry\)"
    ):
        strategy.load_checkpoint(_sharded(tmp_path / "bare.ckpt", record=False))


def test_deepspeed_checks_the_folders_adapter_before_its_engine_loads(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from lightning_peft.lightning.deepspeed_strategy import PEFTDeepSpeedStrategy

    source = lp.inject(TinyLM(), "lora", r=4)
    randomize_adapter(source)
    with torch.no_grad():
        dict(state.adapter_state(source))["model.model.layers.0.self_attn.q_proj.lora_B"][0, 0] = float("nan")
    folder = lp.save_adapter(source, tmp_path / "ds.ckpt")
    strategy, module = _attached(PEFTDeepSpeedStrategy(stage=2))
    before = _adapter(module)
    with pytest.raises(ValueError, match=r"ds\.ckpt holds non-finite values .* model\.model\.layers\.0\.self_attn"):
        strategy.load_checkpoint(folder)  # the engine was never started: the check came first
    _assert_unchanged(module, before)
    other = lp.save_adapter(lp.inject(TinyLM(seed=1), "lora", r=4), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt does not fit this base model"):
        strategy.load_checkpoint(other)
