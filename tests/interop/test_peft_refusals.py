"""save_peft_adapter for a method without a peft format: the refusal says why and what to do instead."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest

import lightning_peft as lp
from lightning_peft import registry
from lightning_peft.interop import save_peft_adapter
from tests import tiny
from tests.methods.cases import CASES

#: Methods that Hugging Face peft has too, by its PeftType name, whose format lightning_peft did not write at first
#: (issue 16 point 4 added it: tests/interop/test_peft_prompts.py and the parity table check it).
PEFT_HAS_THEM = {
    "adalora": "ADALORA",
    "prompt_tuning": "PROMPT_TUNING",
    "p_tuning": "P_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
}
WITHOUT_FORMAT = [m.name for m in registry.all_methods() if m.peft is None]


def test_the_registry_names_peft_types_that_peft_has() -> None:
    types = {t.value for t in peft.PeftType}
    declared = {m.name: m.peft_type for m in registry.all_methods() if m.peft_type is not None}
    assert {name: t for name, t in declared.items() if t not in types} == {}
    assert {name: declared.get(name) for name in PEFT_HAS_THEM} == PEFT_HAS_THEM
    assert all(declared[m.name] == m.peft.peft_type for m in registry.all_methods() if m.peft is not None)
    assert all(registry.get(name).peft is not None for name in PEFT_HAS_THEM)


@pytest.mark.parametrize("method", WITHOUT_FORMAT)
def test_saving_a_method_without_a_peft_format_is_refused_truthfully(tmp_path: Path, method: str) -> None:
    model = lp.inject(tiny.build("gpt2"), method, **CASES[method].options("gpt2"))
    with_format = ", ".join(m.name for m in registry.all_methods() if m.peft is not None)
    then = rf"; save it with lightning_peft.save_adapter instead\. Methods with a peft format: {with_format}\.$"
    if method in PEFT_HAS_THEM:
        expected = (
            rf"^lightning_peft does not write method '{method}' in Hugging Face peft's format yet "
            rf"\(peft has it as peft_type='{PEFT_HAS_THEM[method]}'\){then}"
        )
    else:
        expected = rf"^method '{method}' has no Hugging Face peft equivalent{then}"
    with pytest.raises(ValueError, match=expected):
        save_peft_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing anything
