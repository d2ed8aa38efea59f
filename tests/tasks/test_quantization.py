"""The task modules' quantization option (QLoRA through transformers' BitsAndBytesConfig)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft import PEFTCallback
from lightning_peft.core import quantize as q
from lightning_peft.core import state
from lightning_peft.tasks import CausalLM, CausalLMData, SequenceClassification
from tests.lightning.modules import trainer
from tests.tasks import hub

bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


@pytest.mark.parametrize(
    ("quantization", "compute_dtype", "double_quant"),
    [("nf4", "bfloat16", True), ("fp4", "float32", False), ("int8", "float32", False)],
)
def test_the_model_is_loaded_quantized_and_prepared(
    hub_dir: Path, quantization: str, compute_dtype: str, double_quant: bool
) -> None:
    module = CausalLM(
        str(hub.save_model(hub_dir, "llama")),
        dtype="bfloat16",
        quantization=quantization,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
    )
    module.configure_model()
    model = module.transformer
    layer = model.model.layers[0].self_attn.q_proj
    assert q.quant_kind(layer) == quantization
    if quantization != "int8":
        assert layer.compute_dtype == getattr(torch, compute_dtype)
        assert layer.weight.quant_state.nested == double_quant
        assert not layer.support_avx512bf16_for_cpu
    assert not q.is_quantized(model.lm_head)  # the output layer stays in full precision
    # Prepared for k-bit training: what is not quantized is float32, though loaded in bfloat16.
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == torch.float32
    assert module.hparams.quantization == quantization


def test_a_qlora_run_that_validates_first_still_learns(hub_dir: Path, tmp_path: Path) -> None:
    """Validation before fit is the eval forward that would have made 4-bit layers drop input gradients."""
    L.seed_everything(0)
    data = hub.write_jsonl(tmp_path / "qa.jsonl", hub.qa_rows(repeat=6))
    dm = CausalLMData(train_file=str(data), batch_size=6, val_split=0.25)
    module = CausalLM(str(hub.save_model(hub_dir, "llama")), learning_rate=3e-2, quantization="nf4")
    t = trainer(tmp_path, max_epochs=3, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    before = t.validate(module, dm, verbose=False)[0]
    t.fit(module, dm)
    after = t.validate(module, dm, verbose=False)[0]
    assert after["val_perplexity"] < 0.95 * before["val_perplexity"]
    assert type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n, _ in state.adapter_parameters(module)
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantization": "nf2"}, r"SequenceClassification.quantization must be one of .*'nf4'.*got 'nf2'"),
        ({"quantization": "nf4", "compute_dtype": "int8"}, r"compute_dtype must be one of .*got 'int8'"),
        ({"quantization": "nf4", "double_quant": 1}, r"double_quant must be True or False; got 1"),
        ({"quantization": "int8", "double_quant": True}, r"double_quant must be False unless quantization is 'nf4'"),
        ({"double_quant": True}, r"double_quant must be False unless .*\(it is None\)"),
    ],
)
def test_bad_quantization_options(hub_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SequenceClassification(str(hub.save_model(hub_dir, "bert")), **options)


def test_without_bitsandbytes_quantization_fails_with_the_install_command(
    hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(
        ImportError, match=r"CausalLM\(quantization=.nf4.\) needs bitsandbytes.*lightning-peft\[quant\]"
    ):
        CausalLM(str(hub.save_model(hub_dir, "llama")), quantization="nf4")
    CausalLM(str(hub.save_model(hub_dir, "llama")))  # without quantization it is not needed
