"""PEFT under multi-process strategies, on CPU with 2 gloo ranks: DDP for every registered method,
FSDP1 and FSDP2 (sharded), DeepSpeed ZeRO-2/3 where installed; CUDA variants are marked ``gpu``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback, registry
from lightning_peft.core import state
from tests import optional, tiny
from tests.lightning.distributed import (
    RankProbe,
    SaveProbe,
    cpu_deepspeed,
    facts,
    forked,
    fsdp1_full_state_dict,
    fsdp2_full_state_dict,
    load_ranks,
)
from tests.lightning.modules import StopAfterFirstEpoch, TinyLM, token_loader
from tests.methods.cases import CASES


def _arch(method: str) -> str:
    """LLaMA where the method supports it, else the first architecture its Case lists (BitFit: GPT-2)."""
    archs = CASES[method].archs
    return "llama" if "llama" in archs else archs[0]


def _fit(
    root: Path,
    strategy: Any,
    method: str = "lora",
    epochs: int = 1,
    ckpt_path: Path | None = None,
    module: L.LightningModule | None = None,
    callbacks: tuple = (),
    options: dict[str, Any] | None = None,
) -> L.LightningModule:
    L.seed_everything(0)
    module = module or TinyLM(arch=_arch(method))
    root.mkdir(parents=True, exist_ok=True)
    options = CASES[method].options(module.arch) | (options or {}) | {"verbose": False}
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


@pytest.fixture(scope="module")
def ddp_lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The adapter a 2-rank DDP run trains: what the sharded strategies must reproduce."""
    root = tmp_path_factory.mktemp("ddp_lora")
    _fit(root, "ddp_fork", epochs=2)
    return load_ranks(root)[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", registry.methods())
def test_ddp_two_cpu_ranks(tmp_path: Path, method: str) -> None:
    """fit, adapter-only checkpoint, resume == straight run, identical ranks, only the adapter synced."""
    straight = tmp_path / "straight"
    _fit(straight, "ddp_fork", method, epochs=2)
    first = tmp_path / "first"
    _fit(first, "ddp_fork", method, epochs=2, callbacks=(StopAfterFirstEpoch(),))
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


def _block(arch: str) -> type:
    """The transformer block class FSDP wraps as a unit."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return {"llama": LlamaDecoderLayer, "gpt2": GPT2Block}[arch]


def _fsdp(arch: str = "llama") -> Any:
    from lightning_peft.lightning.strategies import PEFTFSDPStrategy

    return forked(PEFTFSDPStrategy(auto_wrap_policy={_block(arch)}))


@pytest.mark.slow
def test_fsdp_two_cpu_ranks(tmp_path: Path, ddp_lora: dict[str, torch.Tensor]) -> None:
    """FSDP1 on gloo: adapter units of their own, trainable-only checkpoint gathered without a frozen
    weight, exact resume, and the same adapter as DDP."""
    straight = tmp_path / "straight"
    _fit(straight, _fsdp(), epochs=2, callbacks=(SaveProbe(straight, stock=fsdp1_full_state_dict),))
    first = tmp_path / "first"
    _fit(first, _fsdp(), epochs=1)
    resumed = tmp_path / "resumed"
    _fit(resumed, _fsdp(), epochs=2, ckpt_path=first / "last.ckpt")

    fsdp_adapter, ddp_adapter = load_ranks(straight)[0], ddp_lora
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
        # weights, exp_avg, exp_avg_sq; and the weights once more for the peft folder beside the checkpoint
        assert saved["peft"]["gathered"] <= 4 * saved["trainable_numel"]
        # Lightning's own FSDP state dict, under the same probe, unshards every frozen unit.
        assert saved["stock"]["largest"] >= 96 * 32 and saved["stock"]["gathered"] > 20 * saved["trainable_numel"]

    bare = lp.load_adapter(tiny.build("llama"), first / "last.ckpt")
    assert lp.get_info(bare).method == "lora"
    # save_adapter from the running sharded Trainer: a complete adapter folder.
    exported = lp.load_adapter(tiny.build("llama"), straight / "exported")
    for name, tensor in state.adapter_state(exported):
        assert torch.equal(tensor, fsdp_adapter[f"model.{name}"]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_cpu_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: int, ddp_lora: dict[str, torch.Tensor]
) -> None:
    """ZeRO-2/3 on gloo: optimizer restricted before the engine, trainable-only checkpoint folder
    with complete adapter files, frozen weights never gathered, exact resume, same adapter as DDP."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    optional.importorskip("deepspeed")
    straight = tmp_path / "straight"
    _fit(straight, cpu_deepspeed(stage), epochs=2, callbacks=(SaveProbe(straight),))
    first = tmp_path / "first"
    _fit(first, cpu_deepspeed(stage), epochs=1)
    resumed = tmp_path / "resumed"
    _fit(resumed, cpu_deepspeed(stage), epochs=2, ckpt_path=first / "last.ckpt")

    ds_adapter, ddp_adapter = load_ranks(straight)[0], ddp_lora
    for name, tensor in ds_adapter.items():
        torch.testing.assert_close(tensor, ddp_adapter[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(load_ranks(straight)[1][name], tensor)
    for name, tensor in load_ranks(resumed)[0].items():
        assert torch.equal(tensor, ds_adapter[name]), f"resumed {name} differs from the uninterrupted run"

    # The checkpoint folder is an adapter folder too: complete adapter files, gathered under ZeRO-3.
    folder = first / "last.ckpt"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    bare = lp.load_adapter(tiny.build("llama"), folder)
    first_adapter = load_ranks(first)[0]
    for name, tensor in state.adapter_state(bare):
        assert torch.equal(tensor, first_adapter[f"model.{name}"]), name
    # exclude_frozen_parameters: DeepSpeed's module file holds the adapter's tensors and nothing frozen.
    # (Under ZeRO-3 its tensors are empty placeholders: the adapter files above are the complete copy.)
    for model_states in (folder / "checkpoint").glob("*model_states.pt"):
        saved = torch.load(model_states, weights_only=False)
        assert set(saved["module"]) == set(first_adapter) and not saved.get("frozen_param_fragments")
    for saved in facts(straight, "save"):
        # Only the adapter is gathered (ZeRO-3), each tensor no larger than the largest adapter tensor.
        # (twice: the checkpoint folder's adapter files, and the peft folder beside the checkpoint)
        assert saved["peft"]["gathered"] <= 2 * saved["trainable_numel"] + 64
        assert saved["peft"]["largest_gathered"] <= saved["largest_adapter_numel"]
        if stage == 3:  # and the gather is needed: the parameters themselves are empty placeholders
            assert saved["ungathered_numel"] == 0


def _fsdp2(sharded: bool, arch: str = "llama") -> Any:
    from lightning_peft.lightning.strategies import PEFTFSDP2Strategy

    return forked(PEFTFSDP2Strategy(wrap_modules={_block(arch)}, save_distributed_checkpoint=sharded))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "full"])
def test_fsdp2_two_cpu_ranks(tmp_path: Path, sharded: bool, ddp_lora: dict[str, torch.Tensor]) -> None:
    """FSDP2 applied after injection: sharded (per-rank) or full adapter checkpoints, no frozen
    weight gathered to write them, exact resume, and the same adapter as DDP."""
    straight = tmp_path / "straight"
    _fit(straight, _fsdp2(sharded), epochs=2, callbacks=(SaveProbe(straight, stock=fsdp2_full_state_dict),))
    first = tmp_path / "first"
    _fit(first, _fsdp2(sharded), epochs=1)
    resumed = tmp_path / "resumed"
    _fit(resumed, _fsdp2(sharded), epochs=2, ckpt_path=first / "last.ckpt")

    adapter = load_ranks(straight)[0]
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, ddp_lora[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in load_ranks(resumed)[0].items():
        assert torch.equal(tensor, adapter[name]), f"resumed {name} differs from the uninterrupted run"

    checkpoint = first / "last.ckpt"
    assert checkpoint.is_dir() == sharded
    if sharded:  # every tensor in the distributed checkpoint is the adapter's or its optimizer state
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
        assert {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")} == set(adapter)
        assert all(k.split(".", 2)[2].rsplit(".", 1)[0] in adapter for k in keys if k.startswith("optimizer_0.state."))
    else:
        assert set(torch.load(checkpoint, weights_only=True)["state_dict"]) == set(adapter)
        assert checkpoint.stat().st_size < 64 * 1024
    for saved in facts(straight, "save"):
        if sharded:  # each rank writes its own shards; only the peft folder beside it gathers, tensor by tensor
            assert saved["peft"]["largest_gathered"] <= saved["largest_adapter_numel"]
            assert saved["peft"]["gathered"] <= saved["trainable_numel"]
        else:  # one adapter tensor at a time (and its optimizer state)
            assert saved["peft"]["largest_gathered"] <= saved["largest_adapter_numel"]
            assert saved["peft"]["gathered"] <= 4 * saved["trainable_numel"]  # + the peft folder's weights
        # Lightning's own full state dict gathers every frozen weight as well.
        assert saved["stock"]["largest_gathered"] >= 96 * 32


#: One two-rank strategy per sharding the registry names.
SHARDED: dict[str, Callable[[str], Any]] = {
    "fsdp": lambda arch: _fsdp(arch),
    "fsdp2": lambda arch: _fsdp2(False, arch),
    "zero1": lambda arch: cpu_deepspeed(1),
    "zero2": lambda arch: cpu_deepspeed(2),
    "zero3": lambda arch: cpu_deepspeed(3),
}
#: Every method under every sharding it declares (LoRA has the full tests above, but not ZeRO-1).
SUPPORTED = [
    (m.name, sharding)
    for m in registry.all_methods()
    for sharding in sorted(m.sharding)
    if m.name != "lora" or sharding == "zero1"
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "sharding"), SUPPORTED, ids=[f"{m}-{s}" for m, s in SUPPORTED])
def test_methods_under_the_shardings_they_declare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, sharding: str
) -> None:
    """Each method under each sharding its registration lists: training reaches the adapter DDP
    trains, ranks agree, nothing frozen gets a gradient, and the checkpoint holds the adapter only
    and loads onto a bare model."""
    _trains_as_under_ddp(tmp_path, monkeypatch, method, sharding)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "fsdp2", "zero3"])
