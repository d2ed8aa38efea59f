"""LoftQ initialization (Li et al., 2023) of LoRA on bitsandbytes NF4 bases, on CPU.

Each weight ``W`` of a tiny LLaMA is checked against what the quantized layer and its adapter
compute, ``deq(Q) + s B A``: LoftQ beats plain QLoRA (``deq(quantize(W))``, ``B = 0``) on every
targeted layer, never gets worse with more iterations, brings the logits closer to the float
model's, and the adapter still trains.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lightning_peft as lp
from lightning_peft.core import quantize as q
from lightning_peft.methods.lora import LoRAConfig, LoRALinear
from lightning_peft.methods.lora_loftq import loftq
from tests import tiny

pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')

TARGETS = "all-linear"


def float_weights() -> dict[str, Tensor]:
    return {k: v.clone() for k, v in tiny.build("llama").state_dict().items()}


def qlora(**options: object) -> nn.Module:
    return lp.inject(lp.quantize(tiny.build("llama"), "nf4"), "lora", r=4, target_modules=TARGETS, **options)


def errors(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, float]:
    """``||W - (deq(Q) + s B A)||_F`` per LoRA layer, computed from the layers as they are."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            approx = q.dequantized_weight(layer.base).float() + layer.delta_weight().detach().float()
            out[name] = float(torch.linalg.vector_norm(weights[name + ".weight"] - approx))
    return out


def test_loftq_beats_plain_qlora_on_every_layer_and_never_worsens_with_iterations() -> None:
    weights = float_weights()
    plain = errors(qlora(), weights)
    assert len(plain) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    previous = plain
    for iters in (1, 2, 4):
        model = qlora(init="loftq", loftq_iter=iters)
        reported = loftq(model, weights)
        now = errors(model, weights)
        assert set(now) == set(plain) == set(reported)
        for name in plain:
            assert now[name] < plain[name], name
            assert now[name] <= previous[name] + 1e-6, (name, iters)
            norm = float(torch.linalg.vector_norm(weights[name + ".weight"]))
            before, after = reported[name]
            assert before == pytest.approx(plain[name] / norm, rel=1e-4)
            assert after == pytest.approx(now[name] / norm, rel=1e-4)
        previous = now
    # The base holds Q_T, a different quantization from Q_1 = quantize(W) once T > 1.
    layer = model.model.layers[0].self_attn.q_proj
    assert q.quant_kind(layer.base_layer) == "nf4"
    plain_q = qlora().model.layers[0].self_attn.q_proj.base_layer
    assert not torch.equal(q.dequantized_weight(layer.base_layer), q.dequantized_weight(plain_q))


def test_loftq_logits_are_closer_to_the_float_models_than_plain_qlora() -> None:
    batch = tiny.inputs("llama")
    with torch.no_grad():
        full = tiny.logits(tiny.build("llama"), batch)
        plain = tiny.logits(qlora(), batch)
        model = qlora(init="loftq", loftq_iter=2)
        loftq(model, float_weights())
        ours = tiny.logits(model, batch)
    assert torch.linalg.vector_norm(ours - full) < 0.8 * torch.linalg.vector_norm(plain - full)


def test_loftq_from_a_safetensors_file_and_with_a_wrapper_prefix(tmp_path: object) -> None:
    from safetensors.torch import save_file

    weights = float_weights()
    path = tmp_path / "model.safetensors"  # type: ignore[operator]
    save_file(weights, str(path))
    wrapped = nn.ModuleDict({"net": qlora(init="loftq")})  # names gain a "net." prefix
    from_file = loftq(wrapped, path)
    from_dict = loftq(qlora(init="loftq"), weights)
    assert {k.removeprefix("net."): v for k, v in from_file.items()} == from_dict


def test_loftq_adapter_trains() -> None:
    model = qlora(init="loftq")
    loftq(model, float_weights())
    model.train()
    batch = tiny.inputs("llama")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": "svd"}, "LoRAConfig.init must be one of 'kaiming', 'gaussian', 'loftq'; got 'svd'"),
        ({"init": "loftq", "loftq_iter": 0}, "LoRAConfig.loftq_iter must be a positive integer; got 0"),
        ({"init": "loftq", "loftq_iter": 1.5}, "LoRAConfig.loftq_iter must be a positive integer; got 1.5"),
        ({"init": "loftq", "loftq_iter": True}, "LoRAConfig.loftq_iter must be a positive integer; got True"),
        ({"init": "loftq", "use_dora": True}, "LoRAConfig.init must be 'kaiming' or 'gaussian' with use_dora=True"),
    ],
)
def test_bad_config(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoRAConfig(**options)


def test_loftq_refuses_a_base_that_is_not_4_bit() -> None:
    with pytest.raises(
        TypeError,
        match=r"selected 'model.layers.0.self_attn.q_proj'.*init='loftq' needs a "
        r"bitsandbytes 4-bit base.*this one is a Linear;",
    ):
        lp.inject(tiny.build("llama"), "lora", init="loftq")
    int8 = lp.quantize(tiny.build("llama"), "int8")
    with pytest.raises(TypeError, match=r"this one is a Linear8bitLt \(int8\)"):
        lp.inject(int8, "lora", init="loftq")
    with pytest.raises(TypeError, match=r"selected 'model.embed_tokens'.*this one is a Embedding"):
        lp.inject(lp.quantize(tiny.build("llama"), "nf4"), "lora", init="loftq", target_modules=["embed_tokens"])


def test_loftq_bad_calls() -> None:
    with pytest.raises(ValueError, match="no LoRA layer injected with init='loftq'"):
        loftq(qlora(), float_weights())
    weights = float_weights()
    del weights["model.layers.1.mlp.down_proj.weight"]
    model = qlora(init="loftq")
    first = model.model.layers[0].self_attn.q_proj
    untouched = first.base_layer
    with pytest.raises(KeyError, match="no full-precision weight for the LoRA layer 'model.layers.1.mlp.down_proj'"):
        loftq(model, weights)
    assert first.base_layer is untouched and not first.lora_B.any()  # nothing changed
    weights = float_weights()
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"].t()
    with pytest.raises(ValueError, match=r"the full-precision weight has shape \(\d+, \d+\), but the layer is"):
        loftq(qlora(init="loftq"), weights)
    with pytest.raises(TypeError, match="weights must be a mapping of tensors or a .safetensors path; got list"):
        loftq(qlora(init="loftq"), [])  # type: ignore[arg-type]
