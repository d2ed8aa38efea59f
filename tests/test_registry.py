"""The registry's own checks on a Method entry."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lightning_peft import registry


def test_peft_type_comes_from_the_peft_format_when_there_is_one() -> None:
    lora = registry.get("lora")
    assert lora.peft is not None and lora.peft_type == lora.peft.peft_type == "LORA"
    assert dataclasses.replace(lora, peft=None).peft_type == "LORA"  # peft still has it


def test_a_peft_type_that_contradicts_the_peft_format_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"Method 'lora' has peft_type='IA3' but its PeftFormat has peft_type='LORA'; leave Method.peft_type "
        r"unset \(None\) or make the two agree\.",
    ):
        dataclasses.replace(registry.get("lora"), peft_type="IA3")


def test_an_empty_registry_is_a_missing_import_not_an_empty_list() -> None:
    """The registry sits below the methods and never imports them: read before they are, it says so."""
    code = (
        "import lightning_peft.registry as r\n"
        "try:\n    r.methods()\nexcept RuntimeError as e:\n    print(e)\nelse:\n    raise SystemExit('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "import lightning_peft.methods" in out
