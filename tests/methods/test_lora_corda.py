"""LoRA init="corda" (CorDA): the paper's decomposition written out, peft 0.21 parity, training, resume, errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from lightning_peft.methods.lora import LoRAConfig, to_peft
from lightning_peft.methods.lora_corda import CordaLinear
from tests import tiny
from tests.lightning.modules import StopAfterFirstEpoch, TinyLM, token_loader, trainer

IN, OUT, T = 16, 12, 10


class Net(nn.Module):
    """Two linear layers: ``proj`` (16 -> 12) and ``head`` (12 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(IN, OUT)
        self.head = nn.Linear(OUT, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _net_batches(n: int = 3, batch: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(IN, IN, generator=g)  # correlated inputs: a covariance far from the identity
    return [torch.randn(batch, T, IN, generator=g) @ mix for _ in range(n)]


def _net_loss(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x).square().mean()


def _corda(model: nn.Module, batches: list[Tensor], **options: Any) -> nn.Module:
    lp.inject(model, "lora", **options)
    lp.calibrate(model, batches, _net_loss(model))
    return model


def _written_out(weight: Tensor, inputs: list[Tensor], r: int, s: float, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """CorDA (Yang et al. 2024, as peft): (s B_0 A_0, W_res, V) for W (out, in) and the samples x_i (T, in)."""
    cov = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in inputs) / len(inputs)  # C
    damp = 0.01
    while True:
        fixed = cov + damp * torch.diag(cov).mean() * torch.eye(cov.shape[0])  # C'
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, torch.eye(cov.shape[0])) < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)  # W C' = U S V'^T
    v = inverse.T @ vh.T  # V = C'^-T V': W = U S V^T
    torch.testing.assert_close(u @ torch.diag(sv) @ v.T, weight, atol=1e-4, rtol=1e-4)
    keep = slice(None, r) if mode == "ipm" else slice(-r, None)  # ipm: largest r; kpm: smallest r
    principal = u[:, keep] @ torch.diag(sv[keep]) @ v[:, keep].T  # = s B_0 A_0
    return principal, weight - principal, v[:, keep]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_follows_the_formula(mode: str) -> None:
    """s B A = U_r S_r V_r^T of W C' (ipm: largest, kpm: smallest), the base weight W - s B A, the model unchanged."""
    base, batches = Net(), _net_batches()
    x = batches[0]
    model = _corda(
        copy.deepcopy(base), batches, r=4, alpha=8, target_modules=["proj"], init="corda",
        corda_config={"corda_method": mode, "calibration_batches": 3},
    )  # fmt: skip
    layer = model.proj
    assert isinstance(layer, CordaLinear) and bool(layer.corda_ready) and layer.residual_applied
    samples = [b[i] for b in batches for i in range(b.shape[0])]  # one sample per sequence (peft's batch of 1)
    principal, residual, v = _written_out(base.proj.weight.detach(), samples, 4, 2.0, mode)
    with torch.no_grad():
        torch.testing.assert_close(2.0 * layer.lora_B @ layer.lora_A, principal, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.base.weight, residual, atol=1e-4, rtol=1e-4)
        # B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T: A's rows span V_r's columns, B's columns are orthogonal.
        gram = layer.lora_B.T @ layer.lora_B
        torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            torch.linalg.lstsq(v, layer.lora_A.T).solution.T @ v.T, layer.lora_A, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)  # W_res + s B A = W
        assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)


