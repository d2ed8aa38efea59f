"""What a LoRA layer keeps of its input for backward (core.saved_input): factors autograd keeps anyway,
recomputed to the same bits, or the input itself wherever that cannot be relied on."""

from __future__ import annotations

import torch

from lightning_peft.core import saved_input


def norm_like() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)  # a frozen weight
    h = torch.randn(3, 5, 8, generator=g).requires_grad_(True)
    return w, h, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_product_of_two_kept_factors_is_recomputed_to_the_bit() -> None:
    a, b = (torch.randn(4, 6).requires_grad_(True) for _ in range(2))
    x = torch.nn.functional.silu(a) * b
    kept = saved_input.keep(x)
    assert len(kept) == 2 and not any(t is x for t in kept)
    assert torch.equal(saved_input.restore(kept), x)


def test_a_frozen_weight_times_a_kept_product_is_recomputed_to_the_bit() -> None:
    w, h, r = norm_like()
    x = w * (h * r)  # RMSNorm
    kept = saved_input.keep(x)
    assert len(kept) == 3 and kept[0] is w
    assert torch.equal(saved_input.restore(kept), x)
    y = (h * r) * w  # the weight as the second factor
    assert torch.equal(saved_input.restore(saved_input.keep(y)), y)


def test_the_input_itself_is_kept_where_the_factors_cannot_be_relied_on() -> None:
    w, h, r = norm_like()
    inner = h * r
    inner.mul_(2)  # the factor changed after the inner product: not that product's output any more
    assert len(saved_input.keep(w * inner)) == 1
    x = w * (h.clone() * r)
    assert len(saved_input.keep(x)) == 3
    w64 = w.double()
    assert len(saved_input.keep(w64 * (h * r))) == 1  # type promotion: not the factors' dtype
    assert len(saved_input.keep(h + 1)) == 1  # not a product
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert len(saved_input.keep(w * (h * r))) == 1  # hooks own what autograd keeps (checkpointing)
    a = torch.randn(4, 6).requires_grad_(True)
    assert len(saved_input.keep(a * torch.randn(6))) == 1  # a factor that is not kept (needs no gradient)


def test_grad_t_input_is_the_product_with_the_input() -> None:
    w, h, r = norm_like()
    grad = torch.randn(3, 5, 4)
    for x in (w * (h * r), torch.nn.functional.silu(h) * h.exp(), h * 2):
        kept = saved_input.keep(x)
        want = grad.reshape(-1, 4).t() @ x.detach().reshape(-1, 8)
        torch.testing.assert_close(saved_input.grad_t_input(grad, kept), want, rtol=1e-5, atol=1e-6)
    assert saved_input._rows_and_columns(saved_input.keep(w * (h * r))) is not None  # the norm's shortcut taken
