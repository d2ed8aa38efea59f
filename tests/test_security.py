"""No lightning_peft code path unpickles a checkpoint.

A payload that writes a marker file when unpickled (tests/payload.py) is put in front of every
loader: ``load_adapter``, ``load_peft_adapter``, the checkpoint IO, each strategy's own
``load_checkpoint`` (one process), DCP's metadata and byte entries, DeepSpeed's checkpoint engine,
and ``Trainer.fit(ckpt_path=...)`` under the default strategy, DDP, FSDP1, FSDP2 (sharded and
full) and DeepSpeed ZeRO-2/3 on two CPU ranks. Each must refuse it, saying the file is not a
plain-tensor checkpoint, and the marker must never appear.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import files, state
from lightning_peft.lightning import strategies
from lightning_peft.lightning.base import PEFTCheckpointIO, secure
from tests import optional, tiny
from tests.core.test_io import _kill_while_writing
from tests.lightning.distributed import cpu_deepspeed, forked
from tests.lightning.modules import TinyLM, token_loader
from tests.payload import Payload, poison

REFUSED = r"is not a plain-tensor checkpoint"


def test_the_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The control: a plain ``torch.load`` runs it, so the tests below can fail."""
    marker = tmp_path / "marker"
    torch.load(poison(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.read_text() == "unpickled"


# --------------------------------------------------------------------------- each loader, one process


def _attached(strategy: Any) -> Any:
    """``strategy`` holding an injected TinyLM, attached to a Trainer (not started)."""
    module = TinyLM()
    lp.inject(module, "lora", r=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    strategy.connect(module)
    module.trainer = trainer
    return strategy


def _fsdp(**kwargs: Any) -> Any:
    return _attached(strategies.PEFTFSDPStrategy(**kwargs))


def _fsdp2(sharded: bool) -> Any:
    return _attached(strategies.PEFTFSDP2Strategy(save_distributed_checkpoint=sharded))


def _sharded_folder(tmp_path: Path, marker: Path, poisoned: str) -> Path:
    """A sharded FSDP2 checkpoint folder with the payload in ``meta.pt`` or in DCP's ``.metadata``."""
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    module = lp.inject(TinyLM(), "lora", r=4)
    meta = {state.METADATA_KEY: state.require_info(module).metadata(), "epoch": 0}
    if poisoned == "meta.pt":
        poison(folder / "meta.pt", marker, meta)
    else:
        torch.save(meta, folder / "meta.pt")
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return folder


def _peft_bin(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}')
    poison(folder / "adapter_model.bin", marker, {})
    return folder


LOADERS: dict[str, Callable[[Path, Path], Any]] = {
    "load_adapter": lambda tmp, m: lp.load_adapter(tiny.build("llama"), poison(tmp / "e.ckpt", m)),
    "load_peft_adapter": lambda tmp, m: lp.load_peft_adapter(tiny.build("llama"), _peft_bin(tmp, m)),
    "checkpoint_io": lambda tmp, m: PEFTCheckpointIO().load_checkpoint(poison(tmp / "e.ckpt", m), weights_only=False),
    "single_device": lambda tmp, m: _secured(SingleDeviceStrategy("cpu")).load_checkpoint(poison(tmp / "e.ckpt", m)),
    "ddp": lambda tmp, m: _secured(DDPStrategy()).load_checkpoint(poison(tmp / "e.ckpt", m), weights_only=False),
    "peft_fsdp": lambda tmp, m: _fsdp().load_checkpoint(poison(tmp / "e.ckpt", m), weights_only=False),
    "peft_fsdp2_full": lambda tmp, m: _fsdp2(False).load_checkpoint(poison(tmp / "e.ckpt", m), weights_only=False),
    "peft_fsdp2_meta": lambda tmp, m: _fsdp2(True).load_checkpoint(_sharded_folder(tmp, m, "meta.pt")),
    "peft_fsdp2_dcp_metadata": lambda tmp, m: _fsdp2(True).load_checkpoint(_sharded_folder(tmp, m, ".metadata")),
    "dcp_byte_entry": lambda tmp, m: _dcp_byte_entry(tmp, m),
    "deepspeed_engine": lambda tmp, m: _deepspeed_engine().load(str(poison(tmp / "e.pt", m))),
}


def _secured(strategy: Any) -> Any:
    secure(strategy)
    return strategy


def _dcp_byte_entry(tmp_path: Path, marker: Path) -> None:
    """A distributed checkpoint whose non-tensor entry (pickled by DCP's writer) is the payload."""
    from torch.distributed.checkpoint import save

    save({"x": Payload(marker)}, checkpoint_id=tmp_path / "dcp")
    assert not marker.exists()
    strategies.load_distributed({"x": None}, tmp_path / "dcp")


def _deepspeed_engine() -> Any:
    optional.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from lightning_peft.lightning.deepspeed_strategy import PlainTensorEngine

    return PlainTensorEngine(TorchCheckpointEngine())


@pytest.mark.parametrize("loader", list(LOADERS))
def test_no_loader_unpickles(tmp_path: Path, loader: str) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(Exception, match=REFUSED) as caught:
        LOADERS[loader](tmp_path, marker)
    assert isinstance(caught.value, files.FileContentError) or REFUSED.split()[-1] in str(caught.value)
    assert not marker.exists(), f"{loader} ran the payload"


def test_plain_dcp_still_reads_a_real_distributed_checkpoint(tmp_path: Path) -> None:
    """The allowlisted reader reads what DCP writes: sizes, dtypes, byte entries (optimizer settings)."""
    from torch.distributed.checkpoint import save

    written = {"w": torch.randn(3, 2, dtype=torch.bfloat16), "betas": (0.9, 0.999), "lr": 1e-3}
    save(written, checkpoint_id=tmp_path / "dcp")
    target: dict[str, Any] = {"w": torch.empty(3, 2, dtype=torch.bfloat16), "betas": None, "lr": None}
    strategies.load_distributed(target, tmp_path / "dcp")
    assert torch.equal(target["w"], written["w"]) and target["betas"] == (0.9, 0.999) and target["lr"] == 1e-3


def test_deepspeed_engine_reads_deepspeed_data_classes(tmp_path: Path) -> None:
    optional.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"scaler": LossScaler(1.0), "stage": ZeroStageEnum.gradients}, tmp_path / "optim.pt")
    loaded = _deepspeed_engine().load(str(tmp_path / "optim.pt"))
    assert isinstance(loaded["scaler"], LossScaler) and loaded["stage"] is ZeroStageEnum.gradients


# --------------------------------------------------------------------------- the checkpoint IO each strategy uses


@pytest.mark.parametrize(
    "make",
    [
        lambda: SingleDeviceStrategy("cpu"),
        lambda: DDPStrategy(),
        lambda: strategies.PEFTFSDPStrategy(),
        lambda: strategies.PEFTFSDP2Strategy(),
    ],
    ids=["single_device", "ddp", "peft_fsdp", "peft_fsdp2"],
)
def test_every_supported_strategy_gets_the_plain_tensor_io(make: Callable[[], Any]) -> None:
    strategy = make()
    strategies.check_supported(strategy)  # a pure check
    strategies.secure_checkpoints(strategy)  # what PEFTCallback.setup calls next
    assert type(strategy.checkpoint_io) is PEFTCheckpointIO


def test_a_checkpoint_io_the_user_chose_is_kept() -> None:
    class Mine(TorchCheckpointIO):
        pass

    strategy = SingleDeviceStrategy("cpu", checkpoint_io=Mine())
    strategies.secure_checkpoints(strategy)
    assert type(strategy.checkpoint_io) is Mine
    assert isinstance(strategy.checkpoint_io, CheckpointIO)


_KILLED_CHECKPOINT_SAVE = """
import sys, time
from pathlib import Path
import torch
from lightning_peft.lightning.base import PEFTCheckpointIO
target, ready = Path(sys.argv[1]), Path(sys.argv[2])
def slow_save(obj, handle, *args, **kwargs):
    handle.write(b"partial checkpoint")
    handle.flush()
    ready.write_text("writing")
    time.sleep(120)
torch.save = slow_save
PEFTCheckpointIO().save_checkpoint({"state_dict": {}}, target)
"""


def test_a_checkpoint_save_killed_mid_write_leaves_the_old_one_and_nothing_in_tmpdir(tmp_path: Path) -> None:
    folder, target = _kill_while_writing(tmp_path, named=False, script=_KILLED_CHECKPOINT_SAVE)
    PEFTCheckpointIO().save_checkpoint({"epoch": 3}, target)
    assert files.load_torch(target) == {"epoch": 3}
    assert sorted(p.name for p in folder.iterdir()) == ["file.bin"]


# --------------------------------------------------------------------------- Trainer.fit(ckpt_path=...)


def _resume(root: Path, strategy: Any, ckpt: Path, devices: int = 1, **fit: Any) -> None:
    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[PEFTCallback("lora", r=4, verbose=False)],
    )
    t.fit(TinyLM(), token_loader(n=8, batch_size=4), ckpt_path=ckpt, **fit)


