"""LoRA on convolutions: ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped or not, as peft 0.21 has them.

The frozen conv ``W * x + b`` (kernel ``W``: out x in/g x k_1 x ... x k_d, ``g`` groups) gets the
update of two convs in a row::

    h = W * x + b + s * B(A(dropout(x))),      s = alpha / r (or alpha / sqrt(r) with rslora)

``A``: a conv with the base layer's kernel size, stride, padding and dilation from all ``in``
channels to ``r`` (never grouped, and padding with zeros); ``B``: a pointwise (kernel 1) conv
from ``r`` to ``out`` channels with the base layer's ``groups`` (so ``r`` must be a multiple of
``g``), initialized to zero so the model starts out unchanged. With ``lora_bias`` ``B`` has a
bias ``c`` too (peft's ``lora_B.bias``, zero at init), and the update is ``s * (B A x + c)``.

Ungrouped, the two convs compose to one conv with kernel ``B.A``::

    (B.A)[o, i, k] = sum_j B[o, j] A[j, i, k]

so merging adds ``s B.A`` to ``W`` (and ``s c`` to ``b``). Grouped, the update reads every input
channel while the base kernel of each group reads only that group's: no grouped kernel computes
it, and merging is refused, as peft refuses it. Merging is refused too where the base pads other
than with zeros (``A`` pads with zeros, as peft's does, so a merged kernel would differ at the
borders) and where ``lora_bias`` meets a base without a bias (the merged bias has no home).

peft (0.21.2 and before) builds ``A`` without the base layer's dilation, for LoRA and DoRA alike.
On a dilated conv with a kernel larger than 1, peft's update then reads an undilated window: its
forward fails on a shape mismatch, or, where the strides make the shapes agree, adds another
update than its own merge (which adds ``s B.A`` to the dilated kernel). A peft file of such a
layer means nothing definite, so both peft paths refuse it (:meth:`LoRAConv.peft_refusal`); the
native format keeps the dilation. A kernel of size 1 is the same dilated or not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_peft.methods.lora import LAYER_TYPES, LoRAConfig, LoRALayer

#: The conv layers LoRA wraps, by the number of spatial dimensions their kernel has.
CONV_TYPES: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def conv_kind(module: nn.Module) -> type[nn.Module] | None:
    """The ``nn.ConvNd`` class ``module`` is an instance of (a subclass counts), or ``None``."""
    for kind in CONV_TYPES:
        if isinstance(module, kind):
            return kind
    return None


class LoRAConv(LoRALayer):
    """LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: ``A`` a conv with the base kernel into
    ``r`` channels, ``B`` a pointwise conv with the base's groups (and with ``lora_bias``, a bias)."""

    adapter_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        kind = conv_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRAConv wraps nn.Conv1d, nn.Conv2d and nn.Conv3d; got a {type(base_layer).__name__}")
        conv: nn.Conv1d | nn.Conv2d | nn.Conv3d = base_layer  # type: ignore[assignment]
        groups = conv.groups
        if config.r % groups:
            raise TypeError(
                f"LoRAConfig.r={config.r} must be a multiple of the {kind.__name__}'s groups={groups} (its B conv "
                "is grouped like the base layer, as peft's); choose r divisible by groups, or exclude this layer "
                "from target_modules"
            )
        if self.init not in ("kaiming", "gaussian", "random"):
            raise TypeError(
                f"LoRAConfig.init={self.init!r} is for linear layers (peft refuses it on convolutions too); a "
                f"{kind.__name__} takes init='kaiming', 'gaussian' or 'random'. Exclude the conv layers from "
                "target_modules"
            )
        self.kind = kind
        factory = self.adapter_factory(conv.weight)
        ones = (1,) * CONV_TYPES[kind]
        # A: (r, in, *kernel) over every input channel; B: (out, r / groups, 1, ...), grouped as the base.
        self.lora_A = kind(
            conv.in_channels, config.r, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            bias=False, **factory,
        )  # fmt: skip
        self.lora_B = kind(config.r, conv.out_channels, ones, ones, groups=groups, bias=config.lora_bias, **factory)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        if self.init == "random":  # peft's init_lora_weights=False: both as torch initializes a conv
            self.lora_A.reset_parameters()
            self.lora_B.reset_parameters()
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def peft_refusal(self) -> str | None:
        """Why peft's format cannot hold this layer's adapter, or ``None`` when it can.

        peft 0.21.2's conv ``A`` passes no dilation: on a dilated conv (dilation > 1 along an axis
        whose kernel is larger than 1) its update is not ``B(A(x))`` with the dilated ``A`` computed
        here (see the module docstring).
        """
        base = self.base
        dilated = any(d != 1 and k != 1 for d, k in zip(base.dilation, base.kernel_size, strict=True))
        if not dilated:
            return None
        layer = (
            f"{type(base).__name__}({base.in_channels}, {base.out_channels}, kernel_size={base.kernel_size}, "
            f"dilation={base.dilation})"
        )
        method = type(self).__name__.removesuffix("Conv")  # LoRA, DoRA
        return (
            f"{method} on a {layer}: dilation={base.dilation} cannot go through Hugging Face peft's format. "
            "peft 0.21.2 builds this layer's lora_A without the dilation, so its update reads another window (its "
            "forward fails on the shape, or differs from its own merge): a peft file would mean something else in "
            "peft. Save the adapter with lightning_peft.save_adapter (the native format keeps the dilation), or leave "
            "the dilated conv out of target_modules (kernel-size-1 and dilation-1 convs go through peft's format)"
        )

    def merge_refusal(self) -> str | None:
        """Why this layer's update cannot be folded into the base kernel, or ``None`` when it can."""
        base = self.base
        name = f"{type(base).__name__}"
        if base.groups != 1:
            return (
                f"cannot merge LoRA into a {name} with groups={base.groups}: its A conv reads every input channel "
                "(as peft's does), so the update is no grouped kernel; peft refuses this merge too. Keep the "
                "adapter unmerged"
            )
        if base.padding_mode != "zeros":
            return (
                f"cannot merge {type(self).__name__.removesuffix('Conv')} into a {name} with "
                f"padding_mode={base.padding_mode!r}: its A conv pads with zeros, as peft's does, so the merged "
                "kernel would give other outputs at the borders. Keep the adapter unmerged (it computes what peft "
                "computes), or use padding_mode='zeros'."
            )
        if self.lora_B.bias is not None and base.bias is None:
            return (
                f"cannot merge LoRA with lora_bias=True into a {name} with bias=False: the update's bias s * c has "
                "no base bias to go into (peft refuses this merge too). Keep the adapter unmerged"
            )
        return None

    @property
    def mergeable(self) -> bool:
        return self.merge_refusal() is None and super().mergeable

    def merge(self) -> None:
        refusal = self.merge_refusal()
        if refusal is not None:
            raise TypeError(refusal)
        super().merge()

    def delta_weight(self) -> Tensor:
        """``s B.A`` laid out as the base kernel (out, in, *kernel); ungrouped layers only."""
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in, *k), (out, r, 1, ...)
        return torch.einsum("or,ri...->oi...", b.flatten(1), a) * self.scaling

    def _merge(self) -> None:
        super()._merge()
        bias = self.lora_B.bias
        if bias is not None:
            self.base.bias.add_((bias * self.scaling).to(self.base.bias.dtype))

    def _unmerge(self) -> None:
        super()._unmerge()
        bias = self.lora_B.bias
        if bias is not None:
            self.base.bias.sub_((bias * self.scaling).to(self.base.bias.dtype))

    def update(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        if self.rows is not None:
            return self.mixed_forward(x, self.update)
        result = self.base_layer(x)  # (B, out, *spatial')
        return result + self.update(x).to(result.dtype)

    def extra_repr(self) -> str:
        bias = ", lora_bias=True" if self.lora_B.bias is not None else ""
        return f"{super().extra_repr()}{bias}"


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The LoRA wrapper for a conv layer (see :data:`lightning_peft.methods.lora.LAYER_TYPES`)."""
    return LoRAConv(module, config)


for _kind in CONV_TYPES:
    LAYER_TYPES[_kind] = wrap
