"""What every PEFT strategy shares: the :class:`PEFTStrategy` interface that PEFTCallback and
the method hooks talk to, and the helpers that name and load a trainable-only state."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_peft.core import state

if TYPE_CHECKING:
    from lightning_peft.registry import Sharding

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


def load_adapter_into(
    pl_module: nn.Module, tensors: Mapping[str, Tensor], write: Callable[[Mapping[str, Tensor]], None]
) -> None:
    """Validate a trainable-only state dict against ``pl_module``'s adapter, then ``write`` it in."""
    info = state.require_info(pl_module)
    record = state.read_metadata(tensors)  # type: ignore[arg-type]
    if record is not None:
        state.check_record(info, record)
    expected = [clean_name(n) for n, _ in state.adapter_state(pl_module)]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(
            f"the checkpoint lacks adapter weights: {', '.join(missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}. It is incomplete or not a "
            "lightning_peft checkpoint."
        )
    write(tensors)
