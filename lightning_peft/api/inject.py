"""Adding a method to a model, and taking it back out: inject, merge, unmerge, unload, summary.

A layer method's ``apply`` wraps the modules it selects (see :mod:`lightning_peft.core.wrapping`);
an input-side method's ``apply`` attaches its module and hooks. Either way the model is only
changed once every check has passed, and a failure takes out whatever was added.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

import lightning_peft.methods  # noqa: F401  (registers the built-in methods this floor looks up)
from lightning_peft import registry
from lightning_peft.core import state, targeting
from lightning_peft.core.config import AdapterConfig
from lightning_peft.core.layer import AdapterLayer, AdapterModule, TrainableModule
from lightning_peft.core.quantize import WeightMergingLayer
from lightning_peft.core.wrapping import replace_modules

M = TypeVar("M", bound=nn.Module)
#: The name ``mixed_batch`` reads as "no adapter: the bare base model" (peft's too).
BASE = "__base__"


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


def check_adapter_name(name: Any, field: str = "adapter_name") -> str:
    """``name`` if it can name an adapter: a non-empty string that is not :data:`BASE` and holds no
    character a module path or a folder would split (``.``, ``/``, ``\\``).

    Raises:
        ValueError: naming ``field`` (``PEFTCallback.adapter_name``, ``--adapters``), the value and the rule.
    """
    if not isinstance(name, str) or not name or name == BASE or any(c in name for c in "./\\"):
        raise ValueError(
            f"{field} must be a non-empty string without '.', '/' or '\\', other than {BASE!r} (which "
            f"mixed_batch reads as the bare base model); got {name!r}."
        )
    return name


def _check_name(model: nn.Module, name: Any, entry: registry.Method) -> None:
    """Refuse an adapter name that is malformed or taken, and a second input-side adapter."""
    check_adapter_name(name)
    table = state.adapters(model)
    existing = [n for n, _ in state.adapter_modules(model)]
    if not table and existing:
        raise ValueError(
            f"{type(model).__name__} already has adapter modules ({', '.join(existing[:3])}) that inject did not add; "
            "call lightning_peft.unload(model) first, or inject into a fresh copy of the base model."
        )
    if name in table:
        raise ValueError(
            f"{type(model).__name__} already has an adapter named {name!r} ({table[name].method}); pass another "
            f"adapter_name, or call lightning_peft.delete_adapter(model, {name!r}) first."
        )
    merged = [n for n, m in state.adapter_modules(model) if m.merged]
    if merged:
        raise ValueError(
            f"{type(model).__name__} has merged adapter layers ({', '.join(merged[:3])}); call "
            "lightning_peft.unmerge(model) before adding another adapter."
        )
    if entry.kind == "input":
        inputs = [n for n, info in table.items() if registry.get(info.method).kind == "input"]
        if inputs:
            raise ValueError(
                f"{type(model).__name__} already has the input-side adapter {inputs[0]!r} "
                f"({table[inputs[0]].method}), and a model takes one input-side adapter (they all edit the same "
                f"inputs); add {entry.name} to a fresh copy of the base model, or delete {inputs[0]!r} first. "
                "Layer adapters (lora, ia3, ...) can be added beside it."
            )


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters: their modules on and trainable, all others off and frozen."""
    for _, module in state.adapter_modules(model):
        module.set_enabled(module.adapter_name in names)
    state.set_active(model, names)
    state.freeze(model)


def inject(
    model: M, method: str | AdapterConfig = "lora", /, *, adapter_name: str = state.DEFAULT_ADAPTER, **options: Any
) -> M:
    """Add a PEFT method to ``model`` in place as adapter ``adapter_name``, freeze the rest, return ``model``.

    A model holds several named adapters (of the same or different methods, on the same or other
    targets); the one added last is the active one, the one that trains, until
    :func:`lightning_peft.set_adapter` says otherwise.

    Args:
        model: any ``nn.Module``; for transformers models the method's per-architecture defaults
            apply. A LightningModule works too (its inner transformers model is found).
        method: a registered method name (see :func:`lightning_peft.methods`) or a config object.
        adapter_name: the adapter's name (``"default"``, peft's default, unless given).
        **options: the method's options when ``method`` is a name (``r=8, alpha=16``).

    Raises:
        ValueError: for an unknown method, invalid options, a listed target, exclusion or module to
            save that matches no module (with the closest names), targets that match nothing, an
            adapter name that is malformed or taken, a second input-side adapter, or merged layers.
        TypeError: when a target is a module type the method cannot wrap, or cannot share a layer
            with the adapter already there.
    """
    entry, config = registry.to_config(method, options)
    _check_name(model, adapter_name, entry)
    # The lists as given (not the defaults resolve() fills in), before anything is changed.
    check_listed_modules(model, config)
    config = resolve(model, config)
    to_save = (
        targeting.select(model, config.modules_to_save, None, field="modules_to_save", owner=type(config).__name__)
        if config.modules_to_save
        else []
    )
    before = {id(m) for _, m in state.adapter_modules(model)}
    previous = state.active_adapters(model)

    def added_modules() -> list[AdapterModule]:
        return [m for _, m in state.adapter_modules(model) if id(m) not in before]

    # Heads first: a wrapped head's inside is never a target of the method itself.
    replace_modules(model, to_save, lambda _, module: TrainableModule(module))
    try:
        added = entry.apply(model, config)
    except Exception:
        _remove(model, added_modules(), merge=False)
        raise
    for module in added_modules():
        module.adapter_name = adapter_name
    base_path, _ = targeting.find_base_model(model)
    modules = [*to_save, *added]
    fingerprint = state.fingerprint(model)
    state.attach(model, state.PEFTInfo(entry.name, config, base_path, fingerprint, modules, name=adapter_name))
    activate(model, [adapter_name])
    trainable, _ = state.count_parameters(model)
    if trainable == 0:
        remove_added(model, [adapter_name], previous)
        raise ValueError(
            f"{entry.name} with {config} left no trainable parameter in {type(model).__name__}; "
            "widen target_modules or the method's options."
        )
    return model


