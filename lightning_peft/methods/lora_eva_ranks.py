"""EVA's redistributed ranks applied to the adapter: layers resized or unwrapped, and the new record.

When EVA's rank redistribution (``rho > 1``, see :mod:`lightning_peft.methods.lora_eva`) gives
layer ``i`` a rank ``k_i`` other than its ``r_i``, peft 0.21.2 (``_load_eva_state_dict``) changes
the adapter after the SVD, and so does this module::

    k_i = 0:      the layer holds no adapter any more: it is replaced by its base layer
    k_i != r_i:   new A (k_i x in) = EVA's top k_i components, new B (out x k_i) = 0, and
                  alpha_i' = alpha_i k_i / r_i with ``adjust_scaling_factors`` (else alpha_i),
                  scale s_i = alpha_i' / k_i (rsLoRA: alpha_i' / sqrt(k_i))
    k_i == r_i:   the layer keeps its tensors and scale (A is set in place)

so ``adjust_scaling_factors`` keeps a plain layer's scale ``alpha_i / r_i`` whatever its new rank.
The result is recorded as peft records it: a new config (the user's object is never changed) with
``rank_pattern = {layer: k_i}`` where ``k_i`` differs from ``r``, ``alpha_pattern = {layer:
alpha_i'}`` where ``alpha_i'`` differs from ``alpha``, and, when a layer was unwrapped,
``target_modules`` = the layers left (names inside the transformers model). That config is the
adapter's record from then on (checkpoints, :func:`lightning_peft.save_adapter`, the peft export),
so loading one injects these shapes, never the user's ``r``. A record of such an adapter loaded into
a model whose EVA adapter of the user's config has not been calibrated yet (a resumed fit, or
``lp.load_adapter`` after ``lp.inject``) first reshapes that adapter to the record (:func:`adopt`).

All or nothing: every new tensor and the new config are built before anything changes, and each
change is logged so that a failure part-way puts back the old tensors, scales and modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.config import AdapterConfig
from lightning_peft.core.targeting import find_base_model, name_matches, relative_name
from lightning_peft.methods.lora import LoRAConfig, LoRALinear

#: The config fields a redistribution changes; a record differing in others is not adopted.
CHANGED_FIELDS = frozenset({"rank_pattern", "alpha_pattern", "target_modules"})


@dataclass
class Change:
    """One layer's new shape: rank 0 unwraps it; ``rows`` are A's new rows (None: zeros, a load fills them)."""

    path: str  # full name in the model EVA ran on
    name: str  # name inside the transformers model (peft's, what rank_pattern keys hold)
    layer: LoRALinear
    rank: int
    alpha: float
    scaling: float
    rows: Tensor | None


class Undo:
    """A log of changes, put back in reverse order by :meth:`__call__`."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        old = getattr(obj, attr)
        setattr(obj, attr, value)
        self.steps.append(lambda: setattr(obj, attr, old))

    def __call__(self) -> None:
        while self.steps:
            self.steps.pop()()


def new_config(config: LoRAConfig, changes: list[Change], kept: list[str]) -> LoRAConfig:
    """The adapter's config after ``changes``, as peft records it (see the module doc).

    Args:
        config: the adapter's config before.
        changes: every EVA layer's rank and alpha.
        kept: the names (inside the transformers model) of every layer of the adapter left wrapped.
    """
    rank_pattern = {c.name: c.rank for c in changes if c.rank and c.rank != config.r}
    alpha_pattern = {c.name: c.alpha for c in changes if c.rank and c.alpha != config.alpha}
    dropped = any(c.rank == 0 for c in changes)
    return config.replace(
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=list(kept) if dropped else config.target_modules,
    )


def scale(config: LoRAConfig, rank: int, alpha: float) -> float:
    """LoRA's scale for a layer of rank ``rank`` and ``alpha`` (rsLoRA: alpha / sqrt(rank))."""
    return alpha / (math.sqrt(rank) if config.rslora else rank)


