"""Many adapters on one base: add, switch, disable, delete, mixed batches, hotswap, save and load by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from tests import tiny

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    """Give adapter ``name`` non-trivial weights (LoRA's B starts at zero, (IA)^3 at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in state.adapter_state(model, name):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3 + (1.0 if tensor.dim() == 1 else 0.0))


def two_loras(arch: str = "llama", task: str = "lm") -> nn.Module:
    model = tiny.build(arch, task)
    lp.inject(model, "lora", adapter_name="a", **LORA)
    lp.inject(model, "lora", adapter_name="b", r=2, alpha=4, target_modules=["q_proj", "k_proj"])
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    return model


def alone(name: str, arch: str = "llama", task: str = "lm") -> nn.Module:
    """A fresh base with only adapter ``name``, with the same weights as in :func:`two_loras`."""
    model = tiny.build(arch, task)
    if name == "a":
        lp.inject(model, "lora", adapter_name="a", **LORA)
    else:
        lp.inject(model, "lora", adapter_name="b", r=2, alpha=4, target_modules=["q_proj", "k_proj"])
    _randomize(model, name, 1 if name == "a" else 2)
    return model


def test_named_adapters_are_listed_and_the_last_added_is_active_and_alone_trains() -> None:
    model = two_loras()
    listed = lp.adapters(model)
    assert list(listed) == ["a", "b"] and listed["a"].method == "lora" and listed["b"].config.r == 2
    assert lp.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in state.adapter_parameters(model, "b")}
    lp.set_adapter(model, "a")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in state.adapter_parameters(model, "a")
    }


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_adapter_alone_equals_a_model_with_only_that_adapter(name: str) -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    lp.set_adapter(model, name)
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(alone(name), batch), rtol=0, atol=1e-5)


def test_several_active_adapters_add_their_updates() -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    base = tiny.logits(tiny.build("llama"), batch)
    lp.set_adapter(model, ["a", "b"])
    both = tiny.logits(model, batch)
    # On q_proj both LoRA terms add to W x: check at the layer, where the sum is exact.
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.base.in_features)
    a, b = layer, layer.base_layer
    expected = layer.base(x) + a.update(x) + b.update(x)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(both, base)


def test_disable_adapter_is_the_base_model_exactly_and_restores_on_exit_and_on_error() -> None:
    batch = tiny.inputs("llama")
    base = tiny.logits(tiny.build("llama"), batch)
    model = two_loras()
    lp.set_adapter(model, ["a", "b"])
    adapted = tiny.logits(model, batch)
    with lp.disable_adapter(model):
        assert torch.equal(tiny.logits(model, batch), base)
    assert torch.equal(tiny.logits(model, batch), adapted)
    with pytest.raises(RuntimeError, match="boom"), lp.disable_adapter(model):
        raise RuntimeError("boom")
    assert torch.equal(tiny.logits(model, batch), adapted)


def test_disable_adapter_covers_input_side_adapters_and_saved_heads() -> None:
    batch = tiny.inputs("bert")
    base = tiny.logits(tiny.build("bert", "classify"), batch)
    model = tiny.build("bert", "classify")
    lp.inject(model, "prompt_tuning", num_virtual_tokens=3)
    _randomize(model, "default", 3)
    adapted = tiny.logits(model, batch)
    assert not torch.allclose(adapted, base)
    with lp.disable_adapter(model):
        assert torch.equal(tiny.logits(model, batch), base)
    torch.testing.assert_close(tiny.logits(model, batch), adapted, rtol=0, atol=0)


def test_delete_adapter_leaves_the_others_exact() -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    with pytest.raises(
        ValueError, match=r"adapter 'b' \(lora\) is active; call lightning_peft.set_adapter\(model, 'a'\)"
    ):
        lp.delete_adapter(model, "b")
    lp.set_adapter(model, "a")
    lp.delete_adapter(model, "b")
    assert list(lp.adapters(model)) == ["a"]
    assert not list(state.adapter_modules(model, "b")) and len(list(state.adapter_modules(model))) == 4
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(alone("a"), batch), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"is active; .*it is the last one: call lightning_peft.unload"):
        lp.delete_adapter(model, "a")


