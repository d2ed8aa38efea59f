"""Merging LoRA into a 4-bit base by quantizing again (issue 15 point 3): the error is reported, never silent."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.core import quantize as q
from lightning_peft.core import state
from tests import tiny
from tests.peft_reference import randomize_adapter

pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')


def adapted(kind: str = "nf4", **options: object) -> torch.nn.Module:
    model = lp.quantize(tiny.build("llama"), kind)
    lp.inject(model, "lora", r=4, target_modules=["q_proj", "v_proj"], **options)
    randomize_adapter(model, std=0.3)
    return model


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_the_merged_layer_is_the_requantized_sum_and_the_error_is_what_it_lost(kind: str) -> None:
    model = adapted(kind)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.base.in_features)
    with torch.no_grad():
        target = q.dequantized_weight(layer.base) + layer.delta_weight()  # W + s B A, (out, in)
    errors = lp.merge_requantized(model)
    assert set(errors) == {n for n, _ in state.adapter_modules(model)}  # every LoRA layer, by its site
    merged = q.dequantized_weight(layer.base)
    expected = float(torch.linalg.vector_norm(merged - target) / torch.linalg.vector_norm(layer.delta_weight()))
    assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(expected, rel=1e-5)
    # Closer to W + s B A than the old 4-bit weight was (that one is off by exactly the update: error 1).
    assert all(error < 1.0 for error in errors.values()), errors
    assert q.is_quantized(layer.base) and layer.merged  # still 4-bit, and the wrapper passes through
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
        # The merged layer computes with the requantized sum: within 4-bit rounding of W + s B A.
        torch.testing.assert_close(layer(x), x @ merged.t(), rtol=1e-4, atol=1e-4)


def test_a_large_loss_warns_and_a_requantized_merge_cannot_be_undone() -> None:
    model = adapted()
    with torch.no_grad():
        for _, tensor in state.adapter_parameters(model):
            tensor.mul_(1e-3)  # an update far below 4-bit resolution: requantizing loses most of it
    with pytest.warns(UserWarning, match="requantizing lost more than the update itself"):
        errors = lp.merge_requantized(model)
    assert max(errors.values()) > 1.0
    with pytest.raises(TypeError, match="was merged into .* by quantizing again"):
        lp.unmerge(model)


def test_refusals_name_what_to_do_instead() -> None:
    model = adapted(use_dora=True)
    with pytest.raises(TypeError, match=r"merge_requantized folds LoRA updates \(not DoRA"):
        lp.merge_requantized(model)
    assert not any(m.merged for _, m in state.adapter_modules(model))
    plain = lp.inject(tiny.build("llama"), "lora")
    with pytest.raises(ValueError, match="no active adapter of LlamaForCausalLM wraps a bitsandbytes layer"):
        lp.merge_requantized(plain)
    with pytest.raises(TypeError, match=r"lightning_peft.merge_requantized\(model\)"):
        lp.merge(adapted())
