"""DoRA (LoRA's ``use_dora`` option): parity with peft, the formula, merge/unmerge, gradients, errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods.dora import DoRAConv, DoRAEmbedding, DoRALinear
from lightning_peft.methods.lora import LoRAConfig
from tests import tiny
from tests.peft_reference import copy_into_peft, randomize_adapter


def dora_rename(module: str, local: str) -> str:
    if local == "lora_magnitude":
        return f"{module}.lora_magnitude_vector.default.weight"
    return f"{module}.{local}.default.weight"


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random A, B and a magnitude near the initial norms (positive, as after training)."""
    randomize_adapter(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in state.wrapped_layers(model):
            if isinstance(module, DoRALinear):
                noise = torch.rand(module.lora_magnitude.shape, generator=g) + 0.5
                module.lora_magnitude.copy_(module.weight_norm() * noise)


@pytest.mark.parametrize("arch", tiny.PARITY_ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft(arch: str, rslora: bool) -> None:
    ours = lp.inject(tiny.build(arch), "lora", r=4, alpha=8, rslora=rslora, dropout=0.1, use_dora=True)
    targets = lp.get_info(ours).config.target_modules
    reference = peft.get_peft_model(
        tiny.build(arch),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.1, target_modules=targets, use_dora=True),
    ).eval()
    batch = tiny.inputs(arch)
    # At init both are the base model, and our magnitude equals peft's (||W|| per output feature).
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)
    peft_state = reference.state_dict()
    for name, tensor in lp.trainable_state_dict(ours).items():
        if name.endswith("lora_magnitude"):
            key = "base_model.model." + dora_rename(*name.rsplit(".", 1))
            torch.testing.assert_close(tensor, peft_state[key], rtol=0, atol=1e-6)
    randomize(ours)
    assert copy_into_peft(ours, reference, dora_rename) == 3 * len(lp.get_info(ours).modules)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_follows_the_formula(kind: str) -> None:
    """h = m * (W + s B A) / ||W + s B A||_row x + b, with the weight written out as (out, in)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    weight = base.weight if kind == "linear" else base.weight.T  # (out, in)
    layer = DoRALinear(copy.deepcopy(base), LoRAConfig(r=3, alpha=6, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude, weight.norm(dim=1))  # m starts as ||W||
    nn.init.normal_(layer.lora_B)
    nn.init.uniform_(layer.lora_magnitude, 0.5, 2.0)
    x = torch.randn(4, 7, 6)
    adapted = weight + (6 / 3) * layer.lora_B @ layer.lora_A
    directions = adapted / adapted.norm(dim=1, keepdim=True)
    expected = x @ (layer.lora_magnitude[:, None] * directions).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_the_norm_is_a_constant_in_backpropagation() -> None:
    """Section 4.3: dL/dB flows only through the update term, as if ||W + sBA|| were fixed."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)
    layer = DoRALinear(copy.deepcopy(base), LoRAConfig(r=2, alpha=2, use_dora=True))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    layer(x).pow(2).sum().backward()
    A, B, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    norm = (base.weight + B.detach() @ A.detach()).norm(dim=1)  # detached, as the paper says
    out = x @ ((m / norm)[:, None] * (base.weight + B @ A)).T + base.bias
    out.pow(2).sum().backward()
    for ours, reference in [(layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude, m)]:
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-5)
    # Had the norm been differentiated, B's gradient would differ (so the check above can fail).
    B.grad = None
    full = (base.weight + B @ A.detach()).norm(dim=1)
    (x @ ((m.detach() / full)[:, None] * (base.weight + B @ A.detach())).T + base.bias).pow(2).sum().backward()
    assert not torch.allclose(layer.lora_B.grad, B.grad, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_is_exact(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else Conv1D(6, 8)
    original = base.weight.detach().clone()
    model = nn.Sequential(base)
    lp.inject(model, "lora", r=3, alpha=5, target_modules=["0"], use_dora=True)
    randomize(model)
    x = torch.randn(3, 8)
    adapted = model(x)
    lp.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(model[0].base_layer(x), adapted, rtol=0, atol=1e-5)  # really in the weight
    lp.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, original, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    assert model[0]._merged_norm is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "bart"])
def test_round_trip_merge_and_unload_on_models(arch: str) -> None:
    trained = lp.inject(tiny.build(arch), "lora", r=4, use_dora=True)
    randomize(trained, seed=2)
    fresh = lp.inject(tiny.build(arch), "lora", r=4, use_dora=True)
    fresh.load_state_dict(lp.trainable_state_dict(trained))
    batch = tiny.inputs(arch)
    adapted = tiny.logits(trained, batch)
    torch.testing.assert_close(tiny.logits(fresh, batch), adapted, rtol=0, atol=0)
    torch.testing.assert_close(tiny.logits(lp.merge(fresh), batch), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny.logits(lp.unmerge(fresh), batch), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny.logits(lp.unload(fresh, merge=True), batch), adapted, rtol=0, atol=1e-5)