def _places(root: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    places = []
    for name, m in root.named_modules(remove_duplicate=False):
        if m is module and name:
            parent, _, attr = name.rpartition(".")
            places.append((root.get_submodule(parent) if parent else root, attr))
    return places


def apply(model: nn.Module, info: state.PEFTInfo, changes: list[Change], config: LoRAConfig) -> Undo:
    """Resize or unwrap the layers of ``changes`` and record ``config``; returns the log to undo it all.

    Raises:
        TypeError: for a layer that is merged or not a plain LoRA linear layer (DoRA), before any change.
    """
    tensors: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for c in changes:
        layer = c.layer
        if layer.merged:
            raise TypeError(f"LoRA layer {c.path!r} is merged: unmerge it before EVA sets its rank")
        resized = c.rank not in (0, layer.r)
        if resized and type(layer) is not LoRALinear:
            raise TypeError(
                f"LoRAConfig.init='eva': EVA's rank redistribution gives {c.path!r} rank {c.rank} instead of "
                f"{layer.r}, and resizing a {type(layer).__name__} is not implemented; use eva_config={{'rho': 1.0}}"
            )
        if resized:
            old_a, old_b = layer.lora_A, layer.lora_B
            dtype, device = old_a.dtype, old_a.device
            a = torch.zeros(c.rank, old_a.shape[1], dtype=dtype, device=device)
            if c.rows is not None:  # copied: contiguous, as a loaded A is (a resumed run computes the same)
                a.copy_(c.rows)
            b = torch.zeros(old_b.shape[0], c.rank, dtype=dtype, device=device)
            tensors[c.path] = (
                nn.Parameter(a, requires_grad=old_a.requires_grad),
                nn.Parameter(b, requires_grad=old_b.requires_grad),
            )
    undo = Undo()
    try:
        for c in changes:
            _change(model, undo, c, tensors.get(c.path))
        undo.set(info, "modules", [n for n in info.modules if n not in {c.path for c in changes if c.rank == 0}])
        if config is not info.config:
            undo.set(info, "injected", info.injected or info.config)
            undo.set(info, "config", config)
    except BaseException:
        undo()
        raise
    return undo


def _change(model: nn.Module, undo: Undo, c: Change, tensors: tuple[nn.Parameter, nn.Parameter] | None) -> None:
    """One layer's change, logged in ``undo``."""
    layer = c.layer
    if c.rank == 0:  # as peft: the base layer takes the wrapper's place, so no update, no tensor, no record
        undo.set(layer, "shared_inputs", None)  # its group's other layers project without it
        for parent, attr in _places(model, layer):
            undo.set(parent, attr, layer.base_layer)
        return
    if c.scaling != layer.scaling:
        undo.set(layer, "scaling", c.scaling)
    if tensors is not None:
        undo.set(layer, "lora_A", tensors[0])
        undo.set(layer, "lora_B", tensors[1])
        undo.set(layer, "r", c.rank)
    elif c.rows is not None:  # same rank: A in place (the optimizer may hold these tensors)
        with torch.no_grad():
            before = layer.lora_A.detach().clone()
            layer.lora_A.copy_(c.rows.to(layer.lora_A))
            layer.lora_B.zero_()
        undo.steps.append(lambda: _put(layer.lora_A, before))


def _put(tensor: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(value)


def eva_layers(model: nn.Module, adapter: str) -> list[tuple[str, LoRALinear]]:
    """(full name, layer) of every LoRA linear layer of ``adapter`` in ``model``."""
    return [(n, m) for n, m in state.adapter_modules(model, adapter) if isinstance(m, LoRALinear)]


def adopt(model: nn.Module, info: state.PEFTInfo, recorded: AdapterConfig) -> Callable[[], None] | None:
    """Reshape ``info``'s uncalibrated EVA adapter to a record of it calibrated; returns the undo.

    ``None`` (nothing changed) unless ``info`` is a LoRA ``init="eva"`` adapter whose layers all wait
    for calibration and ``recorded`` differs from its config in what a redistribution changes only
    (``rank_pattern``, ``alpha_pattern``, ``target_modules``). Each layer then takes the record's
    rank and scale (A and B zero, for the load to fill) or, where the record targets it no more, is
    unwrapped, as calibration would have done.
    """
    config = info.config
    if info.method != "lora" or not isinstance(config, LoRAConfig) or not isinstance(recorded, LoRAConfig):
        return None
    diff = config.diff(recorded)
    layers = eva_layers(model, info.name)
    if (
        config.init != "eva"
        or not diff
        or not set(diff) <= CHANGED_FIELDS
        or not layers
        or not all(m.__dict__.get("eva_pending") for _, m in layers)
    ):
        return None
    base_path = find_base_model(model)[0]
    changes = []
    for path, layer in layers:
        name = relative_name(path, base_path)
        targets = recorded.target_modules
        kept = targets is None or name_matches(path, targets)
        own = recorded.for_layer(name)
        rank = own.r if kept else 0
        changes.append(Change(path, name, layer, rank, own.alpha, own.scaling, None))
    moved = [c for c in changes if c.rank == 0 or c.rank != c.layer.r or c.scaling != c.layer.scaling]
    return apply(model, info, moved, recorded)


state.ADOPTERS.append(adopt)
