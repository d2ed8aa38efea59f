"""Many adapters on one base model: list, switch, disable, mixed batches, hotswap.

``lightning_peft.inject(model, method, adapter_name=...)`` adds a named adapter; a model holds
several, of one or several methods, and one copy of the base weights serves them all::

    lp.inject(model, "lora", adapter_name="topic", r=8)
    lp.inject(model, "lora", adapter_name="spam", r=8)   # the one added last is active
    lp.set_adapter(model, "topic")                       # switch (several names: their updates add up)
    with lp.disable_adapter(model):                      # the bare base model, exactly
        reference = model(**batch).logits
    with lp.mixed_batch(model, ["topic", "spam", "__base__"]):  # one adapter per sample, one forward
        logits = model(**batch).logits

Only the active adapters train; the others are frozen. In a mixed batch every adapter layer
gathers the rows of its own samples, computes its update on them and adds it back (one gather and
one scatter per layer and adapter, no loop over samples), so each sample gets what it alone would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn

from lightning_peft import registry
from lightning_peft.api import io
from lightning_peft.api.inject import BASE, activate
from lightning_peft.core import state
from lightning_peft.core.targeting import find_base_model

M = TypeVar("M", bound=nn.Module)


def adapters(model: nn.Module) -> dict[str, state.PEFTInfo]:
    """The adapters of ``model`` by name, in the order they were added: each record's ``method``,
    ``config`` (resolved options) and base fingerprint. :func:`active_adapters` says which are on."""
    return state.adapters(model)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (those the forward uses and training updates)."""
    state.require_info(model)
    return state.active_adapters(model)


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = [f"{n} ({m.adapter_name!r})" for n, m in state.adapter_modules(model) if m.merged]
    if merged:
        raise ValueError(
            f"cannot {what} while adapters are merged ({', '.join(merged[:3])}); "
            "call lightning_peft.unmerge(model) first."
        )


def set_adapter(model: M, adapter_name: str | Sequence[str]) -> M:
    """Make ``adapter_name`` (one name, or several whose updates then add up, as in peft) the active
    adapter(s): on in the forward and trainable; every other adapter off and frozen.

    Raises:
        ValueError: for a name the model does not hold (listing the ones it does), an empty or
            repeated list, merged adapters, or several adapters that each keep a trained copy of
            the same module (``modules_to_save``), of which only one can answer.
    """
    state.require_info(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"set_adapter takes one adapter name or a list of distinct names; got {adapter_name!r}.")
    for name in names:
        state.adapter_of(model, name)
    _refuse_merged(model, "switch adapters")
    saved: dict[str, list[str]] = {}
    for path, module in state.adapter_modules(model):
        if module.method == "modules_to_save" and module.adapter_name in names:
            saved.setdefault(state.site_name(model, path), []).append(module.adapter_name)
    shared = {site: held for site, held in saved.items() if len(held) > 1}
    if shared:
        site, held = next(iter(shared.items()))
        raise ValueError(
            f"adapters {', '.join(map(repr, held))} each keep a trained copy of {site!r} (modules_to_save), and only "
            "one copy can answer; activate one of them at a time."
        )
    activate(model, names)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the bare base model inside the block (every adapter off), e.g. for a
    reference model's logits (DPO, KL penalties) or a base-vs-adapter evaluation; the adapters are
    switched back on exit, also when the block raises.

    Raises:
        ValueError: for a model without adapters, or with merged ones (their update is in the weights).
    """
    state.require_info(model)
    _refuse_merged(model, "disable the adapters")
    modules = [m for _, m in state.adapter_modules(model)]
    before = [m.enabled for m in modules]
    try:
        for module in modules:
            module.set_enabled(False)
        yield
    finally:
        for module, enabled in zip(modules, before, strict=True):
            module.set_enabled(enabled)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Inside the block, sample ``i`` of each batch runs through adapter ``adapter_names[i]``
    (``"__base__"``: the bare base model), whatever the active adapters are, in one forward.

    Works with ``generate()`` (one name per sequence: repeat names for ``num_return_sequences`` or
    beams). LoRA (rsLoRA too), (IA)^3, bottleneck adapters and saved modules of one output shape
    take part; a batch of another size than ``len(adapter_names)`` is refused at its first layer.

    Raises:
        ValueError: for unknown names (listing those the model holds), merged adapters, an adapter
            whose layers cannot serve single rows (DoRA, AdaLoRA, selective and input-side methods).
    """
    state.require_info(model)
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names) or not adapter_names:
        raise ValueError(
            f"mixed_batch takes one adapter name per sample (a non-empty list of strings); got {adapter_names!r}."
        )
    names = list(adapter_names)
    table = state.adapters(model)
    for name in dict.fromkeys(names):
        if name != BASE and name not in table:
            raise state.unknown_adapter(model, name)
    _refuse_merged(model, "run a mixed batch")
    modules = [m for _, m in state.adapter_modules(model)]
    used = set(names)
    refusing = sorted(
        {
            f"{m.adapter_name!r} ({table[m.adapter_name].method}, {type(m).__name__})"
            for m in modules
            if m.adapter_name in used and not m.supports_mixed_batch
        }
    )
    if refusing:
        raise ValueError(
            f"adapter {refusing[0]} cannot serve single rows of a batch; mixed_batch runs lora (not DoRA), ia3 and "
            "bottleneck adapters. Serve it in a batch of its own with set_adapter."
        )
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    rows = {
        name: torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=device)
        for name in table
    }
    before = [(m.enabled, m.rows, m.batch_size) for m in modules]
    try:
        for module in modules:
            module.set_enabled(True)
            module.rows, module.batch_size = rows[module.adapter_name], len(names)
        yield
    finally:
        for module, (enabled, old_rows, size) in zip(modules, before, strict=True):
            module.rows, module.batch_size = old_rows, size
            module.set_enabled(enabled)


def hotswap_adapter(model: M, path: io.PathLike, adapter_name: str = state.DEFAULT_ADAPTER) -> M:
    """Replace adapter ``adapter_name``'s weights in place with those saved at ``path``.

    No module is added or replaced (tensors are copied into the existing ones), so a compiled
    model keeps its graph. The saved adapter must be of the same method, options (rank, targets,
    scale) and base model; anything else is refused before a tensor changes.

    Raises:
        ValueError: for an unknown adapter name, another method or options, another base model,
            missing or extra tensors, other shapes or non-finite values.
    """
    info = state.adapter_of(model, adapter_name)
    record, tensors = io.read_adapter(path)
    where = str(path)
    try:
        registry.get(record["method"])
    except ValueError as error:
        raise ValueError(f"{where} holds an adapter of a method this lightning_peft does not have: {error}") from error
    state.check_record(info, record, where)
    keys = io.site_keys(model, adapter_name, training_state=False)
    base_path, _ = find_base_model(model)
    stored = io.rebase(tensors, record["base_path"], base_path)
    extra = sorted(set(stored) - set(keys))
    if extra:
        raise ValueError(f"{where} holds tensors adapter {adapter_name!r} does not have: {', '.join(extra[:5])}.")
    state.check_tensors({key: tensor.shape for key, (_, tensor) in keys.items()}, stored, where)
    with torch.no_grad():
        for key, (_, tensor) in keys.items():
            tensor.copy_(stored[key].to(tensor))
    return model


__all__ = [
    "active_adapters",
    "adapters",
    "disable_adapter",
    "hotswap_adapter",
    "mixed_batch",
    "set_adapter",
]
