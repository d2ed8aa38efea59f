"""add_weighted_adapter: model-level parity with peft for every combination, and the refusals."""

from __future__ import annotations

import copy

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import lightning_peft as lp
from lightning_peft.api.combine import _params, _sites, add_weighted_adapter
from lightning_peft.core import state
from lightning_peft.methods.lora_combine import COMBINATIONS
from tests.peft_reference import skip_if_peft_scales_svd_twice

pytestmark = pytest.mark.filterwarnings("ignore:The density:UserWarning", "ignore:Adapter name:UserWarning")
WEIGHTS = [0.7, -0.4]
TARGETS = {"a": ["q_proj", "v_proj"], "b": ["q_proj", "v_proj"]}

CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
]


def llama() -> torch.nn.Module:
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    return tf.LlamaForCausalLM(config).eval()


def twins(ranks=(4, 4), targets=TARGETS):
    """The same base with adapters 'a' and 'b' holding the same tensors: (peft model, ours)."""
    torch.manual_seed(0)
    base = llama()
    ours = copy.deepcopy(base)
    alphas = {"a": 8, "b": 3}
    options = {n: dict(r=r, lora_alpha=alphas[n], target_modules=targets[n]) for n, r in zip("ab", ranks, strict=True)}
    theirs = get_peft_model(base, LoraConfig(init_lora_weights=False, **options["a"]), adapter_name="a")
    theirs.add_adapter("b", LoraConfig(init_lora_weights=False, **options["b"]))
    for name, o in options.items():
        lp.inject(ours, "lora", adapter_name=name, r=o["r"], alpha=o["lora_alpha"], target_modules=o["target_modules"])
    prefix = "base_model.model."
    copied = 0
    for path, layer in theirs.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in layer.lora_A:
            A, B = _params(_sites(ours, name)[path.removeprefix(prefix)])
            with torch.no_grad():
                A.copy_(layer.lora_A[name].weight)
                B.copy_(layer.lora_B[name].weight)
            copied += 1
    assert copied == sum(len(_sites(ours, n)) for n in "ab")
    return theirs, ours


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


def check_parity(theirs, ours, states, combination, adapters=("a", "b"), weights=WEIGHTS, **options):
    skip_if_peft_scales_svd_twice(combination, len(adapters))
    theirs.add_weighted_adapter(list(adapters), weights, "mix", combination_type=combination, **options)
    active = state.active_adapters(ours)
    generator = torch.Generator().set_state(states[0])  # replays peft's global RNG for DARE's masks
    assert add_weighted_adapter(ours, adapters, weights, "mix", combination, generator=generator, **options) is ours
    assert state.active_adapters(ours) == active  # the new adapter is not activated, as in peft
    assert (ours_config := state.adapter_of(ours, "mix").config).r == theirs.peft_config["mix"].r
    assert ours_config.alpha == theirs.peft_config["mix"].lora_alpha
    theirs.set_adapter("mix")
    lp.set_adapter(ours, "mix")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        lp.set_adapter(ours, "a")
        assert not torch.allclose(ours(input_ids=ids).logits, actual)  # the combination did change something
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_cases_cover_every_combination():
    assert {c for c, _ in CASES} == set(COMBINATIONS)


@pytest.mark.parametrize(
    ("combination", "options"), CASES, ids=[c + "".join(f"-{v}" for v in o.values()) for c, o in CASES]
)
def test_matches_peft(combination, options, rng_at_merge):
    check_parity(*twins(), rng_at_merge, combination, **options)


@pytest.mark.parametrize("combination", ["cat", "svd", "dare_ties_svd"])
def test_matches_peft_with_different_ranks_and_targets(combination, rng_at_merge):
    theirs, ours = twins(ranks=(4, 2), targets={"a": ["q_proj", "v_proj"], "b": ["v_proj", "k_proj"]})
    check_parity(theirs, ours, rng_at_merge, combination, density=0.5)
    sites = set(_sites(ours, "mix"))
    assert sites == set(_sites(ours, "a")) | set(_sites(ours, "b"))
    # cat pads the layers holding one adapter with zeros: rank 6 everywhere, 4 or 2 rows used there.
    if combination == "cat":
        q = next(m for s, m in _sites(ours, "mix").items() if s.endswith("q_proj"))
        assert q.lora_A.shape[0] == 6 and not q.lora_A[4:].any()


def test_one_adapter_is_linear(rng_at_merge):
    check_parity(*twins(), rng_at_merge, "cat", adapters=("b",), weights=[2.0])


def test_mixed_target_kinds_list_the_layers(rng_at_merge):
    theirs, ours = twins()
    lp.inject(ours, "lora", adapter_name="c", r=4, target_modules=r".*\.k_proj")
    add_weighted_adapter(ours, ["a", "c"], [1.0, 1.0], "mix", "cat")
    config = state.adapter_of(ours, "mix").config
    assert set(config.target_modules) == set(_sites(ours, "a")) | set(_sites(ours, "c")) == set(_sites(ours, "mix"))


def unchanged(model):
    """A snapshot of what a refused call must leave as it was."""
    return list(state.adapters(model)), state.active_adapters(model), [n for n, _ in model.named_modules()]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: add_weighted_adapter(m, ["a", "zz"], WEIGHTS, "mix"), "no adapter named 'zz'; it holds 'a', 'b'"),
        (lambda m: add_weighted_adapter(m, "a", [1.0], "mix"), "non-empty list of adapter names"),
        (lambda m: add_weighted_adapter(m, [], [], "mix"), "non-empty list of adapter names"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], WEIGHTS, "b"), "already has an adapter named 'b'"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], [1.0], "mix"), r"one number per adapter \(2\)"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], WEIGHTS, "mix", "sum"), "combination must be one of"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], WEIGHTS, "mix", "ties"), "density must be a number in"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], [1.0, float("nan")], "mix", "cat"), "finite numbers"),
        (lambda m: add_weighted_adapter(m, ["a", "b"], WEIGHTS, "mix", "svd", svd_clamp=2), "svd_clamp"),
    ],
)
def test_refusals_change_nothing(call, message):
    _, ours = twins()
    before = unchanged(ours)
    with pytest.raises(ValueError, match=message):
        call(ours)
    assert unchanged(ours) == before


def test_linear_needs_equal_ranks():
    _, ours = twins(ranks=(4, 2))
    with pytest.raises(ValueError, match="all equal for combination 'linear'"):
        add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "mix", "linear")
    assert "mix" not in state.adapters(ours)


def test_refuses_other_methods_and_dora():
    _, ours = twins()
    lp.inject(ours, "ia3", adapter_name="i", target_modules=["k_proj"], feedforward_modules=[])
    lp.inject(ours, "lora", adapter_name="d", r=4, use_dora=True, target_modules=["o_proj"])
    with pytest.raises(ValueError, match="LoRA adapters only; 'i' is a 'ia3' adapter"):
        add_weighted_adapter(ours, ["a", "i"], WEIGHTS, "mix")
    with pytest.raises(ValueError, match="cannot combine DoRA adapters.*'d' has use_dora=True"):
        add_weighted_adapter(ours, ["a", "d"], WEIGHTS, "mix")
    assert list(state.adapters(ours)) == ["a", "b", "i", "d"]
