"""One projection for the adapter layers that read the same input tensor.

In a transformer block several wrapped layers read one tensor: q/k/v of attention read the
normalized hidden states, gate/up of a gated MLP read the same. Each low-rank adapter multiplies
that input by its own down-projection ``A_i`` (r x in), so a block runs three (N, in) x (in, r)
matmuls where one (N, in) x (in, sum r) matmul would do, and keeps the input for backward once per
product. :class:`SharedInputs` lets those layers meet: the first layer to see an input (the
*leader*) projects it with the concatenated ``[A_1; A_2; ...]`` of the layers that read the same
tensor last time, and each of them takes its slice::

    H = x [A_1; ...; A_k]^T          (N, sum r), one matmul, x saved for backward once
    h_i = H[:, r_1 + ... + r_{i-1} : r_1 + ... + r_i] = x A_i^T

Which layers share an input is learned, not declared: it is whatever the forward does. A layer that
reads an input another layer led is recorded as a peer, and from the leader's next call on it is
projected with it; a predicted peer that does not show up is dropped. A layer only ever takes a
slice computed from the very tensor it was given (same object, unchanged since: the tensor's
version counter) with its current ``A`` (the parameter's version counter), so a wrong guess costs
a few columns of compute, never a wrong result. Outputs equal separate products up to the
summation order of one matmul.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Projecting(Protocol):
    """A layer that can join: its down-projection, ``(r, in)``, applied as ``x @ weight.t()``."""

    def shared_weight(self) -> Tensor: ...


class _Projection(torch.autograd.Function):
    """``h_i = x A_i^T`` for every ``A_i`` in one matmul, ``x`` saved once.

    One output per weight (not slices of one), so that a predicted reader that does not come leaves
    its ``A`` without a gradient (``None``, as if it had not been projected), not with a zero one.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, *weights)
        hidden = F.linear(x, torch.cat(weights))  # (..., sum r)
        return tuple(h.contiguous() for h in hidden.split([w.shape[0] for w in weights], dim=-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[Tensor | None] = [None] * (1 + len(weights))
        if not present:
            return tuple(out)
        grad = torch.cat([grads[i] for i in present], dim=-1)  # type: ignore[misc]  # (..., sum r')
        if ctx.needs_input_grad[0]:
            out[0] = grad @ torch.cat([weights[i] for i in present])  # (..., in)
        grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = grad_2d.t() @ x_2d  # (sum r', in)
        for i, g in zip(present, grad_w.split([weights[i].shape[0] for i in present])):
            if ctx.needs_input_grad[1 + i]:
                out[1 + i] = g
        return tuple(out)


@dataclass
class _Slot:
    weight: Tensor
    version: int
    hidden: Tensor | None = None
    taken: bool = False


@dataclass
class _Entry:
    """One input's projection: for whom it was computed, and who came for it."""

    leader: weakref.ref[nn.Module]
    source: weakref.ref[Tensor]
    version: int
    slots: dict[int, _Slot] = field(default_factory=dict)
    layers: dict[int, weakref.ref[nn.Module]] = field(default_factory=dict)
    late: list[weakref.ref[nn.Module]] = field(default_factory=list)

    def matches(self, x: Tensor) -> bool:
        return self.source() is x and self.version == x._version


class SharedInputs:
    """The meeting point of the adapter layers of one injection (see the module docstring).

    Held by each participating layer as a plain attribute (not a submodule, no state): copying a
    model gives the copy a fresh, empty one.
    """

    def __init__(self) -> None:
        self._by_input: dict[int, _Entry] = {}  # id(input) -> its entry (checked against a weakref)
        self._led: dict[int, _Entry] = {}  # id(leader) -> the entry it led last
        self._peers: dict[int, list[weakref.ref[nn.Module]]] = {}  # id(leader) -> who read its input

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedInputs:
        return SharedInputs()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def project(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """``x @ layer.shared_weight().t()``, shared with the other layers reading ``x``.

        Returns ``None`` when ``layer`` leads ``x`` alone (no known peers): the caller then
        computes its own product as usual, and the entry left behind lets later readers of ``x``
        be learned as its peers.
        """
        entry = self._by_input.get(id(x))
        if entry is not None and entry.matches(x):
            slot = entry.slots.get(id(layer))
            if slot is not None and not slot.taken:
                slot.taken = True
                weight = layer.shared_weight()  # type: ignore[operator]
                hidden, slot.hidden = slot.hidden, None
                if all(s.taken for s in entry.slots.values()):
                    del self._by_input[id(x)]
                fresh = slot.weight is weight and slot.version == weight._version
                return hidden if fresh and hidden is not None else F.linear(x, weight)
            if slot is None and entry.leader() is not layer:
                entry.late.append(weakref.ref(layer))
                return F.linear(x, layer.shared_weight())  # type: ignore[operator]
        return self._lead(layer, x)

    def _lead(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        # Gradient checkpointing runs the forward again inside backward and requires the same saved
        # tensors: the peers learned so far stay as they were in the original forward until the next one.
        if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
            self._learn(layer)
        self._forget_dead()
        members = [layer] + [p for p in (ref() for ref in self._peers.get(id(layer), [])) if p is not None]
        weights = [m.shared_weight() for m in members]  # type: ignore[operator]
        members = [m for m, w in zip(members, weights) if w.dtype == weights[0].dtype and w.device == weights[0].device]
        weights = [w for w in weights if w.dtype == weights[0].dtype and w.device == weights[0].device]
        entry = _Entry(weakref.ref(layer), weakref.ref(x), x._version)
        for member, weight in zip(members, weights):
            entry.slots[id(member)] = _Slot(weight, weight._version)
            entry.layers[id(member)] = weakref.ref(member)
        entry.slots[id(layer)].taken = True
        self._by_input[id(x)] = entry
        self._led[id(layer)] = entry
        if len(members) == 1:
            return None
        hidden = _Projection.apply(x, *weights)
        for member, h in zip(members[1:], hidden[1:]):
            entry.slots[id(member)].hidden = h
        return hidden[0]

    def _learn(self, leader: nn.Module) -> None:
        """Update ``leader``'s peers from the input it led last: who came, and who came uninvited."""
        last = self._led.pop(id(leader), None)
        if last is None:
            return
        came = [last.layers[key] for key, slot in last.slots.items() if slot.taken and key != id(leader)]
        self._peers[id(leader)] = [ref for ref in came + last.late if ref() is not None]
        if self._by_input.get(id(last.source())) is last:
            del self._by_input[id(last.source())]

    def _forget_dead(self) -> None:
        for key in [k for k, e in self._by_input.items() if e.source() is None]:
            del self._by_input[key]


def attach(layers: list[nn.Module]) -> SharedInputs:
    """Let ``layers`` (one injection's adapter layers) share projections of common inputs."""
    shared = SharedInputs()
    for layer in layers:
        layer.shared_inputs = shared
    return shared


def detach(model: nn.Module) -> int:
    """Turn shared projections off in ``model`` (sharded strategies, where layers may sit in
    different units whose weights are gathered one unit at a time). Returns how many layers had them.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "shared_inputs", None) is not None:
            module.shared_inputs = None
            count += 1
    return count
