"""The compatibility point: the attention cache's argument name, whichever transformers is installed."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch
from packaging.version import Version
from torch import nn
from transformers import DynamicCache

import lightning_peft as lp
from lightning_peft.core.compat import cache_argument, output_cache, take_cache
from tests import tiny

#: transformers renamed ``past_key_values`` to ``cache`` in 5.24.
RENAMED = Version(importlib.metadata.version("transformers")) >= Version("5.24")
EXPECTED = "cache" if RENAMED else "past_key_values"


@pytest.mark.parametrize("arch", sorted(tiny.BUILDERS))
def test_the_installed_transformers_name_is_found(arch: str) -> None:
    model = tiny.build(arch)
    stack = model.get_decoder() if tiny.FAMILIES[arch] == "seq2seq" else model.base_model
    if tiny.FAMILIES[arch] != "encoder":  # masked-LM heads take no cache; their encoder stack does
        assert cache_argument(model) == EXPECTED
    assert cache_argument(stack) == EXPECTED
    assert EXPECTED in inspect.signature(type(stack).forward).parameters


def test_a_forward_without_a_cache_has_none() -> None:
    assert cache_argument(nn.Linear(2, 2)) is None


def test_the_deprecated_name_is_moved_to_the_current_one() -> None:
    cache = object()
    kwargs = {"past_key_values": cache}
    assert take_cache(kwargs, "cache") is cache and kwargs == {"cache": cache}
    both = {"past_key_values": 1, "cache": 2}  # transformers refuses both; leave them for it
    assert take_cache(both, "cache") == 2 and both == {"past_key_values": 1, "cache": 2}
    old = {"past_key_values": cache}
    assert take_cache(old, "past_key_values") is cache and old == {"past_key_values": cache}


def test_output_cache_reads_the_field_by_the_same_name() -> None:
    model = tiny.build("llama")
    out = model(**tiny.inputs("llama"), use_cache=True)
    assert output_cache(out, cache_argument(model)).get_seq_length() == tiny.SEQ
    assert output_cache((1, 2), "cache") is None


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_a_caller_passing_the_old_name_gets_the_same_outputs(method: str) -> None:
    """An empty cache passed as ``past_key_values=`` (deprecated on 5.24) works like none."""
    model = lp.inject(tiny.build("llama"), method, num_virtual_tokens=3)
    batch = tiny.inputs("llama")
    with torch.no_grad():
        plain = model(**batch).logits
        old = model(**batch, past_key_values=DynamicCache(config=model.config)).logits
    torch.testing.assert_close(old, plain, rtol=0, atol=1e-6)
