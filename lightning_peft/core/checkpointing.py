"""Gradient checkpointing for an adapted transformers model: recompute activations in backward.

Each decoder/encoder layer's activations are dropped after the forward and recomputed when its
backward runs, trading about one extra forward for activation memory that no longer grows with the
number of layers. With PEFT the base weights are frozen, and so usually are the input embeddings:
then the hidden states entering the first checkpointed layer do not require grad, and reentrant
checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) would run that layer's backward
for nothing, leaving every adapter inside it without a gradient. A forward hook on the input
embeddings makes their output require grad, which fixes that; it is added whether or not the
embeddings are frozen yet (``inject`` may freeze them later), and costs nothing when not needed.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.core.compat import checkpointing_switches
from lightning_peft.core.quantize import enable_input_require_grads
from lightning_peft.core.targeting import find_base_model


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> nn.Module:
    """Turn on gradient checkpointing in the transformers model inside ``model``, in place.

    Args:
        model: a transformers ``PreTrainedModel``, or a module holding one (a LightningModule), with or
            without an adapter injected.
        use_reentrant: ``torch.utils.checkpoint``'s implementation: ``False`` (the recommended one,
            the default) or ``True`` (the older one, which needs inputs that require grad: the input
            embeddings' output is made to require grad, for frozen embeddings).

    Returns:
        ``model``. Checkpointing acts in training mode only, as transformers applies it.

    Raises:
        TypeError: when ``model`` holds no transformers model that supports gradient checkpointing.
        ValueError: when ``use_reentrant`` is not a bool.
    """
    if not isinstance(use_reentrant, bool):
        raise ValueError(f"enable_gradient_checkpointing: use_reentrant must be True or False; got {use_reentrant!r}.")
    _, base = find_base_model(model)
    switches = checkpointing_switches(base)
    if switches is None:
        raise TypeError(
            f"enable_gradient_checkpointing: {type(base).__name__} is not a transformers model that supports "
            "gradient checkpointing (it has no gradient_checkpointing_enable, or supports_gradient_checkpointing "
            "is False); wrap its blocks in torch.utils.checkpoint.checkpoint yourself."
        )
    enable, _, kwargs_name = switches
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})
    # Our own hook: transformers adds one only for some models and versions (input_ids models on 5.x, peft
    # models before), and whether the embeddings are frozen may change after this call (inject freezes them).
    enable_input_require_grads(model)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (the input-grad hook stays; it is harmless)."""
    _, base = find_base_model(model)
    switches = checkpointing_switches(base)
    if switches is not None:
        switches[1]()
    return model
