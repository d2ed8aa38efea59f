"""LoRA's EVA init: A from the SVD of each layer's inputs (the paper's formula, peft's numbers), B = 0."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft import registry
from lightning_peft.core import state
from lightning_peft.methods.lora import LoRAConfig, LoRALinear
from tests import tiny
from tests.interop.parity import assert_parity
from tests.lightning.modules import TinyLM, fit_stop_resume, token_loader

DIM, RANK_OF_DATA = 16, 4


class Embedded(nn.Module):
    """Token embeddings whose rows span a 4-dimensional space (steps 8, 4, 2, 1), then a linear layer.

    The linear layer's inputs then have rank 4, so an SVD of rank 4 is exact whatever the order of
    the batches: EVA's incremental SVD must give the one-shot SVD of the paper's formula.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the linear layers: the same model each time (adapter files check the base)
        g = torch.Generator().manual_seed(0)
        basis, _ = torch.linalg.qr(torch.randn(DIM, RANK_OF_DATA, generator=g))  # (16, 4) orthonormal columns
        scales = torch.tensor([8.0, 4.0, 2.0, 1.0])
        self.embed = nn.Embedding(tiny.VOCAB, DIM)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(tiny.VOCAB, RANK_OF_DATA, generator=g) * scales @ basis.T + 0.5)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, tiny.VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(input_ids))))


def _lm_batches(n: int = 3, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(n):
        batch = tiny.inputs("llama", batch=4, seed=seed + i)
        labels = batch["input_ids"].clone()
        labels[:, :2] = -100  # a prompt that the loss ignores: EVA (use_label_mask) skips it too
        batches.append(batch | {"labels": labels})
    return batches


def _forward(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    def run(batch: Any) -> torch.Tensor:
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        return out if isinstance(out, torch.Tensor) else out.logits

    return run


def _signed(vh: torch.Tensor) -> torch.Tensor:
    """Each singular vector with its largest-magnitude entry positive (the sign convention)."""
    return vh * torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(dim=1)]).view(-1, 1)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("use_label_mask", [True, False])
def test_a_is_the_top_right_singular_vectors_of_the_inputs(use_label_mask: bool, whiten: bool) -> None:
    """A = V_r^T (whitened: S_r^{-1/2} V_r^T) with X - mean = U S V^T over the kept token positions of
    the batches that were run; B = 0; the layer's output is unchanged."""
    base = Embedded()
    model = lp.inject(
        copy.deepcopy(base), "lora", target_modules=["proj"], r=RANK_OF_DATA, init="eva",
        eva_config={"rho": 1.0, "tau": 0.5, "use_label_mask": use_label_mask, "whiten": whiten},
    )  # fmt: skip
    batches = _lm_batches()
    seen: list[dict[str, torch.Tensor]] = []
    forward = _forward(model)
    lp.calibrate(model, batches, lambda b: (seen.append(b), forward(b))[1])
    # The first batch runs once to find layers sharing an input, then the SVD reads batch after batch
    # until two in a row agree (cosine similarity >= tau): here, after the first two.
    assert [id(b) for b in seen] == [id(batches[0]), id(batches[0]), id(batches[1])]
    rows = []
    for batch in batches[:2]:
        keep = batch["attention_mask"].bool()
        if use_label_mask:
            keep &= batch["labels"] != -100
        rows.append(base.embed.weight[batch["input_ids"]][keep].double())
    x = torch.cat(rows)
    _, s, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    expected = _signed(vh[:RANK_OF_DATA])
    if whiten:
        expected = expected / s[:RANK_OF_DATA].sqrt().view(-1, 1)
    layer = model.proj
    assert isinstance(layer, LoRALinear)
    assert_parity(layer.lora_A.double(), expected, "A against the SVD of the kept inputs")
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    ids = batches[2]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_gradients_reach_a_and_b_after_calibration() -> None:
    model = lp.inject(Embedded(), "lora", target_modules=["proj"], r=4, init="eva", eva_config={"rho": 1.0})
    lp.calibrate(model, _lm_batches(), _forward(model))
    model.train()
    model(_lm_batches(1, seed=3)[0]["input_ids"]).square().mean().backward()
    layer = model.proj
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad is not None  # zero at the first step: B = 0, as for every B = 0 init


