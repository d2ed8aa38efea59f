"""Checkpoints of a QLoRA run: adapter-only, resumed exactly, and tied to the quantized base.

A real ``L.Trainer`` with ``PEFTCallback("lora")`` trains a tiny LLaMA whose linears are NF4
``Linear4bit`` layers (built by ``lp.quantize``, or by a task module's ``quantization`` option,
which goes through transformers' ``BitsAndBytesConfig``). The checkpoint must hold no packed 4-bit
weight and none of the quantization state bitsandbytes serializes beside it (``absmax``,
``quant_map``, ``quant_state.*``); resuming from it must end on the adapter an uninterrupted run
ends on; and its base fingerprint must refuse a base quantized from other weights while accepting
the same float weights quantized again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import quantize as q
from lightning_peft.core import state
from lightning_peft.tasks import CausalLM, CausalLMData
from tests import tiny
from tests.lightning.modules import StopAfterFirstEpoch, TinyLM, token_loader, trainer
from tests.methods.test_qlora import quantized_llama
from tests.tasks import hub

bnb = pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

#: Key fragments bitsandbytes writes for a 4-bit weight's quantization state (Linear4bit._save_to_state_dict).
QUANT_STATE_KEYS = ("absmax", "quant_map", "quant_state", "nested_", "bitsandbytes__")


class QuantizedLM(TinyLM):
    """:class:`TinyLM` over a tiny LLaMA quantized to NF4 (from the float weights of ``seed``)."""

    def __init__(self, seed: int = 0, double_quant: bool = False) -> None:
        super().__init__(seed=seed)
        self.model = lp.quantize(tiny.build("llama", seed=seed), "nf4", double_quant=double_quant).train()


def adapter(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lp.trainable_state_dict(module).items()}


def checkpoint_bytes(module: nn.Module) -> int:
    """What a checkpoint of the adapter with AdamW's two moments takes, at most."""
    return 3 * sum(p.numel() * p.element_size() for _, p in state.adapter_parameters(module))


def base_state_keys(module: nn.Module) -> set[str]:
    """The full state dict's keys that are not the adapter's: what a checkpoint must leave out."""
    adapter_keys = {n for n, _ in state.adapter_state(module)}
    return set(module.state_dict()) - adapter_keys


def _task_module(hub_dir: Path, tmp_path: Path) -> tuple[L.LightningModule, object]:
    data = hub.write_jsonl(tmp_path / "qa.jsonl", hub.qa_rows(repeat=2))
    module = CausalLM(str(hub.save_model(hub_dir, "llama")), learning_rate=1e-2, quantization="nf4")
    return module, CausalLMData(train_file=str(data), batch_size=4)


@pytest.mark.parametrize("built_by", ["lp.quantize", "CausalLM(quantization='nf4')"])
def test_the_checkpoint_holds_only_the_adapter(built_by: str, hub_dir: Path, tmp_path: Path) -> None:
    if built_by == "lp.quantize":
        module, data = QuantizedLM(), token_loader()
    else:
        module, data = _task_module(hub_dir, tmp_path)
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, data)
    base = module.model if built_by == "lp.quantize" else module.transformer
    layer = base.model.layers[0].self_attn.q_proj.base_layer
    assert q.quant_kind(layer) == "nf4" and layer.weight.dtype == torch.uint8  # it trained on packed 4-bit weights
    full = base_state_keys(module)
    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in full)  # what bitsandbytes would save

    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["state_dict"]
    assert set(saved) == {n for n, _ in state.adapter_state(module)} and saved
    assert not set(saved) & full
    assert not [k for k in saved if "base_layer" in k or any(part in k for part in QUANT_STATE_KEYS)]
    assert all(t.is_floating_point() and t.dtype != torch.uint8 for t in saved.values())
    assert path.stat().st_size <= 1.1 * checkpoint_bytes(module) + 64 * 1024  # adapter-sized
    # The same checkpoint with the whole state dict is larger by at least the packed 4-bit weights.
    packed = sum(m.weight.numel() * m.weight.element_size() for _, m in q.quantized_layers(module))
    torch.save(checkpoint | {"state_dict": module.state_dict()}, tmp_path / "full.ckpt")
    assert (tmp_path / "full.ckpt").stat().st_size - path.stat().st_size >= packed > 0


