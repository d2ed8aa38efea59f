"""Top-k: the selection follows the score formulas, only selected entries change, checkpoints hold only them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods.topk import SparseDelta, TopKConfig
from tests import tiny


def _batches(arch: str, n: int = 3) -> list[dict[str, torch.Tensor]]:
    batches = [tiny.inputs(arch, batch=4, seed=10 + i) for i in range(n)]
    key = "decoder_input_ids" if tiny.FAMILIES[arch] == "seq2seq" else "input_ids"
    return [b | {"labels": b[key]} for b in batches]


def _loss_fn(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    return lambda batch: model(**batch).loss


def _calibrated(arch: str = "llama", **options: object) -> nn.Module:
    model = lp.inject(tiny.build(arch), "topk", **({"fraction": 0.1, "calibration_batches": 3} | options))
    lp.calibrate(model, _batches(arch), _loss_fn(model))
    return model


@pytest.mark.parametrize("score", ["fisher", "gradient"])
def test_selection_follows_the_score_formula(score: str) -> None:
    """fisher: sum_b g_b^2, gradient: sum_b |g_b|, over the batches; each tensor keeps its top ceil(f * numel)."""
    base = tiny.build("llama")
    reference = copy.deepcopy(base)
    weights = {n: p for n, p in reference.named_parameters() if n.endswith("proj.weight")}  # all-linear targets
    for p in weights.values():
        p.requires_grad_(True)
    scores = {n: torch.zeros_like(p) for n, p in weights.items()}
    for batch in _batches("llama"):
        grads = torch.autograd.grad(reference(**batch).loss, list(weights.values()))
        for name, g in zip(weights, grads, strict=True):
            scores[name] += g**2 if score == "fisher" else g.abs()

    model = lp.inject(copy.deepcopy(base), "topk", fraction=0.1, score=score, calibration_batches=3)
    lp.calibrate(model, _batches("llama"), _loss_fn(model))
    layers = dict(state.adapter_modules(model))
    assert set(layers) == {n.rsplit(".", 1)[0] for n in weights}
    for name, s in scores.items():
        layer = layers[name.rsplit(".", 1)[0]]
        k = math.ceil(0.1 * s.numel())
        chosen = layer.indices["weight"]
        assert chosen.numel() == k and bool(layer.selected)
        assert torch.equal(chosen, chosen.sort().values)
        # Every chosen entry scores at least as high as every entry left out.
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[chosen] = True
        assert s.reshape(-1)[mask].min() >= s.reshape(-1)[~mask].max(), name
        assert set(chosen.tolist()) == set(s.reshape(-1).topk(k).indices.tolist())


def test_only_the_selected_entries_change() -> None:
    base = tiny.build("llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = lp.inject(copy.deepcopy(base), "topk", fraction=0.05, calibration_batches=2)
    lp.calibrate(model, _batches("llama"), _loss_fn(model))
    selected = {
        f"{name}.base_layer.{param}": layer.indices[param].clone()
        for name, layer in state.adapter_modules(model)
        for param in layer.values
    }
    # AdamW with weight decay: a dense mask on gradients would still let decay move other entries.
    optimizer = torch.optim.AdamW([p for _, p in state.adapter_parameters(model)], lr=1e-2, weight_decay=0.1)
    model.train()
    for step, batch in enumerate(_batches("llama", 3), start=1):
        model(**batch).loss.backward()
        optimizer.step()
        lp.on_step(model, step)
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in selected:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), f"frozen {name} changed in place"
    merged = {n: p.detach() for n, p in lp.unload(lp.merge(model)).named_parameters()}
    for name in before:
        changed = (merged[name] != before[name]).reshape(-1).nonzero().flatten()
        key = next((k for k in selected if k.replace(".base_layer", "") == name), None)
        if key is None:
            assert changed.numel() == 0, f"{name} was not a target but changed"
        else:
            assert set(changed.tolist()) == set(selected[key].tolist()), f"{name}: changed entries != selected ones"


def test_checkpoints_hold_only_the_selected_entries(tmp_path: Path) -> None:
    model = _calibrated(fraction=0.05)
    sd = lp.trainable_state_dict(model)
    shapes = {n: p.shape for n, p in tiny.build("llama").named_parameters()}
    for key, tensor in sd.items():
        module, kind, param = key.rsplit(".", 2)
        if kind in ("values", "indices"):
            full = shapes[f"{module}.{param}"].numel()
            assert tensor.numel() == math.ceil(0.05 * full) < full, key
        else:
            assert key.endswith(".selected") and tensor.dim() == 0, key
    lp.save_adapter(model, tmp_path / "adapter")
    loaded = lp.load_adapter(tiny.build("llama"), tmp_path / "adapter")
    for (name, a), (_, b) in zip(state.adapter_state(model), state.adapter_state(loaded), strict=True):
        assert torch.equal(a, b), name


def _never(*_: object) -> Iterator[object]:
    raise AssertionError("calibration drew batches although the selection was restored")
    yield


def test_a_restored_selection_is_kept() -> None:
    trained = _calibrated()
    fresh = lp.inject(tiny.build("llama"), "topk", fraction=0.1, calibration_batches=3)
    assert not any(bool(m.selected) for _, m in state.adapter_modules(fresh))
    fresh.load_state_dict(lp.trainable_state_dict(trained))
    lp.calibrate(fresh, _never(), _loss_fn(fresh))  # nothing to do: no batch is drawn
    assert all(bool(m.selected) for _, m in state.adapter_modules(fresh))


def test_training_before_calibration_is_refused() -> None:
    model = lp.inject(tiny.build("llama"), "topk")
    with pytest.raises(RuntimeError, match=r"topk trained before selecting its entries: call lightning_peft.calibrate"):
        lp.on_step(model, 1)
    with pytest.raises(ValueError, match=r"topk needs training batches to select the entries it trains, but got none"):
        lp.calibrate(model, [], _loss_fn(model))


def test_follows_the_formula() -> None:
    """W_eff[i] = W[i] + v[i] for selected i, W[i] elsewhere."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    layer = SparseDelta(copy.deepcopy(base), TopKConfig(fraction=0.25))
    chosen = [1, 7, 12, 18, 19]  # ceil(0.25 * 20) entries of the 4 x 5 weight
    layer.select("weight", torch.tensor(chosen))
    nn.init.normal_(layer.values["weight"])
    weight = base.weight.detach().clone().reshape(-1)
    weight[chosen] += layer.values["weight"].detach()
    x = torch.randn(3, 5)
    expected = x @ weight.reshape(4, 5).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.values["bias"].numel() == 1  # ceil(0.25 * 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fraction": 0}, r"TopKConfig.fraction must be a number in \(0, 1\]; got 0"),
        ({"fraction": 1.5}, r"TopKConfig.fraction must be a number in \(0, 1\]; got 1.5"),
        ({"fraction": True}, r"TopKConfig.fraction must be a number in \(0, 1\]; got True"),
        ({"score": "hessian"}, r"TopKConfig.score must be one of 'fisher', 'gradient'; got 'hessian'"),
        ({"calibration_batches": 0}, r"TopKConfig.calibration_batches must be a positive integer; got 0"),
    ],
)
def test_invalid_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopKConfig(**options)
