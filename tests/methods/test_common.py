"""The shared tester: every registered method x every tiny architecture, the same checks.

Checks: identity at init, gradients reach exactly the adapter, the trainable state dict round-trips
into a fresh model, merge/unmerge agree with the unmerged forward, unload restores the base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lightning_peft as lp
from lightning_peft import registry
from lightning_peft.core import state
from tests import tiny
from tests.methods.cases import CASES

ROOT = Path(__file__).resolve().parents[2]
GRID = [(name, arch) for name in registry.methods() for arch in CASES.get(name, CASES["lora"]).archs]


def test_every_method_has_a_case_a_reference_test_and_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in registry.methods():
        assert name in CASES, f"tests/methods/cases.py has no Case for registered method {name!r}"
        assert (ROOT / "tests" / "methods" / f"test_{name}.py").is_file(), f"no tests/methods/test_{name}.py"
        assert f"`{name}`" in readme, f"README.md does not document method {name!r}"


def _inject(name: str, arch: str, task: str = "lm", seed: int = 0) -> torch.nn.Module:
    return lp.inject(tiny.build(arch, task, seed=seed), name, **CASES[name].options(arch))


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every adapter tensor non-trivial values (many adapters start as an exact identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in state.adapter_state(model):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("name", "arch"), GRID)
def test_identity_at_init(name: str, arch: str) -> None:
    if not CASES[name].identity_at_init:
        pytest.skip(f"{name} changes the model from the start by design")
    batch = tiny.inputs(arch)
    base = tiny.logits(tiny.build(arch), batch)
    torch.testing.assert_close(tiny.logits(_inject(name, arch), batch), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "arch"), GRID)
def test_gradients_reach_exactly_the_adapter(name: str, arch: str) -> None:
    model = _inject(name, arch, task="classify" if tiny.FAMILIES[arch] != "seq2seq" else "lm").train()
    _perturb(model)
    out = model(**tiny.inputs(arch))
    out.logits.float().pow(2).mean().backward()
    declared = {n for n, _ in state.adapter_parameters(model)}
    for param_name, param in model.named_parameters():
        if param_name in declared:
            assert param.requires_grad and param.grad is not None, f"{param_name} got no gradient"
        else:
            assert not param.requires_grad and param.grad is None, f"frozen {param_name} got a gradient"


@pytest.mark.parametrize(("name", "arch"), GRID)
def test_state_dict_round_trip(name: str, arch: str) -> None:
    trained = _inject(name, arch)
    _perturb(trained)
    fresh = _inject(name, arch)
    fresh.load_state_dict(lp.trainable_state_dict(trained))
    batch = tiny.inputs(arch)
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(trained, batch), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "arch"), GRID)
def test_merge_unmerge_and_unload(name: str, arch: str) -> None:
    model = _inject(name, arch)
    _perturb(model)
    batch = tiny.inputs(arch)
    adapted = tiny.logits(model, batch)
    base = tiny.logits(tiny.build(arch), batch)
    if not all(module.mergeable for _, module in state.adapter_modules(model)):
        with pytest.raises(TypeError, match="nothing to merge"):
            lp.merge(model)
    else:
        torch.testing.assert_close(tiny.logits(lp.merge(model), batch), adapted, rtol=0, atol=1e-5)
        torch.testing.assert_close(tiny.logits(lp.unmerge(model), batch), adapted, rtol=0, atol=1e-5)
        merged_copy = lp.unload(copy.deepcopy(model), merge=True)
        assert not list(state.adapter_modules(merged_copy)) and lp.get_info(merged_copy) is None
        torch.testing.assert_close(tiny.logits(merged_copy, batch), adapted, rtol=0, atol=1e-5)
    plain = lp.unload(model, merge=False)
    torch.testing.assert_close(tiny.logits(plain, batch), base, rtol=0, atol=1e-5)
