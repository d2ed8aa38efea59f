"""Hugging Face peft's adapter format: adapters cross over in both directions with the same outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft.core.files import FileContentError
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
    theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "p")
    config_file = tmp_path / "p" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "layer_replication": [[0, 2]]}))
    with pytest.raises(
        ValueError,
        match=r"adapter_config.json has layer_replication=\[\[0, 2\]\], which lightning_peft's lora does not "
        r"implement \(supported: layer_replication=None\)",
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


# --------------------------------------------------------------------------- refusals, all or nothing


def _peft_adapter(tmp_path: Path, model: torch.nn.Module | None = None, **save: object) -> Path:
    theirs = peft.get_peft_model(model or tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path / "p", **save)
    return tmp_path / "p"


def _edit_config(folder: Path, change: object) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)  # type: ignore[operator]
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _bare(model: torch.nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_bare(model: torch.nn.Module, before: dict[str, object]) -> None:
    after = _bare(model)
    assert lp.get_info(model) is None
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()  # type: ignore[attr-defined]
    for name, tensor in before["tensors"].items():  # type: ignore[attr-defined]
        assert torch.equal(after["tensors"][name], tensor), name  # type: ignore[index]


def test_a_field_peft_does_not_have_is_refused_by_name(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    _edit_config(folder, lambda c: c.update(lora_rnak=4))
    with pytest.raises(
        ValueError,
        match=r"adapter_config\.json has field 'lora_rnak', which is not a field of peft's LoraConfig \(as of peft "
        r"0\.21\.2\); did you mean 'lora_bias'\? lightning_peft refuses an option it cannot interpret",
    ):
        load_peft_adapter(tiny.build("llama"), folder)


def test_the_field_lists_cover_the_installed_peft() -> None:
    import dataclasses

    from lightning_peft import registry
    from lightning_peft.interop import peft_format

    for peft_type, fields in peft_format.PEFT_FIELDS.items():
        installed = {f.name for f in dataclasses.fields(getattr(peft, peft_format.PEFT_CLASSES[peft_type]))}
        assert installed <= fields, f"peft {peft.__version__} has {peft_type} fields we would refuse"
        if peft.__version__ == peft_format.PEFT_FIELDS_VERSION:
            assert installed == fields
    with_format = {m.peft.peft_type for m in registry.all_methods() if m.peft is not None}
    assert with_format <= set(peft_format.PEFT_FIELDS), "a method with a peft format needs its field list"


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    _edit_config(folder, lambda c: c.pop("r"))
    with pytest.raises(
        ValueError, match=r"adapter_config\.json lacks the field 'r', which lightning_peft's lora needs"
    ):
        load_peft_adapter(tiny.build("llama"), folder)


def test_a_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(FileContentError, match=r"holds a JSON list, not peft's config object"):
        load_peft_adapter(tiny.build("llama"), folder)


def test_a_truncated_peft_config_names_the_line(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text()[:200])
    with pytest.raises(FileContentError, match=r"adapter_config\.json is not valid JSON \(.* at line \d+"):
        load_peft_adapter(tiny.build("llama"), folder)


def test_a_truncated_peft_weights_file_is_named(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    model = tiny.build("llama")
    before = _bare(model)
    with pytest.raises(FileContentError, match=r"adapter_model\.safetensors is not a readable safetensors"):
        load_peft_adapter(model, folder)
    _assert_bare(model, before)


def test_a_bin_adapter_loads_without_unpickling_and_a_payload_in_one_is_refused(tmp_path: Path) -> None:
    from tests.payload import Payload

    folder = _peft_adapter(tmp_path, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    theirs = peft.PeftModel.from_pretrained(tiny.build("llama"), folder).eval()
    ours = load_peft_adapter(tiny.build("llama"), folder)
    batch = _batch("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(theirs, batch), rtol=0, atol=1e-5)
    marker = tmp_path / "marker"
    tensors = torch.load(folder / "adapter_model.bin", weights_only=True)
    torch.save({**tensors, "extra": Payload(marker)}, folder / "adapter_model.bin")
    model = tiny.build("llama")
    with pytest.raises(FileContentError, match=r"adapter_model\.bin is not a plain-tensor checkpoint"):
        load_peft_adapter(model, folder)
    assert not marker.exists() and lp.get_info(model) is None


def _wider_llama() -> torch.nn.Module:
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=tiny.VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).eval()


def test_another_hidden_size_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    folder = _peft_adapter(tmp_path)
    model = _wider_llama()
    before = _bare(model)
    with pytest.raises(
        ValueError,
        match=r"adapter_model\.safetensors does not fit this model's adapter: base_model\.model\.model\.layers\.0\."
        r"self_attn\.q_proj\.lora_A\.weight is \(2, 32\) there, \(2, 64\) here",
    ):
        load_peft_adapter(model, folder)
    _assert_bare(model, before)


def test_a_non_finite_peft_tensor_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = _peft_adapter(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    model = tiny.build("llama")
    before = _bare(model)
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or infinity\) in adapter tensor\(s\) {key}"):
        load_peft_adapter(model, folder)
    _assert_bare(model, before)


def test_a_failed_peft_load_leaves_the_model_as_it_was_and_a_retry_works(tmp_path: Path) -> None:
    other = tiny.BUILDERS["llama"]("lm")
    other.model.layers = other.model.layers[:1]
    mismatched = _peft_adapter(tmp_path / "two_layers")
    fitting = _peft_adapter(tmp_path / "one_layer", model=copy.deepcopy(other))
    before = _bare(other)
    with pytest.raises(ValueError, match="does not match this model's lora adapter"):
        load_peft_adapter(other, mismatched)
    _assert_bare(other, before)
    load_peft_adapter(other, fitting)  # no "already has 'lora' injected"
    stored = load_file(fitting / "adapter_model.safetensors")
    assert torch.equal(
        dict(lp.trainable_state_dict(other))["model.layers.0.self_attn.q_proj.lora_A"],
        stored["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )


def test_save_refuses_a_non_finite_option(tmp_path: Path) -> None:
    model = lp.inject(tiny.build("llama"), "lora", r=2)
    lp.get_info(model).config.dropout = float("inf")
    with pytest.raises(ValueError, match=r"adapter_config\.json: lora_dropout=inf is not a finite number"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
