"""AdaLoRA on bitsandbytes 4-bit / 8-bit bases (QLoRA-style), on CPU.

Parity: ours and peft's AdaLoRA (its ``SVDLinear4bit`` / ``SVDLinear8bitLt``) on two copies of one
tiny LLaMA quantized the same way, with the same adapter weights, give the same logits and the same
orthogonality penalty. Training: with the budget hooks (``lp.regularization``, ``lp.on_step``) the
loss falls, ranks are pruned and gradients reach exactly the adapter. Merging is refused.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import quantize as q
from lightning_peft.core import state
from lightning_peft.methods import adalora
from tests import tiny

bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

OPTIONS = {"init_r": 4, "target_r": 2, "alpha": 8, "total_step": 10}


def quantized_llama(kind: str, compute_dtype: str = "float32") -> nn.Module:
    return lp.quantize(tiny.build("llama"), kind, compute_dtype=compute_dtype)


def randomize_adapter(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero P, lambda and Q (not tests.peft_reference's: that one would overwrite rank_mask too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in state.adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g) * std)


def peft_adalora(ours: nn.Module, kind: str) -> nn.Module:
    """peft's AdaLoRA on a copy of ``ours``' base quantized the same way, with ``ours``' adapter weights.

    peft picks its bitsandbytes layers from transformers' ``is_loaded_in_4bit`` / ``_8bit`` flags,
    which ``from_pretrained(quantization_config=...)`` sets; ``lp.quantize`` does not, so set them here.
    """
    config = lp.get_info(ours).config
    base = quantized_llama(kind)
    setattr(base, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    reference = peft.get_peft_model(
        base,
        peft.AdaLoraConfig(
            init_r=config.init_r,
            target_r=config.target_r,
            lora_alpha=config.alpha,
            orth_reg_weight=config.orth_reg_weight,
            total_step=config.total_step,
            target_modules=config.target_modules,
        ),
    ).eval()
    wrapped = type(reference.base_model.model.model.layers[0].self_attn.q_proj).__name__
    assert wrapped == ("SVDLinear8bitLt" if kind == "int8" else "SVDLinear4bit")
    targets = dict(reference.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in state.adapter_parameters(ours):
            module, _, local = name.rpartition(".")  # lora_A / lora_E / lora_B: peft's names too
            key = f"base_model.model.{module}.{local}.default"
            targets[key].copy_(param.reshape(targets[key].shape))
            copied += 1
    assert copied == 3 * len(adalora.svd_layers(ours))  # every layer's P, lambda and Q
    return reference


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_adalora_matches_peft_on_a_quantized_llama(kind: str) -> None:
    batch = tiny.inputs("llama")
    ours = lp.inject(quantized_llama(kind), "adalora", **OPTIONS)
    layer = ours.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)  # from in/out_features
    quantized = tiny.logits(ours, batch)  # lambda = 0: the quantized model unchanged
    torch.testing.assert_close(quantized, tiny.logits(quantized_llama(kind), batch), rtol=0, atol=0)
    randomize_adapter(ours)
    reference = peft_adalora(ours, kind)
    adapted = tiny.logits(ours, batch)
    assert (adapted - quantized).abs().max() > 1e-3  # the update changes the output
    # peft divides by (init_r + 1e-5) where we divide by init_r: a relative 2.5e-6 of the update.
    torch.testing.assert_close(adapted, tiny.logits(reference, batch), rtol=0, atol=1e-5)
    # The orthogonality penalty too (peft's AdaLoraModel.forward adds it to the loss).
    labelled = batch | {"labels": batch["input_ids"]}
    ours_loss = ours.eval()(**labelled).loss + lp.regularization(ours)
    torch.testing.assert_close(ours_loss, reference.base_model(**labelled).loss, rtol=0, atol=1e-5)


def test_bfloat16_compute_dtype_puts_the_adapter_in_bfloat16() -> None:
    ours = lp.inject(quantized_llama("nf4", "bfloat16"), "adalora", **OPTIONS)
    for _, layer in adalora.svd_layers(ours):
        assert layer.lora_A.dtype == layer.lora_E.dtype == layer.lora_B.dtype == torch.bfloat16
        assert layer.sensitivity_A.dtype == torch.float32  # importance statistics stay float32
    assert tiny.logits(ours, tiny.inputs("llama")).isfinite().all()


@pytest.mark.parametrize(("kind", "compute_dtype"), [("nf4", "float32"), ("nf4", "bfloat16"), ("int8", "float32")])
def test_training_with_the_budget_hooks_lowers_the_loss_and_trains_only_the_adapter(
    kind: str, compute_dtype: str
) -> None:
    total = 8
    model = lp.inject(
        quantized_llama(kind, compute_dtype), "adalora", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=total
    )
    randomize_adapter(model, std=0.05)  # lambda != 0, so every factor gets a gradient at the first step
    model.train()
    declared = {id(p) for _, p in state.adapter_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == declared
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = tiny.inputs("llama", batch=4)
    losses = []
    for step in range(1, total + 1):
        loss = model(**batch, labels=batch["input_ids"]).loss
        losses.append(loss.item())
        penalty = lp.regularization(model)
        assert penalty is not None and penalty.requires_grad
        (loss + penalty).backward()
        assert {id(p) for p in model.parameters() if p.grad is not None} == declared
        assert all(bool(p.grad.abs().sum() > 0) for _, p in state.adapter_parameters(model))
        optimizer.step()
        lp.on_step(model, step)
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 1e-3, losses
    layers = adalora.svd_layers(model)
    assert sum(adalora.rank_pattern(model).values()) == 2 * len(layers)  # the final budget, target_r per layer
    assert any(float(layer.sensitivity_E.abs().sum()) > 0 for _, layer in layers)  # importance was tracked
    for _, layer in layers:
        assert torch.count_nonzero(layer.lora_E[~layer.rank_mask]) == 0  # pruned triplets stay at zero


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merging_into_a_quantized_base_is_refused(kind: str) -> None:
    model = lp.inject(quantized_llama(kind), "adalora", **OPTIONS)
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.mergeable
    bits = "8-bit" if kind == "int8" else "4-bit"
    with pytest.raises(TypeError, match=rf"cannot merge adalora into a {bits} bitsandbytes .*dequantize\(model\)"):
        layer.merge()
    with pytest.raises(TypeError, match=r"cannot merge adalora into"):
        layer.unmerge()
    with pytest.raises(TypeError, match=r"cannot merge adalora into"):
        lp.merge(model)
    assert not layer.merged


def test_merge_after_dequantize_works() -> None:
    """The documented way out: dequantize, then merge; the merged model computes what the adapter did."""
    model = lp.inject(quantized_llama("nf4"), "adalora", **OPTIONS)
    randomize_adapter(model)
    batch = tiny.inputs("llama")
    before = tiny.logits(model, batch)
    lp.dequantize(model)
    assert not q.quantized_layers(model)
    lp.merge(model)
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-4)
