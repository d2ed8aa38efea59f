"""lp.quantize / prepare_for_kbit_training / dequantize on plain modules and tiny transformers models."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import quantize as q
from tests import tiny

bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')


class Plain(nn.Module):
    """Not a transformers model: two linears, a norm and a conv that quantize must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.down = nn.Linear(128, 64, bias=False)
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantize_replaces_the_linears_of_a_plain_module(kind: str) -> None:
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(3, 64)
    expected = model(x)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("up", "down")}
    assert lp.quantize(model, kind) is model
    assert [n for n, _ in q.quantized_layers(model)] == ["up", "down"]
    assert q.quant_kind(model.up) == kind
    assert type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv1d
    for name, weight in weights.items():  # what it computes with is the weight, up to 4-bit (8-bit) rounding
        error = (q.dequantized_weight(model.get_submodule(name)) - weight).abs().max()
        assert 0 < error < (0.02 if kind == "int8" else 0.2) * weight.abs().max()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0.3)
    assert (model(x) - expected).abs().max() > 0


def test_quantize_options() -> None:
    model = lp.quantize(tiny.build("llama"), "nf4", compute_dtype=torch.bfloat16, double_quant=True)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.uint8
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_state.nested  # double quantization
    assert type(model.lm_head) is nn.Linear  # "all-linear" leaves the output layer in full precision
    only = lp.quantize(tiny.build("llama"), "fp4", target_modules=["q_proj"], exclude_modules=r".*\.1\..*")
    assert [n for n, _ in q.quantized_layers(only)] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quant_type": "nf8"}, r"quant_type must be 'nf4', 'fp4' or 'int8'; got 'nf8'"),
        ({"quant_type": "nf4", "compute_dtype": "int8"}, r"compute_dtype must be 'float32', 'bfloat16' .*got 'int8'"),
        ({"quant_type": "nf4", "double_quant": "yes"}, r"double_quant must be True or False; got 'yes'"),
        ({"quant_type": "int8", "double_quant": True}, r"double_quant must be False with quant_type='int8'; got True"),
        ({"quant_type": "nf4", "target_modules": ["norm"]}, r"none of which is an nn.Linear"),
        ({"quant_type": "nf4", "target_modules": ["nope"]}, r"target_modules=\['nope'\] matched no module"),
    ],
)
def test_quantize_refuses_bad_options(options: dict, message: str) -> None:
    model = Plain()
    with pytest.raises(ValueError, match=message):
        lp.quantize(model, **options)
    assert not q.quantized_layers(model)


def test_without_bitsandbytes_the_error_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r'needs bitsandbytes.*pip install "lightning-peft\[quant\]"'):
        lp.quantize(Plain(), "nf4")
    assert not q.is_quantized(nn.Linear(2, 2))  # telling layers apart never imports it


def test_prepare_for_kbit_training() -> None:
    model = tiny.build("llama").to(torch.bfloat16)
    lp.quantize(model, "nf4", compute_dtype="bfloat16", prepare=False)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert lp.prepare_for_kbit_training(model) is model
    # Norms, embeddings and the head: float32; quantized weights untouched, compute dtype kept.
    assert model.model.norm.weight.dtype == model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.uint8 and layer.compute_dtype == torch.bfloat16
    assert not layer.support_avx512bf16_for_cpu
    model.requires_grad_(False)
    embeds = model.model.embed_tokens(tiny.inputs("llama")["input_ids"])
    assert embeds.requires_grad  # input grads on, for gradient checkpointing with frozen embeddings
    lp.prepare_for_kbit_training(model)  # twice: one hook, not two
    assert len(model.model.embed_tokens._forward_hooks) == 1
    batch = tiny.inputs("llama")
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def test_dequantize_gives_what_the_layers_computed_with() -> None:
    model = lp.quantize(tiny.build("llama"), "nf4", double_quant=True)
    batch = tiny.inputs("llama")
    before = tiny.logits(model, batch)
    lp.dequantize(model, dtype="float32")
    assert not q.quantized_layers(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and not layer.weight.requires_grad and layer.weight.shape == (32, 32)
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-5)
