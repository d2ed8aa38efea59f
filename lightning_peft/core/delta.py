"""A layer that trains a delta on some of its wrapped module's own parameters.

Selective methods (BitFit, the last k blocks, importance-based top-k) train a subset of the base
model's parameters rather than adding new ones. They share this wrapper: for each selected
parameter ``p`` of the wrapped module it holds either a dense delta of ``p``'s shape, or values at
chosen flat positions (a sparse delta)::

    p_eff = p + delta                              (dense)
    p_eff.flatten()[indices] = p.flatten()[indices] + values,  other entries exactly p   (sparse)

and runs the wrapped module with ``p_eff``. Keeping the delta apart from the frozen ``p`` gives
every selective method what the others have: the base stays untouched (``unload(merge=False)``
returns it), ``merge`` folds the delta in, the optimizer (and weight decay) only ever sees the
selected entries, and checkpoints hold only them.

``p_eff`` is put in place at the start of the wrapped module's own forward (a pre-hook, removed
again after the call), not before calling it: a sharding wrapper around the wrapped module (an
FSDP1 unit) gathers ``p`` only there, so that is the one point where ``p`` is whole under every
strategy. ``p_eff`` shadows ``p`` as an instance attribute and never replaces it in
``_parameters``, which the sharding engines keep walking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import AdapterLayer

if TYPE_CHECKING:
    from lightning_peft.core.config import Sharding


class _Buffers(nn.Module):
    """A named set of buffers (``nn.ParameterDict`` has no buffer counterpart)."""

    def __init__(self, buffers: Mapping[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers


class DeltaLayer(AdapterLayer):
    """Wraps a module and trains a dense or sparse delta on chosen parameters of its own.

    Args:
        base_layer: the module whose parameters are tuned; only its direct parameters
            (``named_parameters(recurse=False)``) can be selected.
        dense: names of parameters trained in full (a delta of the same shape, zero at init).
        sparse: ``{name: k}`` for parameters of which k entries are trained; their positions
            start as the first k and are set with :meth:`select`.

    Subclasses set ``method`` (the registered method they belong to).
    """

    adapter_names = ("delta", "values", "indices")
    # The deltas sit in ParameterDicts, which are never called: ZeRO-3 must gather them with the layer.
    gather_as_unit = True
    stackable = False  # it shadows the base layer's own parameters, which a second delta would shadow again
    #: The shardings (:data:`lightning_peft.registry.Sharding`) this layer trains correctly under.
    shardings: frozenset[Sharding] = frozenset({"fsdp", "fsdp2", "zero1", "zero2", "zero3"})

    def __init__(
        self, base_layer: nn.Module, dense: Iterable[str] = (), sparse: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(base_layer)
        own = dict(base_layer.named_parameters(recurse=False))
        sparse = dict(sparse or {})
        for name in [*dense, *sparse]:
            if name not in own:
                raise TypeError(f"{type(base_layer).__name__} has no parameter {name!r} of its own ({sorted(own)})")
        self.delta = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(own[n].shape, **self._factory(own[n]))) for n in dense}
        )
        self.values = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(k, **self._factory(own[n]))) for n, k in sparse.items()}
        )
        self.indices = _Buffers({n: torch.arange(k, device=own[n].device) for n, k in sparse.items()})
        #: The whole shape of each selected parameter (a strategy may later hold only a shard of it).
        self.shapes: dict[str, torch.Size] = {n: own[n].shape for n in [*dense, *sparse]}
        self._shadowed: dict[str, Tensor | None] = {}
        self._recorder: list[tuple[DeltaLayer, str, Tensor]] | None = None

    @staticmethod
    def _factory(param: Tensor) -> dict[str, Any]:
        return AdapterLayer.adapter_factory(param)

    def _own(self) -> dict[str, Tensor]:
        return dict(self.base_layer.named_parameters(recurse=False))

    def _names(self) -> list[str]:
        return [*self.delta.keys(), *self.values.keys()]

    def select(self, name: str, indices: Tensor) -> None:
        """Set the flat positions of ``name`` that :attr:`values` trains (sorted, distinct, k of them)."""
        current = self.indices[name]
        if indices.shape != current.shape:
            raise ValueError(f"{name}: expected {current.numel()} positions, got shape {tuple(indices.shape)}")
        with torch.no_grad():
            current.copy_(indices)
            self.values[name].zero_()

    def effective_parameters(self, own: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The selected parameters with their deltas applied (differentiable in the deltas).

        Args:
            own: the base tensors to apply them to (default: the base layer's parameters).
        """
        own = self._own() if own is None else own
        out = {n: own[n] + d.to(own[n].dtype) for n, d in self.delta.items()}
        for n, v in self.values.items():
            p = own[n]
            out[n] = p.reshape(-1).index_add(0, self.indices[n], v.to(p.dtype)).view_as(p)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.bypassed:
            return self.base_layer(*args, **kwargs)
        owner = self.base_owner(self._names())
        # Registered per call, so that they run after any hook a strategy put on the owner (which
        # may be what gathers its parameters) on the way in, and before them on the way out.
        pre = owner.register_forward_pre_hook(self._shadow)
        post = owner.register_forward_hook(self._unshadow, prepend=True, always_call=True)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            pre.remove()
            post.remove()

    def _shadow(self, owner: nn.Module, args: Any) -> None:
        """Inside the owner's forward, where its parameters are whole: read ``p``, put ``p_eff`` over it."""
        names = self._names()
        effective = self.effective_parameters({n: getattr(owner, n) for n in names})
        for name in names:
            tensor = effective[name]
            if self._recorder is not None:
                self._recorder.append((self, name, tensor))
            # An instance attribute wins over ``_parameters`` in attribute lookup; a wrapper's own
            # instance attribute (FSDP1 keeps its unsharded views there) is put back afterwards.
            self._shadowed[name] = owner.__dict__.get(name)
            owner.__dict__[name] = tensor

    def _unshadow(self, owner: nn.Module, args: Any, output: Any) -> None:
        for name, previous in self._shadowed.items():
            if previous is None:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous
        self._shadowed.clear()

    @contextlib.contextmanager
    def record_effective(self, into: list[tuple[DeltaLayer, str, Tensor]]) -> Generator[None, None, None]:
        """Append ``(self, name, p_eff)`` to ``into`` for every effective parameter built meanwhile.

        ``p_eff`` is built where ``p`` is whole, and ``dL/dp_eff = dL/dp``: differentiating a loss
        with respect to the recorded tensors gives the whole gradient of every selected ``p``
        under any sharding, without touching ``.grad`` (top-k's calibration scores it).
        """
        self._recorder = into
        try:
            yield
        finally:
            self._recorder = None

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            for tensor in [*self.delta.values(), *self.values.values()]:
                tensor.zero_()

    def _apply_delta(self, sign: float) -> None:
        own = self._own()
        for n, d in self.delta.items():
            own[n].add_(d.to(own[n].dtype), alpha=sign)
        for n, v in self.values.items():
            own[n].view(-1).index_add_(0, self.indices[n], v.to(own[n].dtype), alpha=sign)

    def _merge(self) -> None:
        self._apply_delta(1.0)

    def _unmerge(self) -> None:
        self._apply_delta(-1.0)

    def extra_repr(self) -> str:
        parts = [f"{n}: dense" for n in self.delta] + [f"{n}: {v.numel()} entries" for n, v in self.values.items()]
        return ", ".join(parts)
