"""Named adapters in Hugging Face peft's layout: several adapters cross over to peft and back, each with its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from tests import tiny

#: Two LoRA adapters per architecture, of other ranks and scales, sharing one target (so "other" sits
#: inside "default"'s wrapper there); on BERT both keep a trained copy of the classifier.
CASES = {
    "llama": (
        "lm",
        {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 2, "alpha": 6, "target_modules": ["q_proj", "k_proj"]},
    ),
    "bert": (
        "classify",
        {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        {"r": 2, "alpha": 6, "target_modules": ["query", "key"]},
    ),
}
NAMES = ("default", "other")


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    """Give adapter ``name`` non-trivial weights (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in state.adapter_state(model, name):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


def _ours(arch: str, names: tuple[str, ...] = NAMES) -> nn.Module:
    task, *options = CASES[arch]
    model = tiny.build(arch, task)
    for name in names:
        lp.inject(model, "lora", adapter_name=name, **options[NAMES.index(name)])
        _randomize(model, name, NAMES.index(name) + 1)
    return model


def _peft_config(options: dict, task: str) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        target_modules=options["target_modules"],
        modules_to_save=["classifier"] if task == "classify" else None,
    )


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return tiny.logits(model.eval(), batch)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_our_adapters_load_in_peft_each_with_its_outputs(tmp_path: Path, arch: str) -> None:
    ours = _ours(arch)
    folder = save_peft_adapter(ours, tmp_path / "ours")
    assert (folder / "adapter_config.json").is_file() and (folder / "other" / "adapter_config.json").is_file()
    assert not (folder / "default").exists()
    for path in (folder, folder / "other"):
        assert not [
            key for key in load_file(path / "adapter_model.safetensors") if ".default" in key or ".other" in key
        ]
    theirs = peft.PeftModel.from_pretrained(tiny.build(arch, CASES[arch][0]), folder)
    theirs.load_adapter(folder / "other", adapter_name="other")
    batch = tiny.inputs(arch)
    seen = []
    for name in NAMES:
        lp.set_adapter(ours, name)
        theirs.set_adapter(name)
        seen.append(_logits(ours, batch))
        torch.testing.assert_close(_logits(theirs, batch), seen[-1], rtol=0, atol=1e-5)
    assert not torch.allclose(*seen, atol=1e-3)  # the two adapters do differ


@pytest.mark.parametrize("arch", sorted(CASES))
def test_an_inner_adapter_writes_what_it_would_alone(tmp_path: Path, arch: str) -> None:
    ours = _ours(arch)
    assert any(
        n.endswith(".base_layer") for n, _ in state.adapter_modules(ours, "other")
    )  # "other" sits inside a chain
    save_peft_adapter(ours, tmp_path / "named", "other")  # one adapter by name: into the folder itself
    save_peft_adapter(_ours(arch, ("other",)), tmp_path / "alone")
    named = load_file(tmp_path / "named" / "adapter_model.safetensors")
    alone = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    assert named.keys() == alone.keys() and all(torch.equal(named[k], alone[k]) for k in alone)
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "alone" / "adapter_config.json").read_text())
    assert config["r"] == 2 and not (tmp_path / "named" / "other").exists()


def _peft_two_adapters(arch: str, folder: Path) -> peft.PeftModel:
    task, first, second = CASES[arch]
    theirs = peft.get_peft_model(tiny.build(arch, task), _peft_config(first, task))
    theirs.add_adapter("other", _peft_config(second, task))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # both adapters' tensors, whichever is active
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    theirs.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_adapters_load_here_each_with_its_outputs(tmp_path: Path, arch: str) -> None:
    theirs = _peft_two_adapters(arch, tmp_path / "peft")
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()  # peft's layout
    ours = load_peft_adapter(tiny.build(arch, CASES[arch][0]), tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    assert list(lp.adapters(ours)) == list(NAMES) and lp.active_adapters(ours) == ["other"]
    assert lp.adapters(ours)["other"].config.r == 2
    batch = tiny.inputs(arch)
    for name in NAMES:
        lp.set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), rtol=0, atol=1e-5)
    # Loading into an adapter of that name overwrites it; the other one keeps its weights.
    lp.set_adapter(ours, "other")
    expected = _logits(ours, batch)
    default = {k: v.clone() for k, v in state.adapter_state(ours, "default")}
    _randomize(ours, "other", 7)
    load_peft_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    torch.testing.assert_close(_logits(ours, batch), expected, rtol=0, atol=0)
    assert all(torch.equal(default[k], v) for k, v in state.adapter_state(ours, "default"))


