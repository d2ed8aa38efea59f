"""One projection for the adapter layers that read the same input tensor.

In a transformer block several wrapped layers read one tensor: q/k/v of attention read the
normalized hidden states, gate/up of a gated MLP read the same. Each low-rank adapter multiplies
that input by its own down-projection ``A_i`` (r x in), so a block runs three (N, in) x (in, r)
matmuls where one (N, in) x (in, sum r) matmul would do, and keeps the input for backward once per
product. Here the first layer of a group to see an input (the *leader*) projects it for the whole
group, and the others take their share::

    h_1, ..., h_k = x [A_1; ...; A_k]^T      one (N, in) x (in, sum r) matmul, x saved for backward once
    h_i = x A_i^T

A group is the adapter layers of one injection that sit side by side in one module and take
inputs of the same width and dtype (q/k/v/o of an attention block, gate/up of an MLP): the layers
that *can* share an input. Which of them do is checked on every call, never assumed: a layer only
takes a share computed from the very tensor it was given (the same object, unchanged since: its
version counter) with its current ``A`` (the parameter's version counter), and computes its own
product otherwise (o_proj, whose input is the attention output). The rule depends on nothing but
the calls of the current forward, so the same forward always runs the same products: a resumed run
computes bit for bit what the uninterrupted one did, and gradient checkpointing's recomputation
saves what the first forward saved. Outputs equal separate products up to the summation order of
one matmul.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core import saved_input


class Projecting(Protocol):
    """A layer that can join: its down-projection, ``(r, in)``, applied as ``x @ weight.t()``."""

    shared_inputs: SharedInputs | None

    def shared_weight(self) -> Tensor: ...


class _Projection(torch.autograd.Function):
    """``h_i = x A_i^T`` for every ``A_i`` in one matmul, ``x`` saved once.

    One output per weight (not slices of one), so that a predicted reader that does not come leaves
    its ``A`` without a gradient (``None``, as if it had not been projected), not with a zero one.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        kept = saved_input.keep(x)  # x, or its factors where autograd keeps those anyway
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*kept, *weights)
        hidden = F.linear(x, torch.cat(weights))  # (..., sum r)
        return tuple(h.contiguous() for h in hidden.split([w.shape[0] for w in weights], dim=-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        kept, weights = saved[: ctx.n_kept], saved[ctx.n_kept :]
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[Tensor | None] = [None] * (1 + len(weights))
        if not present:
            return tuple(out)
        grad = torch.cat([grads[i] for i in present], dim=-1)  # type: ignore[misc]  # (..., sum r')
        if ctx.needs_input_grad[0]:
            out[0] = grad @ torch.cat([weights[i] for i in present])  # (..., in)
        if not any(ctx.needs_input_grad[1 + i] for i in present):
            return tuple(out)
        grad_w = saved_input.grad_t_input(grad, kept)  # (sum r', in)
        for i, g in zip(present, grad_w.split([weights[i].shape[0] for i in present]), strict=True):
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
    """One input's projection for the group, and which members took their share."""

    source: weakref.ref[Tensor]
    version: int
    slots: dict[int, _Slot] = field(default_factory=dict)

    def matches(self, x: Tensor) -> bool:
        return self.source() is x and self.version == x._version


class SharedInputs:
    """One group of adapter layers that may read the same input (see the module docstring).

    Held by each member as a plain attribute (not a submodule, no state): copying a model gives
    the copy's layers fresh, empty groups of their own.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        self._members = list(members)
        self._entry: _Entry | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedInputs:
        new = SharedInputs([])
        memo[id(self)] = new
        new._members = [copy.deepcopy(m, memo) for m in self._members]  # the copied model's layers
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"_members": self._members, "_entry": None}

    def project(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """``layer``'s share of the group's projection of ``x``, ``x @ layer.shared_weight().t()``.

        Returns ``None`` when ``layer`` is to compute its own product as usual: it reads an input
        the group's current projection was not made from.
        """
        if x.is_inference() or torch.compiler.is_compiling():
            # No version counter to check (inference_mode); Python-side state a compiled graph would guard on.
            return None
        entry = self._entry
        slot = entry.slots.get(id(layer)) if entry is not None else None
        if entry is not None and slot is not None and not slot.taken and entry.source() is not None:
            slot.taken = True
            hidden, slot.hidden = slot.hidden, None
            if not entry.matches(x):
                return None
            weight = layer.shared_weight()  # type: ignore[operator]
            if slot.weight is weight and slot.version == weight._version and hidden is not None:
                return hidden
            return F.linear(x, weight)
        return self._lead(layer, x)

    def _lead(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        members = [m for m in self._members if m.shared_inputs is self]  # not those unloaded since
        if layer not in members:
            return None
        weights = [m.shared_weight() for m in members]  # type: ignore[operator]
        entry = _Entry(weakref.ref(x), x._version)
        for member, weight in zip(members, weights, strict=True):
            entry.slots[id(member)] = _Slot(weight, weight._version)
        self._entry = entry
        hidden = _Projection.apply(x, *weights)
        own = members.index(layer)
        entry.slots[id(layer)].taken = True
        for i, (member, h) in enumerate(zip(members, hidden, strict=True)):
            if i != own:
                entry.slots[id(member)].hidden = h
        return hidden[own]


def attach(model: nn.Module, layers: list[nn.Module]) -> list[list[str]]:
    """Group ``layers`` (one injection's adapter layers in ``model``) that may share an input.

    Layers are grouped when they sit in the same parent module and their down-projections have the
    same width, dtype and device; a group of one is left alone. Returns the groups, by module name.
    """
    wanted = {id(layer) for layer in layers}
    groups: dict[tuple[Any, ...], list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        if id(module) in wanted:
            weight = module.shared_weight()  # type: ignore[operator]
            site = name
            while site.endswith(".base_layer"):  # a chain of adapters on one base layer: where the chain sits
                site = site.removesuffix(".base_layer")
            parent = site.rpartition(".")[0]
            groups[parent, weight.shape[1], weight.dtype, weight.device].append((name, module))
    found = []
    for group in groups.values():
        unique = list({id(m): (n, m) for n, m in group}.values())  # a module shared under two names: once
        if len(unique) < 2:
            continue
        shared = SharedInputs([m for _, m in unique])
        for _, module in unique:
            module.shared_inputs = shared
        found.append([n for n, _ in unique])
    return found


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