def test_bad_names_are_refused_with_the_names_held() -> None:
    model = two_loras()
    for call in (
        lambda: lp.set_adapter(model, "c"),
        lambda: lp.delete_adapter(model, "c"),
        lambda: lp.save_adapter(model, "/nonexistent", adapter_name="c"),
    ):
        with pytest.raises(ValueError, match=r"no adapter named 'c'; it holds 'a', 'b'"):
            call()
    with pytest.raises(ValueError, match=r"already has an adapter named 'a' \(lora\)"):
        lp.inject(model, "lora", adapter_name="a")
    for bad in ("", "__base__", "x.y", 3):
        with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
            lp.inject(model, "lora", adapter_name=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one adapter name or a list of distinct names"):
        lp.set_adapter(model, ["a", "a"])


def test_a_failed_inject_leaves_the_other_adapters_as_they_were() -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    before = tiny.logits(model, batch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matches no module"):
        lp.inject(model, "lora", adapter_name="c", target_modules=["q_prj"])
    assert list(lp.adapters(model)) == ["a", "b"] and lp.active_adapters(model) == ["b"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(tiny.logits(model, batch), before)


def test_dora_and_selective_methods_refuse_to_share_a_layer() -> None:
    model = two_loras()
    with pytest.raises(TypeError, match="cannot share a base layer with another adapter"):
        lp.inject(model, "lora", adapter_name="d", use_dora=True, target_modules=["q_proj"])
    assert list(lp.adapters(model)) == ["a", "b"]


def test_a_second_input_side_adapter_is_refused() -> None:
    model = tiny.build("llama")
    lp.inject(model, "prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="a model takes one input-side adapter"):
        lp.inject(model, "prefix_tuning", adapter_name="p", num_virtual_tokens=2)
    lp.inject(model, "lora", adapter_name="l", **LORA)  # a layer adapter beside it is fine
    assert list(lp.adapters(model)) == ["default", "l"]


# --------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("method", ["lora", "ia3", "bottleneck"])
def test_mixed_batch_equals_each_sample_alone(method: str) -> None:
    options: dict = {"lora": {"r": 4, "rslora": True}, "ia3": {}, "bottleneck": {}}[method]
    model = tiny.build("llama")
    lp.inject(model, method, adapter_name="a", **options)
    lp.inject(model, method, adapter_name="b", **options)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    names = ["a", "__base__", "b", "a"]
    batch = tiny.inputs("llama", batch=4)
    with lp.mixed_batch(model, names):
        mixed = tiny.logits(model, batch)
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        if name == "__base__":
            with lp.disable_adapter(model):
                expected = tiny.logits(model, one)
        else:
            lp.set_adapter(model, name)
            expected = tiny.logits(model, one)
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=0, atol=1e-5)


def test_mixed_batch_works_with_generate() -> None:
    model = two_loras()
    ids = tiny.inputs("llama", batch=2)["input_ids"]
    with lp.mixed_batch(model, ["a", "b"]):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for i, name in enumerate(["a", "b"]):
        lp.set_adapter(model, name)
        alone_out = model.generate(ids[i : i + 1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i : i + 1], alone_out)


def test_mixed_batch_bad_inputs() -> None:
    model = two_loras()
    batch = tiny.inputs("llama", batch=2)
    wrong_size = "mixed_batch names 3 samples, but .* got a batch of 2"
    with pytest.raises(ValueError, match=wrong_size), lp.mixed_batch(model, ["a", "b", "a"]):
        tiny.logits(model, batch)
    with pytest.raises(ValueError, match=r"no adapter named 'c'"), lp.mixed_batch(model, ["a", "c"]):
        pass
    with pytest.raises(ValueError, match="one adapter name per sample"), lp.mixed_batch(model, "a"):
        pass
    lp.merge(model)
    with pytest.raises(ValueError, match="while adapters are merged"), lp.mixed_batch(model, ["a", "b"]):
        pass


def test_mixed_batch_refuses_methods_that_cannot_serve_single_rows() -> None:
    model = tiny.build("llama")
    lp.inject(model, "lora", adapter_name="d", use_dora=True, **LORA)
    refused = r"adapter 'd' \(lora, DoRALinear\) cannot serve single rows"
    with pytest.raises(ValueError, match=refused), lp.mixed_batch(model, ["d", "__base__"]):
        pass


def test_mixed_batch_with_classification_heads_of_one_shape() -> None:
    batch = tiny.inputs("bert", batch=2)
    model = tiny.build("bert", "classify")
    lp.inject(model, "lora", adapter_name="a", r=2)
    lp.inject(model, "lora", adapter_name="b", r=2)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    with lp.mixed_batch(model, ["b", "a"]):
        mixed = tiny.logits(model, batch)
    for i, name in enumerate(["b", "a"]):
        lp.set_adapter(model, name)
        one = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i : i + 1], tiny.logits(model, one), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- files


def test_save_all_writes_peft_layout_and_load_adds_by_name(tmp_path: Path) -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    lp.save_adapter(model, tmp_path)
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    # b sits inside a's wrappers on q_proj; its file names tensors by where they sit in the base.
    fresh = lp.load_adapter(tiny.build("llama"), tmp_path / "b")
    assert list(lp.adapters(fresh)) == ["b"]
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(alone("b"), batch), rtol=0, atol=1e-5)
    lp.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    assert list(lp.adapters(fresh)) == ["b", "a"] and lp.active_adapters(fresh) == ["a"]
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(alone("a"), batch), rtol=0, atol=1e-5)


