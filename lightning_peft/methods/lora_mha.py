"""LoRA on ``torch.nn.MultiheadAttention``, as peft 0.21 has it.

nn.MultiheadAttention holds no linear layer whose forward it calls: its forward reads the packed
query/key/value projection ``W_in`` (``in_proj_weight``: 3E x E, rows ``[W_q; W_k; W_v]``) and the
output projection's weight ``W_o`` (``out_proj.weight``: E x E) directly. So LoRA adapts both
weights, as peft does (one pair for the packed projection, one for ``out_proj``)::

    W_in' = W_in + s * B A,        A: r x E,  B: 3E x r   (B = 0 at init)
    W_o'  = W_o  + s * B_o A_o,    A_o: r x E, B_o: E x r  (B_o = 0 at init)
    MHA'(q, k, v) = MHA(q, k, v; W_in', W_o')

i.e. ``Q = q (W_q + s B_q A)^T + b_q`` with ``B_q = B[:E]`` (likewise K and V with ``B[E:2E]``,
``B[2E:]``), attention as the module computes it (masks, ``bias_k``/``bias_v``, ``add_zero_attn``,
dropout), then ``out = attn (W_o + s B_o A_o)^T + b_o``; ``s = alpha / r`` (``alpha / sqrt(r)``
with rslora). Merging adds the two updates to the two weights.

peft's files: peft 0.19 to 0.21.2 add the ``out_proj`` update twice, in the forward and in a merge
(``W_o + 2 s B_o A_o``: its merge sets ``W_o + s B_o A_o`` and then merges the inner LoRA linear
again; peft PR #3774, open). The same adapter gives the same outputs here and in peft only if
``B_o`` here is twice peft's, so a peft file's ``out_proj`` ``lora_B`` is doubled on load and halved
on save (exactly: a power of two); the other three tensors are stored as they are.

Why a functional forward: peft merges the update into the weights before the module's forward
and subtracts it after. That writes the frozen weights on every call, and ``W + d - d`` is not
``W`` in floating point, so the base weights drift by rounding with every step. Here the module's
own forward runs with the effective weights put in place of its parameters for that call only
(``torch.func.functional_call``): no stored weight is written, autograd reaches ``A, B, A_o,
B_o`` through ``W + s B A``, and whatever the module does with its weights (masks, the inference
fast path) it does with the adapted ones.

Refused, by name (peft refuses or ignores the same): separate key/value sizes
(``_qkv_same_embed_dim=False``: no packed weight), DoRA, ``lora_bias``, ``dropout > 0`` (the
update lives in the weight, so the adapter's input cannot be dropped separately; peft ignores
``lora_dropout`` here), inits that read the base weight, mixed batches, and LoRA on ``out_proj``
alone (the module never calls that layer's forward, so a wrapper there would change nothing).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from lightning_peft.methods.lora import LAYER_TYPES, LoRAConfig, LoRALayer

#: The inits a LoRA on nn.MultiheadAttention takes: those that do not read the base weight.
INITS = ("kaiming", "gaussian", "random")


class LoRAMultiheadAttention(LoRALayer):
    """LoRA around ``nn.MultiheadAttention``: one pair on the packed in-projection, one on ``out_proj``."""

    # (LoRALayer's own declaration is inferred as a pair of names)
    adapter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "out_proj_lora_A", "out_proj_lora_B")  # type: ignore[assignment]
    #: peft keeps the in-projection pair on its wrapper and wraps ``out_proj`` in a LoRA linear inside it.
    peft_names = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "out_proj_lora_A": "base_layer.out_proj.lora_A.weight",
        "out_proj_lora_B": "base_layer.out_proj.lora_B.weight",
    }
    supports_mixed_batch = False  # the batch is dimension 1 unless batch_first; peft refuses mixed batches too
    stackable = False  # the effective weights replace the module's own for the call: one adapter at a time
    gather_as_unit = True  # the forward reads the base weights before the base module's own forward runs

    def __init__(self, base_layer: nn.MultiheadAttention, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        if not base_layer._qkv_same_embed_dim:
            raise TypeError(
                f"it is a MultiheadAttention with kdim={base_layer.kdim}, vdim={base_layer.vdim} and "
                f"embed_dim={base_layer.embed_dim} (_qkv_same_embed_dim=False): separate query/key/value weights, "
                "no packed in_proj_weight; lora wraps a MultiheadAttention whose kdim and vdim equal embed_dim "
                "(peft refuses the other too)"
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(
                f"it is a MultiheadAttention whose out_proj is a {type(base_layer.out_proj).__name__}; lora needs "
                "an nn.Linear there"
            )
        if config.dropout > 0:
            raise TypeError(
                f"LoRAConfig.dropout={config.dropout} is refused on a MultiheadAttention: its update is added to the "
                "weights the module reads, so the adapter's input cannot be dropped out apart from the base's (peft "
                "ignores lora_dropout there); use dropout=0, or exclude it from target_modules"
            )
        if getattr(config, "lora_bias", False):
            raise TypeError(
                "LoRAConfig.lora_bias=True is refused on a MultiheadAttention (peft's drops the in-projection's bias "
                "from its update); use lora_bias=False, or exclude it from target_modules"
            )
        if self.init not in INITS:
            raise TypeError(
                f"LoRAConfig.init={self.init!r} is refused on a MultiheadAttention (peft cannot initialize it there "
                f"either); it takes init={' or '.join(map(repr, INITS))}. Exclude it from target_modules"
            )
        embed_dim = base_layer.embed_dim
        factory = self.adapter_factory(base_layer.in_proj_weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, embed_dim, **factory))
        self.lora_B = nn.Parameter(torch.empty(3 * embed_dim, config.r, **factory))
        self.out_proj_lora_A = nn.Parameter(torch.empty(config.r, embed_dim, **factory))
        self.out_proj_lora_B = nn.Parameter(torch.empty(embed_dim, config.r, **factory))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        for lora_A, lora_B in ((self.lora_A, self.lora_B), (self.out_proj_lora_A, self.out_proj_lora_B)):
            if self.init == "random":  # peft's init_lora_weights=False: both as nn.Linear initializes its weight
                nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
                continue
            if self.init == "gaussian":
                nn.init.normal_(lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(lora_B)

    @property
    def attention(self) -> nn.MultiheadAttention:
        """The wrapped nn.MultiheadAttention itself."""
        return cast(nn.MultiheadAttention, self.base)

    def delta_weight(self) -> Tensor:
        """``s B A``, laid out like ``in_proj_weight`` (3E x E)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def out_proj_delta_weight(self) -> Tensor:
        """``s B_o A_o``, laid out like ``out_proj.weight`` (E x E)."""
        return (self.out_proj_lora_B @ self.out_proj_lora_A) * self.scaling

    def to_peft_tensor(self, local: str, tensor: Tensor) -> Tensor:
        # peft 0.19-0.21.2 add out_proj's update twice, in its forward and its merge (W_o + 2 s B_o A_o; peft
        # PR #3774): a peft file holds half the B_o that gives the same outputs here. Exact (a power of two).
        return tensor * 0.5 if local == "out_proj_lora_B" else tensor

    #: The newest peft known to add out_proj's update twice (what the halved B_o in peft's files is for).
    PEFT_DOUBLES_OUT_PROJ_THROUGH = "0.21.2"

    def check_peft_version(self, version: str | None) -> None:
        # A file from a later peft may hold the B_o that PR #3774's fix applies once: doubling it would be wrong.
        from packaging.version import Version

        newest = self.PEFT_DOUBLES_OUT_PROJ_THROUGH
        if version is not None and Version(str(version).split("@")[0]) > Version(newest):
            raise ValueError(
                f"peft_version={version!r}: LoRA on nn.MultiheadAttention reads files of peft <= {newest}, which adds "
                "out_proj's update twice (peft PR #3774), so lightning_peft doubles the stored out_proj lora_B; "
                f"whether peft {version} still does is not known here. Save the adapter with peft <= {newest}, or load "
                "it with the peft that wrote it."
            )

    def from_peft_tensor(self, local: str, stored: Tensor) -> Tensor:
        return stored * 2 if local == "out_proj_lora_B" else stored

    def _effective_in(self) -> Tensor:
        """``W_in + s B A`` in the base weight's dtype, differentiable in the adapter."""
        w_in = self.attention.in_proj_weight
        return w_in + self.delta_weight().to(w_in.dtype)

    def _effective_out(self) -> Tensor:
        """``W_o + s B_o A_o`` in the base weight's dtype, differentiable in the adapter."""
        w_out = self.attention.out_proj.weight
        return w_out + self.out_proj_delta_weight().to(w_out.dtype)

    @property
    def _active(self) -> bool:
        return not self._merged and self._enabled

    @property
    def dropout(self) -> float:  # type: ignore[override]
        """The attention's dropout probability, as on nn.MultiheadAttention (LoRA's own dropout is refused here)."""
        return self.attention.dropout

    # nn.TransformerEncoder(Layer) in inference reads these attributes itself and calls a fused kernel
    # with them instead of this module's forward: they answer with the weights the layer computes with.
    @property
    def in_proj_weight(self) -> Tensor:
        """The packed projection this layer computes with: ``W_in + s B A`` while the adapter is on and unmerged."""
        return self._effective_in() if self._active else self.attention.in_proj_weight

    @property
    def out_proj(self) -> Any:
        """The output projection's weight and bias as this layer computes with them (``weight``: ``W_o + s B_o A_o``
        while the adapter is on and unmerged); the base ``out_proj`` module itself otherwise."""
        out_proj = self.attention.out_proj
        if not self._active:
            return out_proj
        return SimpleNamespace(weight=self._effective_out(), bias=out_proj.bias)

    def _merge(self) -> None:
        base = self.attention
        base.in_proj_weight.add_(self.delta_weight().to(base.in_proj_weight.dtype))
        base.out_proj.weight.add_(self.out_proj_delta_weight().to(base.out_proj.weight.dtype))

    def _unmerge(self) -> None:
        base = self.attention
        base.in_proj_weight.sub_(self.delta_weight().to(base.in_proj_weight.dtype))
        base.out_proj.weight.sub_(self.out_proj_delta_weight().to(base.out_proj.weight.dtype))

    def update(self, x: Tensor) -> Tensor:
        raise TypeError(
            "LoRA on a MultiheadAttention has no additive update of its input alone (attention is not linear in the "
            "weights); run the layer itself"
        )

    def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.bypassed:
            return self.base_layer(query, *args, **kwargs)
        if self.rows is not None:
            raise TypeError(
                f"adapter {self.adapter_name!r} (LoRA on a MultiheadAttention) cannot serve single rows of a mixed "
                "batch; serve it in a batch of its own with set_adapter"
            )
        attention = self.base_layer
        if not isinstance(attention, nn.MultiheadAttention):  # a strategy's wrapper in between: no such names there
            raise TypeError(
                f"LoRA on a MultiheadAttention runs the attention's own forward with its adapted weights, but its "
                f"base layer is a {type(attention).__name__} around it; wrap the LoRA layer, not the attention inside"
            )
        # The base module's own forward, with the effective weights in place of its two parameters.
        weights = {"in_proj_weight": self._effective_in(), "out_proj.weight": self._effective_out()}
        return torch.func.functional_call(attention, weights, (query, *args), kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_proj and out_proj"


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The LoRA wrapper for an ``nn.MultiheadAttention`` (see :data:`lightning_peft.methods.lora.LAYER_TYPES`)."""
    return LoRAMultiheadAttention(module, config)  # type: ignore[arg-type]


LAYER_TYPES[nn.MultiheadAttention] = wrap
