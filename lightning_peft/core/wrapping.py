"""Wrapping selected modules: the primitives layer methods build their ``apply`` and ``resolve`` from.

The generic loop is the same for every layer method: select modules, wrap each (once, even when
the module is shared under several names), swap the wrapper in, only once every wrapper is built.
``lightning_peft.api.inject`` (a floor above the methods) runs a method's ``apply`` on a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from lightning_peft.core import targeting
from lightning_peft.core.config import LayerConfig
from lightning_peft.core.layer import AdapterLayer

L = TypeVar("L", bound=LayerConfig)

#: Builds the wrapper for one selected module, or raises TypeError if the method cannot wrap it.
WrapFn = Callable[[nn.Module, Any], AdapterLayer]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def chain_end(module: AdapterLayer) -> AdapterLayer:
    """The last adapter wrapper in a chain of adapters that share one base layer (see ``core.layer``)."""
    while isinstance(module.base_layer, AdapterLayer):
        module = module.base_layer
    return module


def replace_modules(root: nn.Module, names: Sequence[str], build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace each named module by ``build(name, module)``, wrapping a shared module only once.

    A module that already holds another adapter's wrapper is not wrapped again from outside: the
    new wrapper goes around its base layer, at the end of the chain (``build`` gets the base layer).
    All wrappers are built before the first swap, so an error leaves the model untouched.

    Raises:
        TypeError: when the new wrapper and one already there cannot share a base layer.
    """
    built: dict[int, nn.Module] = {}
    plan: list[tuple[str, nn.Module]] = []
    inner: list[tuple[AdapterLayer, nn.Module]] = []
    for name in names:
        refuse_unused(root, name)
        module = root.get_submodule(name)
        if id(module) in built:
            plan.append((name, built[id(module)]))
            continue
        if isinstance(module, AdapterLayer):
            end = chain_end(module)
            new = build(name, end.base_layer).train(end.base_layer.training)
            links = [new, module, *(m for m in module.modules() if isinstance(m, AdapterLayer) and m is not module)]
            refusing = [type(m).__name__ for m in links if not m.stackable]
            if refusing:
                raise TypeError(
                    f"{name!r} already holds adapter {module.adapter_name!r} ({type(module).__name__}), and "
                    f"{' and '.join(dict.fromkeys(refusing))} cannot share a base layer with another adapter (it reads "
                    "the base weight itself); target other modules, or delete the other adapter first."
                )
            built[id(module)] = module
            inner.append((end, new))
            continue
        # New submodules start in training mode; match the mode of what they replace.
        built[id(module)] = build(name, module).train(module.training)
        plan.append((name, built[id(module)]))
    for end, new in inner:
        end.base_layer = new
    # Every other path to a shared module (tied embeddings, T5's `shared`) gets the same wrapper.
    aliases = [(n, m) for n, m in targeting.iter_named_modules(root) if n and id(m) in built and n not in names]
    for name, module in [*plan, *((n, built[id(m)]) for n, m in aliases)]:
        _set_module(root, name, module)
    return list(names)


def resolve_targets(model: nn.Module, config: L, *, defaults: Mapping[str, str | Sequence[str]], method: str) -> L:
    """``resolve`` for layer methods: fill ``target_modules`` from the architecture default of ``method``."""
    if config.target_modules is not None:
        return config
    return config.replace(target_modules=targeting.architecture_default(model, defaults, method=method))


def select_targets(model: nn.Module, config: LayerConfig) -> list[str]:
    """The full names of the modules ``config`` selects: ``target_modules`` minus ``exclude_modules``,
    in ``layers_to_transform`` only (see :func:`lightning_peft.core.targeting.select`)."""
    assert config.target_modules is not None, "resolve() fills target_modules before apply()"
    return targeting.select(
        model,
        config.target_modules,
        config.exclude_modules,
        owner=type(config).__name__,
        layers=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )


def check_biases(model: nn.Module, config: LayerConfig, names: Sequence[str]) -> None:
    """Refuse a ``bias_scope`` that would train no bias at all (a bias option silently doing nothing).

    Raises:
        ValueError: naming the option, the modules it looked at and what to do instead.
    """
    scope = config.bias_scope
    if scope == "none":
        return
    if scope == "adapted":
        found = any(_own_bias(_unwrapped(model.get_submodule(n))) for n in names)
        where = f"none of the {len(names)} adapted layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    else:
        found = any(_own_bias(m) for _, m in targeting.model_named_modules(model))
        where = f"no module of {type(model).__name__}"
    if not found:
        field = getattr(config, "bias", scope)
        raise ValueError(
            f"{type(config).__name__}.bias={field!r} would train no bias: {where} has a bias parameter. "
            "Use bias='none', or target layers that have biases."
        )


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdapterLayer) else module


def _own_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def refuse_unused(root: nn.Module, name: str) -> None:
    """Refuse a module whose forward its parent never calls: a wrapper there would change nothing.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself (``F.multi_head_attention_forward``)
    and never calls ``out_proj``; a layer method's wrapper there would train and save an adapter the
    outputs never see (peft wraps it all the same).

    Raises:
        TypeError: naming the module and what to target instead.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if leaf == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"{name!r} is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight itself and never calls "
            "out_proj's forward, so a wrapper there would change nothing; leave it out of target_modules "
            "(exclude_modules), and for LoRA target the MultiheadAttention module itself (its LoRA adapts in_proj "
            "and out_proj)"
        )


def inject_layers(model: nn.Module, config: LayerConfig, *, wrap: WrapFn) -> list[str]:
    """``apply`` for layer methods: wrap every module that ``config`` selects.

    Each module is wrapped with ``config.for_layer(name)``, its name inside the transformers model
    as peft spells it: the options for that layer (LoRA's ``rank_pattern``/``alpha_pattern``), a
    new config where they differ from ``config``.
    """
    names = select_targets(model, config)
    check_biases(model, config, names)
    base_path, _ = targeting.find_base_model(model)
    config.check_selected([targeting.relative_name(n, base_path) for n in names])

    def build(name: str, module: nn.Module) -> nn.Module:
        try:
            return wrap(module, config.for_layer(targeting.relative_name(name, base_path)))
        except TypeError as err:
            raise TypeError(f"{type(config).__name__}.target_modules selected {name!r}: {err}") from None

    return replace_modules(model, names, build)