def test_training_before_calibration_is_refused_and_a_loaded_adapter_needs_none(tmp_path: Path) -> None:
    model = lp.inject(Embedded(), "lora", target_modules=["proj"], r=4, init="eva", eva_config={"rho": 1.0})
    ids = _lm_batches(1)[0]["input_ids"]
    with torch.no_grad():
        model(ids)  # eval forwards (a sanity check, peft's hooks) are fine
    model.train()
    with pytest.raises(RuntimeError, match=r"init='eva' trains before EVA set its A: call lightning_peft.calibrate"):
        model(ids)
    lp.calibrate(model, _lm_batches(), _forward(model))
    model(ids)  # calibrated: trains
    lp.save_adapter(model, tmp_path / "a")
    fresh = lp.inject(Embedded(), "lora", target_modules=["proj"], r=4, init="eva", eva_config={"rho": 1.0})
    lp.load_adapter(fresh, tmp_path / "a")
    calls: list[Any] = []
    lp.calibrate(fresh, _lm_batches(), calls.append)  # restored: EVA runs no batch and keeps the loaded A
    assert not calls and torch.equal(fresh.proj.lora_A, model.proj.lora_A)
    fresh.train()(ids)


def test_plain_lora_draws_no_calibration_batch() -> None:
    """LoRA has a calibrate hook for its data-driven inits only: other inits never touch the batches."""

    class Untouchable:
        def __iter__(self) -> Any:
            raise AssertionError("a plain LoRA run iterated the training batches")

    method = registry.get("lora")
    assert not method.needs_calibration(LoRAConfig()) and method.needs_calibration(LoRAConfig(init="eva"))
    model = lp.inject(tiny.build("llama"), "lora")
    lp.calibrate(model, Untouchable(), _forward(model))  # type: ignore[arg-type]


_QKV_UP = ["q_proj", "k_proj", "v_proj", "up_proj"]


