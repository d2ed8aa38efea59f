"""Bottleneck adapters: the formulas written out, identity at init, placement, errors.

peft has no bottleneck adapters, so these tests check the papers' formulas directly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods.bottleneck import BottleneckAdapter, BottleneckConfig
from tests import more_archs, tiny


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in state.adapter_state(model):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


class Block(nn.Module):
    """An attention-like block: called with hidden_states=..., returns (hidden, extra)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 12)
        self.out = nn.Linear(12, 8)

    def forward(
        self, hidden_states: torch.Tensor | None = None, scale: float = 1.0, states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str]:
        hidden_states = states if hidden_states is None else hidden_states
        return self.out(torch.tanh(self.inner(hidden_states))) * scale, "extra"


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_sequential_follows_the_formula(activation: str) -> None:
    """y = h + s (W_up f(W_down h + b_down) + b_up), h = W x + b."""
    torch.manual_seed(0)
    base = nn.Linear(6, 16)
    layer = BottleneckAdapter(
        copy.deepcopy(base), BottleneckConfig(reduction_factor=4, activation=activation, scaling=2)
    )
    nn.init.normal_(layer.adapter_up.weight)
    nn.init.normal_(layer.adapter_up.bias)
    f = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}[activation]
    down, up = layer.adapter_down, layer.adapter_up
    assert down.weight.shape == (4, 16) and up.weight.shape == (16, 4)  # 16 / reduction_factor 4 = 4 units
    x = torch.randn(3, 5, 6)
    h = x @ base.weight.T + base.bias
    expected = h + 2 * (f(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_parallel_follows_the_formula_and_keeps_the_rest_of_a_tuple() -> None:
    """y = block(x) + s (W_up f(W_down x + b_down) + b_up), x = the block's input."""
    torch.manual_seed(0)
    block = Block()
    layer = BottleneckAdapter(copy.deepcopy(block), BottleneckConfig(reduction_factor=2, variant="parallel", scaling=4))
    nn.init.normal_(layer.adapter_up.weight)
    down, up = layer.adapter_down, layer.adapter_up
    assert (down.in_features, down.out_features, up.out_features) == (8, 4, 8)
    x = torch.randn(2, 3, 8)
    expected = block(x, scale=0.5)[0] + 4 * (torch.relu(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    for out in (layer(hidden_states=x, scale=0.5), layer(x, 0.5)):  # keyword or positional input
        torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
        assert out[1] == "extra"


@pytest.mark.parametrize(
    ("arch", "variant", "placement"),
    [(arch, "sequential", "both") for arch in ("llama", "gpt2", "t5", "bert", "bart")]
    + [(arch, "parallel", "both") for arch in ("llama", "gpt2", "t5")]
    + [("bart", "parallel", "attention")],  # BART and BERT have no feed-forward block (see below)
)
def test_identity_at_init_and_zero_up_projection(arch: str, variant: str, placement: str) -> None:
    model = lp.inject(tiny.build(arch), "bottleneck", variant=variant, placement=placement)
    for layer in adapters(model).values():
        assert torch.count_nonzero(layer.adapter_up.weight) == 0 and torch.count_nonzero(layer.adapter_up.bias) == 0
        assert torch.count_nonzero(layer.adapter_down.weight) > 0  # down is initialized, so up learns at once
    batch = tiny.inputs(arch)
    # Not bitwise: T5 picks other matmul paths for the contiguous sums (LoRA differs from it by as much).
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(tiny.build(arch), batch), rtol=0, atol=1e-6)


def test_init_is_houlsbys_near_identity() -> None:
    """W_down ~ N(0, 1e-2) truncated at 2 std, b_down = 0 (AdapterHub's "houlsby"); W_up = b_up = 0."""
    torch.manual_seed(0)
    layer = BottleneckAdapter(nn.Linear(512, 512), BottleneckConfig(reduction_factor=8))
    down, up = layer.adapter_down, layer.adapter_up
    assert down.weight.abs().max() <= 2e-2 and 0.8e-2 < down.weight.std() < 0.95e-2  # 0.88 std after truncation
    assert torch.count_nonzero(down.bias) == 0
    assert torch.count_nonzero(up.weight) == 0 and torch.count_nonzero(up.bias) == 0
    layer.adapter_down.bias.data.fill_(1.0)
    layer.reset_parameters()  # what a strategy materializing from the meta device calls
    assert torch.count_nonzero(down.bias) == 0


@pytest.mark.parametrize("seed", range(8))
def test_every_adapter_tensor_gets_a_gradient_on_a_narrow_bottleneck(seed: int) -> None:
    """Hidden 64, bottleneck 4 with ReLU: nn.Linear's default bias could leave every unit dead on
    every token (seeds 3 and 4 did), so that adapter never trained. With W_up = 0 the first backward
    reaches the up-projection only; after one step, every declared adapter tensor has a gradient."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = lp.inject(tf.LlamaForCausalLM(config), "bottleneck", placement="both", activation="relu")
    assert {layer.adapter_down.out_features for layer in adapters(model).values()} == {4}
    params = dict(state.adapter_parameters(model))  # what the layers declare (adapter_names)
    assert params.keys() == lp.trainable_state_dict(model).keys() and len(params) == 4 * 2 * 2
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(params.values(), lr=0.1)

    model(input_ids=ids, labels=ids).loss.backward()
    up = {id(p) for layer in adapters(model).values() for p in layer.adapter_up.parameters()}
    for name, param in params.items():
        gets_one = id(param) in up  # W_up = 0 blocks the gradient to the down-projection, for now
        assert param.grad is not None and (torch.count_nonzero(param.grad) > 0) == gets_one, name
    optimizer.step()
    optimizer.zero_grad()

    model(input_ids=ids, labels=ids).loss.backward()
    dead = [name for name, param in params.items() if param.grad is None or torch.count_nonzero(param.grad) == 0]
    assert dead == []


@pytest.mark.parametrize(
    ("arch", "variant", "placement", "expected"),
    [
        ("llama", "sequential", "ffn", ["mlp.down_proj"]),
        ("llama", "sequential", "both", ["self_attn.o_proj", "mlp.down_proj"]),
        ("llama", "parallel", "both", ["self_attn", "mlp"]),
        ("gpt2", "sequential", "attention", ["attn.c_proj"]),
        ("gpt2", "parallel", "ffn", ["mlp"]),
        ("bert", "sequential", "ffn", ["layer.0.output.dense", "layer.1.output.dense"]),
        ("bert", "sequential", "attention", ["attention.output.dense"]),
        ("roberta", "sequential", "both", ["attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"]),
        ("t5", "sequential", "attention", ["SelfAttention.o", "EncDecAttention.o"]),
        ("t5", "parallel", "ffn", ["DenseReluDense"]),
        ("bart", "sequential", "both", ["self_attn.out_proj", "encoder_attn.out_proj", "fc2"]),
        ("bart", "parallel", "attention", ["self_attn", "encoder_attn"]),
    ],
)
def test_default_placement(arch: str, variant: str, placement: str, expected: list[str]) -> None:
    model = lp.inject(tiny.build(arch), "bottleneck", variant=variant, placement=placement)
    names = list(adapters(model))
    assert all(any(n.endswith("." + e) for e in expected) for n in names), names
    assert all(any(n.endswith("." + e) for n in names) for e in expected), names


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_adapters_sit_where_the_papers_put_them(arch: str, variant: str) -> None:
    """Sequential: adapter on the output projection's output. Parallel: on the block's input."""
    model = lp.inject(tiny.build(arch), "bottleneck", variant=variant, placement="ffn")
    perturb(model)
    seen: list[tuple[BottleneckAdapter, torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: seen.append((module, args[0], output)))
        for layer in adapters(model).values()
    ]
    tiny.logits(model, tiny.inputs(arch))
    assert len(seen) == len(hooks) > 0
    for layer, x, output in seen:
        inner = layer.base_layer(x)  # what the wrapped module alone computes
        if variant == "sequential":
            assert isinstance(layer.base_layer, nn.Linear) or type(layer.base_layer).__name__ == "Conv1D"
            torch.testing.assert_close(output, inner + layer.adapter(inner))
        else:
            assert not isinstance(layer.base_layer, nn.Linear)  # the whole feed-forward block
            torch.testing.assert_close(output, inner + layer.adapter(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_parallel_attention_blocks_train_and_round_trip(arch: str) -> None:
    """Attention blocks take keyword arguments and return tuples; gradients and state still flow."""
    model = lp.inject(tiny.build(arch), "bottleneck", variant="parallel", placement="both", scaling=4).train()
    perturb(model)
    batch = tiny.inputs(arch)
    tiny.logits(model, batch).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in state.adapter_parameters(model))
    fresh = lp.inject(tiny.build(arch), "bottleneck", variant="parallel", placement="both", scaling=4)
    fresh.load_state_dict(lp.trainable_state_dict(model))
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(model.eval(), batch), rtol=0, atol=0)


def test_parallel_needs_a_block() -> None:
    with pytest.raises(
        ValueError, match=r"no default parallel placement for the ffn sublayer\(s\) of architecture 'bert'"
    ):
        lp.inject(tiny.build("bert"), "bottleneck", variant="parallel")
    with pytest.raises(ValueError, match=r"for the ffn sublayer\(s\) of architecture 'bart'.*variant='sequential'"):
        lp.inject(tiny.build("bart"), "bottleneck", variant="parallel", placement="both")


def test_merge_is_refused_and_unload_restores_the_base() -> None:
    model = lp.inject(tiny.build("llama"), "bottleneck")
    perturb(model)
    with pytest.raises(TypeError, match=r"BottleneckAdapter \(bottleneck\) has nothing to merge.*non-linear"):
        lp.merge(model)
    with pytest.raises(TypeError, match=r"nothing to merge"):
        lp.unload(model, merge=True)
    batch = tiny.inputs("llama")
    torch.testing.assert_close(
        tiny.logits(lp.unload(model, merge=False), batch), tiny.logits(tiny.build("llama"), batch), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reduction_factor": 0}, r"BottleneckConfig.reduction_factor must be a positive number; got 0"),
        ({"placement": "mlp"}, r"BottleneckConfig.placement must be one of 'attention', 'ffn', 'both'; got 'mlp'"),
        ({"variant": "serial"}, r"BottleneckConfig.variant must be one of 'sequential', 'parallel'; got 'serial'"),
        ({"activation": "swish"}, r"BottleneckConfig.activation must be one of 'relu', 'gelu', 'silu', 'tanh'"),
        ({"scaling": -1.0}, r"BottleneckConfig.scaling must be a positive number; got -1.0"),
    ],
)
def test_invalid_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**options)


def test_targets_it_cannot_wrap_are_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"selected 'model.layers.0.mlp.down_proj': BottleneckConfig.reduction_factor=64 leaves no bottleneck "
        r"unit for its width of 32; use a reduction_factor of at most 32",
    ):
        lp.inject(tiny.build("llama"), "bottleneck", reduction_factor=64)
    with pytest.raises(TypeError, match=r"selected 'model.norm': it is a LlamaRMSNorm without linear layers"):
        lp.inject(tiny.build("llama"), "bottleneck", target_modules=["norm"])
    model = lp.inject(
        nn.Sequential(nn.Linear(4, 4), nn.Identity()), "bottleneck", target_modules=["0"], reduction_factor=2
    )
    assert isinstance(model[0], BottleneckAdapter)  # any linear layer can be a target


@pytest.mark.parametrize("arch", list(more_archs.BUILDERS))
def test_defaults_on_the_other_named_architectures(arch: str) -> None:
    """Sequential (both sublayers) and parallel (attention blocks) defaults select modules and run."""
    batch = more_archs.inputs(arch)
    base = more_archs.build(arch)(**batch).logits
    for options in ({"placement": "both"}, {"placement": "attention", "variant": "parallel"}):
        model = lp.inject(more_archs.build(arch), "bottleneck", **options)
        torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-6)
        perturb(model)
        assert not torch.allclose(model(**batch).logits, base, atol=1e-4), options


def test_blocks_it_cannot_read_are_named() -> None:
    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.proj(x)}

    layer = BottleneckAdapter(ReturnsDict(), BottleneckConfig(reduction_factor=2))
    with pytest.raises(TypeError, match=r"return a tensor or a tuple starting with one; ReturnsDict returned dict"):
        layer(torch.randn(2, 8))
    parallel = BottleneckAdapter(Block(), BottleneckConfig(reduction_factor=2, variant="parallel"))
    with pytest.raises(TypeError, match=r"reads the hidden states its block is called with .*; Block got none"):
        parallel(states=torch.randn(2, 8))
