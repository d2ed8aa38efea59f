"""lora_combine: per-layer parity with peft's ``add_weighted_adapter`` (DARE included, by replaying its RNG), errors."""

from __future__ import annotations

import math

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.methods.lora_combine import (
    COMBINATIONS,
    Factors,
    combine,
    effective_combination,
    merge_tensors,
    new_alpha,
    new_rank,
)
from tests.peft_reference import skip_if_peft_scales_svd_twice

pytestmark = pytest.mark.filterwarnings("ignore:.*fan_in_fan_out:UserWarning", "ignore:The density:UserWarning")
WEIGHTS = [0.7, -0.4]


def llama() -> tuple[nn.Module, list[str]]:
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    return tf.LlamaForCausalLM(config), ["q_proj", "v_proj"]


class Zoo(nn.Module):
    """One of each layer kind peft combines: Embedding, 3x3 and 1x1 Conv2d, fan-in-fan-out Conv1D, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 8, 3)
        self.pw = nn.Conv2d(8, 8, 1)
        self.c1d = Conv1D(10, 12)
        self.lin = nn.Linear(12, 10)


def zoo() -> tuple[nn.Module, list[str]]:
    return Zoo(), ["emb", "conv", "pw", "c1d", "lin"]


def two_adapters(build, ranks=(4, 4), rslora=False):
    """A peft model with adapters 'one' and 'two' (random A and B, different scalings)."""
    torch.manual_seed(0)
    base, targets = build()
    config = dict(target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    model = get_peft_model(base, LoraConfig(r=ranks[0], lora_alpha=8, **config), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=ranks[1], lora_alpha=3, **config))
    return model


def layers(model, name):
    """peft's LoRA layers holding adapter ``name``, in the order add_weighted_adapter visits them."""
    return [m for m in model.modules() if isinstance(m, LoraLayer) and name in {*m.lora_A, *m.lora_embedding_A}]


def factors(layer, name) -> Factors:
    if name in layer.lora_A:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    else:
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return Factors(A.detach().clone(), B.detach().clone(), layer.scaling[name])


def transposed(layer) -> bool:
    return bool(getattr(layer, "fan_in_fan_out", False)) or len(layer.lora_embedding_A) > 0


def peft_delta(layer, name):
    """peft's delta weight of ``name`` laid out as (out, in·k), like ``B.flatten(1) @ A.flatten(1)``."""
    delta = layer.get_delta_weight(name).detach()
    return (delta.t() if transposed(layer) else delta).flatten(1)


@pytest.fixture
def rng_at_merge(monkeypatch):
    """The global RNG state when peft starts merging (after it has initialised the new adapter)."""
    states = []
    freeze = peft_lora_model._freeze_adapter

    def freeze_and_record(*args):
        freeze(*args)
        states.append(torch.get_rng_state())

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_and_record)
    return states


def check_parity(model, states, adapters, weights, combination, generator=None, **options):
    """Run peft's add_weighted_adapter, then ours on the same per-layer tensors and RNG state."""
    skip_if_peft_scales_svd_twice(combination, len(adapters))
    model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination, **options)
    rank = new_rank(combination, [model.peft_config[n].r for n in adapters], options.pop("svd_rank", None))
    assert (model.peft_config["mix"].r, model.peft_config["mix"].lora_alpha) == (rank, new_alpha(rank))
    combination = effective_combination(combination, len(adapters))
    if generator is not None:
        generator.set_state(states[0])
    else:
        torch.set_rng_state(states[0])
    checked = 0
    for layer in layers(model, "mix"):
        mine = [factors(layer, n) for n in adapters]
        A, B = combine(
            mine, weights, combination, svd_rank=rank, transposed=transposed(layer), generator=generator, **options
        )
        theirs = factors(layer, "mix")
        assert (A.shape, B.shape) == (theirs.A.shape, theirs.B.shape)
        scale = layer.scaling["mix"]
        torch.testing.assert_close(scale * B.flatten(1) @ A.flatten(1), peft_delta(layer, "mix"), atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked > 0
    return rank


CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
]


def test_cases_cover_every_combination():
    assert {c for c, _ in CASES} == set(COMBINATIONS)