def _peft_eva(
    base: nn.Module, batches: list[dict[str, torch.Tensor]], targets: list[str], r: int, **options: Any
) -> Any:
    peft = pytest.importorskip("peft")
    eva = pytest.importorskip("peft.tuners.lora.eva")
    config = peft.LoraConfig(
        r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(**options)
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    eva.initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    return theirs


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_same_a_as_peft_and_peft_loads_it(rho: float, tmp_path: Path) -> None:
    """On a tiny LLaMA (q/k/v read one input: one shared SVD), with peft's label mask: peft's A to 1e-5,
    and our calibrated, saved adapter gives peft's outputs after peft loads it. With rho=2 each layer
    computes 2r components and the budget goes by explained variance (here every layer keeps r=4)."""
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    # peft before 0.21 never applies its label mask (it asks hasattr(batch, "labels") of a dict): compare without it
    options = {"rho": rho, "tau": 0.9, "use_label_mask": Version(peft.__version__) >= Version("0.21")}
    base, batches = tiny.build("llama"), _lm_batches(4)
    theirs = _peft_eva(base, batches, _QKV_UP, 4, **options)
    assert not theirs.peft_config["default"].rank_pattern
    model = lp.inject(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=_QKV_UP, init="eva", eva_config=options)
    lp.calibrate(model, batches, _forward(model))
    layers = dict(state.adapter_modules(model))
    assert len(layers) == 8
    for name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            mine = layers[name]
            assert_parity(mine.lora_A, module.lora_A["default"].weight, f"EVA's A of {name}")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()  # as if trained, so that the outputs depend on A
        ours = model(ids).logits
    lp.save_peft_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_parity(back(ids).logits, ours, "peft loading our EVA adapter")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_rank_redistribution_is_refused_by_name() -> None:
    """rho > 1: where peft gives layers other ranks (its rank_pattern), lightning_peft refuses by name."""
    base, batches = tiny.build("llama"), _lm_batches(4)
    theirs = _peft_eva(base, batches, ["o_proj", "down_proj"], 2, rho=2.0, tau=0.9)
    assert theirs.peft_config["default"].rank_pattern, "peft kept every rank: the row tests nothing"
    model = lp.inject(
        copy.deepcopy(base),
        "lora",
        r=2,
        alpha=8,
        target_modules=["o_proj", "down_proj"],
        init="eva",
        eva_config={"tau": 0.9},
    )
    with pytest.raises(ValueError, match=r"eva_config rho=2.0: EVA's rank redistribution gives layers other ranks"):
        lp.calibrate(model, batches, _forward(model))


def test_refusals_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig.eva_config\['rho'\] must be a number >= 1; got 0.5"):
        LoRAConfig(init="eva", eva_config={"rho": 0.5})
    with pytest.raises(ValueError, match=r"LoRAConfig.eva_config\['tau'\] must be a number in \[0, 1\]; got 2"):
        LoRAConfig(init="eva", eva_config={"tau": 2})
    with pytest.raises(ValueError, match=r"LoRAConfig.eva_config has no option 'sigma'; valid: 'rho'"):
        LoRAConfig(init="eva", eva_config={"sigma": 1})
    with pytest.raises(ValueError, match=r"LoRAConfig.eva_config is set .* but init='kaiming'"):
        LoRAConfig(eva_config={"rho": 1.0})
    with pytest.raises(ValueError, match=r"max_batches'\] must be a positive int; got 0"):
        LoRAConfig(init="eva", eva_config={"max_batches": 0})
    assert LoRAConfig(init="eva").eva_config == {
        "rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
        "adjust_scaling_factors": True, "max_batches": 100,
    }  # fmt: skip
    with pytest.raises(TypeError, match=r"init='eva' initializes linear layers .* 'embed' is a LoRAEmbedding"):
        lp.inject(Embedded(), "lora", target_modules=["embed", "proj"], init="eva")
    model = lp.inject(tiny.build("llama"), "lora", r=2, init="eva", eva_config={"rho": 1.0, "whiten": True})
    with pytest.raises(ValueError, match=r"whiten=True with layers reading the same input"):
        lp.calibrate(model, _lm_batches(), _forward(model))
    model = lp.inject(Embedded(), "lora", target_modules=["proj"], r=4, init="eva", eva_config={"max_batches": 1})
    with pytest.raises(RuntimeError, match=r"did not converge .* within eva_config max_batches=1"):
        lp.calibrate(model, _lm_batches(), _forward(model))
    with pytest.raises(ValueError, match=r"init='eva' needs training batches"):
        lp.calibrate(model, [], _forward(model))


@pytest.mark.slow
def test_fits_in_a_trainer_and_resumes_exactly(tmp_path: Path) -> None:
    """PEFTCallback calibrates at train start; a fit stopped after 2 of 4 steps and resumed (EVA keeps the
    restored A) ends with the uninterrupted fit's adapter."""
    options = {"target_modules": ["q_proj", "v_proj"], "r": 2, "init": "eva", "eva_config": {"rho": 1.0, "tau": 0.9}}

    full, _, _ = fit_stop_resume(tmp_path, TinyLM, lambda: token_loader(n=8, shuffle=False), options)
    # The callback calibrated at train start: A is EVA's for the training batches (run as the callback
    # runs them), moved by the few steps only.
    reference = TinyLM()
    lp.inject(reference.model, "lora", **options)
    lp.calibrate(
        reference.model, token_loader(n=8, shuffle=False), lambda b: reference.model(input_ids=b[0], labels=b[0]).loss
    )
    eva = dict(state.adapter_modules(reference.model))
    for name, layer in state.adapter_modules(full.model):
        assert not layer.__dict__["eva_pending"]
        moved = (layer.lora_A - eva[name].lora_A).abs().max()
        assert 0 < moved < 0.1, f"{name}: A moved by {moved} from EVA's"
