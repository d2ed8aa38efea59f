"""Helpers for multi-process Trainer tests on CPU: forked ranks, per-rank probes, collective counting.

Ranks are forked (not spawned) so that they share the parent's imports: a 2-process fit then costs
about a second instead of the ~6 s each spawned rank spends importing torch, Lightning and
transformers. The strategies and their code paths are the same as with ``strategy="ddp"``; only the
launcher differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.lightning import strategies


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
