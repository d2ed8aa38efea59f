"""Gradient checkpointing for an adapted model: recompute activations in backward.

Each block's activations are dropped after the forward and recomputed when its backward runs,
trading about one extra forward for activation memory that no longer grows with the number of
blocks. transformers models have their own switch (their decoder/encoder layers are the blocks);
for any other model the caller names the blocks, and each one's ``forward`` is wrapped in
``torch.utils.checkpoint.checkpoint``.

With PEFT the base weights are frozen, and so usually are the input embeddings: then the hidden
states entering the first checkpointed block do not require grad, and reentrant checkpointing
(``use_reentrant=True``) would run that block's backward for nothing, leaving every adapter inside
it without a gradient. For transformers models a forward hook on the input embeddings makes their
output require grad; it is added whether or not the embeddings are frozen yet (``inject`` may freeze
them later), and costs nothing when not needed. Blocks named by the caller do the same for their own
floating-point inputs when none requires grad.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_peft.core.compat import checkpointing_switches
from lightning_peft.core.quantize import enable_input_require_grads
from lightning_peft.core.targeting import find_base_model

#: Set on a block whose ``forward`` this module wrapped (the instance attribute ``forward`` is ours).
_WRAPPED = "_lightning_peft_checkpointed"


def enable_gradient_checkpointing(
    model: nn.Module,
    *,
    use_reentrant: bool = False,
    blocks: Sequence[str | type[nn.Module]] | None = None,
) -> nn.Module:
    """Turn on gradient checkpointing in ``model``, in place.

    Args:
        model: a transformers ``PreTrainedModel``, or a module holding one (a LightningModule), with or
            without an adapter injected; or, with ``blocks``, any ``nn.Module``.
        use_reentrant: ``torch.utils.checkpoint``'s implementation: ``False`` (the recommended one,
            the default) or ``True`` (the older one, which needs inputs that require grad: the input
            embeddings' output, or a named block's inputs, are made to require grad when frozen).
        blocks: the modules to checkpoint, instead of transformers' layers: module names as
            ``model.named_modules()`` spells them (a ``ModuleList`` or ``Sequential`` stands for each
            of its children: ``["layers"]``), or module classes (every outermost module of that class).
            With ``use_reentrant=True`` a block's keyword arguments get no gradient.

    Returns:
        ``model``. Checkpointing acts in training mode, with grad enabled, only.

    Raises:
        TypeError: when ``blocks`` is not given and ``model`` holds no transformers model that supports
            gradient checkpointing, or an entry of ``blocks`` is neither a name nor a module class.
        ValueError: when ``use_reentrant`` is not a bool, or an entry of ``blocks`` matches no module.
    """
    if not isinstance(use_reentrant, bool):
        raise ValueError(f"enable_gradient_checkpointing: use_reentrant must be True or False; got {use_reentrant!r}.")
    if blocks is not None:
        for block in _resolve_blocks(model, blocks):
            _wrap(block, use_reentrant)
        return model
    _, base = find_base_model(model)
    switches = checkpointing_switches(base)
    if switches is None:
        raise TypeError(
            f"enable_gradient_checkpointing: {type(base).__name__} is not a transformers model that supports "
            "gradient checkpointing (it has no gradient_checkpointing_enable, or supports_gradient_checkpointing "
            "is False); name the modules to checkpoint with blocks=[...] (e.g. blocks=['layers'])."
        )
    enable, _, kwargs_name = switches
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})
    # Our own hook: transformers adds one only for some models and versions (input_ids models on 5.x, peft
    # models before), and whether the embeddings are frozen may change after this call (inject freezes them).
    enable_input_require_grads(model)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (the input-grad hook stays; it is harmless)."""
    for module in model.modules():
        if getattr(module, _WRAPPED, False):
            _unwrap(module)
    _, base = find_base_model(model)
    switches = checkpointing_switches(base)
    if switches is not None:
        switches[1]()
    return model


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules whose forward :func:`enable_gradient_checkpointing` wrapped (``blocks=``)."""
    return [name for name, module in model.named_modules() if getattr(module, _WRAPPED, False)]


def _resolve_blocks(model: nn.Module, blocks: Sequence[str | type[nn.Module]]) -> list[nn.Module]:
    if isinstance(blocks, (str, type)) or not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(
            "enable_gradient_checkpointing: blocks must be a non-empty list of module names or module classes; "
            f"got {blocks!r}."
        )
    named = dict(model.named_modules())
    found: list[nn.Module] = []
    for entry in blocks:
        if isinstance(entry, str):
            if entry not in named or entry == "":
                close = [n for n in named if n and (entry in n or n.rsplit(".", 1)[-1] == entry.rsplit(".", 1)[-1])]
                raise ValueError(
                    f"enable_gradient_checkpointing: blocks entry {entry!r} names no module of "
                    f"{type(model).__name__}" + (f"; did you mean one of {close[:5]}?" if close else ".")
                )
            module = named[entry]
            found.extend(module.children() if isinstance(module, (nn.ModuleList, nn.Sequential)) else [module])
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            matches = _outermost(model, entry)
            if not matches:
                raise ValueError(
                    f"enable_gradient_checkpointing: blocks entry {entry.__name__} matches no module of "
                    f"{type(model).__name__}."
                )
            found.extend(matches)
        else:
            raise TypeError(
                "enable_gradient_checkpointing: each blocks entry must be a module name (str) or an nn.Module "
                f"subclass; got {entry!r}."
            )
    unique = list({id(m): m for m in found}.values())
    if not unique:
        raise ValueError(f"enable_gradient_checkpointing: blocks {list(blocks)!r} hold no module to checkpoint.")
    return unique


def _outermost(model: nn.Module, cls: type[nn.Module]) -> list[nn.Module]:
    """Modules of class ``cls`` not inside another one (checkpointing a block inside a checkpointed one is waste)."""
    matches: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, cls):
                matches.append(child)
            else:
                visit(child)

    visit(model)
    return matches


def _wrap(block: nn.Module, use_reentrant: bool) -> None:
    if not getattr(block, _WRAPPED, False):
        # A forward someone set on the instance (rare) is kept and called; else the class's.
        block._lightning_peft_forward = block.__dict__.get("forward")  # type: ignore[assignment]
        # A bound method, not a closure: deepcopy rebinds it to the copy.
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
    block._lightning_peft_reentrant = use_reentrant  # type: ignore[assignment]
    setattr(block, _WRAPPED, True)


def _unwrap(block: nn.Module) -> None:
    original = block.__dict__.pop("_lightning_peft_forward", None)
    del block.forward
    if original is not None:
        block.forward = original  # type: ignore[method-assign]
    for name in (_WRAPPED, "_lightning_peft_reentrant"):
        block.__dict__.pop(name, None)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = self.__dict__.get("_lightning_peft_forward") or type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    if not self.__dict__.get("_lightning_peft_reentrant", False):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        # A tensor without grad has no graph to cut: give it one, so the block's backward runs.
        args = tuple(_require_grad(a) for a in args)
    return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=True)


def _require_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value
