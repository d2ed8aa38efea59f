"""LoRA's fused linear kernels against the formula written out (issue 18).

``y = x W^T + b + s (x A^T) B^T`` (Hu et al., 2021, eq. 3, with peft's ``s = alpha / r``) and its
gradients, computed by plain autograd on the written-out expression, are the reference for both
:class:`FusedLoRALinear` and :class:`LoRAFromHidden` (which takes ``h = x A^T`` as given): the same
values within 1e-6 in float32, and gradients on exactly the tensors that need one.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_peft.methods.lora_kernels import FusedLoRALinear, LoRAFromHidden

IN, OUT, R, S = 24, 40, 4, 0.75


def tensors(dtype: torch.dtype, bias: bool) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(3, 5, IN, generator=g, dtype=dtype),
        "W": torch.randn(OUT, IN, generator=g, dtype=dtype),
        "b": torch.randn(OUT, generator=g, dtype=dtype) if bias else None,
        "A": torch.randn(R, IN, generator=g, dtype=dtype),
        "B": torch.randn(OUT, R, generator=g, dtype=dtype),
    }


def formula(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor) -> Tensor:
    y = x @ W.t() + S * (x @ A.t()) @ B.t()
    return y if b is None else y + b


def leaves(t: dict[str, Tensor | None], trainable: tuple[str, ...]) -> dict[str, Tensor | None]:
    return {k: (v.clone().requires_grad_(k in trainable) if v is not None else None) for k, v in t.items()}


def gradients(fn: object, t: dict[str, Tensor | None], upstream: Tensor) -> tuple[Tensor, dict[str, Tensor | None]]:
    y = fn(**t)  # type: ignore[operator]
    y.backward(upstream)
    return y.detach(), {k: v.grad for k, v in t.items() if v is not None}


def fused(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor) -> Tensor:
    return FusedLoRALinear.apply(x, W.t(), b, A, B, S)


def from_hidden(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor) -> Tensor:
    x2d = x.reshape(-1, IN)
    return LoRAFromHidden.apply(x2d, W.t(), b, x2d @ A.t(), B, S).view(*x.shape[:-1], OUT)


@pytest.mark.parametrize("kernel", [fused, from_hidden], ids=["fused", "from_hidden"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("input_grad", [False, True], ids=["frozen_input", "input_grad"])
def test_values_and_gradients_are_the_formulas(kernel: object, bias: bool, input_grad: bool) -> None:
    trainable = ("A", "B") + (("x",) if input_grad else ())
    base = tensors(torch.float64, bias)
    upstream = torch.randn(3, 5, OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want, want_grads = gradients(formula, leaves(base, trainable), upstream)
    got, got_grads = gradients(kernel, leaves(base, trainable), upstream)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in ("x", "W", "b", "A", "B"):
        if base[name] is None:
            continue
        assert (got_grads[name] is None) == (name not in trainable), name  # exactly the trainable tensors
        if name in trainable:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("kernel", [fused, from_hidden], ids=["fused", "from_hidden"])
def test_float32_within_1e_6_of_the_formula(kernel: object) -> None:
    t = tensors(torch.float32, bias=True)
    t["B"] = t["B"] * 0.05  # an update of a trained adapter's size against the frozen product
    with torch.no_grad():
        got, want = kernel(**t), formula(**t)  # type: ignore[operator]
    assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())