def test_dropout_applies_to_the_rescaled_base_term_in_training() -> None:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 16), LoRAConfig(r=4, dropout=0.5, use_dora=True))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    dropped = layer.dropout(x)
    torch.manual_seed(1)
    out = layer(x)
    scale = layer.lora_magnitude / layer.weight_norm()
    base = x @ layer.weight.T + layer.bias
    update = layer.scaling * dropped @ layer.lora_A.T @ layer.lora_B.T
    expected = base + (scale - 1) * (dropped @ layer.weight.T) + scale * update
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(TypeError, match=r"it is a LlamaRMSNorm, which lora with use_dora=True cannot wrap; DoRA wraps"):
        lp.inject(tiny.build("llama"), "lora", target_modules=["input_layernorm"], use_dora=True)


def test_grouped_convs_and_a_bad_flag_are_named() -> None:
    with pytest.raises(
        TypeError, match=r"'0': it is a Conv2d with groups=2, which lora with use_dora=True cannot wrap"
    ):
        lp.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "lora", target_modules=["0"], use_dora=True)
    with pytest.raises(
        TypeError,
        match=r"it is a Conv3d with groups=2, which lora with use_dora=True cannot wrap \(peft's DoRA norm.*nn.Conv3d",
    ):
        lp.inject(nn.Sequential(nn.Conv3d(4, 4, 3, groups=2)), "lora", target_modules=["0"], use_dora=True)
    with pytest.raises(ValueError, match=r"LoRAConfig.use_dora must be True or False; got 'yes'"):
        LoRAConfig(use_dora="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- nn.Conv2d and nn.Embedding


def _randomize_factors(layer: nn.Module, seed: int = 0) -> None:
    """Random A, B and a magnitude near the initial norms, on one DoRA layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in layer.adapter_state():
            if name != "lora_magnitude":
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
        layer.lora_magnitude.copy_(layer.weight_norm() * (torch.rand(layer.lora_magnitude.shape, generator=g) + 0.5))


def test_conv2d_follows_the_formula_with_a_detached_norm() -> None:
    """h = m / ||W + s B.A||_(in,kh,kw) * ((W + s B.A) * x) + b, and the norm takes no gradient."""
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1).requires_grad_(False)
    layer = DoRAConv(copy.deepcopy(base), LoRAConfig(r=2, alpha=4, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude, base.weight.flatten(1).norm(dim=1))  # m starts as ||W||
    _randomize_factors(layer)
    x = torch.randn(2, 3, 7, 7)
    layer(x).pow(2).sum().backward()
    A, B, m = (
        t.detach().clone().requires_grad_() for t in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude)
    )
    update = 2.0 * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)  # s B.A, (out, in, kh, kw)
    norm = (base.weight + update.detach()).flatten(1).norm(dim=1)  # detached, as peft and the paper do
    expected = F.conv2d(x, (m / norm)[:, None, None, None] * (base.weight + update), base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    expected.pow(2).sum().backward()
    for ours, reference in [(layer.lora_A.weight, A), (layer.lora_B.weight, B), (layer.lora_magnitude, m)]:
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)


def test_conv2d_dropout_rescales_the_dropped_base_term_in_training() -> None:
    torch.manual_seed(0)
    layer = DoRAConv(nn.Conv2d(3, 4, 3, padding=1), LoRAConfig(r=2, dropout=0.5, use_dora=True))
    _randomize_factors(layer)
    x = torch.randn(2, 3, 5, 5)
    layer.train()
    torch.manual_seed(1)
    dropped = layer.dropout(x)
    torch.manual_seed(1)
    out = layer(x)
    scale = (layer.lora_magnitude / layer.weight_norm())[None, :, None, None]
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    base_dropped = F.conv2d(dropped, weight, padding=1)
    update = layer.scaling * F.conv2d(F.conv2d(dropped, layer.lora_A.weight, padding=1), layer.lora_B.weight)
    expected = F.conv2d(x, weight, bias, padding=1) + (scale - 1) * base_dropped + scale * update
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_conv2d_merge_is_refused_where_the_base_pads_other_than_with_zeros() -> None:
    """peft's A conv pads with zeros whatever the base does: unmerged that is what peft computes, merged it is not."""
    model = lp.inject(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
        "lora",
        target_modules=["0"],
        use_dora=True,
    )
    _randomize_factors(model[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"cannot merge DoRA into a Conv2d with padding_mode='reflect'"):
        lp.merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and not model[0].merged


class ScaledEmbedding(nn.Embedding):
    """An embedding that multiplies its output by ``embed_scale``, as Gemma's and scaled BART's do."""

    def __init__(self, *args: int, embed_scale: float) -> None:
        super().__init__(*args)
        self.embed_scale = embed_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


@pytest.mark.parametrize("embed_scale", [None, 3.0])
def test_embedding_follows_the_formula(embed_scale: float | None) -> None:
    """h = m / ||W + s (B A)^T||_tokens * c (W + s (B A)^T)[x]: the norm per embedding dimension."""
    torch.manual_seed(0)
    base = nn.Embedding(11, 6) if embed_scale is None else ScaledEmbedding(11, 6, embed_scale=embed_scale)
    layer = DoRAEmbedding(copy.deepcopy(base), LoRAConfig(r=3, alpha=6, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude, base.weight.norm(dim=0))  # (dim,): over the tokens
    _randomize_factors(layer)
    x = torch.randint(0, 11, (2, 5))
    adapted = base.weight + 2.0 * (layer.lora_B @ layer.lora_A).T  # (num, dim)
    table = layer.lora_magnitude * adapted / adapted.norm(dim=0)
    expected = table[x] * (1.0 if embed_scale is None else embed_scale)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "embedding"])
def test_conv2d_and_embedding_merge_unmerge_and_reload_exactly(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1) if kind == "conv2d" else ScaledEmbedding(9, 4, embed_scale=2.0)
    x = torch.randn(2, 3, 5, 5) if kind == "conv2d" else torch.randint(0, 9, (3, 4))
    original = base.weight.detach().clone()
    model = lp.inject(nn.Sequential(copy.deepcopy(base)), "lora", r=2, target_modules=["0"], use_dora=True)
    _randomize_factors(model[0])
    adapted = model(x)
    fresh = lp.inject(nn.Sequential(copy.deepcopy(base)), "lora", r=2, target_modules=["0"], use_dora=True)
    fresh.load_state_dict(lp.trainable_state_dict(model))
    torch.testing.assert_close(fresh(x), adapted, rtol=0, atol=0)
    lp.merge(model)
    torch.testing.assert_close(model[0].base_layer(x), adapted, rtol=0, atol=1e-5)  # really in the weight
    lp.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, original, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    assert model[0]._merged_norm is None


def test_conv2d_and_embedding_match_peft_on_a_cnn_and_a_scaled_embedding() -> None:
    """Same weights -> peft 0.21's DoRA outputs: a padded, strided conv with bias; Gemma's scaled embedding."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = ScaledEmbedding(12, 3, embed_scale=1.7)
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N, 16) -> (N, 4, 2, 2)
            return self.conv(self.emb(ids).transpose(1, 2).reshape(-1, 3, 4, 4))

    torch.manual_seed(0)
    base = Net()
    ids = torch.randint(0, 12, (2, 16))
    ours = lp.inject(copy.deepcopy(base), "lora", r=2, alpha=4, target_modules=["emb", "conv"], use_dora=True)
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"], use_dora=True)
    ).eval()
    peft_state = reference.state_dict()
    prefix = "base_model.model."
    torch.testing.assert_close(  # equal initial magnitudes, in peft's shapes
        ours.conv.lora_magnitude.view(1, -1, 1, 1), peft_state[prefix + "conv.lora_magnitude_vector.default.weight"]
    )
    torch.testing.assert_close(ours.emb.lora_magnitude, peft_state[prefix + "emb.lora_magnitude_vector.default.weight"])
    for layer in (ours.conv, ours.emb):
        _randomize_factors(layer, seed=3)
    with torch.no_grad():
        named = {
            "conv.lora_A.default.weight": ours.conv.lora_A.weight,
            "conv.lora_B.default.weight": ours.conv.lora_B.weight,
            "conv.lora_magnitude_vector.default.weight": ours.conv.lora_magnitude.view(1, -1, 1, 1),
            "emb.lora_embedding_A.default": ours.emb.lora_A,
            "emb.lora_embedding_B.default": ours.emb.lora_B,
            "emb.lora_magnitude_vector.default.weight": ours.emb.lora_magnitude,
        }
        for key, tensor in named.items():
            peft_state[prefix + key].copy_(tensor)
        expected = reference(ids)
        bound = 1e-5 * max(1.0, expected.abs().max().item())
        assert (ours(ids) - expected).abs().max() <= bound
        reference.merge_adapter()
        lp.merge(ours)
        assert (ours(ids) - reference(ids)).abs().max() <= bound
        assert (ours(ids) - expected).abs().max() <= bound


def test_a_dora_checkpoint_does_not_load_into_plain_lora() -> None:
    dora = lp.inject(tiny.build("llama"), "lora", r=4, use_dora=True)
    plain = lp.inject(tiny.build("llama"), "lora", r=4)
    with pytest.raises(ValueError, match=r"use_dora=True in the state dict, use_dora=False here"):
        plain.load_state_dict(lp.trainable_state_dict(dora))