def _check_mergeable(model: nn.Module) -> list[AdapterModule]:
    """The active adapters' modules, once each is known to be mergeable."""
    active = state.active_adapters(model)
    modules = [m for _, m in state.adapter_modules(model) if not state.adapters(model) or m.adapter_name in active]
    if not modules:
        state.require_info(model)
        raise ValueError(f"{type(model).__name__} has no adapter modules to merge.")
    for module in modules:
        if not module.mergeable:
            module.merge()  # raises the module's own explanation
    _refuse_tied(model, modules)
    return modules


def _refuse_tied(model: nn.Module, modules: list[AdapterModule]) -> None:
    """Refuse to merge into a weight another module also holds (tied input and output embeddings):
    the update belongs to the adapted layer only, and merging it would change the other one too."""
    holders: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)].append(name)
    names = {id(m): n for n, m in model.named_modules()}
    for module in modules:
        if not isinstance(module, WeightMergingLayer):
            continue
        weight = getattr(module.base, "weight", None)
        base_names = {n for n, m in model.named_modules(remove_duplicate=False) if m is module.base}
        others = [n for n in holders.get(id(weight), []) if n not in base_names]
        if others:
            raise ValueError(
                f"cannot merge the {module.method} adapter of {names.get(id(module), type(module).__name__)!r}: its "
                f"base weight is tied to {others[0]!r} (one tensor for both), so merging would change {others[0]!r} "
                "too. Keep the adapter unmerged, or untie the weights first (e.g. give the output layer its own copy: "
                "model.config.tie_word_embeddings=False and clone the weight), then merge."
            )


def merge(model: M) -> M:
    """Fold the active adapters into their base weights in place (zero extra latency at inference).

    Raises:
        TypeError: for methods with nothing to merge (prompt and prefix tuning).
    """
    for module in _check_mergeable(model):
        module.merge()
    return model


def unmerge(model: M) -> M:
    """Undo :func:`merge`: base weights back as they were (to float rounding), adapters active."""
    modules = [m for _, m in state.adapter_modules(model) if m.merged]
    if not modules:
        _check_mergeable(model)
    for module in modules:
        module.unmerge()
    return model


def merge_requantized(model: nn.Module) -> dict[str, float]:
    """Fold the active LoRA adapters on bitsandbytes layers into them: dequantize, add the update, quantize again.

    Never a silent precision loss: returns, per layer (by its place in the base model), the
    second quantization's error relative to the update, ``||deq(Q') - (deq(Q) + s B A)|| / ||s B A||``,
    and warns when a layer lost more than the update itself (an error above 1). A requantized merge
    cannot be undone; ``lightning_peft.dequantize(model)`` before ``merge`` keeps float weights instead.

    Raises:
        ValueError: when no active adapter wraps a bitsandbytes layer.
        TypeError: for an active adapter on a bitsandbytes layer that cannot be merged so (not LoRA, or DoRA).
    """
    from lightning_peft.core.quantize import is_quantized

    active = state.active_adapters(model)
    layers = [
        (name, m)
        for name, m in state.adapter_modules(model)
        if isinstance(m, AdapterLayer) and m.adapter_name in active and is_quantized(m.base)
    ]
    if not layers:
        state.require_info(model)
        raise ValueError(
            f"no active adapter of {type(model).__name__} wraps a bitsandbytes layer; lightning_peft.merge merges "
            "adapters on float layers."
        )
    refusing = [f"{name} ({type(m).__name__})" for name, m in layers if not getattr(m, "requantizable", False)]
    if refusing:
        raise TypeError(
            f"merge_requantized folds LoRA updates (not DoRA, not other methods) into quantized layers; these "
            f"cannot be: {', '.join(refusing[:3])}. Call lightning_peft.dequantize(model), then lightning_peft.merge."
        )
    errors = {state.site_name(model, name): m.merge_requantized() for name, m in layers}  # type: ignore[attr-defined]
    worst = max(errors, key=errors.__getitem__)
    if errors[worst] > 1.0:
        warnings.warn(
            f"requantizing lost more than the update itself on {sum(e > 1.0 for e in errors.values())} of "
            f"{len(errors)} layers (worst: {worst}, {errors[worst]:.2f}x the update's norm); the merged model is "
            "further from the adapted one than the base was. Keep the adapter unmerged, or dequantize first.",
            UserWarning,
            stacklevel=2,
        )
    return errors


