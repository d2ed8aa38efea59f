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
    base: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    targets: list[str],
    r: int,
    rslora: bool = False,
    **options: Any,
) -> Any:
    peft = pytest.importorskip("peft")
    eva = pytest.importorskip("peft.tuners.lora.eva")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(**options),
        use_rslora=rslora,
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


_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_layers(peft_model: Any) -> dict[str, Any]:
    return {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("targets", "adjust", "rslora", "dropped"),
    [
        (["o_proj", "down_proj"], True, False, ["model.layers.1.mlp.down_proj"]),  # a layer gets rank 0: unwrapped
        (["o_proj", "down_proj"], True, True, ["model.layers.1.mlp.down_proj"]),  # scale alpha' / sqrt(k)
        (_ALL_LINEAR, False, False, []),  # q/k/v and gate/up share their inputs (one SVD each); alpha kept
    ],
)
def test_a_redistribution_as_peft_does_it(
    targets: list[str], adjust: bool, rslora: bool, dropped: list[str], tmp_path: Path
) -> None:
    """peft's default rho=2 (whiten off) at r=2 on a tiny LLaMA: each layer's rank k_i, A (k_i x in), B = 0 and
    scale (alpha_i' / k_i, alpha_i' = alpha k_i / r with adjust_scaling_factors) as peft's; a layer with k_i = 0
    is its base layer again; the record carries peft's rank_pattern/alpha_pattern; with B set alike, outputs
    (forward and merged) equal peft's, and each side loads the other's saved adapter with the same outputs."""
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    # peft before 0.21 never applies its label mask (see test_same_a_as_peft_and_peft_loads_it): compare without it
    options = {
        "tau": 0.9,
        "adjust_scaling_factors": adjust,
        "use_label_mask": Version(peft.__version__) >= Version("0.21"),
    }
    base, batches = tiny.build("llama"), _lm_batches(4)
    theirs = _peft_eva(base, batches, targets, 2, rslora, **options)
    config = theirs.peft_config["default"]
    assert config.rank_pattern, "peft kept every rank: the case tests nothing"
    user = LoRAConfig(r=2, alpha=8, rslora=rslora, target_modules=targets, init="eva", eva_config=options)
    model = lp.inject(copy.deepcopy(base), user)
    lp.calibrate(model, batches, _forward(model))
    recorded = state.require_info(model).config
    assert recorded is not user and user.rank_pattern == {} and user.target_modules == targets  # a new config
    assert (recorded.rank_pattern, recorded.alpha_pattern) == (config.rank_pattern, config.alpha_pattern)
    assert bool(recorded.alpha_pattern) == adjust
    ours, peft_layers = dict(state.adapter_modules(model)), _lora_layers(theirs)
    assert sorted(ours) == sorted(peft_layers) and all(name not in ours for name in dropped)
    for name in dropped:
        assert type(model.get_submodule(name)) is nn.Linear
        assert type(theirs.base_model.model.get_submodule(name)) is nn.Linear
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in peft_layers.items():
            mine = ours[name]
            assert isinstance(mine, LoRALinear) and mine.r == module.r["default"]
            assert mine.scaling == pytest.approx(module.scaling["default"], rel=1e-12)
            assert_parity(mine.lora_A, module.lora_A["default"].weight, f"EVA's A of {name}")
            assert torch.equal(mine.lora_B, torch.zeros_like(mine.lora_B))
            mine.lora_B.copy_(module.lora_B["default"].weight.normal_())  # as if trained
    ids = batches[0]["input_ids"]
    theirs.eval()
    with torch.no_grad():
        reference = theirs(input_ids=ids).logits
        assert_parity(model(ids).logits, reference, "outputs")
    lp.save_peft_adapter(model, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    loaded = lp.load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs")
    # into a model injected with the user's options, not calibrated: it takes the file's ranks
    into_pending = lp.load_peft_adapter(lp.inject(copy.deepcopy(base), user), tmp_path / "theirs")
    assert state.require_info(into_pending).config.rank_pattern == config.rank_pattern
    with torch.no_grad():
        assert_parity(back(input_ids=ids).logits, reference, "peft loading our adapter")
        assert_parity(loaded(ids).logits, reference, "lightning_peft loading peft's adapter")
        assert_parity(into_pending(ids).logits, reference, "peft's adapter loaded into an uncalibrated EVA adapter")
        assert_parity(lp.merge(model)(ids).logits, theirs.merge_and_unload()(input_ids=ids).logits, "merged")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_redistributed_adapter_saves_loads_and_trains_only_its_new_tensors(tmp_path: Path) -> None:
    """The record carries the new shapes: an adapter file loads into a bare model and into one injected with
    the user's options (not calibrated), which takes the record's shapes; a refused load leaves that one as it
    was. Gradients reach exactly the resized A and B, and the unwrapped layer holds none."""
    base, batches = tiny.build("llama"), _lm_batches(4)
    options = {"r": 2, "alpha": 8, "target_modules": ["o_proj", "down_proj"], "init": "eva", "eva_config": {"tau": 0.9}}
    model = lp.inject(copy.deepcopy(base), "lora", **options)
    old = {name: p for name, p in model.named_parameters() if p.requires_grad}
    lp.calibrate(model, batches, _forward(model))
    new = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(new) == 6 and not {id(p) for p in new.values()} & {id(p) for p in old.values()}
    assert "model.layers.1.mlp.down_proj.lora_A" in old and "model.layers.1.mlp.down_proj.lora_A" not in new
    with torch.no_grad():
        for layer in dict(state.adapter_modules(model)).values():
            layer.lora_B.normal_()
    model.train()
    model(**batches[1]).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in new)
    model.zero_grad()
    ids = batches[2]["input_ids"]
    with torch.no_grad():
        want = model.eval()(ids).logits
    lp.save_adapter(model, tmp_path / "eva")
    bare = lp.load_adapter(copy.deepcopy(base), tmp_path / "eva")
    pending = lp.inject(copy.deepcopy(base), "lora", **options)
    shapes = {n: p.shape for n, p in pending.named_parameters() if p.requires_grad}
    broken = tmp_path / "broken"
    lp.save_adapter(model, broken)
    tensors = lp.core.files.load_tensors(broken / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.o_proj.lora_B"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    lp.core.files.save_tensors(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="non-finite values"):
        lp.load_adapter(pending, broken)
    assert {n: p.shape for n, p in pending.named_parameters() if p.requires_grad} == shapes  # as it was
    assert state.require_info(pending).config.rank_pattern == {}
    assert isinstance(pending.model.layers[1].mlp.down_proj, LoRALinear)
    lp.load_adapter(pending, tmp_path / "eva")
    for loaded in (bare, pending):
        assert state.require_info(loaded).config == state.require_info(model).config
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, want)
    calls: list[Any] = []
    lp.calibrate(pending, batches, calls.append)  # loaded: nothing to calibrate
    assert not calls


