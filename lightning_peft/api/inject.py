"""Adding a method to a model, and taking it back out: inject, merge, unmerge, unload, summary.

A layer method's ``apply`` wraps the modules it selects (see :mod:`lightning_peft.core.wrapping`);
an input-side method's ``apply`` attaches its module and hooks. Either way the model is only
changed once every check has passed, and a failure takes out whatever was added.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, TypeVar

from torch import nn

import lightning_peft.methods  # noqa: F401  (registers the built-in methods this floor looks up)
from lightning_peft import registry
from lightning_peft.core import state, targeting
from lightning_peft.core.config import AdapterConfig
from lightning_peft.core.layer import AdapterLayer, AdapterModule, TrainableModule
from lightning_peft.core.wrapping import replace_modules

M = TypeVar("M", bound=nn.Module)


def resolve(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """A copy of ``config`` with every architecture-dependent default filled in for ``model``.

    This is the config that ``inject`` applies and records; the argument is never changed.
    """
    config = registry.for_config(config).resolve(model, config)
    if config.modules_to_save is None:
        config = config.replace(modules_to_save=targeting.default_modules_to_save(model))
    return config


def listed_module_options(config: AdapterConfig) -> list[tuple[str, list[str]]]:
    """The options of ``config`` that hold a list of module names, as ``(field, names)``.

    Recognized by peft's naming, which every method follows: ``modules_to_save`` and any field
    ending in ``_modules`` (``target_modules``, ``exclude_modules``, (IA)^3's ``feedforward_modules``).
    """
    found: list[tuple[str, list[str]]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (f.name == "modules_to_save" or f.name.endswith("_modules")) and isinstance(value, (list, tuple)):
            found.append((f.name, list(value)))
    return found


def _default_names(model: nn.Module, config: AdapterConfig, field: str) -> list[str]:
    """What the method would put in ``field`` for ``model`` itself (``[]`` where it has no default)."""
    try:
        value = getattr(resolve(model, config.replace(**{field: None})), field)
    except (ValueError, TypeError):  # no default for this architecture, or one the other options exclude
        return []
    return list(value) if isinstance(value, (list, tuple)) else []


def check_listed_modules(model: nn.Module, config: AdapterConfig) -> None:
    """Every entry of every list of module names in ``config`` must match a module of ``model``.

    Entries the method's own default for ``model`` holds are exempt: a default may name a module
    under each of its transformers spellings (ViT's ``query`` and ``q_proj``), and a recorded
    config, defaults filled in, must load where it was trained.

    Raises:
        ValueError: naming the option, the entry and the closest module names (see
            :func:`lightning_peft.core.targeting.check_listed`).
    """
    for field, names in listed_module_options(config):
        exempt = _default_names(model, config, field)
        targeting.check_listed(model, names, field=field, owner=type(config).__name__, exempt=exempt)


def _check_fresh(model: nn.Module) -> None:
    info = state.get_info(model)
    existing = [n for n, _ in state.adapter_modules(model)]
    if info is not None or existing:
        what = f"{info.method!r}" if info else f"adapter modules ({', '.join(existing[:3])})"
        raise ValueError(
            f"{type(model).__name__} already has {what} injected; a model takes one adapter. "
            "Call lightning_peft.unload(model) first, or inject into a fresh copy of the base model."
        )


def inject(model: M, method: str | AdapterConfig = "lora", /, **options: Any) -> M:
    """Add a PEFT method to ``model`` in place, freeze everything else, and return ``model``.

    Args:
        model: any ``nn.Module``; for transformers models the method's per-architecture defaults
            apply. A LightningModule works too (its inner transformers model is found).
        method: a registered method name (see :func:`lightning_peft.methods`) or a config object.
        **options: the method's options when ``method`` is a name (``r=8, alpha=16``).

    Raises:
        ValueError: for an unknown method, invalid options, a listed target, exclusion or module to
            save that matches no module (with the closest names), targets that match nothing, or a
            model that already has an adapter.
        TypeError: when a target is a module type the method cannot wrap.
    """
    entry, config = registry.to_config(method, options)
    _check_fresh(model)
    # The lists as given (not the defaults resolve() fills in), before anything is changed.
    check_listed_modules(model, config)
    config = resolve(model, config)
    to_save = (
        targeting.select(model, config.modules_to_save, None, field="modules_to_save", owner=type(config).__name__)
        if config.modules_to_save
        else []
    )
    # Heads first: a wrapped head's inside is never a target of the method itself.
    replace_modules(model, to_save, lambda _, module: TrainableModule(module))
    try:
        added = entry.apply(model, config)
    except Exception:
        _remove_adapters(model, merge=False)
        raise
    base_path, _ = targeting.find_base_model(model)
    state.attach(model, state.PEFTInfo(entry.name, config, base_path, state.fingerprint(model), [*to_save, *added]))
    state.freeze(model)
    trainable, _ = state.count_parameters(model)
    if trainable == 0:
        unload(model, merge=False)
        raise ValueError(
            f"{entry.name} with {config} left no trainable parameter in {type(model).__name__}; "
            "widen target_modules or the method's options."
        )
    return model


def _check_mergeable(model: nn.Module) -> list[AdapterModule]:
    modules = [m for _, m in state.adapter_modules(model)]
    if not modules:
        state.require_info(model)
        raise ValueError(f"{type(model).__name__} has no adapter modules to merge.")
    for module in modules:
        if not module.mergeable:
            module.merge()  # raises the module's own explanation
    return modules


def merge(model: M) -> M:
    """Fold every adapter into its base weights in place (zero extra latency at inference).

    Raises:
        TypeError: for methods with nothing to merge (prompt and prefix tuning).
    """
    for module in _check_mergeable(model):
        module.merge()
    return model


def unmerge(model: M) -> M:
    """Undo :func:`merge`: base weights back as they were (to float rounding), adapters active."""
    for module in _check_mergeable(model):
        module.unmerge()
    return model


def _remove_adapters(model: nn.Module, *, merge: bool) -> None:
    for name, module in list(state.adapter_modules(model)):
        if isinstance(module, AdapterLayer):
            if merge:
                module.merge()
            replace_modules(model, [name], lambda _, m: m.unwrap())  # type: ignore[attr-defined]
        else:
            module.on_unload()
            parent_name, _, attr = name.rpartition(".")
            delattr(model.get_submodule(parent_name) if parent_name else model, attr)


def unload(model: M, *, merge: bool = True) -> M:
    """Remove the adapter and return the plain base model (``merge=True`` keeps what it learned).

    Heads in ``modules_to_save`` keep their trained weights. Parameters stay frozen.
    """
    state.require_info(model)
    if merge:
        _check_mergeable(model)
    _remove_adapters(model, merge=merge)
    state.detach(model)
    return model


def summary_dict(model: nn.Module) -> dict[str, Any]:
    """Trainable vs total parameters and a per-module breakdown, as plain JSON types."""
    info = state.require_info(model)
    trainable, total = state.count_parameters(model)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, module in state.adapter_modules(model):
        key = f"{name.rsplit('.', 1)[-1]} ({type(module).__name__})"
        groups[key][0] += 1
        groups[key][1] += sum(p.numel() for _, p in module.adapter_parameters())
    return {
        "method": info.method,
        "config": info.config.to_dict(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "modules": {k: {"count": c, "trainable_params": n} for k, (c, n) in sorted(groups.items())},
    }


def summary(model: nn.Module) -> str:
    """A printable table of what the adapter trains (used by PEFTCallback at setup)."""
    data = summary_dict(model)
    rows = [(k, f"{v['count']}", f"{v['trainable_params']:,}") for k, v in data["modules"].items()]
    width = max([len("module"), *(len(r[0]) for r in rows)])
    lines = [
        f"lightning_peft: {data['method']} | trainable params: {data['trainable_params']:,} || "
        f"total params: {data['total_params']:,} || trainable%: {data['trainable_percent']:.4f}",
        f"  {'module'.ljust(width)}  {'count':>5}  {'trainable':>12}",
        *(f"  {a.ljust(width)}  {b:>5}  {c:>12}" for a, b, c in rows),
    ]
    return "\n".join(lines)
