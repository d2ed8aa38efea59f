"""Strategy hooks: PEFT under FSDP, FSDP2 and DeepSpeed with trainable-only, frozen-aware state.

Pick one by name and nothing else in a config changes::

    trainer:
      strategy: peft_fsdp              # or peft_fsdp2, peft_deepspeed_stage_2, peft_deepspeed_stage_3
      callbacks: [{class_path: lightning_peft.PEFTCallback, init_args: {method: lora}}]

Single-device, DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``) need no special strategy: DDP
registers only parameters that require grad with its reducer, so frozen weights never enter
gradient sync, and PEFTCallback trims the checkpoint. The sharded strategies need more, because
Lightning's own versions gather the whole model to save a few MB of adapter:

- ``PEFTFSDPStrategy`` (FSDP1, ``peft_fsdp``): an auto-wrap policy that puts every adapter in an
  FSDP unit of its own, apart from the frozen layer it wraps, so each flat parameter is uniformly
  trainable or frozen; checkpoints gather only those adapter units. Runs on CPU with gloo too.
- ``PEFTFSDP2Strategy`` (``fully_shard``, ``peft_fsdp2``): parameters are DTensors, so the
  trainable-only state dict is taken shard by shard (sharded checkpoints) or gathered one
  adapter tensor at a time (full checkpoints); frozen weights are never touched.
- ``PEFTDeepSpeedStrategy`` (``peft_deepspeed_stage_2``/``_3``): ``exclude_frozen_parameters``,
  and the adapter gathered with ``GatheredParameters`` (only its own tensors) so that under
  ZeRO-3 the adapter files in each checkpoint folder are complete.

``PEFTStrategy`` (the interface PEFTCallback talks to) is in ``lightning/base.py`` and the DeepSpeed
strategy in ``lightning/deepspeed_strategy.py``; every name is importable from here.

Every strategy PEFTCallback runs reads and writes checkpoints through lightning_peft's file
helpers (:class:`~lightning_peft.lightning.base.PEFTCheckpointIO`): loading never unpickles
(``weights_only=True`` whatever the Trainer passes, DCP's metadata and DeepSpeed's files through
allowlists of their data classes), a refused checkpoint changes nothing in the model, and saving
replaces files atomically in their own folder.

Injection happens before any of them wraps the model (PEFTCallback injects in ``setup`` or right
after ``configure_model``), and PEFTCallback restricts the optimizer where ``configure_optimizers``
returns, before FSDP or DeepSpeed see it.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    StrategyRegistry,
)
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

import lightning_peft.api  # noqa: F401  (registers the built-in methods)
from lightning_peft import registry
from lightning_peft.api import io
from lightning_peft.core import files, state
from lightning_peft.lightning.base import (  # every name importable from here
    PEFTCheckpointIO,  # noqa: F401
    PEFTStrategy,
    checkpoint_state,
    clean_name,
    clean_state,
    is_sharded,
    load_adapter_into,
    secure,
)
from lightning_peft.lightning.deepspeed_strategy import PEFTDeepSpeedStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_peft.registry import Method, Sharding


# --------------------------------------------------------------------------- FSDP1


def adapter_units(model: nn.Module) -> list[nn.Module]:
    """The modules an FSDP wrap policy must wrap so that no flat parameter mixes trainable and frozen.

    For every adapter layer: its frozen ``base_layer`` (one unit) and the adapter layer itself,
    whose own flat parameter then holds only the adapter tensors. Adapter modules that do not wrap
    a layer (input-side methods) hold only adapter tensors and become one unit each.
    """
    from lightning_peft.core.layer import AdapterLayer

    units: list[nn.Module] = []
    for _, module in state.adapter_modules(model):
        if isinstance(module, AdapterLayer):
            base = {id(p) for p in module.base_layer.parameters()}
            if base:
                units.append(module.base_layer)
            if any(id(p) not in base for p in module.parameters()):
                units.append(module)
        elif any(True for _ in module.parameters()):
            units.append(module)
    return units


def adapter_wrap_policy(model: nn.Module, policy: Any = None) -> Any:
    """An FSDP1 ``auto_wrap_policy``: the given one (classes or a policy) plus :func:`adapter_units`.

    Args:
        model: the injected model about to be wrapped.
        policy: the user's policy: ``None``, a set of module classes (e.g. the decoder block),
            a ``ModuleWrapPolicy``/``CustomPolicy``, or a legacy callable policy.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy, _Policy

    units = {id(m) for m in adapter_units(model)}
    adapters = CustomPolicy(lambda module: id(module) in units)
    if policy is None:
        return adapters
    if isinstance(policy, (set, frozenset, list, tuple)):
        policy = ModuleWrapPolicy(set(policy))
    if isinstance(policy, _Policy):
        inner: _Policy = policy

        class _Both(_Policy):
            def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: Any) -> Any:
                targets = inner._run_policy(root_module, ignored_modules, root_kwargs)
                for module, kwargs in adapters._run_policy(root_module, ignored_modules, root_kwargs).items():
                    targets.setdefault(module, kwargs)
                return targets

        return _Both()
    # A legacy callable ``(module, recurse, nonwrapped_numel) -> bool``: or it with ours.

    def either(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or id(module) in units or bool(policy(module, recurse, nonwrapped_numel))

    return either


def _own_parameters(unit: FullyShardedDataParallel) -> Iterator[nn.Parameter]:
    """Parameters held in ``unit``'s own flat parameter (not in a nested FSDP unit)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    stack: list[nn.Module] = [unit.module]
    while stack:
        module = stack.pop()
        yield from module.parameters(recurse=False)
        stack.extend(child for child in module.children() if not isinstance(child, FSDP))


@contextlib.contextmanager
def _summon_adapter(
    root: nn.Module, params: Sequence[Tensor], writeback: bool, with_grads: bool = False
) -> Generator[None, None, None]:
    """Unshard exactly the FSDP1 units that own ``params`` (``recurse=False``), one at a time inside;
    ``with_grads``: their gradients too (written back with ``writeback``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    fsdp_root = next(m for m in root.modules() if isinstance(m, FSDP))
    _lazy_init(fsdp_root, fsdp_root)  # before any unit is touched, or the first one thinks it is the root
    wanted = {id(p) for p in params}
    units = [u for u in FSDP.fsdp_modules(fsdp_root) if any(id(p) in wanted for p in _own_parameters(u))]
    with contextlib.ExitStack() as stack:
        for unit in units:
            stack.enter_context(
                FSDP.summon_full_params(unit, recurse=False, writeback=writeback, with_grads=with_grads)
            )
        yield


def call_through_units(root: nn.Module) -> None:
    """Point each input-side adapter that is an FSDP1 unit of its own at its unit.

    Its hooks compute the virtual tokens outside any unit's forward, where FSDP1 holds the
    adapter's parameters as flat shards; calling the unit gathers them (and regathers them for
    the backward pass), as for any other module.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_peft.core.virtual import InputAdapter

    for unit in FSDP.fsdp_modules(root):
        if isinstance(unit.module, InputAdapter):
            unit.module.call_through(unit)


class PEFTFSDPStrategy(PEFTStrategy, FSDPStrategy):
    """FSDP1 with an adapter-aware wrap policy and trainable-only full checkpoints.

    Takes every argument of Lightning's ``FSDPStrategy``; ``auto_wrap_policy`` (say, the decoder
    block class) is extended with :func:`adapter_units`. ``use_orig_params`` stays on so that the
    optimizer and the adapter walk see the original parameters. Checkpoints are one file written by
    rank 0 with the adapter, its optimizer state and the loops; only the adapter units are
    unsharded to write it. For sharded (per-rank) checkpoints use :class:`PEFTFSDP2Strategy`.
    """

    strategy_name = "peft_fsdp"

    @property
    def sharding(self) -> Sharding:
        return "fsdp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("state_dict_type", "full") != "full":
            raise ValueError(
                f"PEFTFSDPStrategy(state_dict_type={kwargs['state_dict_type']!r}) is not supported: FSDP1's sharded "
                "state dict unshards every unit, frozen ones included. Use 'full' (the adapter is small), or "
                "strategy='peft_fsdp2' for sharded checkpoints."
            )
        if kwargs.get("use_orig_params") is False:
            raise ValueError("PEFTFSDPStrategy needs use_orig_params=True (the default) to find the adapter's tensors.")
        super().__init__(*args, **kwargs)
        secure(self)

    def _wrap(self, model: nn.Module) -> nn.Module:
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by hand in configure_model: keep the user's units
        self.kwargs["auto_wrap_policy"] = adapter_wrap_policy(model, self.kwargs.get("auto_wrap_policy"))
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # torch refuses FSDP on CPU unless the device is named explicitly (gloo runs it fine).
        wrapped = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        wrapped = self._wrap(model)
        call_through_units(wrapped)
        return wrapped

    @override
    def adapter_state_dict(self) -> OrderedDict[str, Tensor]:
        assert self.model is not None and self.lightning_module is not None
        with _summon_adapter(self.model, self.adapter_params(), writeback=False):
            sd = state.trainable_state_dict(self.lightning_module)  # inside: the full views, not the shards
            for key in sd:
                sd[key] = sd[key].detach().to("cpu", copy=True)
        return clean_state(sd)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.adapter_state_dict()

    @contextlib.contextmanager
    @override
    def calibration(self) -> Generator[Callable[..., Any], None, None]:
        assert self.model is not None and self.lightning_module is not None

        def training_step(*args: Any, **kwargs: Any) -> Any:
            # Through the root unit, which gathers the frozen weights it holds (embeddings, norms).
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

        yield training_step

    @contextlib.contextmanager
    @override
    def adapter_gradients(self, keep: bool = False) -> Generator[None, None, None]:
        # The gradients stay in the flat parameters' .grad until the next step clears them: nothing to keep.
        with self._whole_adapter():
            yield

    @contextlib.contextmanager
    @override
    def stepped_adapter(self) -> Generator[None, None, None]:
        with self._whole_adapter():
            yield

    def _whole_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Only the adapter units unsharded, gradients included; edits to both written back."""
        assert self.model is not None
        return _summon_adapter(self.model, self.adapter_params(), writeback=True, with_grads=True)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.model is not None and self.lightning_module is not None
        path = Path(self.broadcast(checkpoint_path))
        # weights_only=True whatever Lightning passes (its None used to become False here).
        checkpoint = checkpoint_state(files.load_torch(path), str(path))
        load_adapter_into(self.lightning_module, checkpoint.pop("state_dict"), self._write_adapter, str(path))
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(optimizer_states):
            raise RuntimeError(
                f"the checkpoint holds {len(optimizer_states)} optimizer states for {len(self.optimizers)} optimizers."
            )
        # Keyed by parameter name; the states exist for trainable parameters only: nothing frozen moves.
        options = StateDictOptions(full_state_dict=True)
        for optimizer, opt_state in zip(self.optimizers, optimizer_states, strict=True):
            set_optimizer_state_dict(self.model, optimizer, opt_state, options=options)
        return checkpoint

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        assert self.model is not None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        # torch's name-keyed full optimizer state (every rank computes it; rank 0 writes it).
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True))

    def _write_adapter(self, tensors: Mapping[str, Tensor], where: str) -> None:
        assert self.model is not None and self.lightning_module is not None
        named = [(clean_name(n), p) for n, p in state.adapter_state(self.lightning_module)]
        params = [p for _, p in named if isinstance(p, nn.Parameter)]
        with _summon_adapter(self.model, params, writeback=True), torch.no_grad():
            state.check_tensors({name: tensor.shape for name, tensor in named}, tensors, where)  # whole shapes here
            for name, tensor in named:
                tensor.copy_(tensors[name])

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "peft_fsdp", cls, description="FSDP with adapter units of their own and trainable-only checkpoints"
        )