def _real_checkpoint(tmp_path: Path, marker: Path) -> Path:
    """A checkpoint PEFTCallback wrote (default strategy), with the payload added."""
    root = tmp_path / "first"
    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[PEFTCallback("lora", r=4, verbose=False)],
    )
    t.fit(TinyLM(), token_loader(n=8, batch_size=4))
    t.save_checkpoint(root / "real.ckpt")
    return poison(tmp_path / "evil.ckpt", marker, torch.load(root / "real.ckpt", weights_only=True))


_FIT_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(L.Trainer.fit).parameters


@pytest.mark.parametrize("weights_only", [None, False], ids=["lightning_default", "weights_only_false"])
def test_resuming_under_the_default_strategy_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_only: bool | None
) -> None:
    marker = tmp_path / "marker"
    ckpt = _real_checkpoint(tmp_path, marker)
    if weights_only is None:
        # torch would unpickle for Lightning's default (None) under this variable; the IO passes True.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        fit: dict[str, Any] = {}
    elif not _FIT_TAKES_WEIGHTS_ONLY:
        pytest.skip("this Lightning's Trainer.fit has no weights_only")
    else:
        fit = {"weights_only": weights_only}
    with pytest.raises(files.FileContentError, match=rf"evil\.ckpt {REFUSED}"):
        _resume(tmp_path / "resumed", "auto", ckpt, **fit)
    assert not marker.exists()


