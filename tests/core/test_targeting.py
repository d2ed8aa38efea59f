"""Module selection: names, suffixes, regex, all-linear, exclusions, defaults and their errors."""

from __future__ import annotations

import pytest
from torch import nn

import lightning_peft as lp
from lightning_peft.core import targeting
from lightning_peft.core.layer import AdapterLayer, AdapterModule
from tests import more_archs, tiny


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
    with pytest.raises(ValueError, match=r"target_modules=\['proj'\]: 'proj' matches no module"):
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


def test_a_regex_matching_nothing_lists_module_names() -> None:
    with pytest.raises(ValueError) as err:
        lp.inject(tiny.build("llama"), "lora", target_modules=r".*\.query")
    message = str(err.value)
    assert "LoRAConfig.target_modules='.*\\\\.query' matched no module of LlamaForCausalLM. " in message
    assert "Module names it has include: embed_tokens, q_proj," in message
    assert "act_fn" not in message and "rotary_emb" not in message  # leaves without parameters are no targets


def _untouched(model: nn.Module) -> bool:
    return (
        lp.get_info(model) is None
        and not any(isinstance(m, AdapterModule) for m in model.modules())
        and all(p.requires_grad for p in model.parameters())
    )


def test_a_typo_in_a_target_list_is_named_with_the_closest_names() -> None:
    # A classification model: its head would be wrapped first (modules_to_save), if anything were.
    model = tiny.build("llama", "classify")
    with pytest.raises(ValueError) as err:
        lp.inject(model, "lora", target_modules=["q_proj", "v_prj"])
    message = str(err.value)
    assert message.startswith(
        "LoRAConfig.target_modules=['q_proj', 'v_prj']: 'v_prj' matches no module of LlamaForSequenceClassification "
        "(closest: 'v_proj', "
    )
    assert "fix or remove it. Module names it has include: embed_tokens, q_proj" in message
    assert _untouched(model)
    lp.inject(model, "lora", target_modules=["q_proj", "v_proj"])  # and the model is still as it was


def test_a_typo_in_an_exclude_list_is_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"^LoRAConfig.exclude_modules=\['down_prj'\]: 'down_prj' matches no module .*"
        r"\(closest: 'down_proj'",
    ):
        lp.inject(tiny.build("llama"), "lora", target_modules="all-linear", exclude_modules=["down_prj"])


def test_an_exclusion_that_names_a_module_outside_the_targets_is_fine() -> None:
    model = lp.inject(tiny.build("llama"), "lora", target_modules=["q_proj"], exclude_modules=["down_proj"])
    assert len(wrapped(model)) == 2


def test_every_bad_entry_is_named_with_dotted_suggestions() -> None:
    with pytest.raises(ValueError) as err:
        lp.inject(tiny.build("llama"), "lora", target_modules=["xyzzy", "mlp.up_prj", "layers.7.self_attn.q_proj"])
    message = str(err.value)
    assert "'xyzzy' matches no module of LlamaForCausalLM (no name is close); " in message
    assert "'mlp.up_prj' matches none (closest: 'mlp.up_proj'" in message
    assert "'layers.7.self_attn.q_proj' matches none (closest: 'layers.1.self_attn.q_proj', 'layers.0." in message
    assert "fix or remove them" in message


def test_other_name_lists_are_checked_too() -> None:
    with pytest.raises(
        ValueError,
        match=r"^LoRAConfig.modules_to_save=\['scroe'\]: 'scroe' matches no module .*"
        r"\(closest: 'score'\)",
    ):
        lp.inject(tiny.build("llama", "classify"), "lora", modules_to_save=["scroe"])
    # (IA)^3's feed-forward list, where the targets are a pattern (a subset check cannot catch it).
    with pytest.raises(ValueError, match=r"^IA3Config.feedforward_modules=\['down_prj'\]: 'down_prj' matches no"):
        lp.inject(tiny.build("llama"), "ia3", target_modules=r".*(k|v|down)_proj", feedforward_modules=["down_prj"])
    model = tiny.build("bert")
    with pytest.raises(ValueError, match=r"^BitFitConfig.exclude_modules=\['qury'\]: 'qury' matches no"):
        lp.inject(model, "bitfit", exclude_modules=["qury"])  # bitfit's own path, without target_modules
    assert _untouched(model)


def test_names_inside_a_wrapper_module_match() -> None:
    holder = nn.Module()
    holder.net = tiny.build("llama")
    lp.inject(holder, "lora", target_modules=["net.model.layers.0.self_attn.q_proj", "self_attn.v_proj"])
    assert wrapped(holder) == [
        "net.model.layers.0.self_attn.q_proj",
        "net.model.layers.0.self_attn.v_proj",
        "net.model.layers.1.self_attn.v_proj",
    ]


def test_a_recorded_config_with_default_spellings_injects_again() -> None:
    # LoRA's ViT default names the attention projections in both transformers spellings; the model
    # has one of them. The recorded config (as a checkpoint keeps it) must inject again.
    config = lp.get_info(lp.inject(more_archs.build("vit"), "lora")).config
    assert set(config.target_modules) == {"q_proj", "v_proj", "query", "value"}
    assert wrapped(lp.inject(more_archs.build("vit"), config))


def test_close_names_compare_as_many_components_as_the_key_has() -> None:
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    assert targeting.close_names("v_prj", names) == ["v_proj", "up_proj"]
    assert targeting.close_names("mlp.up_prj", names)[0] == "mlp.up_proj"
    # Longer than every name: compared with the full names.
    assert targeting.close_names("net.model.layers.0.mlp.up_proj", names)[0] == "model.layers.0.mlp.up_proj"
    assert targeting.close_names("xyzzy", names) == []


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


def test_image_and_audio_classification_heads_train_by_default() -> None:
    """Their heads are new (random) like a text classifier's, so they train unless the user says otherwise."""
    import transformers as tf

    from lightning_peft.core.targeting import default_modules_to_save

    vit = tf.ViTForImageClassification(
        tf.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=8, num_labels=3,
        )
    )  # fmt: skip
    wav2vec2 = tf.Wav2Vec2ForSequenceClassification(
        tf.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_labels=3,
        )
    )  # fmt: skip
    assert default_modules_to_save(vit) == ["classifier"]
    assert default_modules_to_save(wav2vec2) == ["classifier", "projector"]
