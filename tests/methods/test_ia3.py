"""(IA)^3: parity with Hugging Face peft, the formula, defaults, merge/unmerge, errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_peft as lp
from lightning_peft.methods.ia3 import IA3Config, IA3Layer
from tests import more_archs, tiny
from tests.peft_reference import copy_into_peft, randomize_adapter


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


@pytest.mark.parametrize("arch", tiny.PARITY_ARCHS)
def test_parity_with_peft(arch: str) -> None:
    ours = lp.inject(tiny.build(arch), "ia3")
    layers = ia3_layers(ours)
    feedforward = [n for n, m in layers.items() if m.feedforward]
    assert feedforward and len(feedforward) < len(layers)  # both kinds are exercised
    # peft gets the modules we resolved, by full name, so both wrap and classify the same set.
    reference = peft.get_peft_model(
        tiny.build(arch), peft.IA3Config(target_modules=list(layers), feedforward_modules=feedforward)
    ).eval()
    randomize_adapter(ours, std=0.5)
    assert copy_into_peft(ours, reference, lambda m, local: f"{m}.ia3_l.default") == len(layers)
    batch = tiny.inputs(arch)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "targets", "feedforward"),
    [
        ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        ("bert", ["key", "value", "layer.0.output.dense", "layer.1.output.dense"], None),
        ("t5", ["k", "v", "wo"], ["wo"]),
        ("bart", ["k_proj", "v_proj", "fc2"], ["fc2"]),
    ],
)
def test_defaults_are_keys_values_and_the_feedforward_input(arch: str, targets: list, feedforward: list) -> None:
    layers = ia3_layers(lp.inject(tiny.build(arch), "ia3"))
    assert all(any(n == t or n.endswith("." + t) for t in targets) for n in layers), arch
    assert {n for n, m in layers.items() if m.feedforward} == {
        n for n in layers if n.endswith(("down_proj", "mlp.c_proj", "output.dense", "wo", "fc2"))
    }
    assert not any(n.endswith("attention.output.dense") for n in layers)  # BERT's attention output stays out


def test_user_targets_keep_only_their_default_feedforward_modules() -> None:
    config = lp.get_info(lp.inject(tiny.build("llama"), "ia3", target_modules=["k_proj", "v_proj"])).config
    assert config.feedforward_modules == []
    config = lp.get_info(lp.inject(tiny.build("t5"), "ia3", target_modules=["v", "wo"])).config
    assert config.feedforward_modules == ["wo"]


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_follows_the_formula(kind: str, feedforward: bool) -> None:
    """Attention: y = l * (W x + b). Feed-forward: y = W (l * x) + b. Written out with the weight."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    weight = base.weight if kind == "linear" else base.weight.T  # (out, in)
    layer = IA3Layer(copy.deepcopy(base), feedforward=feedforward)
    assert layer.ia3_l.shape == ((6,) if feedforward else (5,)) and torch.equal(
        layer.ia3_l, torch.ones_like(layer.ia3_l)
    )
    nn.init.normal_(layer.ia3_l)
    x = torch.randn(4, 3, 6)
    if feedforward:
        expected = (layer.ia3_l * x) @ weight.T + base.bias
    else:
        expected = layer.ia3_l * (x @ weight.T + base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_is_exact(kind: str, feedforward: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else Conv1D(6, 8)
    nn.init.normal_(base.bias)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    model = nn.Sequential(base)
    lp.inject(model, "ia3", target_modules=["0"], feedforward_modules=["0"] if feedforward else [])
    randomize_adapter(model, std=0.5)
    model[0].ia3_l.data += 1
    x = torch.randn(3, 8)
    adapted = model(x)
    lp.merge(model)
    torch.testing.assert_close(model[0].base_layer(x), adapted, rtol=0, atol=1e-5)  # really in the weight
    assert torch.equal(model[0].base_layer.bias, bias) == feedforward  # the bias scales for attention only
    lp.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[0].base_layer.bias, bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- nn.Conv2d and nn.Conv3d


def _conv(dims: int, groups: int, padding_mode: str = "zeros") -> nn.Module:
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    conv = cls(4, 6, 3, stride=2, padding=1, groups=groups, padding_mode=padding_mode)
    nn.init.normal_(conv.bias)
    return conv


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize(("dims", "groups"), [(2, 1), (2, 2), (3, 1)])
def test_conv_follows_the_formula_and_merges_into_the_kernel(dims: int, groups: int, feedforward: bool) -> None:
    """Per channel: y = l[o] * (W * x + b)[o], or y = W * (l[c] x[c]) + b; merged, the kernel's entry
    (o, j) takes the vector entry of the input channel it reads (written out per group here)."""
    torch.manual_seed(0)
    base = _conv(dims, groups, padding_mode="reflect" if dims == 2 else "zeros")
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject(model, "ia3", target_modules=["0"], feedforward_modules=["0"] if feedforward else [])
    layer = model[0]
    assert layer.ia3_l.shape == ((4,) if feedforward else (6,)) and torch.equal(
        layer.ia3_l, torch.ones(layer.ia3_l.shape)
    )
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    vec = layer.ia3_l.detach().view(1, -1, *(1,) * dims)  # (1, C, 1, 1[, 1])
    x = torch.randn(2, 4, *(5,) * dims)
    expected = base(vec * x) if feedforward else vec * base(x)
    adapted = model(x)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)
    lp.merge(model)
    kernel = weight.clone()
    per_in, per_out = 4 // groups, 6 // groups
    for o in range(6):
        if feedforward:
            channels = (o // per_out) * per_in + torch.arange(per_in)
            kernel[o] *= layer.ia3_l.detach()[channels].view(-1, *(1,) * dims)
        else:
            kernel[o] *= layer.ia3_l.detach()[o]
    torch.testing.assert_close(layer.base_layer.weight, kernel, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.base_layer.bias, bias if feedforward else bias * layer.ia3_l.detach())
    torch.testing.assert_close(layer.base_layer(x), adapted, rtol=0, atol=1e-5)  # really in the kernel
    lp.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feedforward", [False, True])
def test_conv_mixed_batch_equals_each_sample_alone(feedforward: bool) -> None:
    model = nn.Sequential(_conv(2, 1))
    for name in ("a", "b"):
        lp.inject(
            model, "ia3", adapter_name=name, target_modules=["0"], feedforward_modules=["0"] if feedforward else []
        )
    vectors = [p for n, p in model.named_parameters() if n.endswith("ia3_l")]
    assert len(vectors) == 2
    with torch.no_grad():
        for vector in vectors:
            vector.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5, 5)
    names = ["b", "__base__", "a"]
    with lp.mixed_batch(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        if name == "__base__":
            with lp.disable_adapter(model):
                expected = model(x[i : i + 1])
        else:
            lp.set_adapter(model, name)
            expected = model(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=0, atol=1e-6)


def test_unmerge_refuses_a_vector_with_zeros() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject(model, "ia3", target_modules=["0"], feedforward_modules=[])
    with torch.no_grad():
        model[0].ia3_l[1] = 0
    lp.merge(model)
    with pytest.raises(ValueError, match=r"cannot unmerge this \(IA\)\^3 layer: its vector has 1 zero entries"):
        lp.unmerge(model)
    assert model[0].merged


def test_bf16_base_gets_bf16_vector() -> None:
    layer = IA3Layer(nn.Linear(8, 8).to(torch.bfloat16), feedforward=True)
    assert layer.ia3_l.dtype == torch.bfloat16
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["w0"]},
            r"IA3Config.feedforward_modules must be a subset of target_modules \['k', 'v', 'wo'\] "
            r"\(\['w0'\] are not targets\); got \['w0'\]",
        ),
        (
            {"feedforward_modules": "all-linear"},
            r"IA3Config.feedforward_modules must be None, a regular expression or a list of module names; "
            r"got 'all-linear'",
        ),
        ({"feedforward_modules": [""]}, r"IA3Config.feedforward_modules must be None, a regular .*; got \[''\]"),
        ({"feedforward_modules": 3}, r"IA3Config.feedforward_modules must be None, a regular .*; got 3"),
    ],
)
def test_invalid_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IA3Config(**options)


