"""Top-k: identify the important parameters from a few batches, then train only those entries.

Importance-based sparse fine-tuning in the manner of FISH masks (Sung et al., 2021, "Training
Neural Networks with Fixed Sparse Masks"). Before training, over ``calibration_batches`` batches
with gradients ``g_b = dL_b/dW`` of every targeted weight ``W``::

    fisher     score(w) = sum_b g_b(w)^2      (empirical Fisher information, from batch gradients)
    gradient   score(w) = sum_b |g_b(w)|

Each targeted tensor keeps its ``ceil(fraction * numel)`` highest-scoring entries ``S``, fixed for
the rest of training, and only those change::

    W_eff[i] = W[i] + v[i]  for i in S,     W_eff[i] = W[i]  otherwise,     v = 0 at init

The budget is per tensor (FISH ranks globally) so that every shape is known at injection and a
checkpoint, which stores just the positions and values of ``S``, loads without resizing. The
selection runs in :func:`lightning_peft.core.training.calibrate` (PEFTCallback calls it at train
start, on the training dataloader); a model restored from a checkpoint keeps its selection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.config import LayerConfig, check_choice, check_positive_int, invalid
from lightning_peft.core.delta import DeltaLayer
from lightning_peft.core.inject import inject_layers
from lightning_peft.core.targeting import ALL_LINEAR
from lightning_peft.registry import Method, register


@dataclass(kw_only=True)
class TopKConfig(LayerConfig):
    """Top-k options.

    Args:
        fraction: share of each targeted tensor's entries that trains, in (0, 1].
        score: ``"fisher"`` (squared gradients) or ``"gradient"`` (gradient magnitude).
        calibration_batches: training batches scored before training.
        target_modules: modules whose parameters are candidates, matched as in
            :class:`~lightning_peft.core.config.LayerConfig`; ``None`` means ``"all-linear"``.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    fraction: float = 0.01
    score: Literal["fisher", "gradient"] = "fisher"
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise invalid(self, "fraction", fraction, "a number in (0, 1]")
        check_choice(self, "score", self.score, ("fisher", "gradient"))
        check_positive_int(self, "calibration_batches", self.calibration_batches)


class SparseDelta(DeltaLayer):
    """Trains chosen entries of every parameter of the wrapped module; ``selected`` says they were chosen."""

    adapter_names = (*DeltaLayer.adapter_names, "selected")
    method = "topk"

    def __init__(self, base_layer: nn.Module, config: TopKConfig) -> None:
        own = dict(base_layer.named_parameters(recurse=False))
        if not own:
            raise TypeError(f"it is a {type(base_layer).__name__}, which holds no parameters of its own to train")
        super().__init__(base_layer, sparse={n: max(1, math.ceil(config.fraction * p.numel())) for n, p in own.items()})
        device = next(iter(own.values())).device
        self.register_buffer("selected", torch.tensor(False, device=device))


def resolve(model: nn.Module, config: TopKConfig) -> TopKConfig:
    return config if config.target_modules is not None else config.replace(target_modules=ALL_LINEAR)


def _layers(model: nn.Module) -> list[SparseDelta]:
    return [m for _, m in state.adapter_modules(model) if isinstance(m, SparseDelta)]


def calibrate(model: nn.Module, config: TopKConfig, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
    """Score every candidate entry over a few batches and select each tensor's top entries.

    Does nothing when every layer was already selected (a model restored from a checkpoint or an
    adapter file). Under ``torch.distributed`` the scores are summed over ranks, so every rank
    selects the same entries.
    """
    layers = _layers(model)
    if all(bool(layer.selected) for layer in layers):
        return
    targets = [(layer, name, p) for layer in layers for name, p in layer.base_layer.named_parameters(recurse=False)]
    params = [p for _, _, p in targets]
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)  # only while scoring; autograd.grad leaves every .grad untouched
    seen = 0
    try:
        for batch in itertools.islice(batches, config.calibration_batches):
            grads = torch.autograd.grad(loss_fn(batch), params, allow_unused=True)
            for score, grad in zip(scores, grads, strict=True):
                if grad is not None:
                    score.add_(grad.float().square() if config.score == "fisher" else grad.float().abs())
            seen += 1
    finally:
        for p, trainable in zip(params, was_trainable, strict=True):
            p.requires_grad_(trainable)
    if seen == 0:
        raise ValueError("topk needs training batches to select the entries it trains, but got none.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for score in scores:
            torch.distributed.all_reduce(score)
    for (layer, name, _), score in zip(targets, scores, strict=True):
        chosen = score.reshape(-1).topk(layer.values[name].numel()).indices
        layer.select(name, chosen.sort().values)
    for layer in layers:
        layer.selected.fill_(True)


def on_step(model: nn.Module, config: TopKConfig, step: int, total_steps: int | None) -> None:
    """Refuse to go on training entries that were never selected (calibrate was not called)."""
    if step <= 1 and not all(bool(layer.selected) for layer in _layers(model)):
        raise RuntimeError(
            "topk trained before selecting its entries: call lightning_peft.calibrate(model, batches, loss_fn) "
            "before the first step (PEFTCallback does this at train start)."
        )


register(
    Method(
        name="topk",
        config_cls=TopKConfig,
        kind="layer",
        apply=partial(inject_layers, wrap=SparseDelta),
        resolve=resolve,
        on_step=on_step,
        calibrate=calibrate,
        # Calibration scores whole gradients, of which FSDP2 holds only shards.
        sharding=SparseDelta.shardings - {"fsdp2"},
        summary="the top fraction of each targeted weight's entries by Fisher information or gradient magnitude "
        "over a few batches trains; checkpoints hold only those entries; mergeable",
        paper="Sung et al. 2021, Training Neural Networks with Fixed Sparse Masks",
    )
)
