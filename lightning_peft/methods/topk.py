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
selection runs in :func:`lightning_peft.api.training.calibrate` (PEFTCallback calls it at train
start, on the training dataloader); a model restored from a checkpoint keeps its selection.
"""

from __future__ import annotations

import contextlib
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
from lightning_peft.core.targeting import ALL_LINEAR
from lightning_peft.core.wrapping import inject_layers
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

    The gradients are taken with respect to the effective weights each layer builds in its
    forward (:meth:`DeltaLayer.record_effective`), where the weights are whole under every
    sharding, and with ``torch.autograd.grad``, which leaves every ``.grad`` untouched. Does
    nothing when every layer was already selected (a model restored from a checkpoint or an
    adapter file). Under ``torch.distributed`` the scores are summed over ranks, so every rank
    selects the same entries.
    """
    layers = _layers(model)
    if all(bool(layer.selected) for layer in layers):
        return
    scores: dict[tuple[int, str], Tensor] = {}
    seen = 0
    for batch in itertools.islice(batches, config.calibration_batches):
        recorded: list[tuple[DeltaLayer, str, Tensor]] = []
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.enter_context(layer.record_effective(recorded))
            loss = loss_fn(batch)
        used = [(layer, name, t) for layer, name, t in recorded if t.requires_grad]
        if not used:
            raise RuntimeError(
                "topk scores entries by the gradient of the loss, but the loss of a calibration batch does not "
                "depend on any selected weight with a gradient: are the topk parameters frozen, or is the loss "
                "computed under torch.no_grad()?"
            )
        grads = torch.autograd.grad(loss, [t for _, _, t in used], allow_unused=True)
        for (layer, name, _), grad in zip(used, grads, strict=True):
            if grad is None:
                continue
            score = grad.detach().float().square() if config.score == "fisher" else grad.detach().float().abs()
            key = (id(layer), name)
            scores[key] = scores[key].add_(score) if key in scores else score
        seen += 1
    if seen == 0:
        raise ValueError("topk needs training batches to select the entries it trains, but got none.")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for layer in layers:
        for name, shape in layer.shapes.items():
            chosen = layer.indices[name]
            score = scores.get((id(layer), name))
            if score is None:  # not reached on this rank: it adds nothing to the sum
                score = torch.zeros(shape, dtype=torch.float32, device=chosen.device)
            if distributed:
                torch.distributed.all_reduce(score)
            layer.select(name, score.reshape(-1).topk(chosen.numel()).indices.sort().values)
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
        sharding=SparseDelta.shardings,
        summary="the top fraction of each targeted weight's entries by Fisher information or gradient magnitude "
        "over a few batches trains; checkpoints hold only those entries; mergeable",
        paper="Sung et al. 2021, Training Neural Networks with Fixed Sparse Masks",
    )
)
