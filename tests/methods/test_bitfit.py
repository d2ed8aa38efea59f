"""BitFit: exactly the biases train, by the formula b + delta_b; clear errors where there is no bias."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods.bitfit import BiasDelta
from tests import tiny


def _adamw_steps(model: nn.Module, arch: str, steps: int = 3) -> None:
    """A few AdamW steps with weight decay (which would move any entry the optimizer holds)."""
    params = [p for _, p in state.adapter_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(steps):
        out = model(**tiny.inputs(arch, seed=step))
        out.logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", ["gpt2", "bert", "bart"])
def test_trains_exactly_the_biases(arch: str) -> None:
    base = tiny.build(arch)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    biases = {n for n in before if n.rsplit(".", 1)[-1] == "bias"}
    model = lp.inject(copy.deepcopy(base), "bitfit")
    # One trainable delta per bias tensor of the base model, of the same size, and nothing else.
    trainable = dict(state.adapter_parameters(model))
    assert all(n.endswith(".delta.bias") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(before[n].numel() for n in biases)
    assert state.count_parameters(model)[0] == sum(before[n].numel() for n in biases)
    _adamw_steps(model, arch)
    after = {n: p.detach() for n, p in lp.unload(lp.merge(model)).named_parameters()}
    assert after.keys() == before.keys()
    for name in before:
        if name in biases:
            assert not torch.equal(after[name], before[name]), f"bias {name} did not train"
        else:
            assert torch.equal(after[name], before[name]), f"{name} is not a bias but changed"


def test_follows_the_formula() -> None:
    """Linear: h = W x + (b + delta_b); LayerNorm: h = norm(x) * w + (b + delta_b)."""
    torch.manual_seed(0)
    linear, norm = nn.Linear(6, 5), nn.LayerNorm(5)
    x = torch.randn(3, 6)
    wrapped_linear, wrapped_norm = BiasDelta(copy.deepcopy(linear)), BiasDelta(copy.deepcopy(norm))
    for layer in (wrapped_linear, wrapped_norm):
        nn.init.normal_(layer.delta["bias"])
    h = wrapped_linear(x)
    torch.testing.assert_close(h, x @ linear.weight.T + (linear.bias + wrapped_linear.delta["bias"]))
    normalized = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(wrapped_norm(h), normalized * norm.weight + (norm.bias + wrapped_norm.delta["bias"]))
    assert torch.equal(wrapped_linear.base_layer.bias, linear.bias)  # the frozen bias is untouched


def test_classification_head_trains_in_full_beside_the_biases() -> None:
    model = lp.inject(tiny.build("bert", "classify"), "bitfit")
    keys = set(lp.trainable_state_dict(model))
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= keys
    assert not any(k.startswith("classifier.") and ".delta." in k for k in keys)  # no delta inside the head


def test_checkpoint_holds_only_bias_deltas() -> None:
    model = lp.inject(tiny.build("gpt2"), "bitfit")
    sd = lp.trainable_state_dict(model)
    assert sd and all(k.endswith(".delta.bias") and sd[k].dim() == 1 for k in sd)


def test_explicit_targets_and_exclusions() -> None:
    model = lp.inject(tiny.build("bert"), "bitfit", target_modules=["query", "value"])
    assert len(lp.get_info(model).modules) == 4
    excluded = lp.inject(tiny.build("bert"), "bitfit", exclude_modules=r".*LayerNorm")
    assert not any("LayerNorm" in n for n in lp.get_info(excluded).modules)
    assert any("dense" in n for n in lp.get_info(excluded).modules)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_architectures_without_biases_are_refused(arch: str) -> None:
    with pytest.raises(ValueError, match=r"bitfit found no bias term to train in .*: this architecture has no biases"):
        lp.inject(tiny.build(arch), "bitfit")


def test_targets_without_a_bias_are_refused() -> None:
    with pytest.raises(
        TypeError, match=r"BitFitConfig.target_modules selected modules without a bias of their own: model.layers.0"
    ):
        lp.inject(tiny.build("llama"), "bitfit", target_modules=["q_proj"])
    # BERT's output head owns a bias that its decoder layer shares: a wrapper in a wrapper is refused.
    with pytest.raises(TypeError, match=r"selected cls.predictions together with modules inside them"):
        lp.inject(tiny.build("bert"), "bitfit", target_modules=r"cls\.predictions(\.decoder)?")