def _run(root: Path, epochs: int, ckpt_path: Path | None = None, stop_after_first: bool = False) -> nn.Module:
    L.seed_everything(0)
    module = QuantizedLM()
    callbacks: list[L.Callback] = [
        PEFTCallback("lora", r=4, dropout=0.1, verbose=False),
        ModelCheckpoint(dirpath=root, save_last=True),
    ]
    if stop_after_first:
        callbacks.append(StopAfterFirstEpoch())
    t = trainer(root, max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=2)
    t.fit(module, token_loader(shuffle=True), token_loader(n=8, shuffle=False), ckpt_path=ckpt_path)
    assert t.global_step == (4 if stop_after_first else 4 * epochs)
    return module


def test_a_stopped_qlora_run_resumes_bit_identically(tmp_path: Path) -> None:
    """fit 8 steps == fit 4 of the 8 (stopped after the first epoch), resume, fit the rest;
    shuffling and LoRA dropout on, validation (an eval forward through the 4-bit layers) before
    and after each epoch. On CPU every op is deterministic, so equality is exact."""
    straight = adapter(_run(tmp_path / "straight", epochs=2))
    first = adapter(_run(tmp_path / "first", epochs=2, stop_after_first=True))
    resumed_module = _run(tmp_path / "second", epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    resumed = adapter(resumed_module)
    assert straight.keys() == resumed.keys() and straight
    differences = {name: (resumed[name] - straight[name]).abs().max().item() for name in straight}
    assert max(differences.values()) == 0, differences
    assert any(not torch.equal(first[n], straight[n]) for n in straight)  # the second half did train
    assert type(resumed_module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(QuantizedLM(), token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    return tmp_path / "a.ckpt"


def _resume(tmp_path: Path, module: L.LightningModule, checkpoint: Path) -> L.Trainer:
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader(), ckpt_path=checkpoint)
    return t


def test_the_same_float_weights_quantized_again_are_accepted(tmp_path: Path, checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    module = QuantizedLM(seed=0)  # a fresh quantization of the same float weights
    t = _resume(tmp_path, module, checkpoint)
    assert t.global_step == 3
    name = "model.model.layers.0.self_attn.q_proj.lora_B"
    assert not torch.equal(module.get_parameter(name), torch.zeros_like(saved[name]))  # it started from the checkpoint


def test_a_base_quantized_from_other_weights_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"does not fit this base model: it was trained on another base model"):
        _resume(tmp_path, QuantizedLM(seed=3), checkpoint)


def test_a_float_base_is_refused_with_a_clear_message(tmp_path: Path, checkpoint: Path) -> None:
    """The checkpoint's fingerprint is of the quantized base; the unquantized one is told apart."""
    with pytest.raises(ValueError, match=r"does not fit this base model"):
        _resume(tmp_path, TinyLM(seed=0), checkpoint)


def _with_other_linears(seed: int = 0) -> nn.Module:
    """The float LLaMA of ``seed`` with other linear weights and the same embeddings, norms and head,
    as a derivative that fine-tuned only its transformer blocks has."""
    model = tiny.build("llama", seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.q_proj.weight
            weight.add_(torch.randn_like(weight) * weight.std())
    return model


def test_a_base_differing_only_in_its_quantized_linears_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    """The fingerprint samples the values a packed 4-bit weight computes with (dequantized)."""
    other = QuantizedLM(seed=0)
    other.model = lp.quantize(_with_other_linears(), "nf4").train()
    with pytest.raises(ValueError, match=r"does not fit this base model"):
        _resume(tmp_path, other, checkpoint)


def test_the_fingerprint_of_a_quantized_base() -> None:
    """Without a Trainer: the same float weights quantized twice match, other ones do not."""
    fp = state.fingerprint(quantized_llama())
    assert fp.mismatch(state.fingerprint(quantized_llama())) is None
    assert fp.mismatch(state.fingerprint(lp.quantize(tiny.build("llama", seed=3), "nf4"))) is not None