@pytest.mark.parametrize("build", [llama, zoo])
@pytest.mark.parametrize(
    ("combination", "options"), CASES, ids=[c + "".join(f"-{v}" for v in o.values()) for c, o in CASES]
)
def test_matches_peft(build, combination, options, rng_at_merge):
    check_parity(two_adapters(build), rng_at_merge, ["one", "two"], WEIGHTS, combination, **options)


@pytest.mark.parametrize("build", [llama, zoo])
@pytest.mark.parametrize("combination", ["cat", "svd", "ties_svd", "dare_ties_svd"])
def test_matches_peft_with_different_ranks(build, combination, rng_at_merge):
    options = {"density": 0.5} if combination != "cat" and combination != "svd" else {}
    rank = check_parity(
        two_adapters(build, ranks=(4, 6)), rng_at_merge, ["one", "two"], WEIGHTS, combination, **options
    )
    assert rank == (10 if combination == "cat" else 6)


def test_dare_with_a_generator_matches_peft_under_the_same_state(rng_at_merge):
    gen = torch.Generator()
    check_parity(two_adapters(zoo), rng_at_merge, ["one", "two"], WEIGHTS, "dare_ties_svd", generator=gen, density=0.5)


def test_one_adapter_is_linear_whatever_the_combination(rng_at_merge):
    assert effective_combination("svd", 1) == "linear"
    rank = check_parity(two_adapters(zoo), rng_at_merge, ["two"], [0.5], "svd", svd_rank=2)
    assert rank == 4


def test_peft_scales_the_combination_by_sqrt_r_under_rslora(rng_at_merge):
    model = two_adapters(zoo, rslora=True)
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type="cat")
    for layer in layers(model, "mix"):
        A, B = combine([factors(layer, "one"), factors(layer, "two")], WEIGHTS, "cat")
        assert layer.scaling["mix"] == pytest.approx(math.sqrt(8))
        torch.testing.assert_close(math.sqrt(8) * B.flatten(1) @ A.flatten(1), peft_delta(layer, "mix"))


def test_linear_needs_equal_ranks_like_peft():
    model = two_adapters(zoo, ranks=(4, 6))
    with pytest.raises(ValueError, match="same r"):
        model.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type="ties", density=0.5)
    with pytest.raises(ValueError, match="ranks must be all equal for combination 'ties'"):
        new_rank("ties", [4, 6])
    layer = layers(model, "one")[-1]
    with pytest.raises(ValueError, match=r"ranks must be equal for combination 'linear'"):
        combine([factors(layer, "one"), factors(layer, "two")], WEIGHTS, "linear")


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize(("density", "sign"), [(0.3, "total"), (0.7, "frequency"), (1.0, "total")])
def test_merge_tensors_matches_peft_merge_utils(method, density, sign):
    tensors = list(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)))
    weights = [0.5, -1.0, 2.0]
    args = {"linear": (), "magnitude_prune": (density,), "dare_linear": (density,)}.get(method, (density, sign))
    reference = getattr(merge_utils, "task_arithmetic" if method == "linear" else method)
    torch.manual_seed(1)
    expected = reference(tensors, torch.tensor(weights), *args)
    torch.manual_seed(1)
    got = merge_tensors(tensors, weights, method, density=density, majority_sign_method=sign)
    torch.testing.assert_close(got, expected)


def test_dare_keeps_density_and_rescales():
    gen = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    merged = merge_tensors([torch.ones(100_000)], [1.0], "dare_linear", density=0.3, generator=gen)
    assert torch.equal(torch.get_rng_state(), state)  # the generator, not the global RNG
    kept = merged[merged != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.3))  # rescaled by 1 / density
    assert kept.numel() / merged.numel() == pytest.approx(0.3, abs=0.01)
    again = merge_tensors([torch.ones(100_000)], [1.0], "dare_linear", density=0.3, generator=gen.manual_seed(0))
    assert torch.equal(merged, again)


