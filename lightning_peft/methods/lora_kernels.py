"""LoRA's fused linear kernels: autograd functions that keep for backward only what LoRA's gradients need.

Used by :class:`~lightning_peft.methods.lora.LoRALinear` on float bases: :class:`FusedLoRALinear`
computes ``x W + b + s (x A^T) B^T`` with in-place accumulation, :class:`LoRAFromHidden` the same
from a down-projection ``h = x A^T`` that :mod:`lightning_peft.core.shared_input` computed once for
every layer reading ``x``. Both return results identical to the plain autograd expression.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_peft.core import saved_input


def _update(h: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None) -> Tensor:
    """``b + s h B^T``, (N, out): a fresh buffer that the frozen base product then accumulates into.

    The order matters on a CPU, where the rank-r product is bound by memory, not arithmetic: written
    first, it costs one pass over the (N, out) output, and the big product reads it back inside its
    own kernel (``addmm_``'s ``beta = 1``) at no extra cost. Added after the base product, as
    ``out.addmm_(h, B^T)``, it cost a read and a write of the whole output (issue 18: about 4 % of a
    2-layer step on 2 CPU cores).
    """
    scaled = (lora_B * scaling).t()  # (r, out), small
    return torch.addmm(bias, h, scaled) if bias is not None else h @ scaled


class FusedLoRALinear(torch.autograd.Function):
    """``y = x W + b + s (x A^T) B^T`` for a frozen ``W``, keeping only ``x`` and ``h = x A^T`` for backward
    (and not even ``x`` where autograd keeps its factors: see :mod:`lightning_peft.core.saved_input`).

    The plain autograd expression allocates the base output, then the updated output, and in
    backward two full-size input gradients that are then summed. Here the frozen product accumulates
    into the update's buffer (see :func:`_update`), and the input gradient likewise into the rank-r
    one, so a step costs the base layer's memory plus the (N x r) ``h``. ``W`` is (in, out) here: callers pass
    ``weight.t()`` for ``nn.Linear`` and the weight itself for GPT-2's ``Conv1D``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float
    ) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2d @ lora_A.t()  # (N, r)
        out = _update(h, lora_B, scaling, bias).addmm_(x2d, w)  # (N, out)
        kept = saved_input.keep(x)  # x, or its factors where autograd keeps those anyway
        ctx.save_for_backward(h, w, lora_A, lora_B, *kept)
        ctx.scaling, ctx.shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, w, lora_A, lora_B, *kept = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_h = (grad @ lora_B).mul_(ctx.scaling)  # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ lora_A).addmm_(grad, w.t()).view(ctx.shape)  # (N, in): the big product accumulates
        grad_A = saved_input.grad_t_input(grad_h, tuple(kept)) if ctx.needs_input_grad[3] else None  # (r, in)
        grad_B = (grad.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None  # (out, r)
        return grad_x, None, None, grad_A, grad_B, None


class LoRAFromHidden(torch.autograd.Function):
    """``y = x W + b + s h B^T`` for a frozen ``W`` and a given ``h = x A^T``, keeping only ``h`` for backward.

    The layer's share of a projection that :class:`~lightning_peft.core.shared_input.SharedInputs`
    computed once for the layers reading ``x``: ``x`` itself is kept by that one product (for
    ``dA``), not here (the frozen ``W`` needs no input for its gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, h: Tensor, lora_B: Tensor, scaling: float
    ) -> Tensor:
        out = _update(h, lora_B, scaling, bias).addmm_(x, w)  # (N, out)
        ctx.save_for_backward(h, w, lora_B)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, w, lora_B = ctx.saved_tensors
        grad_x = grad @ w.t() if ctx.needs_input_grad[0] else None  # (N, in)
        grad_h = (grad @ lora_B).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None  # (N, r)
        grad_B = (grad.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None  # (out, r)
        return grad_x, None, None, grad_h, grad_B, None