def test_gradients_reach_the_adapter_only_and_equal_the_formula() -> None:
    """y = W_res x + b + s B A x: dL/dB = s g (A x)^T, dL/dA = s B^T g x^T; W_res gets none."""
    base, batches = Net(), _net_batches()
    model = _corda(copy.deepcopy(base), batches, r=4, alpha=8, target_modules=["proj"], init="corda")
    layer = model.proj
    x = batches[1]
    hidden = layer(x)
    g = torch.randn_like(hidden)
    (hidden * g).sum().backward()
    x2, g2 = x.reshape(-1, IN), g.reshape(-1, OUT)
    with torch.no_grad():
        torch.testing.assert_close(layer.lora_B.grad, 2.0 * g2.T @ (x2 @ layer.lora_A.T), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.lora_A.grad, 2.0 * layer.lora_B.T @ g2.T @ x2, atol=1e-4, rtol=1e-4)
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_merge_and_unload_are_exact() -> None:
    """merge gives W_res + s B A (the model unchanged); unload(merge=False) leaves W_res, as peft's unload."""
    base, batches = Net(), _net_batches()
    model = _corda(copy.deepcopy(base), batches, r=4, alpha=8, target_modules=["proj"], init="corda")
    with torch.no_grad():
        model.proj.lora_B.add_(0.1)  # as after training
        x = batches[2]
        before = model(x)
        residual = model.proj.base.weight.clone()
        lp.merge(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        lp.unmerge(model)
        torch.testing.assert_close(model.proj.base.weight, residual, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
        plain = lp.unload(model, merge=False)
        assert isinstance(plain.proj, nn.Linear)
        torch.testing.assert_close(plain.proj.weight, residual, atol=1e-6, rtol=1e-6)


def test_training_before_calibration_is_refused() -> None:
    model = lp.inject(Net(), "lora", r=4, target_modules=["proj"], init="corda")
    with torch.no_grad():  # uncalibrated, without gradients: the base model (A = B = 0), as in a sanity check
        torch.testing.assert_close(model(_net_batches()[0]), Net()(_net_batches()[0]))
    with pytest.raises(
        RuntimeError, match=r"init='corda' trained before its CorDA decomposition: call lightning_peft\.calibrate"
    ):
        model(_net_batches()[0]).sum().backward()


def test_a_restored_decomposition_is_kept_and_draws_no_batch() -> None:
    """A model given a checkpoint's A_0, B_0 rebuilds W_res from them (the same bits) and reads no batch."""
    base, batches = Net(), _net_batches()
    model = _corda(copy.deepcopy(base), batches, r=4, target_modules=["proj"], init="corda")
    saved = lp.trainable_state_dict(model)  # with the training state, as a checkpoint
    assert any(k.endswith("lora_A0") for k in saved)
    fresh = lp.inject(copy.deepcopy(base), "lora", r=4, target_modules=["proj"], init="corda")
    fresh.load_state_dict(saved, strict=False)

    def never() -> Any:
        raise AssertionError("a restored decomposition drew a calibration batch")
        yield

    lp.calibrate(fresh, never(), _net_loss(fresh))
    assert torch.equal(fresh.proj.base.weight, model.proj.base.weight)
    assert torch.equal(fresh.proj.lora_A, model.proj.lora_A)


def test_adapter_files_without_the_initial_factors_are_refused(tmp_path: Path) -> None:
    base, batches = Net(), _net_batches()
    model = _corda(copy.deepcopy(base), batches, r=4, target_modules=["proj"], init="corda")
    lp.save_adapter(model, tmp_path / "adapter")
    loaded = lp.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with pytest.raises(RuntimeError, match=r"holds trained A, B but not its initial A_0, B_0"), torch.no_grad():
        loaded(batches[0])
    with pytest.raises(RuntimeError, match=r"holds trained A, B but not its initial A_0, B_0"):
        lp.calibrate(loaded, batches, _net_loss(loaded))


def _lm_batches(n: int = 3, batch: int = 2) -> list[dict[str, Tensor]]:
    return [{"input_ids": tiny.inputs("llama", batch=batch, seq=16, seed=20 + i)["input_ids"]} for i in range(n)]


def _peft_pair(
    arch: str, mode: str, targets: list[str], batches: list[dict[str, Tensor]], **patterns: dict[str, Any]
) -> tuple[nn.Module, Any]:
    """(ours calibrated on ``batches``, peft's from preprocess_corda on the same sequences one at a time;
    ``patterns``: rank_pattern / alpha_pattern, the same on both sides)."""
    peft = pytest.importorskip("peft")
    corda = pytest.importorskip("peft.tuners.lora.corda")
    base = tiny.build(arch)
    reference = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode), **patterns,
    )  # fmt: skip

    def run_model() -> None:
        for b in batches:
            for row in b["input_ids"]:
                reference(input_ids=row[None])

    corda.preprocess_corda(reference, config, run_model=run_model)
    theirs = peft.get_peft_model(reference, config)
    ours = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=targets, init="corda",
                     corda_config={"corda_method": mode, "calibration_batches": len(batches)}, **patterns)  # fmt: skip
    lp.calibrate(ours, batches, lambda b: ours(**b).logits.sum())
    return ours, theirs