def test_a_full_state_dict_round_trips_every_adapter() -> None:
    batch = tiny.inputs("llama")
    model = two_loras()
    lp.set_adapter(model, ["a", "b"])
    expected = tiny.logits(model, batch)
    sd = lp.trainable_state_dict(model)
    target = tiny.build("llama")
    lp.inject(target, "lora", adapter_name="a", **LORA)
    lp.inject(target, "lora", adapter_name="b", r=2, alpha=4, target_modules=["q_proj", "k_proj"])
    target.load_state_dict(sd)
    lp.set_adapter(target, ["a", "b"])
    torch.testing.assert_close(tiny.logits(target, batch), expected, rtol=0, atol=0)
    only_b = lp.trainable_state_dict(model, adapter_name="b")
    assert {k for k in only_b} == {n for n, _ in state.adapter_state(model, "b")}
    target.load_state_dict(only_b)  # the other adapter may be missing from a one-adapter state dict


def test_hotswap_replaces_weights_in_place_and_refuses_another_rank(tmp_path: Path) -> None:
    batch = tiny.inputs("llama")
    source = alone("a")
    lp.save_adapter(source, tmp_path / "a")
    model = tiny.build("llama")
    lp.inject(model, "lora", adapter_name="a", **LORA)
    modules = [id(m) for m in model.modules()]
    lp.hotswap_adapter(model, tmp_path / "a", adapter_name="a")
    assert [id(m) for m in model.modules()] == modules  # nothing added or replaced
    torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(source, batch), rtol=0, atol=0)
    other = tiny.build("llama")
    lp.inject(other, "lora", adapter_name="a", **{**LORA, "r": 8})
    lp.save_adapter(other, tmp_path / "r8")
    before = {k: v.clone() for k, v in lp.trainable_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"other lora options: r=8 in .*, r=4 here"):
        lp.hotswap_adapter(model, tmp_path / "r8", adapter_name="a")
    assert all(torch.equal(before[k], v) for k, v in lp.trainable_state_dict(model).items())
    with pytest.raises(ValueError, match=r"no adapter named 'z'"):
        lp.hotswap_adapter(model, tmp_path / "a", adapter_name="z")


def test_a_mixed_batch_trains_each_adapter_on_its_own_rows_only() -> None:
    model = two_loras()
    batch = tiny.inputs("llama", batch=2)
    lp.set_adapter(model, ["a", "b"])
    with lp.mixed_batch(model, ["a", "__base__"]):
        tiny.logits(model, batch).square().mean().backward()
    grads_a = [p.grad for _, p in state.adapter_parameters(model, "a")]
    grads_b = [p.grad for _, p in state.adapter_parameters(model, "b")]
    assert all(g is not None for g in grads_a) and any(g.abs().sum() > 0 for g in grads_a)
    assert all(g is None or g.abs().sum() == 0 for g in grads_b)  # b served no row


def test_a_checkpoint_of_an_adapter_inside_another_ones_wrappers_loads_at_its_site(tmp_path: Path) -> None:
    batch = tiny.inputs("llama")
    model = two_loras()  # b sits inside a's wrapper on q_proj: its keys there are q_proj.base_layer.*
    sd = lp.trainable_state_dict(model, adapter_name="b")
    assert any(".base_layer.lora_A" in key for key in sd)
    torch.save({"state_dict": sd}, tmp_path / "b.ckpt")
    fresh = lp.load_adapter(tiny.build("llama"), tmp_path / "b.ckpt")
    assert list(lp.adapters(fresh)) == ["b"]
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(alone("b"), batch), rtol=0, atol=1e-5)


def test_hotswap_keeps_a_compiled_models_graph(tmp_path: Path) -> None:
    """No module changes, so torch.compile's guards still hold: the new weights run without a recompile."""
    batch = tiny.inputs("llama")
    source = alone("a")
    lp.save_adapter(source, tmp_path / "a")
    model = tiny.build("llama")
    lp.inject(model, "lora", adapter_name="a", **LORA)
    compiles: list[int] = []

    def counting(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        compiles.append(1)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        compiled(**batch)
        first = len(compiles)
        lp.hotswap_adapter(model, tmp_path / "a", adapter_name="a")
        logits = compiled(**batch).logits
    assert first > 0 and len(compiles) == first  # no new graph
    torch.testing.assert_close(logits, tiny.logits(source, batch), rtol=0, atol=1e-5)
