"""Module selection: names, suffixes, regex, all-linear, exclusions, defaults and their errors."""

from __future__ import annotations

import pytest
from torch import nn

import lightning_peft as lp
from lightning_peft.core import targeting
from lightning_peft.core.layer import AdapterLayer
from tests import tiny


def wrapped(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def test_list_entries_match_exact_names_and_dotted_suffixes() -> None:
    model = lp.inject(tiny.build("llama"), "lora", target_modules=["q_proj", "model.layers.1.mlp.up_proj"])
    assert wrapped(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_suffix_match_respects_dots() -> None:
    # "proj" is not a dotted suffix of "q_proj": nothing matches.
    with pytest.raises(ValueError, match=r"target_modules=\['proj'\] matched no module"):
        lp.inject(tiny.build("llama"), "lora", target_modules=["proj"])


def test_string_is_a_full_regex() -> None:
    model = lp.inject(tiny.build("llama"), "lora", target_modules=r".*\.0\.self_attn\.(k|o)_proj")
    assert wrapped(model) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj"]


def test_all_linear_skips_the_output_head_and_honours_exclusions() -> None:
    model = lp.inject(tiny.build("llama"), "lora", target_modules="all-linear", exclude_modules=["down_proj"])
    names = wrapped(model)
    assert len(names) == 2 * 6  # q k v o gate up per block
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)


def test_all_linear_takes_gpt2_conv1d() -> None:
    model = lp.inject(tiny.build("gpt2"), "lora", target_modules="all-linear")
    assert len(wrapped(model)) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj


def test_matching_nothing_lists_module_names() -> None:
    with pytest.raises(ValueError) as err:
        lp.inject(tiny.build("llama"), "lora", target_modules=["query"])
    message = str(err.value)
    assert "LoRAConfig.target_modules=['query'] matched no module of LlamaForCausalLM" in message
    assert "q_proj" in message and "embed_tokens" in message


def test_exclusions_that_remove_everything() -> None:
    with pytest.raises(ValueError, match=r"after exclude_modules=\['q_proj'\]"):
        lp.inject(tiny.build("llama"), "lora", target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_architecture_defaults_cover_the_common_models() -> None:
    for arch, expected in {"llama": "q_proj", "gpt2": "c_attn", "bert": "query", "t5": ".q", "bart": "q_proj"}.items():
        model = lp.inject(tiny.build(arch), "lora")
        assert wrapped(model) and all(
            n.endswith(expected.lstrip(".")) or n.endswith(("v_proj", "value", ".v")) for n in wrapped(model)
        ), arch


def test_no_default_for_a_plain_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"lora has no default target_modules for a Sequential .*target_modules="):
        lp.inject(model, "lora")


def test_a_target_lora_cannot_wrap_is_named() -> None:
    with pytest.raises(TypeError) as err:
        lp.inject(tiny.build("llama"), "lora", target_modules=["input_layernorm"])
    assert "LoRAConfig.target_modules selected 'model.layers.0.input_layernorm'" in str(err.value)
    assert "LlamaRMSNorm, which lora cannot wrap; lora wraps nn.Linear" in str(err.value)


def test_failed_injection_leaves_the_model_untouched() -> None:
    model = tiny.build("llama")
    with pytest.raises(TypeError):
        lp.inject(model, "lora", target_modules=["q_proj", "input_layernorm"])
    assert wrapped(model) == [] and lp.get_info(model) is None
    lp.inject(model, "lora")  # and it can still be injected


def test_shared_module_is_wrapped_once_under_every_name() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    lp.inject(model, "lora", target_modules=["0"])
    assert isinstance(model[0], AdapterLayer) and model[2] is model[0]
    assert len(lp.get_info(model).modules) == 1


def test_find_base_model_inside_a_wrapper_module() -> None:
    holder = nn.Module()
    holder.net = tiny.build("bert")
    path, base = targeting.find_base_model(holder)
    assert path == "net" and base is holder.net
    assert targeting.model_type(holder) == "bert"
