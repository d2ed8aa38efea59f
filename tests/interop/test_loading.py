"""``lp.load_adapter`` reads every adapter kind a user has: ours (folder, checkpoint) and peft's folders."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import lightning_peft as lp
from tests import tiny


def trained(method: str = "lora", **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = lp.inject(tiny.build("llama"), method, **options)
    with torch.no_grad():
        for _, param in lp.trainable_state_dict(model).items():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_a_peft_folder_and_our_own_folder_load_alike(tmp_path: Path) -> None:
    source = trained(r=4)
    batch = tiny.inputs("llama")
    lp.save_peft_adapter(source, tmp_path / "peft")
    lp.save_adapter(source, tmp_path / "ours")
    for folder in ("peft", "ours"):
        model = lp.load_adapter(tiny.build("llama"), tmp_path / folder).eval()
        torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(source, batch), rtol=1e-5, atol=1e-5)


def test_a_folder_peft_itself_saved_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    reference.save_pretrained(tmp_path / "peft")
    model = lp.load_adapter(tiny.build("llama"), tmp_path / "peft").eval()
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(reference.eval(), batch), rtol=1e-5, atol=1e-5)


def test_a_folder_of_neither_kind_says_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a lightning_peft adapter config"):
        lp.load_adapter(tiny.build("llama"), tmp_path)