def test_a_target_ia3_cannot_wrap_is_named() -> None:
    with pytest.raises(TypeError, match=r"selected 'model.embed_tokens': it is a Embedding, which ia3 cannot wrap"):
        lp.inject(tiny.build("llama"), "ia3", target_modules=["embed_tokens"], feedforward_modules=[])
    with pytest.raises(TypeError, match=r"it is a Conv1d, which ia3 cannot wrap; ia3 wraps .*nn.Conv2d and nn.Conv3d"):
        lp.inject(nn.Sequential(nn.Conv1d(2, 3, 3)), "ia3", target_modules=["0"], feedforward_modules=[])


def test_a_plain_module_needs_feedforward_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"ia3 has no default feedforward_modules for a Sequential"):
        lp.inject(model, "ia3", target_modules=["0", "2"])
    lp.inject(model, "ia3", target_modules=["0", "2"], feedforward_modules=["2"])
    assert model[2].feedforward and not model[0].feedforward


@pytest.mark.parametrize("arch", list(more_archs.BUILDERS))
def test_defaults_on_the_other_named_architectures(arch: str) -> None:
    """Every architecture with a default: it selects keys/values and a feed-forward layer, and runs."""
    batch = more_archs.inputs(arch)
    base = more_archs.build(arch)(**batch).logits
    model = lp.inject(more_archs.build(arch), "ia3")
    layers = ia3_layers(model)
    assert any(m.feedforward for m in layers.values()) and not all(m.feedforward for m in layers.values())
    torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-6)
    randomize_adapter(model, std=0.5)
    assert not torch.allclose(model(**batch).logits, base, atol=1e-4)