def test_cat_is_exact_and_svd_pads_missing_directions():
    g = torch.Generator().manual_seed(0)
    fs = [Factors(torch.randn(r, 3, generator=g), torch.randn(4, r, generator=g), s) for r, s in [(2, 0.5), (1, 2.0)]]
    exact = sum(w * f.scaling * f.B @ f.A for w, f in zip(WEIGHTS, fs, strict=True))
    A, B = combine(fs, WEIGHTS, "cat")
    torch.testing.assert_close(B @ A, exact)
    A, B = combine(fs, WEIGHTS, "svd", svd_rank=5)  # rank 5 > min(4, 3): two zero directions
    assert (A.shape, B.shape) == ((5, 3), (4, 5))
    torch.testing.assert_close(B @ A, exact)
    half = [Factors(f.A.bfloat16(), f.B.bfloat16(), f.scaling) for f in fs]
    assert all(t.dtype == torch.bfloat16 for t in combine(half, WEIGHTS, "svd"))


A2, B2, CONV_A, CONV_B = torch.zeros(2, 3), torch.zeros(4, 2), torch.zeros(2, 3, 3, 3), torch.zeros(5, 2, 1, 1)
F2 = Factors(A2, B2, 1.0)
COMBINE_ERRORS = [
    ({"combination": "mean"}, "combination must be one of 'cat', 'linear'"),
    ({"factors": []}, "factors must be a non-empty sequence of Factors"),
    ({"factors": [(A2, B2)]}, "factors must be a non-empty sequence of Factors"),
    ({"factors": [F2, Factors(torch.zeros(2, 5), B2, 1.0)]}, "factors must be of one layer's shape"),
    ({"weights": [1.0, 2.0, 3.0]}, r"weights must be one weight per adapter \(2\)"),
    ({"weights": [1.0, float("nan")]}, "weights must be finite numbers"),
    ({"combination": "ties"}, r"density must be a number in \(0, 1\] for combination 'ties'; got None"),
    ({"combination": "dare_linear", "density": 0}, r"density must be a number in \(0, 1\]"),
    ({"combination": "ties_svd", "density": 1.5}, r"density must be a number in \(0, 1\]"),
    ({"majority_sign_method": "mean"}, "majority_sign_method must be one of 'total', 'frequency'"),
    ({"combination": "svd", "svd_rank": 0}, "svd_rank must be None or a positive integer"),
    ({"combination": "svd", "svd_clamp": 1.5}, r"svd_clamp must be None or a quantile in \[0, 1\]"),
    ({"factors": [Factors(CONV_A, CONV_B, 1.0)] * 2, "transposed": True}, "transposed must be False for conv"),
]


@pytest.mark.parametrize(("override", "message"), COMBINE_ERRORS)
def test_combine_errors(override, message):
    kwargs = {"factors": [F2, F2], "weights": WEIGHTS, "combination": "linear"} | override
    with pytest.raises(ValueError, match=message):
        combine(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Factors(A2, torch.zeros(4, 3), 1.0), r"Factors \(A, B\) shapes must be"),
        (lambda: Factors(CONV_A, torch.zeros(5, 2, 3, 3), 1.0), r"Factors \(A, B\) shapes must be"),
        (lambda: Factors(torch.zeros(3), B2, 1.0), r"Factors \(A, B\) shapes must be"),
        (lambda: Factors(A2, B2, float("inf")), "Factors.scaling must be a finite number"),
        (lambda: new_rank("mean", [4]), "combination must be one of"),
        (lambda: new_rank("cat", []), "ranks must be a non-empty sequence of positive integers"),
        (lambda: new_rank("cat", [4, 0]), "ranks must be a non-empty sequence of positive integers"),
        (lambda: new_rank("svd", [4, 4], svd_rank=-1), "svd_rank must be None or a positive integer"),
        (lambda: new_rank("linear", [4, 8]), "ranks must be all equal for combination 'linear'"),
        (lambda: effective_combination("sum", 2), "combination must be one of"),
    ],
)
def test_factors_and_rank_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_new_rank_and_alpha():
    assert [new_rank(c, [4, 6], s) for c, s in [("cat", None), ("svd", None), ("ties_svd", 3)]] == [10, 6, 3]
    assert new_rank("ties", [4], 9) == 4 and new_alpha(6) == 6.0