@pytest.mark.parametrize(("arch", "mode", "targets", "patterns"), [
    ("llama", "ipm", ["q_proj", "v_proj"], {}), ("llama", "kpm", ["q_proj", "v_proj"], {}),
    ("gpt2", "ipm", ["c_attn"], {}),
    ("llama", "kpm", ["q_proj", "v_proj"], {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 4.0}}),
])  # fmt: skip
def test_matches_peft(arch: str, mode: str, targets: list[str], patterns: dict[str, Any]) -> None:
    """Same base, same calibration sequences: peft's A, B, residual base weights and outputs, merged too
    (per-layer ranks and alphas from rank_pattern / alpha_pattern, as peft's preprocess_corda reads them)."""
    batches = _lm_batches()
    ours, theirs = _peft_pair(arch, mode, targets, batches, **patterns)
    layers = dict(state.adapter_modules(ours))
    assert layers and all(isinstance(m, CordaLinear) for m in layers.values())
    assert all(m.r == (2 if patterns and n.endswith("v_proj") else 4) for n, m in layers.items())
    inner = theirs.base_model.model
    for name, layer in layers.items():
        peft_layer = inner.get_submodule(name)
        for mine, ref in [
            (layer.lora_A, peft_layer.lora_A["default"].weight),
            (layer.lora_B, peft_layer.lora_B["default"].weight),
            (layer.base.weight, peft_layer.base_layer.weight),
        ]:
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():
        for name, layer in layers.items():  # as after training, the same in both
            g = torch.Generator().manual_seed(len(name))
            delta = 0.05 * torch.randn(layer.lora_B.shape, generator=g)
            layer.lora_B.add_(delta)
            inner.get_submodule(name).lora_B["default"].weight.add_(delta)
        x = tiny.inputs(arch, batch=2, seed=3)
        ref = theirs(**x).logits
        assert (ref - tiny.build(arch)(**x).logits).abs().max() > 1e-3  # the adapter moved the model
        torch.testing.assert_close(ours(**x).logits, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)
        merged_ref = theirs.merge_and_unload()(**x).logits
        lp.merge(ours)
        torch.testing.assert_close(ours(**x).logits, merged_ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def test_converted_files_load_both_ways(tmp_path: Path) -> None:
    """convert_to_standard_lora=True: ours -> peft on the original base; peft's converted file -> ours."""
    peft = pytest.importorskip("peft")
    batches = _lm_batches()
    ours, theirs = _peft_pair("llama", "ipm", ["q_proj", "v_proj"], batches)
    theirs.save_pretrained(tmp_path / "initial")  # peft: the initial adapter, before training
    with torch.no_grad():
        for name, layer in state.adapter_modules(ours):
            delta = 0.05 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(len(name)))
            layer.lora_B.add_(delta)
            theirs.base_model.model.get_submodule(name).lora_B["default"].weight.add_(delta)
    x = tiny.inputs("llama", batch=2, seed=4)
    with torch.no_grad():
        want = ours(**x).logits
    scale = 1e-5 * max(1.0, want.abs().max().item())
    save_peft_adapter(ours, tmp_path / "ours", convert_to_standard_lora=True)
    loaded = peft.PeftModel.from_pretrained(tiny.build("llama"), tmp_path / "ours")
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    mine = load_peft_adapter(tiny.build("llama"), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, want, atol=scale, rtol=0)
        torch.testing.assert_close(mine(**x).logits, want, atol=scale, rtol=0)


def test_unconverted_peft_files_are_refused_by_name(tmp_path: Path) -> None:
    batches = _lm_batches()
    _, theirs = _peft_pair("llama", "kpm", ["q_proj"], batches)
    theirs.save_pretrained(tmp_path / "theirs")
    before = {k: v.clone() for k, v in tiny.build("llama").state_dict().items()}
    model = tiny.build("llama")
    with pytest.raises(
        ValueError, match=r"init_lora_weights='corda' is refused: CorDA's adapter applies to the residual"
    ):
        load_peft_adapter(model, tmp_path / "theirs")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _fit(root: Path, *, interrupt: bool = False, ckpt_path: Path | None = None) -> TinyLM:
    L.seed_everything(0)
    module = TinyLM()
    callbacks: list[L.Callback] = [
        lp.PEFTCallback("lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="corda",
                        corda_config={"corda_method": "ipm", "calibration_batches": 2}, verbose=False),
        ModelCheckpoint(dirpath=root, save_last=True),
        *([StopAfterFirstEpoch()] if interrupt else []),
    ]  # fmt: skip
    run = trainer(root, max_epochs=2, callbacks=callbacks)
    run.fit(module, token_loader(n=8, batch_size=4), ckpt_path=ckpt_path)
    return module