def test_peft_adapters_sharing_a_targeted_embedding_cross_both_ways(tmp_path: Path) -> None:
    # peft saves the embedding's base weight beside each adapter that targets it; here it sits
    # under two of our wrappers (embed_tokens.base_layer.base_layer.weight) and must still be recognized.
    theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    theirs.add_adapter("other", peft.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "peft" / "other" / "adapter_model.safetensors"
    )
    ours = load_peft_adapter(tiny.build("llama"), tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    assert "model.embed_tokens.base_layer" in dict(state.adapter_modules(ours, "other"))
    save_peft_adapter(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny.build("llama"), tmp_path / "back")
    again.load_adapter(tmp_path / "back" / "other", adapter_name="other")
    batch = tiny.inputs("llama")
    for name in NAMES:
        lp.set_adapter(ours, name)
        theirs.set_adapter(name)
        again.set_adapter(name)
        torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(again, batch), _logits(theirs, batch), rtol=0, atol=1e-5)


def test_a_round_trip_through_peft_layout_keeps_every_adapter(tmp_path: Path) -> None:
    ours = _ours("llama")
    save_peft_adapter(ours, tmp_path / "a")
    back = load_peft_adapter(tiny.build("llama"), tmp_path / "a")
    load_peft_adapter(back, tmp_path / "a" / "other", adapter_name="other")
    for name in NAMES:
        mine = {state.site_name(ours, k.rpartition(".")[0]): v for k, v in state.adapter_state(ours, name)}
        theirs = {state.site_name(back, k.rpartition(".")[0]): v for k, v in state.adapter_state(back, name)}
        assert mine.keys() == theirs.keys()
        for key, tensor in mine.items():
            assert torch.equal(theirs[key], tensor), (name, key)


# --------------------------------------------------------------------------- refusals, all or nothing


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "adapters": list(lp.adapters(model)) if lp.get_info(model) else [],
        "active": state.active_adapters(model),
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = _snapshot(model)
    for key in ("adapters", "active", "modules", "grad"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()  # type: ignore[attr-defined]
    for name, tensor in before["tensors"].items():  # type: ignore[attr-defined]
        assert torch.equal(after["tensors"][name], tensor), name  # type: ignore[index]


def test_saving_an_unknown_adapter_lists_the_names_held(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no adapter named 'othr'; it holds 'default', 'other'"):
        save_peft_adapter(_ours("llama"), tmp_path / "out", "othr")
    assert not (tmp_path / "out").exists()


def test_saving_every_adapter_refuses_one_without_a_peft_format_before_writing(tmp_path: Path) -> None:
    model = _ours("llama", ("default",))
    lp.inject(model, "bottleneck", adapter_name="side")
    with pytest.raises(ValueError, match=r"^adapter 'side': method 'bottleneck' has no Hugging Face peft equivalent"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_peft_adapter(model, tmp_path / "out", "default")  # the other one alone is fine
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and not (tmp_path / "out" / "side").exists()


def test_a_failed_named_load_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "fits")
    short = tiny.build("llama")
    short.model.layers = short.model.layers[:1]
    peft.get_peft_model(short, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "short")
    model = _ours("llama")
    lp.set_adapter(model, "default")
    before = _snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"does not match this model's lora adapter: missing \['base_model\.model\.model\.layers\.1\.self_attn"
        r"\.q_proj\.lora_A\.weight'.*\(adapter 'new'\)",
    ):
        load_peft_adapter(model, tmp_path / "short", adapter_name="new")
    _assert_unchanged(model, before)
    # Into an existing adapter with other options: refused by name, nothing changed.
    with pytest.raises(ValueError, match=r"adapter 'other' is a lora adapter .* that differs from the peft adapter"):
        load_peft_adapter(model, tmp_path / "fits", adapter_name="other")
    _assert_unchanged(model, before)
    # A non-finite tensor, into a new adapter and into one of that name.
    tensors = load_file(tmp_path / "fits" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "fits" / "adapter_model.safetensors")
    lp.inject(model, "lora", adapter_name="same", r=2, alpha=8, target_modules=["q_proj"])
    lp.set_adapter(model, "default")
    before = _snapshot(model)
    for name in ("new", "same"):
        with pytest.raises(ValueError, match=rf"non-finite values \(NaN or infinity\) in adapter tensor\(s\) {key}"):
            load_peft_adapter(model, tmp_path / "fits", adapter_name=name)
        _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string without '\.'"):
        load_peft_adapter(model, tmp_path / "short", adapter_name="a.b")
    _assert_unchanged(model, before)


def test_a_folder_of_named_adapters_only_points_to_its_subfolders(tmp_path: Path) -> None:
    save_peft_adapter(_ours("llama", ("other",)), tmp_path / "x" / "other", "other")
    with pytest.raises(FileNotFoundError, match=r"lacks adapter_config\.json; it holds adapters in subfolders 'other'"):
        load_peft_adapter(tiny.build("llama"), tmp_path / "x")
