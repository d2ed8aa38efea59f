"""lp.enable_gradient_checkpointing: the same LoRA gradients as without it, both checkpoint implementations."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from tests import tiny
from tests.peft_reference import randomize_adapter


def lora_gradients(arch: str, checkpointing: bool, use_reentrant: bool) -> dict[str, torch.Tensor]:
    model = lp.inject(tiny.build(arch), "lora", r=4, dropout=0.1)
    randomize_adapter(model, std=0.1)  # B != 0, so A gets a gradient too
    if checkpointing:
        assert lp.enable_gradient_checkpointing(model, use_reentrant=use_reentrant) is model
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    batch = tiny.inputs(arch)
    block = model.model.layers[0].mlp if arch == "llama" else model.bert.encoder.layer[0].output
    calls: list[int] = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)  # the same dropout masks: checkpointing replays the RNG state in its recompute
    output = model(**batch)
    output.logits.float().pow(2).mean().backward()
    assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed in backward
    return {name: p.grad.clone() for name, p in state.adapter_parameters(model) if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_same_lora_gradients_with_and_without_checkpointing(arch: str, use_reentrant: bool) -> None:
    plain = lora_gradients(arch, checkpointing=False, use_reentrant=use_reentrant)
    checkpointed = lora_gradients(arch, checkpointing=True, use_reentrant=use_reentrant)
    expected = {name for name, _ in state.adapter_parameters(lp.inject(tiny.build(arch), "lora", r=4))}
    assert set(plain) == set(checkpointed) == expected  # every adapter tensor, the first layer's too
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-5, msg=name)


def test_reentrant_checkpointing_needs_the_input_grad_hook() -> None:
    """Without any input-grad hook (transformers' removed), reentrant checkpointing trains nothing; ours is enough."""
    model = lp.inject(tiny.build("llama"), "lora", r=4)
    randomize_adapter(model, std=0.1)
    lp.enable_gradient_checkpointing(model, use_reentrant=True).train()
    model.disable_input_require_grads()  # transformers 5 adds its own hook for input_ids models: not ours
    batch = tiny.inputs("llama")
    assert model(**batch).logits.requires_grad  # our hook alone keeps the graph
    model.model.embed_tokens._forward_hooks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        logits = model(**batch).logits
    assert not logits.requires_grad  # control: checkpointed layers saw no grad-requiring input, nothing trains


def test_refuses_a_model_without_checkpointing_support() -> None:
    with pytest.raises(TypeError, match=r"Sequential is not a transformers model that supports gradient checkpointing"):
        lp.enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"use_reentrant must be True or False; got 'yes'"):
        lp.enable_gradient_checkpointing(tiny.build("llama"), use_reentrant="yes")  # type: ignore[arg-type]
