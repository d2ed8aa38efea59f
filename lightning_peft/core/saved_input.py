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
first), each elementwise product gives the same bits again; LoRA's ``dA = dh^T x`` of a norm's output
needs no recomputation at all (:func:`grad_t_input`).
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


def _rows_and_columns(saved: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(full, row, column)`` when the three factors are an ``(..., in)`` tensor, a per-row ``(..., 1)``
    and a per-feature ``(in,)`` one (RMSNorm's hidden, rsqrt and weight); else ``None``."""
    full = [t for t in saved if t.shape == torch.broadcast_shapes(*(u.shape for u in saved))]
    if len(full) != 1:
        return None
    rest = [t for t in saved if t is not full[0]]
    width, lead = full[0].shape[-1], full[0].shape[:-1]
    row = [t for t in rest if t.dim() == full[0].dim() and t.shape[-1] == 1 and t.shape[:-1] == lead]
    col = [t for t in rest if t.numel() == width and t.shape[-1] == width]
    if len(row) != 1 or len(col) != 1 or row[0] is col[0]:
        return None
    return full[0], row[0], col[0]


def grad_t_input(grad: Tensor, saved: tuple[Tensor, ...]) -> Tensor:
    """``grad^T x`` for an ``(..., k)`` gradient and the ``(..., in)`` input ``x`` that :func:`keep` saved:
    ``(k, in)``, LoRA's ``dA`` (``k = r``) or the stacked ``dA`` of a shared projection (``k = sum r``).

    For ``x = w * (h * r)`` with ``w`` per feature and ``r`` per row, ``x`` is not rebuilt: since
    ``x[n, j] = w[j] h[n, j] r[n]``, ``grad^T x = ((grad * r)^T h) * w``, an (N x k) and a (k x in)
    scaling instead of two passes over (N x in). Equal to the product with ``x`` up to float rounding.
    """
    g = grad.reshape(-1, grad.shape[-1])
    split = _rows_and_columns(saved) if len(saved) == 3 else None
    if split is not None:
        full, row, col = split
        return ((g * row.reshape(-1, 1)).t() @ full.reshape(-1, full.shape[-1])).mul_(col.reshape(-1))
    x = restore(saved)
    return g.t() @ x.reshape(-1, x.shape[-1])
