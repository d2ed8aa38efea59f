"""Helpers for multi-process Trainer tests on CPU: forked ranks, per-rank probes, collective counting.

Ranks are forked (not spawned) so that they share the parent's imports: a 2-process fit then costs
about a second instead of the ~6 s each spawned rank spends importing torch, Lightning and
transformers. The strategies and their code paths are the same as with ``strategy="ddp"``; only the
launcher differs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from lightning_peft.lightning import strategies
from tests.lightning.modules import TinyLM, token_loader
from tests.methods.cases import CASES


class _ForkLauncher(_MultiProcessingLauncher):
    """Fork ranks; bring back only the trainer state (sharded weights cannot be copied into the parent)."""

    def _collect_rank_zero_results(self, trainer: L.Trainer, results: Any) -> _WorkerOutput | None:
        if self._strategy.local_rank != 0:
            return None
        return _WorkerOutput(None, None, trainer.state, results, self.get_extra_results(trainer))


def forked(strategy: Strategy) -> Strategy:
    """``strategy`` launched by forking this process (FSDP and DeepSpeed otherwise re-run the script)."""
    strategy._configure_launcher = lambda: setattr(  # type: ignore[method-assign]
        strategy, "_launcher", _ForkLauncher(strategy, start_method="fork")
    )
    return strategy


class Collectives(TorchDispatchMode):
    """Counts what collectives move and the largest tensor any op produces, while active.

    Both c10d (FSDP1, DeepSpeed) and functional collectives (FSDP2, DTensor) dispatch as ops, so
    a gathered frozen weight shows up here as a gather output of its full size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gathered = 0  # elements received by all-gathers and broadcasts
        self.largest = 0  # elements of the largest tensor produced by any op
        self.largest_gathered = 0  # elements of the largest collective output

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func)
        # Floating-point only: pickled objects (paths, optimizer metadata) travel as byte tensors.
        leaves = torch.utils._pytree.tree_leaves(out)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sizes = [t.numel() for t in tensors]
        if sizes:
            self.largest = max(self.largest, *sizes)
        if sizes and ("gather" in name or "broadcast" in name):
            self.gathered += sum(sizes)
            self.largest_gathered = max(self.largest_gathered, *sizes)
        return out