def test_a_failed_resize_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while the layers change (here forced at the third layer) puts back every tensor, scale,
    module and the record; the model then calibrates as if nothing had happened."""
    from lightning_peft.methods import lora_eva_ranks

    base, batches = tiny.build("llama"), _lm_batches(4)
    options = {"r": 2, "alpha": 8, "target_modules": ["o_proj", "down_proj"], "init": "eva", "eva_config": {"tau": 0.9}}
    model = lp.inject(copy.deepcopy(base), "lora", **options)
    info = state.require_info(model)
    config, modules = info.config, list(info.modules)
    tree = [(n, id(m)) for n, m in model.named_modules()]
    tensors = {n: (id(t), t.clone()) for n, t in model.state_dict(keep_vars=True).items()}
    layers = {n: (m.r, m.scaling, m.shared_inputs) for n, m in state.adapter_modules(model)}
    change, calls = lora_eva_ranks._change, []

    def failing(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("out of memory (forced)")
        change(*args)

    monkeypatch.setattr(lora_eva_ranks, "_change", failing)
    with pytest.raises(RuntimeError, match="forced"):
        lp.calibrate(model, batches, _forward(model))
    assert [(n, id(m)) for n, m in model.named_modules()] == tree
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys() and all(
        id(now[n]) == i and torch.equal(now[n], t) for n, (i, t) in tensors.items()
    )
    assert {n: (m.r, m.scaling, m.shared_inputs) for n, m in state.adapter_modules(model)} == layers
    assert info.config is config and info.modules == modules
    assert all(m.__dict__["eva_pending"] for _, m in state.adapter_modules(model))
    monkeypatch.setattr(lora_eva_ranks, "_change", change)
    lp.calibrate(model, batches, _forward(model))
    assert state.require_info(model).config.rank_pattern


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
