"""Keeping a layer's input for backward without a copy of its own, where autograd already keeps its factors.

A LoRA layer needs its input ``x`` in backward (``dA = dh^T x``), which the frozen base layer does
not (``dx = dy W`` needs only ``W``). When ``x`` is an elementwise product ``x = a * b`` whose factors
the product's own backward already keeps (SwiGLU's ``act(gate) * up`` in front of ``down_proj``:
``d/d up`` needs ``act(gate)``, ``d/d act(gate)`` needs ``up``), ``x`` itself need not be kept: it is
recomputed in backward, bit for bit, from ``a`` and ``b``, which stay alive until the product's
backward runs after ours anyway. That saves the widest activation of a gated MLP (N x intermediate)
per layer. Anything else is kept as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _no_saved_tensor_hooks() -> bool:
    # Under saved-tensor hooks (activation checkpointing, CPU offloading) the factors' saved form is
    # the hooks' (a recomputation, a host copy): reading them back would cost what it saves.
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def factors(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(a, b)`` with ``x == a * b`` elementwise, both already kept by autograd; else ``None``."""
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0" or not _no_saved_tensor_hooks():
        return None
    try:
        a, b = node._saved_self, node._saved_other
    except (AttributeError, RuntimeError):  # not saved (a factor without grad), or changed in place since
        return None
    same = all(
        isinstance(t, Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device for t in (a, b)
    )
    return (a, b) if same else None


def keep(x: Tensor) -> tuple[Tensor, ...]:
    """What to save for ``x`` (pass to ``ctx.save_for_backward``): its factors, or ``x`` itself."""
    found = factors(x)
    return found if found is not None else (x,)


def restore(saved: tuple[Tensor, ...]) -> Tensor:
    """``x`` from what :func:`keep` returned (the product of the factors, recomputed)."""
    return saved[0] if len(saved) == 1 else saved[0] * saved[1]
