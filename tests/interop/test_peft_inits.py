"""LoRA inits as peft has them, the peft-config allowlist, exact shape checks and embed_scale (issue 16)."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_peft as lp
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from lightning_peft.methods.lora import LoRAConfig, from_peft
from lightning_peft.methods.lora_embedding import LoRAEmbedding
from tests import tiny
from tests.interop import parity

PEFT_INIT = {"random": False}


def _layer(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal", "random"])
def test_an_init_gives_peft_s_adapter_and_base_weights_for_the_same_seed(init: str) -> None:
    base = tiny.build("llama")
    torch.manual_seed(5)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=PEFT_INIT.get(init, init)
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(5)
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"], init=init)
    peft_params = dict(theirs.named_parameters())
    for name, ours_param in ours.named_parameters():
        key = name.replace("lora_A", "lora_A.default.weight").replace("lora_B", "lora_B.default.weight")
        torch.testing.assert_close(ours_param, peft_params["base_model.model." + key], rtol=0, atol=0, msg=name)
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(theirs, batch), rtol=0, atol=1e-6)


def test_pissa_is_the_formula_and_leaves_the_model_unchanged() -> None:
    base = tiny.build("llama")
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["q_proj"], init="pissa")
    layer = _layer(ours, "model.layers.0.self_attn.q_proj")
    w = _layer(base, "model.layers.0.self_attn.q_proj").weight
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scale = 8 / 4
    # A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s),  W_res = W - s B A
    a = torch.diag((s[:4] / scale).sqrt()) @ vh[:4]
    b = u[:, :4] @ torch.diag((s[:4] / scale).sqrt())
    torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.weight, w - scale * b @ a, rtol=0, atol=1e-6)
    assert not torch.allclose(layer.base_layer.weight, w, atol=1e-3)  # the base holds the residual
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(base, batch), rtol=0, atol=1e-5)


def test_olora_is_the_formula() -> None:
    base = tiny.build("llama")
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["q_proj"], init="olora")
    layer = _layer(ours, "model.layers.0.self_attn.q_proj")
    w = _layer(base, "model.layers.0.self_attn.q_proj").weight
    q, r = torch.linalg.qr(w)  # W = Q R: B = Q[:, :r], A = R[:r], W_res = W - s B A
    torch.testing.assert_close(layer.lora_B, q[:, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_A, r[:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.weight, w - 2.0 * q[:, :4] @ r[:4], rtol=0, atol=1e-6)


def test_orthogonal_starts_at_the_identity_with_non_zero_factors() -> None:
    ours = lp.inject(tiny.build("llama"), "lora", r=4, target_modules=["q_proj"], init="orthogonal")
    layer = _layer(ours, "model.layers.0.self_attn.q_proj")
    assert layer.lora_A.abs().min() > 0 and layer.lora_B.abs().sum() > 0
    torch.testing.assert_close(layer.lora_B @ layer.lora_A, torch.zeros(32, 32), rtol=0, atol=1e-7)


def test_pissa_on_gpt2_conv1d_factors_the_transposed_weight() -> None:
    base = tiny.build("gpt2")
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["c_attn"], init="pissa")
    layer = _layer(ours, "transformer.h.0.attn.c_attn")
    w = _layer(base, "transformer.h.0.attn.c_attn").weight  # (in, out)
    torch.testing.assert_close(layer.base_layer.weight, w - (2.0 * layer.lora_B @ layer.lora_A).t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": "lora_ga"}, r"LoRAConfig\.init='lora_ga' is refused: LoRA-GA \(peft's init from estimated"),
        ({"init": "mica"}, r"LoRAConfig\.init='mica' is refused: MiCA \(peft's minor-component init"),
        ({"init": "pissa_niter_0"}, r"init='pissa_niter_0' is refused: the iteration count must be a positive"),
        ({"init": "svd"}, r"init must be one of 'kaiming', 'gaussian', 'loftq'; got 'svd'\. peft's initializations"),
        (
            {"init": "orthogonal", "r": 3},
            r"LoRAConfig\.r must be an even number with init='orthogonal' \(its A and B split r in two\); got 3",
        ),
    ],
)
def test_bad_inits_are_refused_by_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**options)


def test_inits_that_need_a_float_linear_weight_refuse_other_layers() -> None:
    with pytest.raises(TypeError, match=r"selected 'transformer\.h\.0\.attn\.c_attn'.*init='olora' is refused on "):
        lp.inject(tiny.build("gpt2"), "lora", target_modules=["c_attn"], init="olora")
    conv = parity.build("Conv2d")
    with pytest.raises(TypeError, match=r"init='pissa' is for linear layers .* takes init='kaiming', 'gaussian'"):
        lp.inject(conv, "lora", target_modules=["conv2d"], init="pissa")
    assert lp.get_info(conv) is None


# --------------------------------------------------------------------------- loading peft's PiSSA adapters


def _peft_pissa(tmp_path: Path, init: str = "pissa", **options: object) -> tuple[nn.Module, Path]:
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **options)
    theirs = peft.get_peft_model(tiny.build("llama"), config)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.mul_(1.5)
    theirs.save_pretrained(tmp_path / "p")
    return theirs.eval(), tmp_path / "p"


def test_an_unconverted_peft_pissa_adapter_loads_with_peft_s_residual(tmp_path: Path) -> None:
    theirs, folder = _peft_pissa(tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ours = load_peft_adapter(tiny.build("llama"), folder)
    assert lp.get_info(ours).config.init == "pissa"
    peft_weights = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if name.endswith("base_layer.weight"):
            assert torch.equal(param, peft_weights["base_model.model." + name]), name
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(theirs, batch), rtol=0, atol=1e-5)


def test_a_failed_pissa_load_puts_every_base_weight_back_bit_for_bit(tmp_path: Path) -> None:
    _, folder = _peft_pissa(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    model = tiny.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{key} is \(16, 2\) there, \(16, 4\) here"):
        load_peft_adapter(model, folder)
    assert lp.get_info(model) is None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_same_size_tensor_of_another_shape_is_refused_naming_key_and_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = peft.get_peft_model(parity.build("MLP"), peft.LoraConfig(r=10, target_modules=["lin0"]))
    theirs.save_pretrained(tmp_path / "p")
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    key = "base_model.model.lin0.lora_A.weight"
    assert tensors[key].shape == (10, 10)
    tensors[key] = torch.randn(5, 20)  # the same 100 values, another shape: never reshaped to fit
    save_file(tensors, tmp_path / "p" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} is \(5, 20\) there, \(10, 10\) here"):
        load_peft_adapter(parity.build("MLP"), tmp_path / "p")


def test_an_ia3_vector_laid_out_as_a_row_or_column_loads_in_our_layout(tmp_path: Path) -> None:
    # peft keeps a feed-forward vector as (1, in) and an attention one as (out, 1); we keep (n,).
    config = peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    theirs = peft.get_peft_model(parity.build("MLP"), config)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).view(p.shape) / 7)
    theirs.save_pretrained(tmp_path / "p")
    stored = load_file(tmp_path / "p" / "adapter_model.safetensors")
    ours = load_peft_adapter(parity.build("MLP"), tmp_path / "p")
    assert sorted(stored[k].shape for k in stored) == [(1, 20), (20, 1)]  # lin1 feed-forward row, lin0 column
    assert len(lp.trainable_state_dict(ours)) == 2
    for name, tensor in lp.trainable_state_dict(ours).items():
        peft_key = "base_model.model." + name.replace("ia3", "ia3_l.weight")
        key = next(k for k in stored if k.startswith(peft_key.rsplit(".", 1)[0]))
        assert torch.equal(tensor.flatten(), stored[key].flatten()), name


# --------------------------------------------------------------------------- the allowlist


def _options(**fields: object) -> dict:
    saved = json.loads(json.dumps(peft.LoraConfig(r=4).to_dict(), default=str))  # as save_pretrained writes it
    return {**saved, "peft_type": "LORA", "target_modules": ["q_proj"], **fields}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kasa_config", {"some": 1}),
        ("velora_config", {"num_groups": 2}),
        ("monteclora_config", {"num_samples": 2}),
        ("use_bdlora", {"nblocks": 2}),
        ("arrow_config", {"top_k": 2}),
        ("lora_ga_config", {"direction": "ArB2r"}),
        ("loftq_config", {"loftq_bits": 4}),
        ("layer_replication", [[0, 1]]),
        ("use_qalora", True),
        ("runtime_config", {"ephemeral_gpu_offload": True}),
    ],
)
def test_every_field_not_implemented_is_refused_with_its_value(field: str, value: object) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"has {field}={value!r}, which lightning_peft's lora does not implement")
    ):
        from_peft(_options(**{field: value}))


def test_default_valued_and_inert_fields_are_fine_and_each_read_field_maps_exactly() -> None:
    config = from_peft(
        _options(qalora_group_size=32, megatron_core="x", fan_in_fan_out=True, lora_alpha=12, use_rslora=True,
                 lora_dropout=0.1, init_lora_weights=False, exclude_modules=["k_proj"])
    )  # fmt: skip
    assert (config.r, config.alpha, config.rslora, config.dropout, config.init) == (4, 12, True, 0.1, "random")
    assert config.exclude_modules == ["k_proj"]
    with pytest.raises(ValueError, match=r"LoRAConfig\.rslora must be True or False; got 'yes'"):
        from_peft(_options(use_rslora="yes"))  # not coerced


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("loftq", r"init_lora_weights='loftq' is refused: peft replaces the base weights"),
        ("lora_ga", r"init_lora_weights='lora_ga' is refused: LoRA-GA"),
        ("mica", r"init_lora_weights='mica' is refused: MiCA"),
        ("xavier", r"init_lora_weights='xavier' is not one lightning_peft implements; supported: True, False"),
    ],
)
def test_peft_inits_lightning_peft_lacks_are_refused_by_name(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_peft(_options(init_lora_weights=value))


def test_ia3_refuses_random_init_and_unknown_fields() -> None:
    from lightning_peft.methods.ia3 import from_peft as ia3_from_peft

    options = {**peft.IA3Config(target_modules=["q_proj"]).to_dict(), "peft_type": "IA3"}
    with pytest.raises(ValueError, match=r"init_ia3_weights=False, which lightning_peft's ia3 does not implement"):
        ia3_from_peft({**options, "init_ia3_weights": False})
    with pytest.raises(ValueError, match=r"has field 'scaling'=2, which is not an IA3Config field"):
        ia3_from_peft({**options, "scaling": 2})


# --------------------------------------------------------------------------- saving converted


def test_converted_pissa_is_the_plain_rank_2r_lora_of_the_original_base(tmp_path: Path) -> None:
    base = tiny.build("llama")
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["q_proj"], init="pissa")
    layer = _layer(ours, "model.layers.0.self_attn.q_proj")
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with torch.no_grad():
        layer.lora_B.mul_(2.0)
    folder = save_peft_adapter(ours, tmp_path / "c", convert_to_standard_lora=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    stored = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.equal(stored[f"{key}.lora_A.weight"], torch.cat([layer.lora_A.detach(), a0]))
    assert torch.equal(stored[f"{key}.lora_B.weight"], torch.cat([layer.lora_B.detach(), -b0], dim=1))
    # On the original base: W + s (B A - B0 A0) = W_res + s B A, the trained layer.
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(back, batch), tiny.logits(ours, batch), rtol=0, atol=1e-5)
    with_rslora = lp.inject(
        copy.deepcopy(base), "lora", r=4, alpha=8, rslora=True, target_modules=["q_proj"], init="olora"
    )
    config = json.loads((save_peft_adapter(with_rslora, tmp_path / "r", convert_to_standard_lora=True)
                         / "adapter_config.json").read_text())  # fmt: skip
    assert config["r"] == 8 and math.isclose(config["lora_alpha"], 8 * 2**0.5)  # alpha / sqrt(r) kept


def test_convert_to_standard_lora_refusals(tmp_path: Path) -> None:
    ia3 = lp.inject(tiny.build("llama"), "ia3")
    with pytest.raises(ValueError, match=r"converts LoRA adapters .* adapter 'default' is a ia3 adapter"):
        save_peft_adapter(ia3, tmp_path / "a", convert_to_standard_lora=True)
    dora = lp.inject(tiny.build("llama"), "lora", r=4, init="pissa", use_dora=True)
    with pytest.raises(ValueError, match=r"it is DoRA \(use_dora=True\), whose magnitude is not an additive update"):
        save_peft_adapter(dora, tmp_path / "b", convert_to_standard_lora=True)
    with pytest.raises(ValueError, match=r"convert_to_standard_lora must be True or False; got 'yes'"):
        save_peft_adapter(dora, tmp_path / "c", convert_to_standard_lora="yes")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
    plain = lp.inject(tiny.build("llama"), "lora", r=4, init="gaussian")
    config = json.loads((save_peft_adapter(plain, tmp_path / "d", convert_to_standard_lora=True)
                         / "adapter_config.json").read_text())  # fmt: skip
    assert (config["r"], config["init_lora_weights"]) == (4, True)


def test_the_initial_factors_are_kept_once_and_a_reset_does_not_subtract_twice() -> None:
    ours = lp.inject(tiny.build("llama"), "lora", r=4, target_modules=["q_proj"], init="pissa")
    layer = _layer(ours, "model.layers.0.self_attn.q_proj")
    residual = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    layer.reset_parameters()  # as a strategy materializing the module again would
    assert torch.equal(layer.base_layer.weight, residual) and torch.equal(layer.lora_A, layer.lora_A0)
    assert "lora_A0" not in ours.state_dict() and "lora_A0" not in dict(lp.trainable_state_dict(ours))


# --------------------------------------------------------------------------- embed_scale


def test_lora_on_a_scaled_embedding_is_the_formula_and_merges_exactly() -> None:
    model = lp.inject(parity.build("gemma"), "lora", r=4, alpha=8, target_modules=["embed_tokens"])
    layer = _layer(model, "model.embed_tokens")
    assert isinstance(layer, LoRAEmbedding)
    c = layer.base.embed_scale
    assert float(c) == pytest.approx(32**0.5)
    with torch.no_grad():
        layer.lora_A.normal_()
    ids = tiny.inputs("llama")["input_ids"]
    w = layer.base.weight
    # h = c * (W[x] + s * A^T[x] B^T)
    expected = c * (w[ids] + 2.0 * layer.lora_A.t()[ids] @ layer.lora_B.t())
    torch.testing.assert_close(layer(ids), expected, rtol=1e-6, atol=1e-5)
    batch = {"input_ids": ids}
    before = model(**batch).logits
    lp.merge(model)
    torch.testing.assert_close(
        model(**batch).logits, before, rtol=0, atol=1e-5 * before.abs().max().clamp_min(1).item()
    )


def test_pissa_on_a_quantized_base_is_refused_naming_the_layer() -> None:
    pytest.importorskip("bitsandbytes")
    model = lp.quantize(tiny.build("llama"), "nf4")
    with pytest.raises(TypeError, match=r"init='pissa' rewrites the base weight from its SVD/QR and needs a float one"):
        lp.inject(model, "lora", r=4, target_modules=["q_proj"], init="pissa")
    assert lp.get_info(model) is None


def test_an_unconverted_randomized_pissa_adapter_warns_both_ways(tmp_path: Path) -> None:
    _, folder = _peft_pissa(tmp_path, init="pissa_niter_2")
    with pytest.warns(UserWarning, match=r"init='pissa_niter_2' is PiSSA from a randomized SVD .* loading it computed"):
        ours = load_peft_adapter(tiny.build("llama"), folder)
    with pytest.warns(UserWarning, match=r"peft, loading it, computes the residual base weights"):
        save_peft_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_peft_adapter(ours, tmp_path / "converted", convert_to_standard_lora=True)
