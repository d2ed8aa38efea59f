"""Trainable state: freezing, the state dict and its record, and every load-time refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft import registry
from lightning_peft.core import state
from lightning_peft.core.config import AdapterConfig
from tests import tiny
from tests.peft_reference import randomize_adapter


def trained(arch: str = "llama", seed: int = 0, **options: object) -> nn.Module:
    model = lp.inject(tiny.build(arch, seed=seed), "lora", **({"r": 4} | options))
    randomize_adapter(model)
    return model


def test_freeze_leaves_exactly_the_declared_parameters_trainable() -> None:
    model = trained()
    declared = {n for n, _ in state.adapter_parameters(model)}
    assert declared == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) for n in declared)
    trainable, total = state.count_parameters(model)
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 2 layers; q: 32->32, v: 32->16 (2 KV heads)
    assert total == sum(p.numel() for p in model.parameters())


def test_trainable_state_dict_holds_only_the_adapter_and_its_record() -> None:
    model = trained()
    sd = lp.trainable_state_dict(model)
    assert set(sd) == {n for n, _ in state.adapter_parameters(model)}
    record = state.read_metadata(sd)
    assert record["method"] == "lora" and record["config"]["r"] == 4 and record["base"]["structure"]
    assert all(sd[k].data_ptr() == dict(model.named_parameters())[k].data_ptr() for k in sd)  # views, no copy


def test_full_state_dict_carries_the_record_too() -> None:
    assert state.read_metadata(trained().state_dict())["method"] == "lora"


def test_load_into_a_fresh_injection_and_strict_load_of_plain_tensors() -> None:
    source, target = trained(), lp.inject(tiny.build("llama"), "lora", r=4)
    target.load_state_dict(lp.trainable_state_dict(source))
    for (name, a), (_, b) in zip(state.adapter_state(source), state.adapter_state(target), strict=True):
        assert torch.equal(a, b), name
    # A plain dict (no record) still loads strictly: only frozen keys may be missing.
    plain = dict(lp.trainable_state_dict(source))
    lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(plain)
    plain.pop(next(iter(plain)))
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\) in state_dict: \"model\.layers\.0\.self_attn\.q_proj\.lora_A\""
    ):
        lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(plain)


def test_refuses_another_rank() -> None:
    with pytest.raises(ValueError, match=r"trained with other lora options: r=4 in the state dict, r=8 here"):
        lp.inject(tiny.build("llama"), "lora", r=8).load_state_dict(lp.trainable_state_dict(trained()))


def test_refuses_other_targets() -> None:
    sd = lp.trainable_state_dict(trained(target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=r"target_modules=\['q_proj'\] in the state dict, target_modules=\['q_proj', 'v_proj'\] here"
    ):
        lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(sd)


def test_refuses_another_method() -> None:
    sd = lp.trainable_state_dict(trained())
    others = [m for m in registry.methods() if m != "lora"]
    sd._metadata[""]["lightning_peft"]["method"] = others[0] if others else "ia3"
    expected = f"holds a '{others[0] if others else 'ia3'}' adapter, but this model has method='lora' injected"
    with pytest.raises(ValueError, match=expected):
        lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(sd)


def test_refuses_another_base_of_the_same_architecture() -> None:
    sd = lp.trainable_state_dict(trained(seed=0))
    with pytest.raises(
        ValueError, match=r"does not fit this base model: it was trained on another base model of the same architecture"
    ):
        lp.inject(tiny.build("llama", seed=1), "lora", r=4).load_state_dict(sd)


def test_refuses_another_architecture() -> None:
    sd = lp.trainable_state_dict(trained("llama"))
    other = tiny.BUILDERS["llama"]("lm")
    other.model.layers = other.model.layers[:1]  # same names up to the depth: structure differs
    with pytest.raises(ValueError, match=r"another architecture or size"):
        lp.inject(other, "lora", r=4).load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_accepts_the_same_base_in_another_dtype(dtype: torch.dtype) -> None:
    sd = lp.trainable_state_dict(trained())
    lp.inject(tiny.build("llama").to(dtype), "lora", r=4).load_state_dict(sd)


def test_accepts_a_16_bit_copy_trained_on_another_16_bit_copy() -> None:
    """fp16 and bf16 copies of one base: each rounded once from it, compared after a second rounding."""
    source = lp.inject(tiny.build("llama").to(torch.float16), "lora", r=4)
    randomize_adapter(source)
    lp.inject(tiny.build("llama").to(torch.bfloat16), "lora", r=4).load_state_dict(lp.trainable_state_dict(source))


def derivative(seed: int = 0, relative: float = 1e-3) -> nn.Module:
    """The base with every weight moved by ``relative`` Gaussian noise: a fine-tuned derivative of it."""
    model = tiny.build("llama", seed=seed)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.mul_(1 + relative * torch.randn(tensor.shape, generator=g))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refuses_a_derivative_of_the_base(dtype: torch.dtype) -> None:
    sd = lp.trainable_state_dict(trained())
    target = lp.inject(derivative().to(dtype), "lora", r=4)
    with pytest.raises(
        ValueError,
        match=r"does not fit this base model: it was trained on another base model of the same architecture, or on "
        r"a fine-tuned derivative of this one \(\d+ of \d+ frozen weight tensors differ, e\.g\. \w",
    ):
        target.load_state_dict(sd)
    # The format-1 fingerprint (checksums within 5 %) took the derivative for the base.
    structure, checksums = lp.get_info(trained()).fingerprint.legacy
    old = {"model_type": "llama", "structure": structure, "checksums": checksums}
    assert lp.get_info(lp.inject(derivative(), "lora", r=4)).fingerprint.mismatch_legacy(old) is None


def test_buffers_computed_at_init_are_not_part_of_the_fingerprint() -> None:
    """Rotary frequencies are recomputed per device and may differ in the last bit: not weights."""
    sd = lp.trainable_state_dict(trained())
    target = tiny.build("llama")
    rotary = target.model.rotary_emb
    assert "inv_freq" in rotary._non_persistent_buffers_set
    with torch.no_grad():
        rotary.inv_freq.mul_(1 + 1e-6)
    lp.inject(target, "lora", r=4).load_state_dict(sd)


def test_the_fingerprint_samples_every_weight() -> None:
    fingerprint = lp.get_info(trained()).fingerprint
    weights = {n for n, _ in tiny.build("llama").state_dict().items()}
    assert set(fingerprint.names) == weights and len(fingerprint.samples) == len(weights)
    assert all(s is not None and s.startswith("float32:") for s in fingerprint.samples)
    record = fingerprint.to_dict()
    assert set(record) == {"model_type", "structure", "samples"}


def test_refuses_a_record_without_all_adapter_keys() -> None:
    sd = lp.trainable_state_dict(trained())
    del sd["model.layers.1.self_attn.v_proj.lora_B"]
    with pytest.raises(ValueError, match=r"lacks adapter weights: model\.layers\.1\.self_attn\.v_proj\.lora_B"):
        lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(sd)


def test_a_plain_state_dict_is_checked_before_anything_is_copied() -> None:
    """Without a record, too: a non-finite adapter tensor or a frozen weight of another shape is refused
    before torch copies the rest (torch alone copies every tensor that fits, then raises)."""
    source = trained()
    target = lp.inject(tiny.build("llama"), "lora", r=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    poisoned = dict(lp.trainable_state_dict(source))
    poisoned["model.layers.0.self_attn.q_proj.lora_B"] = torch.full((32, 4), float("nan"))
    with pytest.raises(
        ValueError,
        match=r"the state dict holds non-finite values .* model\.layers\.0\.self_attn\."
        r"q_proj\.lora_B \(128 of 128 values\)",
    ):
        target.load_state_dict(poisoned, strict=False)
    full = {k: v.clone() for k, v in source.state_dict().items()}
    full["model.norm.weight"] = torch.ones(31)
    with pytest.raises(
        ValueError, match=r"the state dict does not fit this model: model\.norm\.weight is \(31,\) there, \(32,\) here"
    ):
        target.load_state_dict(full)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def test_refuses_to_load_into_merged_layers() -> None:
    target = lp.merge(trained())
    with pytest.raises(ValueError, match=r"cannot load adapter weights into merged layers.*unmerge"):
        target.load_state_dict(lp.trainable_state_dict(trained()))


def test_injecting_a_taken_adapter_name_again_is_an_error() -> None:
    model = lp.inject(tiny.build("llama"), "lora")
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(lora\); pass another adapter_name"):
        lp.inject(model, "lora", r=2)


def test_no_trainable_parameter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class NothingConfig(AdapterConfig):
        pass

    empty = registry.Method("nothing", NothingConfig, "input", lambda model, config: [], summary="adds nothing")
    monkeypatch.setitem(registry._METHODS, "nothing", empty)
    model = tiny.build("llama")
    with pytest.raises(
        ValueError, match=r"nothing with NothingConfig.*left no trainable parameter in LlamaForCausalLM"
    ):
        lp.inject(model, "nothing")
    assert lp.get_info(model) is None


def test_save_and_load_adapter_files(tmp_path: object) -> None:
    source = trained("bert", r=2)
    folder = lp.save_adapter(source, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    restored = lp.load_adapter(tiny.build("bert"), folder)  # injects from the stored config
    batch = tiny.inputs("bert")
    torch.testing.assert_close(tiny.logits(restored, batch), tiny.logits(source, batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="another base model"):
        lp.load_adapter(tiny.build("bert", seed=5), folder)
    with pytest.raises(FileNotFoundError, match="no adapter folder or checkpoint file"):
        lp.load_adapter(tiny.build("bert"), tmp_path / "missing")


def test_unload_restores_a_plain_model() -> None:
    model = trained()
    lp.unload(model, merge=False)
    assert lp.get_info(model) is None and not list(state.adapter_modules(model))
    assert all(not p.requires_grad for p in model.parameters())
    lp.inject(model, "lora")  # and it takes a new adapter