def test_dora_under_the_shardings_that_shard_its_base_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharding: str
) -> None:
    """DoRA reads the base weight (its norm, and W x' under dropout) where the sharding has it whole."""
    _trains_as_under_ddp(tmp_path, monkeypatch, "lora", sharding, {"use_dora": True, "dropout": 0.1})


def _trains_as_under_ddp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, sharding: str, options: dict[str, Any] | None = None
) -> None:
    if sharding.startswith("zero"):
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        optional.importorskip("deepspeed")
    arch = _arch(method)
    ddp = tmp_path / "ddp"
    _fit(ddp, "ddp_fork", method, epochs=2, options=options)
    sharded = tmp_path / sharding
    _fit(sharded, SHARDED[sharding](arch), method, epochs=2, options=options)

    reference, (rank0, rank1) = load_ranks(ddp)[0], load_ranks(sharded)
    assert rank0.keys() == reference.keys() and rank0
    for name, tensor in rank0.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(rank1[name], tensor), f"ranks disagree on {name}"
    for fact in facts(sharded):
        assert fact["frozen_grads"] == []
    if method == "adalora":  # the budget was reallocated (and identically): the final step prunes to target_r
        masks = [t for n, t in rank0.items() if n.endswith("rank_mask")]
        assert masks and sum(int(m.sum()) for m in masks) == 2 * len(masks)
    if method == "topk":  # calibration chose entries (the same as under DDP, checked above), not the first k
        chosen = [t for n, t in rank0.items() if ".indices." in n]
        assert chosen and any(not torch.equal(t, torch.arange(t.numel())) for t in chosen)

    bare = lp.load_adapter(tiny.build(arch), sharded / "last.ckpt")
    assert lp.get_info(bare).method == method
    for name, tensor in state.adapter_state(bare):
        assert torch.equal(tensor, rank0[f"model.{name}"]), name