class RankProbe(Callback):
    """Writes, per rank, at train end: the adapter as this rank holds it and facts about the run."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategies.save_adapter(trainer, self.out / "exported")  # the adapter folder, written by rank 0
        adapter = strategies.adapter_state_dict(trainer.strategy, pl_module)
        torch.save(dict(adapter), self.out / f"start_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        facts: dict[str, Any] = {"world_size": trainer.world_size}
        trainable = {n: p for n, p in state.adapter_parameters(pl_module)}
        facts["trainable_numel"] = sum(p.numel() for p in trainable.values())
        facts["frozen_grads"] = [
            n for n, p in pl_module.named_parameters() if p.grad is not None and n not in trainable
        ]
        ddp = trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            # What DDP's reducer all-reduces: its logging data counts the tensors and bytes it registered.
            logged = ddp._get_ddp_logging_data()
            facts["ddp_synced_tensors"] = logged.get("num_parameter_tensors")
            facts["ddp_synced_bytes"] = logged.get("total_parameter_size_bytes")
            facts["ddp_find_unused_parameters"] = ddp.find_unused_parameters
            facts["trainable_tensors"] = len(trainable)
            facts["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable.values())
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = FSDP.fsdp_modules(trainer.strategy.model)
        if units:
            # Which FSDP1 units hold both trainable and frozen tensors in their flat parameter.
            own = [{p.requires_grad for p in strategies._own_parameters(u)} for u in units]
            facts["fsdp_units"] = len(units)
            facts["fsdp_mixed_units"] = sum(len(flags) > 1 for flags in own)
        strategies.save_adapter(trainer, self.out / "exported")  # the adapter folder, written by rank 0
        adapter = strategies.adapter_state_dict(trainer.strategy, pl_module)
        torch.save({k: v.detach().cpu().clone() for k, v in adapter.items()}, self.out / f"adapter_rank{rank}.pt")
        (self.out / f"facts_rank{rank}.json").write_text(json.dumps(facts))


class SaveProbe(Callback):
    """At train end, saves a checkpoint while counting collectives, then (for contrast) collects the
    model state dict the way the stock Lightning strategy does, and writes both counts per rank."""

    def __init__(self, out: Path, stock: Callable[[nn.Module], Any] | None = None) -> None:
        self.out, self.stock = Path(out), stock

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        facts: dict[str, Any] = {}
        with Collectives() as probe:
            trainer.save_checkpoint(self.out / "probed.ckpt")
        facts["peft"] = {
            "gathered": probe.gathered,
            "largest": probe.largest,
            "largest_gathered": probe.largest_gathered,
        }
        if self.stock is not None:
            with Collectives() as probe:
                self.stock(trainer.strategy.model)
            facts["stock"] = {
                "gathered": probe.gathered,
                "largest": probe.largest,
                "largest_gathered": probe.largest_gathered,
            }
        # What a plain walk of the model sees (ZeRO-3: empty placeholders; FSDP1: this rank's slices).
        facts["ungathered_numel"] = sum(t.numel() for t in lp.trainable_state_dict(pl_module).values())
        adapter = strategies.adapter_state_dict(trainer.strategy, pl_module)  # gathered: global sizes
        facts["trainable_numel"] = sum(t.numel() for t in adapter.values())
        facts["largest_adapter_numel"] = max(t.numel() for t in adapter.values())
        (self.out / f"save_rank{trainer.global_rank}.json").write_text(json.dumps(facts))


def fsdp1_full_state_dict(model: nn.Module) -> Any:
    """Lightning's FSDPStrategy full state dict, without CPU offload and rank0_only: with those, torch
    2.13's FSDP1 on CPU clones freed memory on the other ranks and crashes."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def fsdp2_full_state_dict(model: nn.Module) -> Any:
    """Lightning's ModelParallelStrategy full state dict (``save_distributed_checkpoint=False``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_ranks(out: Path, world_size: int = 2) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"adapter_rank{r}.pt", weights_only=True) for r in range(world_size)]


def facts(out: Path, name: str = "facts", world_size: int = 2) -> list[dict[str, Any]]:
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(world_size)]


def adapter_keys(module: L.LightningModule) -> set[str]:
    return set(lp.trainable_state_dict(module))


def cpu_deepspeed(stage: int) -> Strategy:
    """``PEFTDeepSpeedStrategy`` on CPU ranks (gloo), forked.

    Lightning's DeepSpeedStrategy accepts only CUDA devices (DeepSpeed itself runs on CPU with
    ``DS_ACCELERATOR=cpu``): these overrides lift that check and nothing else. DeepSpeed's
    shared-memory all-reduce kernel is skipped: it is compiled on first use (over a minute).
    """
    import deepspeed.comm.torch
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_peft.lightning.strategies import PEFTDeepSpeedStrategy

    deepspeed.comm.torch.build_shm_op = lambda: None

    class CPUDeepSpeed(PEFTDeepSpeedStrategy):
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", self.local_rank)  # DeepSpeed reads the index as its device rank

    strategy = CPUDeepSpeed(stage=stage, process_group_backend="gloo")
    # ZeRO-3 otherwise keeps every tensor under 100k elements (all of a tiny model) whole on each rank.
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return forked(strategy)


def fit_lora(
    root: Path,
    strategy: Strategy | str,
    *,
    devices: int = 2,
    num_nodes: int = 1,
    epochs: int = 2,
    ckpt_path: Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> L.LightningModule:
    """A 2-epoch LoRA fit of the tiny LLaMA over 16 sequences, seed 0, on ``num_nodes x devices`` CPU
    ranks; checkpoints (``last.ckpt`` and the epoch's) in ``root / "ckpt"``, :class:`RankProbe` in
    ``root / "probe"``. The same run whatever launches the ranks (forked, torchrun, one node or two):
    with the global batch fixed (4 per rank), only the topology differs between two calls.
    """
    L.seed_everything(0)
    module = TinyLM(arch="llama")
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            PEFTCallback("lora", **CASES["lora"].options("llama"), verbose=False),
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
            RankProbe(root / "probe"),
            *callbacks,
        ],
    )
    trainer.fit(module, token_loader(n=16, batch_size=4), ckpt_path=ckpt_path)
    return module


class FileWrites:
    """Records every file this process creates, replaces or removes under ``folder`` (audit hooks).

    Python raises an audit event for each ``open`` for writing, ``os.rename``/``os.replace``,
    ``os.link`` and ``os.remove``, whoever calls it (Lightning, torch, lightning_peft), so the record
    shows which ranks write a checkpoint without changing the code that writes it. A hook cannot be
    removed once added: use it in a launched worker process, not in the test process.
    """

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, folder: Path) -> None:
        self.folder = str(Path(folder).resolve())
        self.events: list[tuple[str, str]] = []  # (event, path relative to folder)
        sys.addaudithook(self._hook)

    def _note(self, event: str, path: Any) -> None:
        if isinstance(path, (str, os.PathLike)):
            full = os.path.abspath(os.fspath(path))
            if full == self.folder or full.startswith(self.folder + os.sep):
                self.events.append((event, os.path.relpath(full, self.folder)))

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & self._WRITE_FLAGS
            ):
                self._note("write", path)
        elif event in ("os.rename", "os.link"):
            self._note(event.removeprefix("os."), args[1])
        elif event == "os.remove":
            self._note("remove", args[0])
