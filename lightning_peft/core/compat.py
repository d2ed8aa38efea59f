"""The one place where lightning_peft adapts to APIs that differ across the dependency versions it supports.

Each difference is settled here, by asking the installed library once, and the rest of the package
calls these functions instead of looking at versions or signatures itself. A module whose API fits
none of the known forms gets ``None`` (or a clear error from the caller), never a silent guess.

transformers' attention cache
    Models take the key/value cache as ``cache=`` from transformers 5.24 on (``past_key_values=`` is
    deprecated there, still accepted through ``**kwargs`` and renamed by a decorator inside
    ``forward``) and as ``past_key_values=`` before. Model outputs and ``generate()``'s model inputs
    use the same name as the forward's parameter.

transformers' gradient checkpointing
    transformers 5 calls it activation checkpointing (``activation_checkpointing_enable(
    activation_checkpointing_kwargs=...)``; the old ``gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=...)`` warns until v6); earlier versions have only the old name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

#: The names a transformers forward takes its attention cache by, newest first.
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values")
#: The name that transformers 5.24+ still accepts (and renames) for backward compatibility.
DEPRECATED_CACHE_ARGUMENT = "past_key_values"


@functools.cache
def _cache_argument_of(cls: type) -> str | None:
    parameters = inspect.signature(cls.forward).parameters  # follows the deprecation decorator's __wrapped__
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def cache_argument(module: nn.Module) -> str | None:
    """The keyword ``module.forward`` takes the attention cache by (``None`` when it takes none).

    Inspected once per class: ``"cache"`` on transformers 5.24 and later, ``"past_key_values"`` before.
    """
    return _cache_argument_of(type(module))


def take_cache(kwargs: dict[str, Any], name: str) -> Any:
    """The cache in a forward's keyword arguments, which then hold it under ``name`` only.

    A caller on transformers 5.24+ may still pass the deprecated ``past_key_values=``; the model's
    forward would rename it, but a pre-hook that runs before that must see it, so it is moved here.
    Both names at once are left alone for transformers to refuse.
    """
    old = DEPRECATED_CACHE_ARGUMENT
    if name != old and old in kwargs and name not in kwargs:
        kwargs[name] = kwargs.pop(old)
    return kwargs.get(name)


def output_cache(output: Any, name: str) -> Any:
    """The cache a model output returns (its field is named like the forward's parameter)."""
    return output.get(name) if isinstance(output, Mapping) else None


def checkpointing_switches(model: nn.Module) -> tuple[Any, Any, str] | None:
    """``(enable, disable, kwargs name)`` of a transformers model's gradient checkpointing, by the
    newest name it has; ``None`` when it has neither (or says it does not support it)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return None
    for prefix in ("activation", "gradient"):
        enable, disable = (getattr(model, f"{prefix}_checkpointing_{verb}", None) for verb in ("enable", "disable"))
        if callable(enable) and callable(disable):
            return enable, disable, f"{prefix}_checkpointing_kwargs"
    return None
