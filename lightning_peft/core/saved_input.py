"""Keeping a layer's input for backward without a copy of its own, where autograd already keeps its factors.

A LoRA layer needs its input ``x`` in backward (``dA = dh^T x``), which the frozen base layer does
not (``dx = dy W`` needs only ``W``). When ``x`` is an elementwise product whose factors autograd
keeps anyway for the product's own backward, ``x`` itself need not be kept: it is recomputed in
backward, bit for bit, from those factors, which stay alive until the product's backward runs
after ours anyway. Two shapes of product occur in the blocks LoRA targets:

* ``x = a * b`` with both factors kept: SwiGLU's ``act(gate) * up`` in front of ``down_proj``
  (``d/d up`` needs ``act(gate)``, ``d/d act(gate)`` needs ``up``): the widest activation of a gated
  MLP (N x intermediate) per layer.
* ``x = w * (h * r)`` where the outer product keeps only ``w`` and the inner one keeps ``h`` and ``r``:
  RMSNorm's ``weight * (hidden * rsqrt(mean(hidden^2) + eps))`` with a frozen weight, in front of
  q/k/v and gate/up (LLaMA, Mistral, Qwen, ...): an (N x hidden) input per norm.

Anything else is kept as it is. Recomputed in the order the forward computed it (the inner product
first), each elementwise product gives the same bits again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _no_saved_tensor_hooks() -> bool:
    # Under saved-tensor hooks (activation checkpointing, CPU offloading) the factors' saved form is
    # the hooks' (a recomputation, a host copy): reading them back would cost what it saves.
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _saved(node: Any) -> tuple[Tensor | None, Tensor | None] | None:
    """The two factors an elementwise product's backward node keeps (``None`` for one it does not keep)."""
    if type(node).__name__ != "MulBackward0":
        return None
    try:
        return node._saved_self, node._saved_other
    except RuntimeError:  # a factor changed in place since: nothing to rely on
        return None


def _fits(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the product of ``tensors`` is ``x``'s shape (as they broadcast), dtype and device."""
    if not all(isinstance(t, Tensor) and t.dtype == x.dtype and t.device == x.device for t in tensors):
        return False
    return torch.broadcast_shapes(*(t.shape for t in tensors)) == x.shape  # type: ignore[union-attr]


def factors(x: Tensor) -> tuple[Tensor, ...] | None:
    """``(a, b)`` with ``x == a * b``, or ``(w, h, r)`` with ``x == w * (h * r)``, all already kept by
    autograd; else ``None``."""
    node = x.grad_fn
    if node is None or not _no_saved_tensor_hooks():
        return None
    outer = _saved(node)
    if outer is None:
        return None
    a, b = outer
    if a is not None and b is not None:
        return (a, b) if a.shape == b.shape and _fits(x, a, b) else None
    # One factor is not kept (the kept one needs no gradient: a frozen weight). The other may be a
    # product whose own backward keeps both its factors, if it is that product's output as made.
    kept, index = (a, 1) if a is not None else (b, 0)
    inner_node, output = node.next_functions[index]
    inner = _saved(inner_node) if kept is not None and inner_node is not None and output == 0 else None
    if inner is None or inner[0] is None or inner[1] is None:
        return None
    h, r = inner
    return (kept, h, r) if _fits(x, kept, h, r) else None  # type: ignore[return-value]


def keep(x: Tensor) -> tuple[Tensor, ...]:
    """What to save for ``x`` (pass to ``ctx.save_for_backward``): its factors, or ``x`` itself."""
    found = factors(x)
    return found if found is not None else (x,)


def restore(saved: tuple[Tensor, ...]) -> Tensor:
    """``x`` from what :func:`keep` returned (the products recomputed, the inner one first)."""
    if len(saved) == 1:
        return saved[0]
    if len(saved) == 2:
        return saved[0] * saved[1]
    return saved[0] * (saved[1] * saved[2])