def test_fits_in_a_trainer_and_resumes_exactly(tmp_path: Path) -> None:
    """PEFTCallback calibrates at train start; fit 4 steps == fit 2, stop, resume, fit 2 (bit for bit)."""
    module = _fit(tmp_path / "straight")
    layers = dict(state.adapter_modules(module.model))
    assert module.trainer.global_step == 4 and layers
    assert all(isinstance(m, CordaLinear) and m.residual_applied for m in layers.values())
    assert all(not torch.equal(m.lora_B, m.lora_B0) for m in layers.values())  # trained from the decomposition
    assert _fit(tmp_path / "first", interrupt=True).trainer.global_step == 2
    resumed = _fit(tmp_path / "second", ckpt_path=tmp_path / "first" / "last.ckpt")
    straight, again = lp.trainable_state_dict(module), lp.trainable_state_dict(resumed)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    for name, layer in state.adapter_modules(resumed.model):
        assert torch.equal(layer.base.weight, layers[name].base.weight), name  # the same residual
    # The peft folder beside the checkpoint is written converted: peft loads it into the original base.
    peft = pytest.importorskip("peft")
    folder = tmp_path / "straight" / "last.peft"
    assert peft.LoraConfig.from_pretrained(folder).init_lora_weights is True
    x = tiny.inputs("llama", batch=2, seed=4)
    with torch.no_grad():
        want = module.model.eval()(**x).logits
        got = peft.PeftModel.from_pretrained(tiny.build("llama"), folder).eval()(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"corda_config": {"corda_method": "ipm"}}, r"corda_config is set but init='kaiming'"),
    ({"init": "corda", "corda_config": {"corda_method": "xpm"}}, r"corda_method must be .ipm. or .kpm.; got .xpm."),
    ({"init": "corda", "corda_config": {"cache_file": "c.pt"}}, r"cache_file=.c\.pt. is refused: .*pickle"),
    ({"init": "corda", "corda_config": {"covariance_file": "c.pt"}}, r"covariance_file=.c\.pt. is refused"),
    ({"init": "corda", "corda_config": {"prune_temporary_fields": False}}, r"prune_temporary_fields=False is refused"),
    ({"init": "corda", "corda_config": {"calibration_batches": 0}}, r"calibration_batches must be a positive .*got 0"),
    ({"init": "corda", "corda_config": {"rho": 2}}, r"corda_config=\{'rho': 2\}: .*its fields are corda_method"),
    ({"init": "corda", "use_dora": True}, r"use_dora=True is refused with init='corda'"),
])  # fmt: skip
def test_invalid_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**options)


def test_layers_corda_cannot_decompose_are_refused() -> None:
    with pytest.raises(TypeError, match=r"it is a Embedding, and LoRAConfig\.init='corda' decomposes nn\.Linear"):
        lp.inject(tiny.build("llama"), "lora", init="corda", target_modules=["embed_tokens"])
    model = lp.inject(Net(), "lora", r=13, target_modules=["proj"], init="corda")
    with pytest.raises(ValueError, match=r"r=13 components of a \(12, 16\) weight, which has only 12"):
        lp.calibrate(model, _net_batches(), _net_loss(model))
    assert torch.equal(model.proj.base.weight, Net().proj.weight)  # refused before anything was rewritten


def test_peft_config_round_trip_keeps_the_options() -> None:
    config = LoRAConfig(init="corda", corda_config={"corda_method": "kpm", "calibration_batches": 4})
    assert config.corda_config["corda_method"] == "kpm" and config.corda_config["calibration_batches"] == 4
    assert LoRAConfig.from_dict(config.to_dict()) == config
    peft_fields = to_peft(config)
    assert peft_fields["init_lora_weights"] == "corda"
    assert peft_fields["corda_config"] == {
        "corda_method": "kpm", "use_float16_for_covariance": False, "verbose": False, "cache_file": None,
        "covariance_file": None, "prune_temporary_fields": True,
    }  # fmt: skip


def test_verbose_logs_each_layer_and_float16_covariance_keeps_the_input_dtype(caplog: pytest.LogCaptureFixture) -> None:
    """verbose: one log line per decomposed layer; use_float16_for_covariance: the input is not cast (peft's
    flag), so on a float32 model the decomposition is the same as without it."""
    base, batches = Net(), _net_batches()
    with caplog.at_level("INFO", logger="lightning_peft.methods.lora_corda"):
        plain = _corda(copy.deepcopy(base), batches, r=4, target_modules=["proj", "head"], init="corda",
                       rank_pattern={"head": 2}, corda_config={"verbose": True, "corda_method": "kpm"})  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        "CorDA (kpm): decomposed proj with r=4", "CorDA (kpm): decomposed head with r=2",
    ]  # fmt: skip
    half = _corda(copy.deepcopy(base), batches, r=4, target_modules=["proj"], init="corda",
                  corda_config={"use_float16_for_covariance": True, "corda_method": "kpm"})  # fmt: skip
    assert torch.equal(half.proj.lora_A, plain.proj.lora_A) and torch.equal(
        half.proj.base.weight, plain.proj.base.weight
    )
