"""Per-layer control: ``rank_pattern`` / ``alpha_pattern``, ``layers_to_transform`` / ``layers_pattern``,
``bias="lora_only"|"all"`` (issue 16 points 5 and 6).

What each layer gets is written out here by hand (peft's rules: a pattern key is a regex matching
a module's whole name or its end after a dot, the first key wins; a layer index is the number after
the first ``<layers_pattern>.`` or, without one, in the first ``.<name>.<int>.``). Parity with peft
0.21.2 itself is the parity table's (tests/interop/parity.py, rows with source="patterns").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lightning_peft as lp
from lightning_peft.api.inject import summary_dict
from lightning_peft.core import state
from lightning_peft.core.targeting import layer_index, pattern_key
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from lightning_peft.methods.lora import LoRAConfig
from tests import tiny


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.norm = nn.Linear(6, 8), nn.Linear(8, 3), nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin1(torch.relu(self.lin0(x))))


def _lora_layers(model: nn.Module) -> dict[str, tuple[int, float]]:
    """Full name -> (r, scaling) of every LoRA wrapper."""
    return {n: (m.r, m.scaling) for n, m in state.adapter_modules(model) if m.method == "lora"}


# --------------------------------------------------------------------------- the matching rules


def test_pattern_key_matches_the_whole_name_or_its_end_after_a_dot_and_the_first_key_wins() -> None:
    name = "model.layers.0.self_attn.q_proj"
    assert pattern_key(["q_proj"], name) == "q_proj"
    assert pattern_key(["proj"], name) is None  # not at a dot boundary
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.qq_proj") is None
    assert pattern_key([r"layers\.0\..*"], name) == r"layers\.0\..*"
    assert pattern_key([r"layers\.1\..*"], name) is None
    assert pattern_key(["self_attn.q_proj", "q_proj"], name) == "self_attn.q_proj"
    assert pattern_key(["q_proj", "self_attn.q_proj"], name) == "q_proj"
    assert pattern_key([], name) is None


@pytest.mark.parametrize(
    ("name", "pattern", "index"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.1.attn.c_attn", None, 1),
        ("bert.encoder.layer.0.attention.self.query", None, 0),
        ("model.layers.1.mlp.experts.0.w1", None, 1),  # the first index: the layer, not the expert
        ("model.layers.1.mlp.experts.0.w1", "experts", 0),
        ("transformer.h.1.attn.c_attn", ["layers", "h"], 1),
        ("model.layers.2.self_attn.q_proj", "h", None),
        ("lin0", None, None),
        ("encoder.block.1.layer.0.SelfAttention.q", "block", 1),
        ("encoder.block.1.layer.0.SelfAttention.q", "layer", 0),
    ],
)
def test_layer_index_is_read_as_peft_reads_it(name: str, pattern: object, index: int | None) -> None:
    assert layer_index(name, pattern) == index  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rank_pattern / alpha_pattern


def test_rank_and_alpha_patterns_give_each_layer_its_r_and_scale() -> None:
    config = LoRAConfig(
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 4},
        alpha_pattern={"down_proj": 3, "q_proj": 32},
    )
    before = config.to_dict()
    model = lp.inject(tiny.build("llama"), config)
    assert config.to_dict() == before  # the user's config is never changed
    got = _lora_layers(model)
    expected = {}
    for i in (0, 1):
        expected[f"model.layers.{i}.self_attn.q_proj"] = (2, 32 / 2) if i == 0 else (8, 32 / 8)
        expected[f"model.layers.{i}.self_attn.v_proj"] = (4, 16 / 4)
        expected[f"model.layers.{i}.mlp.down_proj"] = (8, 3 / 8)
    assert got == expected
    a = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert a.lora_A.shape == (2, 32) and a.lora_B.shape == (32, 2)
    assert lp.get_info(model).config.rank_pattern == config.rank_pattern  # recorded as given


def test_patterns_with_rslora_scale_by_the_layers_own_rank() -> None:
    model = lp.inject(MLP(), "lora", target_modules=["lin0", "lin1"], rslora=True, alpha=6, rank_pattern={"lin1": 4})
    assert _lora_layers(model) == {"lin0": (8, 6 / math.sqrt(8)), "lin1": (4, 6 / math.sqrt(4))}


def test_patterns_of_a_lightning_module_match_names_inside_the_transformers_model() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny.build("llama")

    holder = lp.inject(Holder(), "lora", target_modules=["q_proj"], rank_pattern={r"^model\.layers\.1\..*": 2})
    ranks = {n: r for n, (r, _) in _lora_layers(holder).items()}
    assert ranks == {"model.model.layers.0.self_attn.q_proj": 8, "model.model.layers.1.self_attn.q_proj": 2}


def test_a_patterned_adapter_round_trips_through_our_files_and_peft_format(tmp_path: Path) -> None:
    options = dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    model = lp.inject(tiny.build("llama"), "lora", **options)
    with torch.no_grad():
        for _, p in state.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    batch = tiny.inputs("llama")
    ref = tiny.logits(model, batch)
    lp.save_adapter(model, tmp_path / "ours")
    torch.testing.assert_close(tiny.logits(lp.load_adapter(tiny.build("llama"), tmp_path / "ours"), batch), ref)
    save_peft_adapter(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"v_proj": 2} and written["alpha_pattern"] == {"q_proj": 4}
    torch.testing.assert_close(tiny.logits(load_peft_adapter(tiny.build("llama"), tmp_path / "peft"), batch), ref)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_pattern": {"q_proj": 0}}, r"LoRAConfig.rank_pattern\['q_proj'\] must be a positive integer; got 0"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"LoRAConfig.rank_pattern\['q_proj'\] must be a positive integer; got 2.5"),
        ({"rank_pattern": {"q_(proj": 2}}, r"LoRAConfig.rank_pattern\['q_\(proj'\] must be keyed by a valid regular"),
        ({"alpha_pattern": {"v_proj": -1}}, r"LoRAConfig.alpha_pattern\['v_proj'\] must be a positive number; got -1"),
        ({"alpha_pattern": ["v_proj"]}, r"LoRAConfig.alpha_pattern must be a dict from module-name regexes"),
        ({"rank_pattern": {"": 2}}, r"LoRAConfig.rank_pattern must be a dict whose keys are non-empty strings"),
        ({"bias": "lora"}, r"LoRAConfig.bias must be one of 'none', 'lora_only', 'all'; got 'lora'"),
    ],
)
def test_bad_patterns_and_bias_name_the_field_key_and_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(target_modules=["q_proj"], **options)


def test_a_pattern_key_that_matches_no_targeted_module_is_refused() -> None:
    model = tiny.build("llama")
    with pytest.raises(ValueError, match=r"LoRAConfig.alpha_pattern key 'k_proj' matches none of the 4 targeted"):
        lp.inject(
            model, "lora", target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"k_proj": 2}
        )
    assert lp.get_info(model) is None and not list(state.adapter_modules(model))


def test_a_pattern_rank_the_init_refuses_names_the_pattern_key() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig.rank_pattern\['q_proj'\]=3 for layer 'model.layers.0.self_attn"):
        lp.inject(tiny.build("llama"), "lora", target_modules=["q_proj"], init="orthogonal", rank_pattern={"q_proj": 3})


# --------------------------------------------------------------------------- layers_to_transform


@pytest.mark.parametrize(
    ("arch", "options", "expected"),
    [
        ("llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
         ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
        ("llama", {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
         ["model.layers.0.self_attn.q_proj"]),
        ("gpt2", {"target_modules": ["c_attn"], "layers_to_transform": [0], "layers_pattern": ["h"]},
         ["transformer.h.0.attn.c_attn"]),
        ("bert", {"target_modules": ["query", "value"], "layers_to_transform": [1]},
         ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]),
    ],
)  # fmt: skip
def test_layers_to_transform_selects_the_layers_named(arch: str, options: dict, expected: list[str]) -> None:
    model = lp.inject(tiny.build(arch), "lora", r=2, **options)
    assert sorted(_lora_layers(model)) == sorted(expected)


@pytest.mark.parametrize("method", ["ia3", "adalora", "bottleneck", "bitfit", "lora"])
def test_every_layer_method_honours_layers_to_transform(method: str) -> None:
    targets = {"bottleneck": ["mlp"], "bitfit": ["c_attn", "c_fc"]}.get(method, ["c_attn", "c_fc"])
    extra = {"feedforward_modules": ["c_fc"]} if method == "ia3" else {}
    model = lp.inject(tiny.build("gpt2"), method, target_modules=targets, layers_to_transform=[1], **extra)
    sites = [state.site_name(model, n) for n, m in state.adapter_modules(model) if m.method == method]
    assert sites and all(s.startswith("transformer.h.1.") for s in sites), sites


def test_a_target_named_in_full_is_taken_whatever_its_layer_as_in_peft() -> None:
    targets = ["q_proj", "model.layers.0.self_attn.v_proj"]  # peft skips the layer check for a full name
    model = lp.inject(tiny.build("llama"), "lora", r=2, target_modules=targets, layers_to_transform=[1])
    assert sorted(_lora_layers(model)) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]


def test_layers_to_transform_matching_nothing_says_so() -> None:
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM in layers_to_transform=\[5\]"):
        lp.inject(tiny.build("llama"), "lora", target_modules=["q_proj"], layers_to_transform=[5])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers_to_transform": -1}, r"LoRAConfig.layers_to_transform must be None, a layer index"),
        ({"layers_to_transform": True}, r"LoRAConfig.layers_to_transform must be None, a layer index"),
        ({"layers_to_transform": []}, r"LoRAConfig.layers_to_transform must be None, a layer index .*; got \[\]"),
        ({"layers_to_transform": [0, "1"]}, r"LoRAConfig.layers_to_transform must be .*; got \[0, '1'\]"),
        ({"layers_pattern": "layers"}, r"LoRAConfig.layers_pattern must be None unless layers_to_transform is set"),
        ({"layers_to_transform": [0], "layers_pattern": "la(yers"}, r"LoRAConfig.layers_pattern must be names or"),
        ({"layers_to_transform": [0], "layers_pattern": [""]}, r"LoRAConfig.layers_pattern must be None, a name"),
        ({"layers_to_transform": [0], "target_modules": ".*q_proj"},
         r"LoRAConfig.layers_to_transform must be None when target_modules is a regex or keyword \('.\*q_proj'"),
    ],
)  # fmt: skip
def test_bad_layer_options_name_the_field_and_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{"target_modules": ["q_proj"], **options})


def test_ia3_layers_to_transform_is_refused_by_name_in_peft_format(tmp_path: Path) -> None:
    # peft 0.21.2's IA3Config has no layers_to_transform: peft would adapt every layer.
    import peft

    assert "layers_to_transform" not in {f.name for f in __import__("dataclasses").fields(peft.IA3Config)}
    model = lp.inject(
        tiny.build("llama"), "ia3", target_modules=["v_proj"], feedforward_modules=[], layers_to_transform=[0]
    )
    with pytest.raises(ValueError, match=r"IA3Config.layers_to_transform=\[0\] has no place in peft's format"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# --------------------------------------------------------------------------- bias


def _biases(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("bias")}


@pytest.mark.parametrize(
    ("bias", "trained"),
    [
        ("none", set()),
        ("lora_only", {"lin0.base_layer.bias"}),
        ("all", {"lin0.base_layer.bias", "lin1.bias", "norm.bias"}),
    ],
)
def test_gradients_reach_exactly_the_adapter_and_the_chosen_biases(bias: str, trained: set[str]) -> None:
    torch.manual_seed(0)
    model = lp.inject(MLP(), "lora", target_modules=["lin0"], bias=bias)
    model(torch.randn(5, 6)).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lin0.lora_A", "lin0.lora_B", *trained}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    assert all(float(model.get_parameter(n).grad.abs().sum()) > 0 for n in trained)
    assert set(state.trainable_state_dict(model)) == {"lin0.lora_A", "lin0.lora_B", *trained}
    counted, _ = state.count_parameters(model)
    assert counted == 8 * 6 + 8 * 8 + sum(model.get_parameter(n).numel() for n in trained)
    shown = summary_dict(model)
    assert shown["trainable_params"] == counted
    biases = shown["modules"].get("bias (base biases trained)", {"count": 0, "trainable_params": 0})
    assert biases == {"count": len(trained), "trainable_params": counted - 8 * 6 - 8 * 8}
    assert state.undeclared_trainable(model) == []


def test_adalora_trains_the_biases_its_bias_option_names() -> None:
    model = lp.inject(MLP(), "adalora", target_modules=["lin0"], init_r=4, target_r=2, bias="lora_only")
    model(torch.randn(5, 6)).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lin0.lora_A", "lin0.lora_B", "lin0.lora_E", "lin0.base_layer.bias"}


def test_trained_biases_save_load_merge_and_unload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lp.inject(MLP(), "lora", target_modules=["lin0"], bias="all")
    with torch.no_grad():
        for _, p in state.adapter_parameters(model):
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 6)
    ref = model(x)
    lp.save_adapter(model, tmp_path / "ours")
    torch.manual_seed(0)
    fresh = lp.load_adapter(MLP(), tmp_path / "ours")  # the same base (seed 0), its biases as they were
    torch.testing.assert_close(fresh(x), ref)
    lp.merge(fresh)  # the update goes into the weight; the trained biases stay where they are
    torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=1e-6)
    plain = lp.unload(fresh)
    assert type(plain.lin0) is nn.Linear
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.lin1.bias, model.lin1.bias)


def test_a_checkpoint_without_the_trained_biases_is_refused() -> None:
    model = lp.inject(MLP(), "lora", target_modules=["lin0"], bias="lora_only")
    sd = state.trainable_state_dict(model)
    del sd["lin0.base_layer.bias"]
    with pytest.raises(ValueError, match=r"lacks adapter weights: lin0.base_layer.bias"):
        model.load_state_dict(sd, strict=False)


def test_peft_format_keys_of_trained_biases_are_peft_s(tmp_path: Path) -> None:
    model = lp.inject(MLP(), "lora", target_modules=["lin0"], bias="all")
    save_peft_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model."
    assert keys == {prefix + k for k in ("lin0.lora_A.weight", "lin0.lora_B.weight", "lin0.base_layer.bias",
                                         "lin1.bias", "norm.bias")}  # fmt: skip


def test_lora_only_with_a_second_adapter_on_the_layer_keeps_peft_s_key(tmp_path: Path) -> None:
    model = lp.inject(MLP(), "ia3", target_modules=["lin0"], feedforward_modules=[])
    lp.inject(model, "lora", target_modules=["lin0"], bias="lora_only", adapter_name="second")
    trained = dict(state.trained_biases(model, "second"))
    assert (
        set(trained) == {"lin0.base_layer.base_layer.bias"} and trained["lin0.base_layer.base_layer.bias"].requires_grad
    )
    save_peft_adapter(model, tmp_path, adapter_name="second")
    assert "base_model.model.lin0.base_layer.bias" in load_file(tmp_path / "adapter_model.safetensors")


def test_a_peft_file_without_the_lora_only_biases_is_refused_by_field(tmp_path: Path) -> None:
    # What peft 0.19 writes for bias="lora_only": the adapter's tensors, none of the biases it trained.
    from safetensors.torch import save_file

    model = lp.inject(MLP(), "lora", target_modules=["lin0"], bias="lora_only")
    save_peft_adapter(model, tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    del stored["base_model.model.lin0.base_layer.bias"]
    save_file(stored, tmp_path / "adapter_model.safetensors")
    fresh = MLP()
    with pytest.raises(ValueError, match=r"has bias='lora_only' but lacks the biases that trains: \['base_model"):
        load_peft_adapter(fresh, tmp_path)
    assert lp.get_info(fresh) is None


@pytest.mark.parametrize(
    ("bias", "targets", "message"),
    [
        ("all", ["q_proj"], r"LoRAConfig.bias='all' would train no bias: no module of LlamaForCausalLM has a bias"),
        ("lora_only", ["q_proj"], r"LoRAConfig.bias='lora_only' would train no bias: none of the 2 adapted layers"),
    ],
)
def test_a_bias_option_that_would_train_nothing_is_refused(bias: str, targets: list[str], message: str) -> None:
    model = tiny.build("llama")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=message):
        lp.inject(model, "lora", target_modules=targets, bias=bias)
    assert [n for n, _ in model.named_modules()] == before and lp.get_info(model) is None


def test_bias_lora_only_trains_in_a_lightning_run_and_resumes(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import PEFTCallback
    from tests.lightning.modules import TinyLM, token_loader, trainer

    module = TinyLM(arch="gpt2")
    start = module.model.transformer.h[0].attn.c_attn.bias.detach().clone()
    frozen = module.model.transformer.h[0].mlp.c_fc.bias.detach().clone()
    callback = PEFTCallback("lora", r=2, target_modules=["c_attn"], bias="lora_only", verbose=False)
    t = trainer(tmp_path, max_steps=3, callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    t.fit(module, token_loader(n=12))
    c_attn = module.model.transformer.h[0].attn.c_attn
    assert not torch.equal(c_attn.base_layer.bias, start)  # trained
    torch.testing.assert_close(module.model.transformer.h[0].mlp.c_fc.bias, frozen, rtol=0, atol=0)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert "model.transformer.h.0.attn.c_attn.base_layer.bias" in saved
    resumed = TinyLM(arch="gpt2")
    t2 = trainer(tmp_path / "2", max_steps=3, callbacks=[PEFTCallback("lora", r=2, target_modules=["c_attn"],
                                                                      bias="lora_only", verbose=False)])  # fmt: skip
    t2.fit(resumed, token_loader(n=12), ckpt_path=tmp_path / "last.ckpt")
    torch.testing.assert_close(resumed.model.transformer.h[0].attn.c_attn.base_layer.bias, c_attn.base_layer.bias)


def test_trained_biases_under_a_sharded_strategy_are_refused_by_name() -> None:
    import lightning as L

    from lightning_peft import PEFTCallback

    t = L.Trainer(accelerator="cpu", devices=2, strategy="peft_fsdp", logger=False)
    with pytest.raises(ValueError, match=r"LoRAConfig.bias='all' trains base-model biases, which PEFTFSDPStrategy"):
        PEFTCallback("lora", bias="all").check_strategy(t)
    PEFTCallback("lora", layers_to_transform=[0], target_modules=["q_proj"]).check_strategy(t)  # selection only
