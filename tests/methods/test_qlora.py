"""QLoRA: LoRA (rsLoRA, DoRA) and (IA)^3 on bitsandbytes 4-bit / 8-bit bases, on CPU.

Parity: ours and peft's ``get_peft_model`` on two copies of one tiny LLaMA quantized the same way,
with the same adapter weights, give the same logits. Training: the loss falls and gradients reach
exactly the adapter. The AVX512-BF16 trap (an eval forward repacks a Linear4bit so that its
backward drops the input gradient) is reproduced, then shown to be avoided.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from torch import nn

import lightning_peft as lp
from lightning_peft.core import quantize as q
from lightning_peft.core import state
from tests import tiny
from tests.peft_reference import copy_into_peft, randomize_adapter

bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

#: (quant_type, compute_dtype, double_quant): NF4 and FP4, each compute dtype, double quant both ways.
GRID = [
    ("nf4", "float32", False),
    ("nf4", "bfloat16", True),
    ("fp4", "float32", True),
    ("fp4", "bfloat16", False),
    ("int8", "float32", False),
]


def lora_rename(module: str, local: str) -> str:
    return f"{module}.{local}.default.weight"


def quantized_llama(kind: str = "nf4", compute_dtype: str = "float32", double_quant: bool = False) -> nn.Module:
    return lp.quantize(tiny.build("llama"), kind, compute_dtype=compute_dtype, double_quant=double_quant)


def peft_to(model: nn.Module, dtype: torch.dtype) -> None:
    """peft creates its adapter in float32 on a quantized base; ours is in the compute dtype."""
    for name, param in model.named_parameters():
        if "lora_" in name or "ia3_" in name:
            param.data = param.data.to(dtype)


@pytest.mark.parametrize(("kind", "compute_dtype", "double_quant"), GRID)
def test_lora_matches_peft_on_a_quantized_llama(kind: str, compute_dtype: str, double_quant: bool) -> None:
    batch = tiny.inputs("llama")
    full = tiny.logits(tiny.build("llama"), batch)
    ours = lp.inject(quantized_llama(kind, compute_dtype, double_quant), "lora", r=4, alpha=8, rslora=True)
    layer = ours.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    dtype = q.COMPUTE_DTYPES[compute_dtype]
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype  # the adapter in the compute dtype
    quantized = tiny.logits(ours, batch)
    assert (quantized - full).abs().max() > 1e-4  # the base really is quantized
    targets = lp.get_info(ours).config.target_modules
    reference = peft.get_peft_model(
        quantized_llama(kind, compute_dtype, double_quant),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=targets),
    ).eval()
    peft_to(reference, dtype)
    randomize_adapter(ours)
    assert copy_into_peft(ours, reference, lora_rename) == 2 * len(lp.get_info(ours).modules)
    adapted = tiny.logits(ours, batch)
    assert (adapted - quantized).abs().max() > 1e-3  # the update changes the output
    torch.testing.assert_close(adapted, tiny.logits(reference, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_matches_peft_on_a_quantized_llama(kind: str) -> None:
    ours = lp.inject(quantized_llama(kind), "lora", r=4, alpha=8, use_dora=True)
    targets = lp.get_info(ours).config.target_modules
    reference = peft.get_peft_model(
        quantized_llama(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    ).eval()
    batch = tiny.inputs("llama")
    # The magnitude starts as the norm of the dequantized weight, as peft's does.
    peft_state = reference.state_dict()
    for name, tensor in lp.trainable_state_dict(ours).items():
        if name.endswith("lora_magnitude"):
            key = f"base_model.model.{name.rsplit('.', 1)[0]}.lora_magnitude_vector.default.weight"
            torch.testing.assert_close(tensor, peft_state[key], rtol=0, atol=1e-6)
    randomize_adapter(ours, std=0.05)

    def rename(module: str, local: str) -> str:
        if local == "lora_magnitude":
            return f"{module}.lora_magnitude_vector.default.weight"
        return lora_rename(module, local)

    assert copy_into_peft(ours, reference, rename) == 3 * len(lp.get_info(ours).modules)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_ia3_matches_peft_on_a_quantized_llama(kind: str) -> None:
    ours = lp.inject(quantized_llama(kind), "ia3")
    config = lp.get_info(ours).config
    reference = peft.get_peft_model(
        quantized_llama(kind),
        peft.IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules),
    ).eval()
    randomize_adapter(ours, std=0.3)
    with torch.no_grad():
        for _, tensor in lp.trainable_state_dict(ours).items():
            tensor.add_(1.0)  # around the identity, as trained vectors are
    peft_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, tensor in lp.trainable_state_dict(ours).items():
            key = f"base_model.model.{name.rsplit('.', 1)[0]}.ia3_l.default"
            peft_params[key].copy_(tensor.reshape(peft_params[key].shape))
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": 4}), ("lora", {"r": 4, "use_dora": True}), ("ia3", {})])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_training_on_a_4bit_base_lowers_the_loss_and_trains_only_the_adapter(
    method: str, options: dict, compute_dtype: str
) -> None:
    model = lp.inject(quantized_llama("nf4", compute_dtype, True), method, **options).train()
    declared = {id(p) for _, p in state.adapter_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == declared
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = tiny.inputs("llama", batch=4)
    losses = []
    for step in range(6):
        loss = lm_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        assert {id(p) for p in model.parameters() if p.grad is not None} == declared
        if step == 1:  # after one update (LoRA's B starts at zero, so A's first gradient is zero)
            assert all(bool(p.grad.abs().sum() > 0) for _, p in state.adapter_parameters(model))
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 1e-3, losses


def llama64() -> nn.Module:
    """A tiny LLaMA whose linears have >= 64 inputs: bitsandbytes repacks only those (one block per row)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tiny.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def eval_then_train(model: nn.Module) -> dict[str, bool]:
    """Validate (eval mode, no grad) once, then take one training backward: which adapters got a gradient."""
    randomize_adapter(model, std=0.1)  # LoRA's A gets no gradient while B is zero
    batch = tiny.inputs("llama")
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    lm_loss(model, batch).backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in state.adapter_parameters(model)}


