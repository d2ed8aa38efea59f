"""LoRA on bare parameters (``LoRAConfig.target_parameters``) against the formula written out.

2-D ``W`` (out, in): ``W' = W + s B A``. 3-D experts ``W`` (E, ., .): ``A`` (E r, in) holds expert
e's ``A_e`` in rows ``e r .. e r + r - 1``; ``B`` (out, r E) holds column j of ``B_e`` at column
``j E + e``; ``Delta_e = B_e A_e`` is (out, in), stored transposed where the module's
``is_transposed`` is True (GPT-OSS). Peft parity: tests/interop/parity.py (``*nn.Parameter*``,
``*experts*``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from lightning_peft.lightning.peft_dir import peft_dir_of
from lightning_peft.methods.lora_param import LoRAParameters
from tests.interop.parity import MLP, MlpUsingParameters, assert_parity
from tests.lightning.modules import fit_stop_resume


def _moe(name: str) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(tf, f"{name}Config")(
        vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, num_local_experts=3, num_experts_per_tok=2, pad_token_id=0,
    )  # fmt: skip
    return getattr(tf, f"{name}ForCausalLM")(config).eval()


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _expert_delta(a: torch.Tensor, b: torch.Tensor, r: int, experts: int, scaling: float) -> torch.Tensor:
    """``(E, out, in)``, expert by expert from the stored layouts (blocked rows of A, interleaved columns of B)."""
    out = []
    for e in range(experts):
        a_e = a[e * r : (e + 1) * r]  # (r, in)
        b_e = b[:, [j * experts + e for j in range(r)]]  # (out, r)
        out.append(scaling * b_e @ a_e)
    return torch.stack(out)


def test_2d_parameter_formula_gradients_merge() -> None:
    model = MlpUsingParameters().eval()
    x = torch.randn(5, 10)
    before = model(x)
    lp.inject(model, "lora", target_parameters=["lin0.weight"], r=2, alpha=6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0 at init
    _randomize(model)
    layer = model.lin0
    assert isinstance(layer, LoRAParameters)
    w = layer.base_layer.weight.detach().clone()  # (10, 20): peft reads a 2-D parameter as (out, in)
    a, b = layer.lora_A["weight"], layer.lora_B["weight"]
    assert a.shape == (2, 20) and b.shape == (10, 2)
    w_eff = w + 3.0 * b @ a  # s = alpha / r
    h = torch.relu(x @ w_eff + layer.base_layer.bias)
    expected = torch.log_softmax(model.lin1(h), dim=-1)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {"lin0.lora_A.weight": True, "lin0.lora_B.weight": True}
    assert layer.base_layer.weight.grad is None
    lp.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, w_eff.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), out.detach(), rtol=1e-5, atol=1e-6)
    lp.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["Mixtral", "GptOss"])
def test_3d_experts_formula(name: str) -> None:
    model = _moe(name)
    ids = torch.randint(1, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    keys = ["experts.gate_up_proj", "experts.down_proj"]
    lp.inject(model, "lora", target_modules=[], target_parameters=keys, r=2, alpha=4)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    _randomize(model)
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, LoRAParameters) and layer.names == ["gate_up_proj", "down_proj"]
    transposed = bool(getattr(layer.base_layer, "is_transposed", False))
    assert transposed == (name == "GptOss")
    originals = {n: layer.base_layer._parameters[n].detach().clone() for n in layer.names}
    for n in layer.names:
        delta = _expert_delta(layer.lora_A[n], layer.lora_B[n], 2, 3, 2.0)  # (E, out, in)
        expected = originals[n] + (delta.transpose(1, 2) if transposed else delta)
        torch.testing.assert_close(originals[n] + layer.delta(n), expected, rtol=1e-6, atol=1e-6)
    # The forward is the experts' own with W + s Delta in place of W: run the plain module on it.
    adapted = model(ids).logits
    plain = _moe(name)
    with torch.no_grad():
        for n in layer.names:
            getattr(plain.model.layers[0].mlp.experts, n).copy_(originals[n] + layer.delta(n))
    torch.testing.assert_close(adapted, plain(ids).logits, rtol=1e-5, atol=1e-5)
    lp.merge(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropout": 0.1}, r"LoRAConfig.dropout must be 0 with target_parameters"),
        ({"use_dora": True}, r"LoRAConfig.use_dora must be False with target_parameters"),
        ({"init": "pissa"}, r"LoRAConfig.init must be one of 'kaiming', 'gaussian', 'random' with target_parameters"),
        (
            {"target_parameters": ["lin0.nothing"]},
            r"target_parameters has \['lin0.nothing'\], which match no parameter",
        ),
        ({"target_parameters": "lin0.weight"}, r"LoRAConfig.target_parameters must be None or a list of module names"),
    ],
)
def test_errors(options: dict, match: str) -> None:
    options = {"target_parameters": ["lin0.weight"], **options}
    model = MlpUsingParameters()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        lp.inject(model, "lora", **options)
    assert lp.get_info(model) is None and type(model.lin0).__name__ == "LinearUsingParameter"
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_rank_and_alpha_patterns_reach_a_parameter_target() -> None:
    """A key may name a parameter target as ``<module>.<parameter>`` (peft's key), beside target_modules:
    ``W' = W + (alpha_k / r_k) B A`` with that key's rank and alpha (peft applies it too: see the parity rows)."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 10)
    patterns = {"rank_pattern": {"lin1.weight": 3, "lin0": 4}, "alpha_pattern": {"weight": 6}}
    lp.inject(model, "lora", target_modules=["lin0"], target_parameters=["lin1.weight"], r=2, alpha=16, **patterns)
    _randomize(model)
    lin0, lin1 = model.lin0, model.lin1
    assert isinstance(lin1, LoRAParameters) and lin1.ranks == {"weight": 3} and lin1.scales == {"weight": 2.0}
    assert lin0.lora_A.shape == (4, 10) and lin0.scaling == 16 / 4  # "weight" names no module: lin0 keeps alpha
    a0, b0, w0 = lin0.lora_A, lin0.lora_B, lin0.base_layer.weight
    a1, b1, w1 = lin1.lora_A["weight"], lin1.lora_B["weight"], lin1.base_layer.weight
    assert a1.shape == (3, 20) and b1.shape == (2, 3)
    h = torch.relu(x @ (w0 + 4.0 * b0 @ a0).T + lin0.base_layer.bias)
    expected = torch.log_softmax(h @ (w1 + 2.0 * b1 @ a1).T + lin1.base_layer.bias, dim=-1)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    # Without target_modules the same key reaches it.
    alone = lp.inject(MlpUsingParameters(), "lora", target_parameters=["lin0.weight", "lin1.weight"],
                      rank_pattern={"lin0.weight": 2}, r=4)  # fmt: skip
    assert alone.lin0.ranks == {"weight": 2} and alone.lin1.ranks == {"weight": 4}


@pytest.mark.parametrize("target_modules", [["lin0"], []])
@pytest.mark.parametrize("key", ["nothing", "lin1"])
def test_a_pattern_key_that_selects_no_target_is_refused(target_modules: list[str], key: str) -> None:
    """A key that selects neither a targeted module nor a targeted parameter (``lin1`` is the module
    holding the parameter, not its key ``lin1.weight``) is refused, with or without target_modules."""
    model = MLP()
    modules = "the 1 targeted modules \\(lin0\\) or " if target_modules else ""
    with pytest.raises(
        ValueError,
        match=rf"LoRAConfig.alpha_pattern key '{key}' matches none of {modules}the 1 targeted parameters "
        r"\(lin1\.weight\); a key must match a targeted (module or )?parameter's name whole or after a dot",
    ):
        lp.inject(model, "lora", target_modules=target_modules, target_parameters=["lin1.weight"],
                  alpha_pattern={key: 2})  # fmt: skip
    assert lp.get_info(model) is None and type(model.lin0) is nn.Linear and type(model.lin1) is nn.Linear


def test_target_modules_empty_only_with_other_targets() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig.target_modules must be"):
        lp.inject(MlpUsingParameters(), "lora", target_modules=[])


def test_target_parameters_alone_wraps_no_default_module() -> None:
    """peft 0.21.2: with target_parameters and no target_modules, the architecture's default modules
    (Mixtral's q_proj/v_proj) are not wrapped; the same sites here as in peft's get_peft_model."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft.LoraConfig(), "target_parameters"):
        pytest.skip(f"peft {peft.__version__} has no target_parameters")
    ours = lp.inject(_moe("Mixtral"), "lora", target_parameters=["experts.down_proj"], r=2)
    theirs = peft.get_peft_model(_moe("Mixtral"), peft.LoraConfig(target_parameters=["experts.down_proj"], r=2))
    wrapped = sorted(name for name, _ in state.adapter_modules(ours))
    assert wrapped == ["model.layers.0.mlp.experts"]
    assert sorted(n for n, _ in theirs.named_modules() if n.endswith(".lora_A")) == [
        "base_model.model.model.layers.0.mlp.experts.lora_A"
    ]
    assert lp.get_info(ours).config.target_modules == []


def test_a_module_and_its_parameter_are_not_both_adapted() -> None:
    model = MLP()
    with pytest.raises(ValueError, match=r"selects parameters of 'lin0', which is already wrapped by LoRALinear"):
        lp.inject(model, "lora", target_modules=["lin0"], target_parameters=["lin0.weight"])
    assert lp.get_info(model) is None and type(model.lin0) is nn.Linear


class _MoELM(L.LightningModule):
    """A causal LM over the tiny Mixtral (3-D expert tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _moe("Mixtral").train()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader() -> DataLoader:
    ids = torch.randint(1, 32, (8, 6), generator=torch.Generator().manual_seed(2))
    return DataLoader(TensorDataset(ids), batch_size=4)


@pytest.mark.slow
def test_trainer_fit_resume_and_peft_folder(tmp_path: Path) -> None:
    """A real fit on the experts: peft loads the checkpoint's peft folder to the same logits, and a
    fit stopped after 2 of 4 steps and resumed ends with the adapter the uninterrupted fit has."""
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    options = {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 2}

    _, resumed, last = fit_stop_resume(tmp_path, _MoELM, _loader, options)
    ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = resumed.model.eval()(ids).logits
        assert not torch.allclose(ours, _moe("Mixtral")(ids).logits, atol=1e-4), "the fit changed nothing"
    if Version(peft.__version__) < Version("0.21"):
        return  # peft 0.19 lays Mixtral's (E, out, in) experts out as (E, in, out) (see the parity rows)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(_moe("Mixtral"), peft_dir_of(last)).eval()(ids).logits
    assert_parity(theirs, ours, "peft loading the resumed fit's peft folder")


@pytest.mark.parametrize("option", [{"target_parameters": ["experts.down_proj"]}, {"trainable_token_indices": [1]}])
def test_sharded_strategies_refuse_by_name(option: dict) -> None:
    t = L.Trainer(accelerator="cpu", devices=2, strategy="peft_fsdp", logger=False)
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"LoRAConfig.{name}=.* is trained on one device and with DDP only"):
        PEFTCallback("lora", **option).check_strategy(t)
    with pytest.raises(ValueError, match=r"trainable_tokens.*(sharded|strateg)"):
        PEFTCallback("trainable_tokens", token_indices=[1]).check_strategy(t)


def test_add_weighted_adapter_refuses_parameter_adapters_by_name() -> None:
    model = MlpUsingParameters().eval()
    lp.inject(model, "lora", target_parameters=["lin0.weight"], r=2)
    lp.inject(model, "lora", adapter_name="b", target_parameters=["lin1.weight"], r=2)
    with pytest.raises(ValueError, match=r"cannot combine adapters with target_parameters .*'default' has"):
        lp.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "both")
    assert "both" not in lp.adapters(model)
