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

The other layers, as peft 0.21 defines them:

- ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (ungrouped): the kernel ``W`` (out, in, *k) plus
  ``s B.A`` (LoRA's conv ``A`` composed with its pointwise conv ``B``), the norm over every axis
  but the output channel, one magnitude per output channel (peft's layout: (1, out, 1, ...)):
  ``h = m / ||W + s B.A|| * ((W + s B.A) * x) + b``. Grouped convs are refused: peft's DoRA
  there takes the norm of ``B.A`` reshaped as if the conv were ungrouped, which is no weight norm.
- ``nn.Embedding``: the table ``W`` (num, dim) plus ``s (B A)^T``, the norm over the tokens (each
  column of the table: peft takes it on the transposed ``(dim, num)`` weight, row-wise), one
  magnitude per embedding dimension; with the base layer's ``embed_scale`` ``c``:
  ``h = m / ||W + s (B A)^T|| * c * (W + s (B A)^T)[x]``.

This file is not a method of its own: it is LoRA's ``use_dora`` option, and registers nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.quantize import adapter_factory, dequantized_weight, is_quantized
from lightning_peft.core.targeting import is_linear
from lightning_peft.methods.lora import VARIANTS, LoRAConfig, LoRALayer, LoRALinear
from lightning_peft.methods.lora_conv import LoRAConv, conv_kind
from lightning_peft.methods.lora_embedding import LoRAEmbedding


def _through_base(layer: LoRALayer, x: Tensor, add: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The base layer's output on ``x`` with ``add(x, output)`` applied in a hook at the end of its forward.

    DoRA's update reads the base weight: computed there, where a strategy that shards the weight
    (FSDP1, ZeRO-3) still has it whole.
    """
    hook = layer.base_owner(["weight"]).register_forward_hook(lambda module, args, result: add(x, result), prepend=True)
    try:
        return layer.base_layer(x)
    finally:
        hook.remove()


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
        return _through_base(self, x, self._add_update_to)

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


class DoRAConv(LoRAConv):
    """DoRA around an ungrouped ``nn.Conv1d/2d/3d``: LoRA's conv ``A`` and pointwise conv ``B``, a magnitude per
    output channel."""

    adapter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude")  # type: ignore[assignment]
    stackable = False  # its norm reads the base weight, which another adapter on the layer would change
    supports_mixed_batch = False  # the norm is per adapter and per weight, not per row
    peft_names = {"lora_magnitude": "lora_magnitude_vector"}
    gather_as_unit = True  # its norm reads the weights of the A and B convs outside their own forwards

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        factory = self.adapter_factory(base_layer.weight)
        self.lora_magnitude = nn.Parameter(torch.empty(base_layer.out_channels, **factory))
        #: (1, -1, 1, ...): a per-channel vector laid along an output's channel axis.
        self._channel_view = (1, -1) + (1,) * (base_layer.weight.dim() - 2)
        self.register_buffer("_merged_norm", None, persistent=False)  # the norm merge() divided by
        self._reset_magnitude()

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        if "lora_magnitude" in self._parameters:  # absent while LoRAConv.__init__ runs
            self._reset_magnitude()

    def _reset_magnitude(self) -> None:
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norm())

    def to_peft_tensor(self, local: str, tensor: Tensor) -> Tensor:
        # peft keeps the conv magnitude as (1, out, 1, ...), the shape its norm has with keepdim.
        return tensor.view(self._channel_view) if local == "lora_magnitude" else tensor

    def _combined(self) -> Tensor:
        weight: Tensor = self.base.weight
        return weight + self.delta_weight().to(weight.dtype)  # (out, in, *k)

    def _norm(self, combined: Tensor) -> Tensor:
        return torch.linalg.vector_norm(combined, dim=tuple(range(1, combined.dim())))  # (out,)

    def weight_norm(self) -> Tensor:
        """``||W + s B.A||`` per output channel (over in, *k), as a constant (no gradient flows through it)."""
        with torch.no_grad():
            return self._norm(self._combined()).to(self.lora_magnitude.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        return _through_base(self, x, self._add_update_to)

    def _add_update_to(self, x: Tensor, result: Tensor) -> Tensor:
        """``result = W * x + b`` plus ``(m / ||W + s B.A|| - 1) W * x' + m / ||W + s B.A|| s B.A * x'``."""
        lora_A = self.lora_A.weight
        dropped = self.dropout(x)
        if dropped.dtype != lora_A.dtype:
            dropped = dropped.to(lora_A.dtype)
        scale = (self.lora_magnitude / self.weight_norm()).view(self._channel_view)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling  # (B, out, *spatial')
        if self.training and isinstance(self.dropout, nn.Dropout):
            base = self.base._conv_forward(dropped, self.base.weight.to(dropped.dtype), None)  # W * x'
        else:
            bias = self.bias
            base = result if bias is None else result - bias.view(self._channel_view)  # W * x, without a second conv
        return result + ((scale - 1) * base + scale * update).to(result.dtype)

    def _merge(self) -> None:
        weight: Tensor = self.base.weight
        combined = self._combined()
        norm = self._norm(combined)
        self._merged_norm = norm
        weight.copy_((self.lora_magnitude.to(weight.dtype) / norm).view((-1,) + (1,) * (weight.dim() - 1)) * combined)

    def _unmerge(self) -> None:
        weight: Tensor = self.base.weight
        scale = (self.lora_magnitude.to(weight.dtype) / self._merged_norm).view((-1,) + (1,) * (weight.dim() - 1))
        weight.copy_(weight / scale - self.delta_weight().to(weight.dtype))
        self._merged_norm = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"


class DoRAEmbedding(LoRAEmbedding):
    """DoRA around ``nn.Embedding``: LoRA's tables ``A``, ``B`` plus a magnitude per embedding dimension."""

    adapter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude")  # type: ignore[assignment]
    stackable = False  # its norm reads the base weight, which another adapter on the layer would change
    supports_mixed_batch = False  # the norm is per adapter and per weight, not per row
    peft_names = {**LoRAEmbedding.peft_names, "lora_magnitude": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        factory = self.adapter_factory(base_layer.weight)
        self.lora_magnitude = nn.Parameter(torch.empty(base_layer.embedding_dim, **factory))
        self.register_buffer("_merged_norm", None, persistent=False)  # the norm merge() divided by
        self._reset_magnitude()

    def reset_adapter_parameters(self) -> None:
        super().reset_adapter_parameters()
        if "lora_magnitude" in self._parameters:  # absent while LoRAEmbedding.__init__ runs
            self._reset_magnitude()

    def _reset_magnitude(self) -> None:
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norm())

    def _combined(self) -> Tensor:
        weight: Tensor = self.base.weight
        return weight + self.delta_weight().to(weight.dtype)  # (num_embeddings, embedding_dim)

    def weight_norm(self) -> Tensor:
        """``||W + s (B A)^T||`` per embedding dimension (over the tokens), as a constant."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self._combined(), dim=0).to(self.lora_magnitude.dtype)  # (dim,)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        return _through_base(self, x, self._add_update_to)

    def _add_update_to(self, x: Tensor, result: Tensor) -> Tensor:
        """``result = c W[x]`` as ``m / ||W + s (B A)^T|| * (c W[x] + c s A^T[x] B^T)``."""
        scale = self.lora_magnitude / self.weight_norm()  # (dim,)
        return (scale * (result + self.update(x).to(result.dtype))).to(result.dtype)

    def _merge(self) -> None:
        weight: Tensor = self.base.weight
        combined = self._combined()
        norm = torch.linalg.vector_norm(combined, dim=0)
        self._merged_norm = norm
        weight.copy_((self.lora_magnitude.to(weight.dtype) / norm)[None, :] * combined)

    def _unmerge(self) -> None:
        weight: Tensor = self.base.weight
        scale = (self.lora_magnitude.to(weight.dtype) / self._merged_norm)[None, :]
        weight.copy_(weight / scale - self.delta_weight().to(weight.dtype))
        self._merged_norm = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"


_WRAPS = "DoRA wraps nn.Linear, transformers' Conv1D, nn.Embedding and ungrouped nn.Conv1d, nn.Conv2d and nn.Conv3d"


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The DoRA wrapper for one selected module (``LoRAConfig.use_dora=True``)."""
    if isinstance(module, nn.Embedding):
        return DoRAEmbedding(module, config)
    kind = conv_kind(module)
    if kind is not None:
        if module.groups != 1:  # peft's DoRA norm there reads B.A as if the conv were ungrouped
            raise TypeError(
                f"it is a {kind.__name__} with groups={module.groups}, which lora with use_dora=True cannot wrap "
                f"(peft's DoRA norm reshapes the grouped B.A as if the conv were ungrouped, which is no weight norm); "
                f"{_WRAPS}"
            )
        return DoRAConv(module, config)
    if is_linear(module):
        return DoRALinear(module, config)
    raise TypeError(f"it is a {type(module).__name__}, which lora with use_dora=True cannot wrap; {_WRAPS}")


VARIANTS["use_dora"] = wrap
