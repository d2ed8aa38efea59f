"""LoftQ for a whole model: every ``init="loftq"`` LoRA layer from the model's full-precision weights.

The per-layer alternation is :meth:`lightning_peft.methods.lora.LoRALinear.loftq_init` (and
:func:`lightning_peft.core.quantize.loftq_decompose`); this module finds each layer's weight by
name in a state dict or a safetensors file, every key before any layer changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_peft.methods.lora import LoRALinear


def _weight_key(weights: Mapping[str, Tensor], name: str) -> str:
    """The key of layer ``name``'s weight: ``name + ".weight"``, or without leading parts (a wrapper's prefix)."""
    parts = name.replace(".base_layer", "").split(".")
    keys = [".".join(parts[i:]) + ".weight" for i in range(len(parts))]
    for key in keys:
        if key in weights:
            return key
    raise KeyError(f"loftq: no full-precision weight for the LoRA layer {name!r} (looked for {keys[0]!r})")


def loftq(model: nn.Module, weights: Mapping[str, Tensor] | str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """LoftQ initialization (Li et al., 2023) of every ``init="loftq"`` LoRA layer in ``model``.

    ``model`` is quantized and then injected: ``lp.inject(lp.quantize(model, "nf4"), "lora",
    init="loftq", loftq_iter=T)``. Quantizing dropped the full-precision weights ``W``, so they come
    from ``weights`` (the float model's ``state_dict()``, or a safetensors file read one tensor at a
    time, as peft's ``replace_lora_weights_loftq`` does), by the layer's module name. For each layer
    the base's 4-bit weight is replaced by ``Q_T`` and ``(A, B)`` are set so that::

        deq(Q_T) + s B A  ~  W,    Q_t = quantize(W - s B_{t-1} A_{t-1}),  s B_t A_t = SVD_r(W - deq(Q_t))

    (details in :func:`lightning_peft.core.quantize.loftq_decompose`). Run it before training.

    Args:
        model: a model with LoRA injected with ``init="loftq"`` on bitsandbytes 4-bit layers.
        weights: a mapping from parameter names (``"model.layers.0.self_attn.q_proj.weight"``) to
            the full-precision weights, or the path of a ``.safetensors`` file holding them.

    Returns:
        ``{layer name: (error before, error after)}``, each ``||W - (deq(Q) + s B A)||_F / ||W||_F``.

    Raises:
        ValueError: no ``init="loftq"`` layer in ``model``, or a weight of the wrong shape.
        KeyError: a layer whose weight ``weights`` does not hold.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.init == "loftq"]
    if not layers:
        raise ValueError(
            "loftq: the model has no LoRA layer injected with init='loftq'; inject with "
            "lightning_peft.inject(lightning_peft.quantize(model, 'nf4'), 'lora', init='loftq') first"
        )
    if isinstance(weights, (str, os.PathLike)):
        from safetensors import safe_open

        with safe_open(os.fspath(weights), framework="pt") as handle:
            return _loftq_layers(layers, _Lazy(handle, set(handle.keys())))
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"loftq: weights must be a mapping of tensors or a .safetensors path; got {type(weights).__name__}"
        )
    return _loftq_layers(layers, weights)


def _loftq_layers(
    layers: list[tuple[str, LoRALinear]], weights: Mapping[str, Tensor]
) -> dict[str, tuple[float, float]]:
    keys = {n: _weight_key(weights, n) for n, _ in layers}  # every key found before any layer changes
    return {n: m.loftq_init(weights[keys[n]]) for n, m in layers}


class _Lazy(Mapping[str, Tensor]):
    """A safetensors handle as a read-on-access mapping."""

    def __init__(self, handle: Any, names: set[str]) -> None:
        self.handle, self.names = handle, names

    def __getitem__(self, key: str) -> Tensor:
        return self.handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