def _deepspeed_folder(tmp_path: Path, marker: Path) -> Path:
    """A DeepSpeed checkpoint folder whose engine files (model and optimizer states) carry the payload."""
    folder = tmp_path / "evil_ds.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    names = ["mp_rank_00_model_states.pt"]
    names += [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(2) for kind in ("model", "optim")]
    for name in names:
        poison(folder / "checkpoint" / name, marker, {"module": {}})
    return folder


def _sharded_fsdp2() -> Any:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return forked(strategies.PEFTFSDP2Strategy(wrap_modules={LlamaDecoderLayer}))


def _full_fsdp2() -> Any:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return forked(strategies.PEFTFSDP2Strategy(wrap_modules={LlamaDecoderLayer}, save_distributed_checkpoint=False))


def _fsdp1() -> Any:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return forked(strategies.PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}))


TWO_RANKS: dict[str, tuple[Callable[[], Any], str]] = {
    "ddp": (lambda: "ddp_fork", "file"),
    "peft_fsdp": (_fsdp1, "file"),
    "peft_fsdp2": (_sharded_fsdp2, "sharded"),
    "peft_fsdp2_full": (_full_fsdp2, "file"),
    "peft_deepspeed_stage_2": (lambda: cpu_deepspeed(2), "deepspeed"),
    "peft_deepspeed_stage_3": (lambda: cpu_deepspeed(3), "deepspeed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_resuming_on_two_ranks_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    make, kind = TWO_RANKS[name]
    if kind == "deepspeed":
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        pytest.importorskip("deepspeed")
    marker = tmp_path / "marker"
    ckpt = {
        "file": lambda: _real_checkpoint(tmp_path, marker),
        "sharded": lambda: _sharded_folder(tmp_path, marker, "meta.pt"),
        "deepspeed": lambda: _deepspeed_folder(tmp_path, marker),
    }[kind]()
    with pytest.raises(Exception, match=REFUSED):  # a rank's error, raised again in this process
        _resume(tmp_path / "resumed", make(), ckpt, devices=2)
    assert not marker.exists(), f"{name} ran the payload"
