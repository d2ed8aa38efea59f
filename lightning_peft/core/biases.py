"""Base-model biases an adapter trains beside its own tensors (peft's ``bias="lora_only"|"all"``).

Biases are found by module, never by a parameter name: a bias is a module's own ``bias``
parameter (``module._parameters["bias"]``). ``"adapted"`` takes that of each layer an adapter wraps
(the base layer at the end of its chain of wrappers), ``"all"`` that of every module of the base
model. An adapter module's own tensors are its declaration's, so the inside of a wrapper counts
only through its base layer, and a module kept as a trained copy (``modules_to_save``) keeps the
biases of both its copies to itself: the copy's train with it, the original stays as it was (as
in peft). :func:`lightning_peft.core.state.trained_biases` declares what these return, so they
train, count, checkpoint and load as adapter tensors; merging leaves them in place (they are the
base layers' own biases, which the merged weights use as they are).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from lightning_peft.core.layer import AdapterLayer, AdapterModule
from lightning_peft.core.targeting import is_model_module


def own_bias(module: nn.Module) -> nn.Parameter | None:
    """``module``'s own ``bias`` parameter (not a submodule's), or ``None``."""
    bias = module._parameters.get("bias")
    return bias if isinstance(bias, nn.Parameter) else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def base_biases(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """(name from ``prefix``, bias) for every base-model module's own bias under ``module``."""
    if isinstance(module, AdapterModule):
        if isinstance(module, AdapterLayer) and module.method != "modules_to_save":
            yield from base_biases(module.base_layer, _join(prefix, "base_layer"))
        return
    bias = own_bias(module)
    if bias is not None:
        yield _join(prefix, "bias"), bias
    for name, child in module.named_children():
        if is_model_module(child):  # never a metric's or a loss's
            yield from base_biases(child, _join(prefix, name))


def layer_biases(layers: Iterable[tuple[str, AdapterLayer]]) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, bias) of the own bias of the base layer each wrapper ``(name, layer)`` adapts."""
    for prefix, layer in layers:
        if layer.method == "modules_to_save":
            continue
        name, module = _join(prefix, "base_layer"), layer.base_layer
        while isinstance(module, AdapterLayer):
            name, module = f"{name}.base_layer", module.base_layer
        bias = own_bias(module)
        if bias is not None:
            yield f"{name}.bias", bias
