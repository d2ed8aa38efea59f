"""Shared input projections (issue 18, point 1): LoRA layers that read one input project it once.

Every check compares a model with the shared projections against a copy without them
(``shared_input.detach``): the same outputs, the same gradients on exactly the same parameters,
the same checkpoint. The reference for ``h_i`` is the paper's ``h_i = x A_i^T`` layer by layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import shared_input
from lightning_peft.core.shared_input import SharedInputs
from tests import tiny


def llama(dtype: torch.dtype = torch.float64, b_std: float = 1.0, **options: object) -> nn.Module:
    torch.manual_seed(0)
    model = lp.inject(tiny.build("llama").to(dtype), "lora", r=4, target_modules="all-linear", **options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=b_std)  # B = 0 at init would hide a wrong h_i
    return model


def pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    plain = copy.deepcopy(model)
    assert shared_input.detach(plain) > 0
    return model, plain


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), grads(model)


def test_layers_beside_each_other_are_grouped_by_input_width() -> None:
    model = llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared_inputs is attn.k_proj.shared_inputs is attn.v_proj.shared_inputs
    assert attn.o_proj.shared_inputs is attn.q_proj.shared_inputs  # same width: it may read the same tensor
    assert mlp.gate_proj.shared_inputs is mlp.up_proj.shared_inputs is not attn.q_proj.shared_inputs
    assert mlp.down_proj.shared_inputs is None  # a group of one (its input is wider)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_outputs_and_gradients_equal_separate_projections(checkpointing: bool) -> None:
    fused, plain = pair(llama())
    for model in (fused, plain):
        if checkpointing:
            lp.enable_gradient_checkpointing(model)
        model.train()
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (fused, plain)]
    for _ in range(3):  # later steps too: nothing carries over from one forward to the next
        (loss, got), (ref_loss, want) = step(fused, ids), step(plain, ids)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        assert got.keys() == want.keys()
        for name in want:
            assert (got[name] is None) == (want[name] is None), name
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
        for optimizer in optimizers:
            optimizer.step()


def test_float32_forward_within_1e_6() -> None:
    fused, plain = pair(llama(torch.float32, b_std=0.05))  # an update of a trained adapter's size
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = fused(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())


def test_the_shared_projection_is_the_formula_and_runs_once_per_input(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.lora_A.shape[1], dtype=torch.float64)
    calls = []
    original = shared_input._Projection.apply
    monkeypatch.setattr(shared_input._Projection, "apply", lambda *a: calls.append(a) or original(*a))
    got = {name: getattr(attn, name).shared_inputs.project(getattr(attn, name), x) for name in ("q_proj", "k_proj")}
    assert len(calls) == 1 and len(calls[0]) == 1 + 4  # x and the four A of q/k/v/o, one product
    for name, h in got.items():
        torch.testing.assert_close(h, x @ getattr(attn, name).lora_A.t(), rtol=0, atol=1e-12)


def test_a_layer_reading_another_tensor_computes_its_own() -> None:
    model = llama()
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.shared_inputs
    x, other = (torch.randn(3, attn.q_proj.lora_A.shape[1], dtype=torch.float64) for _ in range(2))
    assert group.project(attn.q_proj, x) is not None  # leads
    assert group.project(attn.o_proj, other) is None  # not the tensor the group projected: its own product
    torch.testing.assert_close(group.project(attn.k_proj, x), x @ attn.k_proj.lora_A.t())


def test_an_input_changed_in_place_or_an_updated_A_is_projected_again() -> None:
    model = llama()
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.shared_inputs
    x = torch.randn(3, attn.q_proj.lora_A.shape[1], dtype=torch.float64)
    group.project(attn.q_proj, x)
    x.mul_(2)  # the version counter moves: the projection made before is stale
    assert group.project(attn.k_proj, x) is None
    group.project(attn.q_proj, x)
    with torch.no_grad():
        attn.v_proj.lora_A.add_(1.0)  # an optimizer step between two reads
    torch.testing.assert_close(group.project(attn.v_proj, x), x @ attn.v_proj.lora_A.t(), rtol=0, atol=0)


def test_a_member_that_does_not_read_the_input_gets_no_gradient() -> None:
    """o_proj's share is computed with q's but never used: its A keeps grad None, not a zero grad."""
    model = llama()
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.shared_inputs
    x = torch.randn(3, attn.q_proj.lora_A.shape[1], dtype=torch.float64, requires_grad=True)
    (group.project(attn.q_proj, x).sum() + group.project(attn.k_proj, x).sum()).backward()
    assert attn.q_proj.lora_A.grad is not None and attn.k_proj.lora_A.grad is not None
    assert attn.v_proj.lora_A.grad is None and attn.o_proj.lora_A.grad is None
    torch.testing.assert_close(x.grad, (attn.q_proj.lora_A.sum(0) + attn.k_proj.lora_A.sum(0)).expand_as(x))


def test_checkpoints_are_the_same_and_copies_get_their_own_groups() -> None:
    fused, plain = pair(llama())
    ours, theirs = lp.trainable_state_dict(fused), lp.trainable_state_dict(plain)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    copied = copy.deepcopy(fused)
    layer, original = copied.model.layers[0].self_attn.q_proj, fused.model.layers[0].self_attn.q_proj
    assert isinstance(layer.shared_inputs, SharedInputs) and layer.shared_inputs is not original.shared_inputs
    assert layer.shared_inputs._members[1] is copied.model.layers[0].self_attn.k_proj


def test_off_where_it_cannot_apply() -> None:
    dropout = llama(dropout=0.1)  # each layer's own dropout mask: the inputs differ
    assert all(getattr(m, "shared_inputs", None) is None for m in dropout.modules())
    dora = llama(use_dora=True)  # DoRA normalizes per layer; its forward is its own
    assert all(getattr(m, "shared_inputs", None) is None for m in dora.modules())


def test_unloading_an_adapter_leaves_the_others_alone() -> None:
    model = llama()
    lp.inject(model, "lora", r=2, target_modules="all-linear", adapter_name="second")
    lp.set_adapter(model, "default")
    ids = torch.randint(0, tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    lp.delete_adapter(model, "second")
    fused, plain = pair(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-12)


def test_down_proj_keeps_the_factors_of_its_input_not_a_copy() -> None:
    """SwiGLU's act(gate) * up is recomputed from the factors its own backward keeps (core.saved_input):
    the LoRA layer on down_proj saves no tensor of its own for x, and its gradients are the same."""
    from benchmarks.step import saved_mb
    from lightning_peft.core import saved_input

    model = llama()
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    down = model.model.layers[0].mlp.down_proj
    seen: list[int] = []
    original = saved_input.keep
    try:
        saved_input.keep = lambda x: seen.append(len(original(x))) or original(x)  # type: ignore[assignment]
        with_factors = saved_mb(model, lambda: model(input_ids=ids, labels=ids).loss)
        saved_input.keep = lambda x: (x,)  # type: ignore[assignment]
        with_copy = saved_mb(model, lambda: model(input_ids=ids, labels=ids).loss)
    finally:
        saved_input.keep = original  # type: ignore[assignment]
    layers = len(model.model.layers)
    width = down.lora_A.shape[1]
    assert seen.count(2) == layers  # one down_proj per block
    assert with_copy - with_factors == pytest.approx(layers * 2 * 12 * width * 8 / 2**20)  # float64 x per layer
    got = {k: v.clone() for k, v in step(model, ids)[1].items()}
    try:
        saved_input.keep = lambda x: (x,)  # type: ignore[assignment]
        want = step(model, ids)[1]
    finally:
        saved_input.keep = original  # type: ignore[assignment]
    for name in want:  # the product recomputed bit for bit
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_q_k_v_and_gate_up_keep_the_norms_factors_not_its_output() -> None:
    """RMSNorm's ``weight * (hidden * rsqrt(...))`` with a frozen weight in front of q/k/v and gate/up is
    recomputed from the weight and the two factors the inner product's backward keeps (core.saved_input):
    the shared projection saves no (N x hidden) tensor of its own after the first block (whose input needs
    no gradient, so autograd keeps nothing there). Gradients are the same: to the bit except for those
    A's, whose ``dh^T x`` is computed from the factors as ``((dh * r)^T h) * w`` (saved_input.grad_t_input)."""
    from benchmarks.step import saved_mb
    from lightning_peft.core import saved_input

    model = llama(torch.float32, b_std=0.05)  # float32: in float64, LLaMA's norm casts (no plain product)
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    width, wide, layers = model.config.hidden_size, model.config.intermediate_size, len(model.model.layers)
    seen: list[int] = []
    original = saved_input.keep
    try:
        saved_input.keep = lambda x: seen.append(len(original(x))) or original(x)  # type: ignore[assignment]
        recomputed = saved_mb(model, lambda: model(input_ids=ids, labels=ids).loss)
        first = list(seen)
        got = {k: v.clone() for k, v in step(model, ids)[1].items()}
        saved_input.keep = lambda x: (x,)  # type: ignore[assignment]
        kept = saved_mb(model, lambda: model(input_ids=ids, labels=ids).loss)
        want = step(model, ids)[1]
    finally:
        saved_input.keep = original  # type: ignore[assignment]
    assert first[:4] == [1, 1, 3, 2]  # block 0: q/k/v input needs no gradient; o_proj's; gate/up's norm; down's
    assert first[4:] == [3, 1, 3, 2] * (layers - 1)  # later blocks: both norms recomputed
    norms = 2 * layers - 1
    per_token = norms * width + layers * wide  # the norms' outputs and down_proj's inputs, float32
    assert kept - recomputed == pytest.approx(2 * 12 * per_token * 4 / 2**20)
    for name in want:  # dA of a norm's output from its factors ((dh * r)^T h) * w: the same up to rounding
        tolerance = {"rtol": 1e-5, "atol": 1e-7} if name.endswith("lora_A") else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got[name], want[name], **tolerance, msg=name)
