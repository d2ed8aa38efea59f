"""Hugging Face peft's adapter format: adapters cross over in both directions with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from tests import tiny
from tests.peft_reference import randomize_adapter

CASES = [
    ("llama", "lm", "lora", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    ("gpt2", "lm", "lora", {"r": 4, "alpha": 8, "rslora": True}),
    ("bert", "classify", "lora", {"r": 4, "alpha": 8}),  # the classifier head travels as modules_to_save
    ("t5", "lm", "lora", {"r": 2, "use_dora": True}),
    ("llama", "lm", "ia3", {}),
    ("gpt2", "lm", "ia3", {}),
]


def _batch(arch: str) -> dict[str, torch.Tensor]:
    return tiny.inputs(arch)


@pytest.mark.parametrize(("arch", "task", "method", "options"), CASES)
def test_our_adapter_loads_in_peft(tmp_path: Path, arch: str, task: str, method: str, options: dict) -> None:
    ours = lp.inject(tiny.build(arch, task), method, **options)
    randomize_adapter(ours)
    folder = save_peft_adapter(ours, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3"}[method]
    theirs = peft.PeftModel.from_pretrained(tiny.build(arch, task), folder).eval()
    batch = _batch(arch)
    torch.testing.assert_close(tiny.logits(theirs, batch), tiny.logits(ours, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "task", "method", "options"), CASES)
def test_peft_adapter_loads_here(tmp_path: Path, arch: str, task: str, method: str, options: dict) -> None:
    # Let our defaults pick the targets, then give peft the same list so both adapt the same layers.
    resolved = lp.get_info(lp.inject(tiny.build(arch, task), method, **options)).config
    if method == "lora":
        peft_config = peft.LoraConfig(
            r=resolved.r,
            lora_alpha=resolved.alpha,
            use_rslora=resolved.rslora,
            use_dora=resolved.use_dora,
            target_modules=resolved.target_modules,
            modules_to_save=resolved.modules_to_save or None,
        )
    else:
        peft_config = peft.IA3Config(
            target_modules=resolved.target_modules, feedforward_modules=resolved.feedforward_modules
        )
    theirs = peft.get_peft_model(tiny.build(arch, task), peft_config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(tiny.build(arch, task), tmp_path / "peft")
    assert lp.get_info(ours).method == method
    batch = _batch(arch)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(theirs.eval(), batch), rtol=0, atol=1e-5)


def test_round_trip_keeps_every_tensor(tmp_path: Path) -> None:
    ours = lp.inject(tiny.build("bert", "classify"), "lora", r=2)
    randomize_adapter(ours)
    folder = save_peft_adapter(ours, tmp_path / "a")
    assert "base_model.model.classifier.weight" in load_file(folder / "adapter_model.safetensors")
    back = load_peft_adapter(tiny.build("bert", "classify"), folder)
    for name, tensor in lp.trainable_state_dict(ours).items():
        assert torch.equal(lp.trainable_state_dict(back)[name], tensor), name


def test_unsupported_peft_options_are_refused(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    theirs.save_pretrained(tmp_path / "p")
    with pytest.raises(
        ValueError,
        match=r"adapter_config.json has bias='all', which lightning_peft's lora does not "
        r"implement \(supported: bias='none'\)",
    ):
        load_peft_adapter(tiny.build("llama"), tmp_path / "p")


def test_a_method_without_a_peft_format_is_refused(tmp_path: Path) -> None:
    model = lp.inject(tiny.build("llama"), "bottleneck")
    with pytest.raises(
        ValueError,
        match=r"method 'bottleneck' has no Hugging Face peft equivalent; save it with "
        r"lightning_peft.save_adapter",
    ):
        save_peft_adapter(model, tmp_path)


def test_an_adapter_for_another_architecture_is_refused(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "p")
    other = tiny.BUILDERS["llama"]("lm")
    other.model.layers = other.model.layers[:1]
    with pytest.raises(
        ValueError,
        match=r"does not match this model's lora adapter: missing \[\], unexpected "
        r"\['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'",
    ):
        load_peft_adapter(other, tmp_path / "p")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lacks adapter_config.json"):
        load_peft_adapter(tiny.build("llama"), tmp_path)