def _swap(root: nn.Module, module: nn.Module, replacement: nn.Module | None) -> None:
    """Put ``replacement`` wherever ``module`` sits in ``root`` (every path to it), or delete it there."""
    places = [name for name, m in root.named_modules(remove_duplicate=False) if m is module and name]
    for name in places:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if replacement is None:
            delattr(parent, attr)
        else:
            setattr(parent, attr, replacement)


def _remove(model: nn.Module, modules: Sequence[AdapterModule], *, merge: bool) -> None:
    """Take adapter ``modules`` out of ``model`` (a wrapper's place goes to what it wraps)."""
    for module in modules:
        if isinstance(module, AdapterLayer):
            if merge and module.enabled:
                module.merge()
            _swap(model, module, module.unwrap())
        else:
            module.on_unload()
            _swap(model, module, None)


def remove_added(model: nn.Module, names: Sequence[str], active: Sequence[str]) -> None:
    """Take adapters ``names`` out again and make ``active`` the active ones (undoing a failed load)."""
    for name in names:
        _remove(model, [m for _, m in state.adapter_modules(model, name)], merge=False)
        state.detach(model, name)
    if state.adapters(model):
        activate(model, [n for n in active if n in state.adapters(model)])


def delete_adapter(model: M, adapter_name: str) -> M:
    """Remove adapter ``adapter_name`` from ``model``; the others, and the base, stay as they are.

    Raises:
        ValueError: for a name the model does not hold (listing those it does), an active adapter
            (switch to another with ``set_adapter`` first, or ``unload`` the last one), or a merged one.
    """
    info = state.adapter_of(model, adapter_name)
    if adapter_name in state.active_adapters(model):
        others = [n for n in state.adapters(model) if n != adapter_name]
        hint = (
            f"call lightning_peft.set_adapter(model, {others[0]!r}) first"
            if others
            else "it is the last one: call lightning_peft.unload(model, merge=False) to remove it"
        )
        raise ValueError(f"adapter {adapter_name!r} ({info.method}) is active; {hint}.")
    merged = [n for n, m in state.adapter_modules(model, adapter_name) if m.merged]
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into {merged[0]}; call lightning_peft.unmerge(model) first."
        )
    _remove(model, [m for _, m in state.adapter_modules(model, adapter_name)], merge=False)
    state.detach(model, adapter_name)
    state.freeze(model)
    return model


def unload(model: M, *, merge: bool = True) -> M:
    """Remove every adapter and return the plain base model (``merge=True`` keeps what the active ones learned).

    Heads in ``modules_to_save`` keep their trained weights when merged (else the heads as they
    were). Parameters stay frozen.
    """
    state.require_info(model)
    if merge:
        _check_mergeable(model)
    _remove(model, [m for _, m in state.adapter_modules(model)], merge=merge)
    state.detach(model)
    return model


def summary_dict(model: nn.Module) -> dict[str, Any]:
    """Trainable vs total parameters and a per-module breakdown, as plain JSON types."""
    info = state.require_info(model)
    trainable, total = state.count_parameters(model)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    several = len(state.adapters(model)) > 1
    for name, module in state.adapter_modules(model):
        key = f"{state.site_name(model, name).rsplit('.', 1)[-1]} ({type(module).__name__})"
        if several:  # whose module it is, and whether it trains now
            active = module.adapter_name in state.active_adapters(model)
            key += f" [{module.adapter_name}{'' if active else ', inactive'}]"
        groups[key][0] += 1
        groups[key][1] += sum(p.numel() for _, p in module.adapter_parameters())
    for _, bias in state.trained_biases(model):  # base biases an adapter trains (LoRA's bias option)
        groups["bias (base biases trained)"][0] += 1
        groups["bias (base biases trained)"][1] += bias.numel()
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
