"""What every PEFT strategy shares: the :class:`PEFTStrategy` interface that PEFTCallback and
the method hooks talk to, the helpers that name and load a trainable-only state, and
:class:`PEFTCheckpointIO`, through which every strategy PEFTCallback runs reads and writes
checkpoint files (plain-tensor loading, atomic saving)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.fabric.utilities.types import _PATH
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft.core import files, state

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    from lightning_peft.core.config import Sharding

#: Prefixes that wrappers (FSDP1, activation checkpointing) insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def clean_state(sd: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    out: OrderedDict[str, Tensor] = OrderedDict((clean_name(k), v) for k, v in sd.items())
    out._metadata = {clean_name(k): v for k, v in getattr(sd, "_metadata", {}).items()}  # type: ignore[attr-defined]
    return out


def is_sharded(module: nn.Module) -> bool:
    """Whether a sharding wrapper (FSDP1, FSDP2, DeepSpeed ZeRO-3) already holds ``module``'s weights."""
    from torch.distributed.tensor import DTensor

    for param in module.parameters():
        if isinstance(param, DTensor) or hasattr(param, "ds_id") or type(param).__name__ == "FlatParameter":
            return True
    return False


class PEFTStrategy:
    """Marks a strategy whose checkpoints PEFTCallback leaves alone (the strategy trims them itself)."""

    @property
    def sharding(self) -> Sharding:
        """How this strategy lays out the base weights (a method's ``sharding`` must list it)."""
        raise NotImplementedError

    def adapter_state_dict(self) -> OrderedDict[str, Tensor]:
        """The complete adapter (CPU tensors, frozen weights never gathered); call on every rank."""
        raise NotImplementedError

    def adapter_params(self) -> list[nn.Parameter]:
        """The trained module's adapter parameters: what this strategy gathers, and nothing else."""
        module = self.lightning_module  # type: ignore[attr-defined]  # Strategy's, in every subclass
        assert module is not None
        return [p for _, p in state.adapter_parameters(module)]

    @contextlib.contextmanager
    def adapter_gradients(self, keep: bool = False) -> Generator[None, None, None]:
        """Between backward and the optimizer step: each adapter parameter whole, with its whole,
        reduced gradient in ``.grad`` (where a plain loop has it); what is added to ``.grad``
        inside reaches the optimizer. For a method's penalty gradient.

        Args:
            keep: :meth:`stepped_adapter` follows and needs these gradients after the step.
        """
        yield

    @contextlib.contextmanager
    def stepped_adapter(self) -> Generator[None, None, None]:
        """After the optimizer step: each adapter tensor whole and writable, with the step's
        gradients in ``.grad``; what is written inside is kept. For a method's per-step work."""
        yield

    @contextlib.contextmanager
    def calibration(self) -> Generator[Callable[..., Any], None, None]:
        """Yields the ``training_step`` that a method's calibration (top-k) scores batches with.

        It runs outside the training loop, with ``torch.autograd.grad`` instead of ``backward``:
        the strategy says how to call the module there and tidies up after it.
        """
        assert self.lightning_module is not None
        yield self.lightning_module.training_step


#: Writes validated adapter tensors into the (sharded) model: ``(tensors, where)``. It checks their
#: shapes against the whole tensors (:func:`lightning_peft.core.state.check_tensors`) before any copy.
WriteFn = Callable[[Mapping[str, Tensor], str], None]


def load_adapter_into(pl_module: nn.Module, tensors: Mapping[str, Tensor], write: WriteFn, where: str) -> None:
    """Validate a trainable-only state dict against ``pl_module``'s adapter, then ``write`` it in.

    Nothing is written unless the record (method, options, base model) fits and every adapter
    tensor is present and finite; ``write`` then checks the shapes before its first copy.

    Args:
        pl_module: the module holding the adapter.
        tensors: the checkpoint's state dict.
        write: copies them into the model (see :data:`WriteFn`).
        where: the checkpoint, for errors.
    """
    info = state.require_info(pl_module)
    record = state.read_metadata(tensors)  # type: ignore[arg-type]
    if record is not None:
        state.check_record(info, record, where)
    expected = [clean_name(n) for n, _ in state.adapter_state(pl_module)]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(
            f"{where} lacks adapter weights: {', '.join(missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}. It is incomplete or not a "
            "lightning_peft checkpoint."
        )
    state.check_finite({k: tensors[k] for k in expected}, where)
    write(tensors, where)


def checkpoint_state(checkpoint: Any, where: str) -> dict[str, Any]:
    """``checkpoint`` if it is a Lightning checkpoint (a mapping with a ``state_dict``); else a clear error."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise files.FileContentError(
            f"{where} is not a Lightning checkpoint: it holds {type(checkpoint).__name__}"
            + (f" with keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else "")
            + ", and no 'state_dict'. Pass a .ckpt written by Trainer.fit with PEFTCallback."
        )
    return checkpoint


class PEFTCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` through lightning_peft's file helpers.

    ``load_checkpoint`` is ``torch.load(weights_only=True)`` whatever the Trainer passes (Lightning's
    ``None`` becomes ``False`` in some strategies), so a checkpoint holding a pickled object is
    refused, never unpickled (:func:`lightning_peft.core.files.load_torch`). ``save_checkpoint``
    replaces the file atomically in its own folder (:func:`lightning_peft.core.files.atomic_write`),
    where Lightning's default stages it in ``$TMPDIR`` and copies it across filesystems. Remote
    paths (``s3://``, ...) are read through fsspec the same way and written as Lightning does.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        files.save_torch(checkpoint, get_filesystem(path)._strip_protocol(str(path)))

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        fs = get_filesystem(path)
        if _is_local_file_protocol(path):
            return files.load_torch(fs._strip_protocol(str(path)), map_location=map_location)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} is missing.")
        with fs.open(path, "rb") as handle:
            return files.load_torch(handle, map_location=map_location, name=str(path))


def secure(strategy: Strategy) -> None:
    """Give ``strategy`` :class:`PEFTCheckpointIO` where it would use Lightning's default
    ``TorchCheckpointIO``; a checkpoint IO passed by the user (async, cloud) is kept."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    current = strategy._checkpoint_io  # the property would put a default one there first
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = PEFTCheckpointIO()
    elif isinstance(current, _WrappingCheckpointIO) and current.checkpoint_io is None:
        current.checkpoint_io = PEFTCheckpointIO()
