"""DoRA: weight-decomposed low-rank adaptation, the layers behind ``LoRAConfig(use_dora=True)``.

Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation". A frozen weight ``W`` (out x in)
is split into a magnitude and a direction; LoRA updates the direction, the magnitude is trained
directly::

    W' = m * (W + s B A) / ||W + s B A||,       h = W' x + b,       s = alpha / r (or alpha / sqrt r)

where the norm is taken per output feature (each row of nn.Linear's ``(out, in)`` weight; the
paper's "column-wise" norm, written for ``x W`` with ``W`` stored ``(in, out)``) and ``m`` starts as
``||W||``, so the model starts out unchanged. As the paper recommends (section 4.3), the norm is
treated as a constant in backpropagation. With dropout, the rescaled base term sees the dropped
input as the update does (peft's convention)::

    h = W x + b + (m / ||W + s B A|| - 1) W x' + (m / ||W + s B A||) s B A x',     x' = dropout(x)

Merging writes ``W'`` into the weight; unmerging inverts it with the norm cached at merge time.
On a bitsandbytes 4-bit or 8-bit base, ``W`` in the norm is the dequantized weight the layer computes
with, and merging is refused (see :mod:`lightning_peft.core.quantize`).
This file is not a method of its own: it is LoRA's ``use_dora`` option, and registers nothing.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.quantize import adapter_factory, dequantized_weight, is_quantized
from lightning_peft.core.targeting import is_linear
from lightning_peft.methods.lora import VARIANTS, LoRAConfig, LoRALinear


class DoRALinear(LoRALinear):
    """DoRA around ``nn.Linear`` or transformers' ``Conv1D``: LoRA's ``A``, ``B`` plus a magnitude."""

    adapter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude")  # type: ignore[assignment]
    stackable = False  # its norm reads the base weight, which another adapter on the layer would change
    supports_mixed_batch = False  # the norm is per adapter and per weight, not per row
    requantizable = False  # its merged weight is a rescaled direction, not W plus an update
    peft_names = {**LoRALinear.peft_names, "lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        weight: Tensor = base_layer.weight  # type: ignore[assignment]
        quantized = is_quantized(base_layer)
        if not (weight.is_floating_point() or quantized):
            raise TypeError(
                f"its weight is {weight.dtype}; lora with use_dora=True needs a floating-point or bitsandbytes "
                "quantized base weight to take its norm"
            )
        super().__init__(base_layer, config)
        factory = adapter_factory(base_layer) if quantized else self.adapter_factory(weight)
        self.lora_magnitude = nn.Parameter(torch.empty(self.lora_B.shape[0], **factory))
        # The norm that merge() divided by; unmerge() needs it and cannot recover it from the merged weight.
        self.register_buffer("_merged_norm", None, persistent=False)
        self._reset_magnitude()

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        if "lora_magnitude" in self._parameters:  # absent while LoRALinear.__init__ runs
            self._reset_magnitude()

    def _reset_magnitude(self) -> None:
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norm())

    def _base_weight(self) -> Tensor:
        """The base weight as ``(out, in)`` (a view of Conv1D's ``(in, out)`` storage; dequantized for bitsandbytes)."""
        if is_quantized(self.base_layer):
            return dequantized_weight(self.base_layer)
        weight: Tensor = self.base_layer.weight  # type: ignore[assignment]
        return weight.t() if self.fan_in_fan_out else weight

    def _lora_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def weight_norm(self) -> Tensor:
        """``||W + s B A||`` per output feature, as a constant (no gradient flows through it)."""
        with torch.no_grad():
            weight = self._base_weight()
            combined = weight + self._lora_weight().to(weight.dtype)
            return torch.linalg.vector_norm(combined, dim=1).to(self.lora_magnitude.dtype)  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        # The update reads the base weight: computed in a hook at the end of the base layer's own
        # forward, where a strategy that shards it (FSDP1, ZeRO-3) still has it whole.
        hook = self.base_owner(["weight"]).register_forward_hook(
            lambda module, args, result: self._add_update_to(x, result), prepend=True
        )
        try:
            return self.base_layer(x)
        finally:
            hook.remove()

    def _add_update_to(self, x: Tensor, result: Tensor) -> Tensor:
        """``result = W x + b`` plus DoRA's update, ``(m / ||W + s B A|| - 1) W x' + m / ||W + s B A|| s B A x'``."""
        lora_A = self.lora_A
        dropped = self.dropout(x)
        if dropped.dtype != lora_A.dtype:
            dropped = dropped.to(lora_A.dtype)
        scale = self.lora_magnitude / self.weight_norm()  # (out,)
        update = F.linear(F.linear(dropped, lora_A), self.lora_B) * self.scaling  # (..., out)
        if self.training and isinstance(self.dropout, nn.Dropout):
            base = F.linear(dropped, self._base_weight().to(dropped.dtype))  # W x'
        else:
            bias = self.bias
            base = result if bias is None else result - bias  # W x, without a second matmul
        return result + ((scale - 1) * base + scale * update).to(result.dtype)

    def _merge(self) -> None:
        weight = self._base_weight()
        combined = weight + self._lora_weight().to(weight.dtype)
        norm = torch.linalg.vector_norm(combined, dim=1)
        self._merged_norm = norm
        weight.copy_((self.lora_magnitude.to(weight.dtype) / norm)[:, None] * combined)

    def _unmerge(self) -> None:
        weight = self._base_weight()
        scale = (self.lora_magnitude.to(weight.dtype) / self._merged_norm)[:, None]
        weight.copy_(weight / scale - self._lora_weight().to(weight.dtype))
        self._merged_norm = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"


def wrap(module: nn.Module, config: LoRAConfig) -> DoRALinear:
    """The DoRA wrapper for one selected module (``LoRAConfig.use_dora=True``)."""
    if is_linear(module):
        return DoRALinear(module, config)
    raise TypeError(
        f"it is a {type(module).__name__}, which lora with use_dora=True cannot wrap; DoRA wraps nn.Linear "
        "and transformers' Conv1D (without use_dora, lora also wraps nn.Embedding and nn.Conv2d)"
    )


VARIANTS["use_dora"] = wrap