# --------------------------------------------------------------------------- FSDP2


class PEFTFSDP2Strategy(PEFTStrategy, ModelParallelStrategy):
    """FSDP2 (``fully_shard``) applied after injection, with trainable-only full or sharded checkpoints.

    The LightningModule needs no ``configure_model``: the strategy shards the injected model itself,
    one FSDP2 group per instance of ``wrap_modules`` (say, the decoder block) plus the base model. FSDP2
    keeps every parameter as a DTensor, so mixing frozen and trainable tensors in a group is fine and
    the adapter's shards are read without any communication.

    Args:
        wrap_modules: module classes that become FSDP2 groups of their own.
        save_distributed_checkpoint: ``True``: a folder with each rank's adapter shards (nothing
            gathered at all); ``False``: one file, each adapter tensor gathered on its own.
        **kwargs: the rest of ``ModelParallelStrategy``'s arguments (``process_group_backend``, ...).
    """

    strategy_name = "peft_fsdp2"

    @property
    def sharding(self) -> Sharding:
        return "fsdp2"

    def __init__(
        self,
        wrap_modules: set[type[nn.Module]] | None = None,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.wrap_modules = tuple(wrap_modules or ())
        secure(self)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """Apply ``fully_shard`` to each ``wrap_modules`` instance, then to the base model.

        The root group is the base model (the transformers model inside the LightningModule), not
        the LightningModule: FSDP2 gathers a group in its ``forward``, and Lightning calls
        ``training_step``, which calls the base model.
        """
        from torch.distributed.fsdp import fully_shard

        from lightning_peft.core.targeting import find_base_model

        mesh = self.device_mesh["data_parallel"]
        _, base = find_base_model(model)
        for module in list(base.modules()):
            if module is not base and isinstance(module, self.wrap_modules):
                fully_shard(module, mesh=mesh)
        fully_shard(base, mesh=mesh)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if not is_sharded(self.model):
            self.shard(self.model)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _sharded_adapter(self) -> OrderedDict[str, Tensor]:
        assert self.lightning_module is not None
        return state.trainable_state_dict(self.lightning_module)  # DTensors: local shards, no communication

    @override
    def adapter_state_dict(self) -> OrderedDict[str, Tensor]:
        from torch.distributed.tensor import DTensor

        sd = self._sharded_adapter()
        for key, value in sd.items():
            # Each adapter tensor on its own: the gather touches nothing frozen.
            sd[key] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
        return sd

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self._sharded_adapter() if self._save_distributed_checkpoint else self.adapter_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        assert self.lightning_module is not None
        # Distributed checkpoints lose the state dict's torch metadata: keep our record beside it.
        checkpoint[state.METADATA_KEY] = state.require_info(self.lightning_module).metadata()
        if not self._save_distributed_checkpoint or storage_options is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # one file, through PEFTCheckpointIO
            return
        # Lightning's sharded save, with the loop/callback state (meta.pt) written atomically.
        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        converted = {"state_dict": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(converted, path)
        if self.global_rank == 0:
            files.save_torch(checkpoint, path / _METADATA_FILENAME)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None and self.lightning_module is not None
        path = Path(self.broadcast(checkpoint_path))
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        info = state.require_info(self.lightning_module)
        if _is_sharded_checkpoint(path):
            metadata = files.load_torch(path / _METADATA_FILENAME)  # weights_only=True, whatever Lightning passes
            record = metadata.pop(state.METADATA_KEY, None) if isinstance(metadata, dict) else None
            if record is None:
                raise ValueError(
                    f"{path} carries no lightning_peft record ({_METADATA_FILENAME} has no {state.METADATA_KEY!r} "
                    "entry): it was not written by PEFTFSDP2Strategy, so nothing says what adapter it holds."
                )
            state.check_record(info, record, str(path))
            live = self._sharded_adapter()
            # Read into copies of the adapter's shards: a refused checkpoint leaves the model alone.
            loaded = {name: torch.empty_like(tensor) for name, tensor in live.items()}
            target: dict[str, Any] = {"state_dict": loaded}
            sharded = StateDictOptions(full_state_dict=False, cpu_offload=False)
            if fitting:
                for idx, optimizer in enumerate(self.optimizers):
                    target[f"optimizer_{idx}"] = get_optimizer_state_dict(self.model, optimizer, options=sharded)
            load_distributed(target, path)
            self._refuse_non_finite(loaded, str(path))
            with torch.no_grad():
                for name, tensor in live.items():
                    tensor.copy_(loaded[name])
            if fitting:
                for idx, optimizer in enumerate(self.optimizers):
                    set_optimizer_state_dict(self.model, optimizer, target[f"optimizer_{idx}"], options=sharded)
            return metadata
        checkpoint = checkpoint_state(files.load_torch(path), str(path))  # weights_only=True, as above
        checkpoint.pop(state.METADATA_KEY, None)
        load_adapter_into(self.lightning_module, checkpoint.pop("state_dict"), self._write_full, str(path))
        if fitting:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            for optimizer, opt_state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
                set_optimizer_state_dict(self.model, optimizer, _param_names(self.model, opt_state), options=full)
        return checkpoint

    def _refuse_non_finite(self, tensors: Mapping[str, Tensor], where: str) -> None:
        """:func:`~lightning_peft.core.state.check_finite` for sharded tensors: each rank counts its shard,
        the counts are summed, and every rank raises alike."""
        from torch.distributed.tensor import DTensor

        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors.values()]
        counts = torch.tensor(
            [float((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0.0 for t in local],
            device=local[0].device if local else "cpu",  # where the shards are (and the collective runs)
        )
        counts = self.reduce(counts, reduce_op="sum")
        bad = [f"{name} ({int(n)} values)" for name, n in zip(tensors, counts.tolist(), strict=True) if n]
        if bad:
            raise state.non_finite_error(bad, where)

    def _write_full(self, tensors: Mapping[str, Tensor], where: str) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        assert self.lightning_module is not None
        state.check_tensors({n: t.shape for n, t in state.adapter_state(self.lightning_module)}, tensors, where)
        with torch.no_grad():
            for name, tensor in state.adapter_state(self.lightning_module):
                source = tensors[name].to(tensor.device, tensor.dtype)
                if isinstance(tensor, DTensor):
                    source = distribute_tensor(source, tensor.device_mesh, tensor.placements)
                tensor.copy_(source)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("peft_fsdp2", cls, description="FSDP2 after injection, sharded adapter checkpoints")
        strategy_registry.register(
            "peft_fsdp2_full",
            cls,
            description="FSDP2 after injection, single-file adapter checkpoints",
            save_distributed_checkpoint=False,
        )


def _dcp_data(module: str, name: str, found: Any) -> bool:
    """What a DCP ``.metadata`` pickle may hold: torch's checkpoint metadata classes, sizes, dtypes,
    layouts and paths (all data; nothing that runs code when called with the pickle's arguments)."""
    if module == "torch" and isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
        return True
    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(found, type) and found.__module__ == module
    paths = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    return (module in ("pathlib", "pathlib._local") and name in paths) or (module, name) in {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("collections", "OrderedDict"),
    }


@functools.cache
def plain_dcp() -> tuple[type, type]:
    """(storage reader, load planner) classes for torch's distributed checkpoints that never unpickle;
    built on first use, so that importing this module does not import ``torch.distributed.checkpoint``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class _Reader(FileSystemReader):
        """torch's DCP reader, with its ``.metadata`` pickle read through an allowlist of data classes
        (:func:`lightning_peft.core.files.unpickle_plain`) instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            metadata = files.unpickle_plain(Path(self.path) / ".metadata", _dcp_data)
            if not isinstance(metadata, Metadata):
                raise files.FileContentError(
                    f"{self.path}/.metadata holds {type(metadata).__name__}, not DCP metadata."
                )
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return metadata

    class _Planner(DefaultLoadPlanner):
        """torch's default load planner, reading non-tensor entries (optimizer hyperparameters) with
        ``weights_only=True`` (:func:`lightning_peft.core.files.load_torch`) where torch unpickles them."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            fqn = read_item.dest_index.fqn
            loaded = files.load_torch(value, name=f"entry {fqn!r} of the distributed checkpoint")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return _Reader, _Planner


def load_distributed(target: dict[str, Any], path: Path) -> None:
    """``torch.distributed.checkpoint.load(target, path)`` through :func:`plain_dcp`: nothing unpickled,
    and a refused file raises :class:`~lightning_peft.core.files.FileContentError` itself (DCP reports
    its readers' errors as text inside a ``CheckpointException``, a ``BaseException``)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    reader_cls, planner_cls = plain_dcp()
    reader = reader_cls(path)
    reader.read_metadata()  # refused here, before DCP would wrap the error
    try:
        load(target, checkpoint_id=path, storage_reader=reader, planner=planner_cls())
    except CheckpointException as error:
        refused = [exc for exc, _ in error.failures.values() if isinstance(exc, files.FileContentError)]
        if refused:
            raise refused[0] from error
        raise


def _param_names(model: nn.Module, opt_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter index (as Lightning saves it) rekeyed by name for torch's loader."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    if opt_state["state"] and isinstance(next(iter(opt_state["state"])), int):
        return FSDP.rekey_optim_state_dict(opt_state, OptimStateKeyType.PARAM_NAME, model)
    return opt_state


# --------------------------------------------------------------------------- support and registration

#: What PEFTCallback accepts. Lightning's own FSDP, ModelParallel and DeepSpeed strategies gather the
#: whole model into checkpoints (and DeepSpeed builds its optimizer before fit starts), so they are
#: refused in favour of the PEFT variants above.
SUPPORTED: tuple[type[Strategy], ...] = (
    SingleDeviceStrategy,
    DDPStrategy,
    PEFTFSDPStrategy,
    PEFTFSDP2Strategy,
    PEFTDeepSpeedStrategy,
)
_INSTEAD = {
    FSDPStrategy: "strategy='peft_fsdp' (PEFTFSDPStrategy)",
    ModelParallelStrategy: "strategy='peft_fsdp2' (PEFTFSDP2Strategy)",
    DeepSpeedStrategy: "strategy='peft_deepspeed_stage_2' or 'peft_deepspeed_stage_3' (PEFTDeepSpeedStrategy)",
}
NAMES = ("peft_fsdp", "peft_fsdp2", "peft_fsdp2_full", "peft_deepspeed_stage_2", "peft_deepspeed_stage_3")


def is_plain(strategy: Strategy) -> bool:
    """One device or DDP: replicated weights, Lightning's own checkpointing (see :func:`secure`)."""
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)


def secure_checkpoints(strategy: Strategy) -> None:
    """Give a one-device or DDP strategy :class:`PEFTCheckpointIO` (plain tensors only, atomic saves) before
    any checkpoint is loaded: Lightning's TorchCheckpointIO stages saves in $TMPDIR and passes
    ``weights_only`` on unchecked. The PEFT strategies set it themselves."""
    if is_plain(strategy):
        secure(strategy)


def check_supported(strategy: Strategy, method: Method | None = None) -> None:
    """Raise a clear error for a strategy PEFTCallback cannot train and checkpoint correctly, or one
    whose sharding ``method`` does not support (see :attr:`lightning_peft.registry.Method.sharding`)."""
    if is_plain(strategy):
        return
    if isinstance(strategy, PEFTStrategy):
        if method is not None and strategy.sharding not in method.sharding:
            others = [m.name for m in registry.all_methods() if strategy.sharding in m.sharding]
            where = "one device and DDP" + (
                f", and shardings {', '.join(sorted(method.sharding))}" if method.sharding else " only"
            )
            raise ValueError(
                f"PEFTCallback(method={method.name!r}) does not support {type(strategy).__name__} "
                f"(sharding {strategy.sharding!r}): {method.name} trains correctly on {where}. Use strategy='ddp', "
                f"or a method that supports {strategy.sharding!r}: {', '.join(others)}."
            )
        return
    hint = next((f" Use {v} instead." for k, v in _INSTEAD.items() if isinstance(strategy, k)), "")
    supported = ", ".join(s.__name__ for s in SUPPORTED)
    raise ValueError(
        f"PEFTCallback does not support strategy {type(strategy).__name__}; supported: {supported} "
        f"(by name: 'ddp', 'ddp_spawn', 'ddp_fork', {', '.join(map(repr, NAMES))}).{hint}"
    )


def calibration(strategy: Strategy) -> contextlib.AbstractContextManager[Callable[..., Any]]:
    """See :meth:`PEFTStrategy.calibration`; the module's own ``training_step`` elsewhere."""
    if isinstance(strategy, PEFTStrategy):
        return strategy.calibration()
    assert strategy.lightning_module is not None
    return contextlib.nullcontext(strategy.lightning_module.training_step)


def adapter_gradients(strategy: Strategy, keep: bool = False) -> contextlib.AbstractContextManager[None]:
    """See :meth:`PEFTStrategy.adapter_gradients`; a no-op where nothing is sharded (DDP)."""
    return strategy.adapter_gradients(keep) if isinstance(strategy, PEFTStrategy) else contextlib.nullcontext()


def stepped_adapter(strategy: Strategy) -> contextlib.AbstractContextManager[None]:
    """See :meth:`PEFTStrategy.stepped_adapter`; a no-op where nothing is sharded (DDP)."""
    return strategy.stepped_adapter() if isinstance(strategy, PEFTStrategy) else contextlib.nullcontext()


def adapter_state_dict(strategy: Strategy, pl_module: nn.Module) -> OrderedDict[str, Tensor]:
    """The complete adapter of ``pl_module`` under ``strategy`` (gathered if sharded); call on every rank."""
    if isinstance(strategy, PEFTStrategy):
        return strategy.adapter_state_dict()
    return state.trainable_state_dict(pl_module)


def adapter_root(pl_module: nn.Module) -> tuple[str, nn.Module]:
    """The module holding ``pl_module``'s adapter records, with its path: ``pl_module`` itself (where
    PEFTCallback injects), or the one submodule adapters were loaded into before that
    (``lightning_peft.load_adapter(self.model, ...)`` in ``__init__`` or ``configure_model``).

    Raises:
        ValueError: when several submodules hold adapters of their own.
    """
    if state.adapters(pl_module):
        return "", pl_module
    held = [(name, module) for name, module in pl_module.named_modules() if name and state.adapters(module)]
    if len(held) > 1:
        raise ValueError(
            f"{type(pl_module).__name__} holds adapters in several submodules ({', '.join(n for n, _ in held[:3])}); "
            "load or inject all of them into one module (the LightningModule itself, or its model)."
        )
    return held[0] if held else ("", pl_module)


def save_adapter(trainer: pl.Trainer, directory: str | Path) -> Path:
    """``lightning_peft.save_adapter`` for a running Trainer: gathers if sharded, rank 0 writes.

    Writes the active adapter (the one PEFTCallback trains), also where the model holds others.
    Call it on every rank (from a hook or after ``fit`` in the launched script).
    """
    module = trainer.lightning_module
    out = Path(trainer.strategy.broadcast(str(directory)))
    if isinstance(trainer.strategy, PEFTStrategy):  # PEFTCallback lets these train a model of one adapter only
        tensors = trainer.strategy.adapter_state_dict()
        if trainer.is_global_zero:
            io.write_adapter(state.require_info(module), tensors, out)
    elif trainer.is_global_zero:
        _, root = adapter_root(module)
        io.save_adapter(root, out, adapter_name=state.require_info(root).name)
    trainer.strategy.barrier()
    return out


def register(registry: Any = StrategyRegistry) -> None:
    """Add the names in :data:`NAMES` to Lightning's strategy registry (done at import, once)."""
    if all(name in registry for name in NAMES):
        return
    for cls in (PEFTFSDPStrategy, PEFTFSDP2Strategy, PEFTDeepSpeedStrategy):
        cls.register_strategies(registry)


register()