avx512bf16 = pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)


@avx512bf16
def test_the_cpu_repacking_trap_is_real() -> None:
    """Control: a Linear4bit left as bitsandbytes makes it drops the input gradient after an eval forward."""
    model = lp.inject(lp.quantize(llama64(), "nf4", prepare=False), "lora", r=4)
    for module in model.modules():
        if q.is_quantized(module):
            module.support_avx512bf16_for_cpu = True  # undo what inject did: bitsandbytes' own default
    got = eval_then_train(model)
    assert not got["model.layers.0.self_attn.q_proj.lora_A"]  # the first layer's adapter got nothing


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("prepare", [True, False])  # quantize() protects the layers, and inject() does too
def test_an_eval_forward_before_training_keeps_the_gradients(method: str, prepare: bool) -> None:
    model = lp.quantize(llama64(), "nf4", compute_dtype="bfloat16", prepare=prepare)
    got = eval_then_train(lp.inject(model, method))
    assert all(got.values()), [name for name, ok in got.items() if not ok]


@avx512bf16
@pytest.mark.parametrize("double_quant", [False, True])
def test_inject_undoes_a_repacking_that_already_happened(double_quant: bool) -> None:
    model = lp.quantize(llama64(), "nf4", double_quant=double_quant, prepare=False)
    with torch.no_grad():
        model(**tiny.inputs("llama"))  # eval mode, no grad: bitsandbytes repacks every Linear4bit
    assert all(m.weight.quant_state.packing_format_for_cpu for _, m in q.quantized_layers(model))
    model = lp.inject(model, "lora", r=4)
    assert not any(m.weight.quant_state.packing_format_for_cpu for _, m in q.quantized_layers(model))
    # The weights are back, up to the block scales' rounding to bfloat16 (relative 2^-9), and with double
    # quantization their 8-bit requantization (relative ~1/128 near a block's largest scale).
    rtol = 2**-6 if double_quant else 2**-8
    fresh = dict(q.quantized_layers(lp.quantize(llama64(), "nf4", double_quant=double_quant)))
    for name, module in q.quantized_layers(model):
        expected = q.dequantized_weight(fresh[name.replace(".base_layer", "")])
        torch.testing.assert_close(q.dequantized_weight(module), expected, rtol=rtol, atol=1e-6)
    got = eval_then_train(model)
    assert all(got.values()), [name for name, ok in got.items() if not ok]


@pytest.mark.parametrize(("method", "options"), [("lora", {}), ("lora", {"use_dora": True}), ("ia3", {})])
def test_merging_into_a_quantized_base_is_refused(method: str, options: dict) -> None:
    model = lp.inject(quantized_llama(), method, **options)
    randomize_adapter(model, std=0.05)
    batch = tiny.inputs("llama")
    before = tiny.logits(model, batch)
    for action in (lp.merge, lp.unmerge, lp.unload):
        refusal = r"cannot merge .* into a 4-bit bitsandbytes Linear4bit \(nf4\).*lightning_peft.dequantize\(model\)"
        with pytest.raises(TypeError, match=refusal):
            action(model)
    assert not any(m.merged for _, m in state.adapter_modules(model))
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=0)  # nothing changed


@pytest.mark.parametrize(("method", "options"), [("lora", {}), ("lora", {"use_dora": True}), ("ia3", {})])
def test_dequantize_then_merge(method: str, options: dict) -> None:
    """The explicit way: float weights equal to what the 4-bit layers computed with, then merge."""
    model = lp.inject(quantized_llama(), method, **options)
    randomize_adapter(model, std=0.05)
    if method == "ia3":
        with torch.no_grad():
            for _, tensor in lp.trainable_state_dict(model).items():
                tensor.add_(1.0)
    batch = tiny.inputs("llama")
    before = tiny.logits(model, batch)
    lp.dequantize(model)
    assert not q.quantized_layers(model)
    assert type(model.model.layers[0].self_attn.v_proj.base_layer) is nn.Linear
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-5)
    lp.merge(model)
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-5)
    lp.unload(model)
    assert not list(state.adapter_modules(model))
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-5)
