"""Quantized base models (QLoRA): bitsandbytes 4-bit and 8-bit linears under a frozen base.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The base model's linear
weights are stored in 4 bits (NF4 or FP4, optionally with double-quantized block scales) or 8 bits,
and dequantized block by block in the forward; the adapter trains in the compute dtype on top::

    h = dequant(W_q) x + s B A x          (LoRA on a Linear4bit: only A and B train)

This module is pure PyTorch plus bitsandbytes, which is imported only when a function here needs it,
so ``import lightning_peft`` works without it. It never imports lightning.

- :func:`quantize` replaces the ``nn.Linear`` layers of any module by bitsandbytes layers holding
  their quantized weights, then :func:`prepare_for_kbit_training`.
- :func:`prepare_for_kbit_training` does what a quantized base needs before training: float32 for
  the layers that stay unquantized (norms, embeddings, heads), input gradients on, and the CPU
  repacking below turned off.
- :func:`dequantize` turns the quantized layers back into ``nn.Linear`` (the explicit way to merge).

The CPU trap: on CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place at its
first eval-mode forward on an input without gradient, into a layout whose backward returns no input
gradient. A run that validates before training would then train nothing below that layer.
:func:`disable_cpu_repacking` turns it off (``support_avx512bf16_for_cpu = False``) and undoes a
repacking that already happened; the layer-wrapping methods call it at injection. Undone, the block
scales come back rounded to bfloat16 (the repacking stored them so): quantize with ``prepare=True``
(the default) or inject before any eval forward to keep them exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_peft.core.config import invalid
from lightning_peft.core.layer import AdapterLayer
from lightning_peft.core.targeting import ALL_LINEAR, find_base_model, select

QuantType = Literal["nf4", "fp4", "int8"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int8")
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
INSTALL = 'pip install "lightning-peft[quant]"'
_FOUR_BIT = ("Linear4bit", "LinearNF4", "LinearFP4")


def require_bitsandbytes(what: str) -> Any:
    """The ``bitsandbytes`` module, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {INSTALL}") from err
    return bitsandbytes


def _bnb_class(module: nn.Module) -> str | None:
    """The name of the bitsandbytes linear class ``module`` is (or derives from), else None.

    Read from the class hierarchy, so telling layers apart never imports bitsandbytes.
    """
    for cls in type(module).__mro__:
        if (cls.__module__ or "").startswith("bitsandbytes") and cls.__name__ in (*_FOUR_BIT, "Linear8bitLt"):
            return cls.__name__
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return _bnb_class(module) is not None


def quant_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes layer, else None."""
    name = _bnb_class(module)
    if name is None:
        return None
    if name == "Linear8bitLt":
        return "int8"
    return str(getattr(module.weight, "quant_type", "fp4"))


def describe(module: nn.Module) -> str:
    """``"a 4-bit bitsandbytes Linear4bit (nf4)"``: for messages."""
    kind = quant_kind(module)
    bits = "8-bit" if kind == "int8" else "4-bit"
    return f"a {bits} bitsandbytes {type(module).__name__} ({kind})"


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in, which its adapter uses too (float32 when unset).

    ``Linear4bit.compute_dtype``; ``Linear8bitLt`` dequantizes to its input's dtype: float32 here.
    """
    dtype = getattr(module, "compute_dtype", None) if quant_kind(module) != "int8" else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer, quantized or not.

    A ``Linear4bit`` weight is a packed ``(in * out / 2, 1)`` byte column, so its shape says nothing.
    """
    return int(module.in_features), int(module.out_features)


def _unpack_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' AVX512-BF16 repacking of a ``Linear4bit`` weight (a no-op when not repacked)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        nested = bool(getattr(state, "original_nested", False))
        weight.data, restored = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if not nested and restored.absmax.dim() == 2:
            # bitsandbytes 0.50 restores nested scales only: others stay (in / blocksize, out), transposed.
            restored.absmax = restored.absmax.t().reshape(-1).float()
        weight.quant_state = module.quant_state = restored


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every ``Linear4bit`` in ``model`` in the layout whose backward has an input gradient.

    Returns the number of 4-bit layers seen. See the module docstring for why.
    """
    count = 0
    for module in model.modules():
        if _bnb_class(module) in _FOUR_BIT:
            module.support_avx512bf16_for_cpu = False
            _unpack_cpu(module)
            count += 1
    return count


def dequantized_weight(module: nn.Module) -> Tensor:
    """The float ``(out, in)`` weight a bitsandbytes layer computes with (a new tensor, no gradient)."""
    bnb = require_bitsandbytes("reading a quantized weight")
    weight = module.weight
    with torch.no_grad():
        if quant_kind(module) == "int8":
            scales = getattr(weight, "SCB", None)
            if scales is None:
                scales = module.state.SCB
            return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
        _unpack_cpu(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def _check_choice(field: str, value: object, valid: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in valid:
        shown = [repr(v) for v in valid]
        raise invalid("lightning_peft.quantize", field, value, f"{', '.join(shown[:-1])} or {shown[-1]}")


def _dtype(field: str, value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value]
    raise invalid("lightning_peft.quantize", field, value, "'float32', 'bfloat16' or 'float16' (or the torch dtype)")


def _quantized_copy(linear: nn.Linear, kind: str, dtype: torch.dtype, double_quant: bool, bnb: Any) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights quantized (on ``linear``'s device)."""
    weight = linear.weight.detach()
    device = weight.device
    has_bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight.float().cpu().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            compress_statistics=double_quant,
            quant_type=kind,
        )
        layer.weight = bnb.nn.Params4bit(
            weight.float().cpu().clone(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=kind,
            module=layer,
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().float().cpu().clone(), requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes on the move to a device
    layer.train(linear.training)
    return layer


def requantized(layer: nn.Module, delta: Tensor) -> tuple[nn.Module, float]:
    """A new bitsandbytes layer like ``layer`` (same kind, compute dtype, double quantization)
    holding ``dequantized(layer) + delta`` quantized again, and the error that cost.

    The error is ``||deq(Q') - (deq(Q) + delta)||_F / ||delta||_F``: how much of the update the
    second rounding loses, relative to the update (above 1, the merge changed the weights more than
    the adapter did).

    Args:
        layer: a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.
        delta: the update, ``(out, in)`` like ``dequantized_weight(layer)``.
    """
    delta = delta.detach()
    target = dequantized_weight(layer).float() + delta.float()  # (out, in)
    new = quantized_like(layer, target)
    lost = torch.linalg.vector_norm(dequantized_weight(new).float() - target)
    return new, float(lost / torch.linalg.vector_norm(delta.float()).clamp_min(torch.finfo(torch.float32).tiny))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def quantize(
    model: nn.Module,
    quant_type: QuantType = "nf4",
    *,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    exclude_modules: str | Sequence[str] | None = None,
    compute_dtype: str | torch.dtype = "float32",
    double_quant: bool = False,
    prepare: bool = True,
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by bitsandbytes layers holding their quantized weights.

    Args:
        model: any ``nn.Module``, before a method is injected.
        quant_type: ``"nf4"`` (4-bit NormalFloat, QLoRA's choice), ``"fp4"`` (4-bit float) or
            ``"int8"`` (LLM.int8(), ``Linear8bitLt``).
        target_modules: which linears to quantize, matched like a method's ``target_modules``;
            ``"all-linear"`` (the default) takes every ``nn.Linear`` except the output layer, as
            transformers' ``BitsAndBytesConfig`` does.
        exclude_modules: linears to keep in full precision, matched the same way.
        compute_dtype: the dtype 4-bit layers dequantize to and multiply in; adapters injected
            afterwards are created in it.
        double_quant: quantize the 4-bit block scales too (QLoRA's double quantization, ~0.4 bit
            per weight saved).
        prepare: run :func:`prepare_for_kbit_training` afterwards.

    Returns:
        ``model``, changed in place.

    Raises:
        ImportError: without bitsandbytes, with the install command.
        ValueError: for an unknown option value, or targets that match nothing / no ``nn.Linear``.
    """
    _check_choice("quant_type", quant_type, QUANT_TYPES)
    dtype = _dtype("compute_dtype", compute_dtype)
    if not isinstance(double_quant, bool):
        raise invalid("lightning_peft.quantize", "double_quant", double_quant, "True or False")
    if double_quant and quant_type == "int8":
        raise invalid("lightning_peft.quantize", "double_quant", double_quant, "False with quant_type='int8'")
    bnb = require_bitsandbytes(f"lightning_peft.quantize(quant_type={quant_type!r})")
    names = select(model, target_modules, exclude_modules, owner="lightning_peft.quantize")
    linears = [n for n in names if type(model.get_submodule(n)) is nn.Linear]
    if not linears:
        raise ValueError(
            f"lightning_peft.quantize: target_modules={target_modules!r} selected {names[:5]}, none of which is "
            "an nn.Linear; only nn.Linear layers can be quantized."
        )
    for name in linears:
        _set(model, name, _quantized_copy(model.get_submodule(name), quant_type, dtype, double_quant, bnb))
    if prepare:
        prepare_for_kbit_training(model)
    return model


def _make_inputs_require_grad(module: nn.Module, args: Any, output: Tensor) -> None:
    output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module) -> bool:
    """Make the input embeddings' output require grad (once), so checkpointed layers see a graph.

    Returns whether ``model`` (or the transformers model inside it) has input embeddings.
    """
    _, base = find_base_model(model)
    get = getattr(base, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module):
        return False
    if not getattr(embeddings, "_lightning_peft_input_grads", False):
        embeddings.register_forward_hook(_make_inputs_require_grad)
        embeddings._lightning_peft_input_grads = True
    return True


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Get a model with a quantized base ready for adapter training, in place.

    - float16 / bfloat16 parameters outside the quantized layers (norms, embeddings, heads, biases)
      become float32: they are small, and a norm or head that trains in half precision loses it;
    - the input embeddings' output requires grad, so gradient checkpointing sees a graph;
    - bitsandbytes' CPU repacking, whose backward drops the input gradient, is turned off.

    The quantized weights and their compute dtype are left as they are. Returns ``model``.
    """
    for module in model.modules():
        if is_quantized(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                setattr(module, name, nn.Parameter(param.data.float(), requires_grad=param.requires_grad))
    enable_input_require_grads(model)
    disable_cpu_repacking(model)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every bitsandbytes layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]


def dequantize(model: nn.Module, dtype: str | torch.dtype = "float32") -> nn.Module:
    """Replace every bitsandbytes layer in ``model`` by an ``nn.Linear`` with its dequantized weight.

    This is how a quantized model is merged: ``lp.dequantize(model); lp.merge(model)``. The weights
    are exactly what the quantized layers computed with (the quantization error stays), now in
    ``dtype``, at 4 to 8 times the memory. Adapters around the layers stay in place.
    """
    target = _dtype("dtype", dtype)
    for name, module in quantized_layers(model):
        weight = dequantized_weight(module)  # (out, in)
        in_features, out_features = features(module)
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device=weight.device, dtype=target)
        with torch.no_grad():
            linear.weight.copy_(weight.to(target))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(target))
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        linear.train(module.training)
        _set(model, name, linear)
    return model


def merge_refusal(layer: nn.Module, base: nn.Module, method: str) -> TypeError:
    """The error for merging an adapter into a quantized base layer."""
    return TypeError(
        f"cannot merge {method} into {describe(base)}: adding the update to its weight means requantizing it, "
        "which changes the weights by more than the update (a silent precision loss). Either call "
        "lightning_peft.dequantize(model) first (float nn.Linear layers, then lightning_peft.merge works), "
        "lightning_peft.merge_requantized(model) (LoRA: quantize again, and get the error that cost), or keep the "
        "adapter unmerged (lightning_peft.save_adapter) and merge it into the full-precision base model."
    )


class WeightMergingLayer(AdapterLayer):
    """An adapter layer that merges by changing its base layer's weight, which on a bitsandbytes
    base means requantizing it: ``merge`` and ``unmerge`` are refused there (:func:`merge_refusal`),
    once for every such method (LoRA, (IA)^3, AdaLoRA)."""

    @property
    def mergeable(self) -> bool:
        return not is_quantized(self.base) and super().mergeable

    def merge(self) -> None:
        if is_quantized(self.base):  # requantizing W + update would lose more than the update adds
            raise merge_refusal(self, self.base, self.method)
        super().merge()

    def unmerge(self) -> None:
        if is_quantized(self.base):
            raise merge_refusal(self, self.base, self.method)
        super().unmerge()


def adapter_factory(base_layer: nn.Module) -> dict[str, Any]:
    """Device and dtype for the adapter of a quantized layer: its compute dtype (see :func:`compute_dtype`)."""
    return {"device": base_layer.weight.device, "dtype": compute_dtype(base_layer)}


def quantized_like(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A new bitsandbytes layer like ``layer`` (kind, compute dtype, double quantization, bias,
    train mode, CPU repacking setting) holding ``weight`` (``(out, in)``) quantized.
    """
    bnb = require_bitsandbytes("quantizing a weight")
    kind = quant_kind(layer)
    assert kind is not None, "quantized_like() takes a bitsandbytes layer"
    in_features, out_features = features(layer)
    bias = layer.bias
    plain = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight.detach().float())
        if bias is not None:
            plain.bias.copy_(bias.detach().float())
    double_quant = bool(getattr(layer.weight, "compress_statistics", False))
    new = _quantized_copy(plain, kind, compute_dtype(layer), double_quant, bnb)
    new.train(layer.training)
    if getattr(layer, "support_avx512bf16_for_cpu", True) is False:
        disable_cpu_repacking(new)  # as the layer it replaces (see the module docstring)
    return new


def loftq_decompose(
    weight: Tensor, layer: nn.Module, rank: int, scaling: float, iters: int
) -> tuple[nn.Module, Tensor, Tensor, list[float]]:
    """LoftQ (Li et al., 2023): a quantized layer ``Q`` and a rank-``rank`` pair ``(A, B)`` with
    ``deq(Q) + s B A`` close to the full-precision ``weight`` ``W``, by alternating ``iters`` times::

        Q_t        = quantize(W - s B_{t-1} A_{t-1})          (B_0 A_0 = 0, so Q_1 = quantize(W))
        U S V^T    = SVD(W - deq(Q_t)),  truncated to rank r
        A_t        = sqrt(S / s) V^T      (r, in)
        B_t        = U sqrt(S / s)        (out, r),  so  s B_t A_t = U S V^T

    The singular values are split evenly between ``A`` and ``B``, as peft's ``loftq_init`` does;
    unlike peft (whose ``B A`` equals ``U S V^T``, exact only when ``s = alpha / r = 1``) the scale
    ``s`` is divided out, so ``s B A`` is the rank-r approximation of the residual for any alpha.

    The alternation is not guaranteed to descend (the 4-bit block scales change with the input), so
    the iterate with the lowest error ``||W - deq(Q_t) - s B_t A_t||_F`` is kept: the result never
    gets worse with more iterations, and already one beats ``Q_1 = quantize(W)`` alone.

    Args:
        weight: the full-precision ``(out, in)`` weight the layer was quantized from.
        layer: a bitsandbytes 4-bit layer, the template for ``Q`` (its kind, scales, compute dtype).
        rank: r, the adapter's rank (at most ``min(out, in)`` singular values are kept).
        scaling: s, the adapter's scale.
        iters: T, the number of alternations (a positive integer).

    Returns:
        ``(Q, A, B, errors)``: the new quantized layer, ``A`` and ``B`` in float32 on ``weight``'s
        device, and ``||W - deq(Q_t) - s B_t A_t||_F / ||W||_F`` for each ``t = 1..T``.
    """
    target = weight.detach().float()  # (out, in)
    norm = torch.linalg.vector_norm(target).clamp_min(torch.finfo(torch.float32).tiny)
    residual_target = target
    best: tuple[float, nn.Module, Tensor, Tensor] | None = None
    errors: list[float] = []
    with torch.no_grad():
        for _ in range(iters):
            quantized = quantized_like(layer, residual_target)
            residual = target - dequantized_weight(quantized).float().to(target.device)
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            root = (s[:rank] / scaling).sqrt()
            lora_A = root[:, None] * vh[:rank]  # (r, in)
            lora_B = u[:, :rank] * root[None, :]  # (out, r)
            if root.numel() < rank:  # r above min(out, in): the extra directions stay zero
                lora_A = torch.cat([lora_A, lora_A.new_zeros(rank - root.numel(), lora_A.shape[1])])
                lora_B = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], rank - root.numel())], dim=1)
            low_rank = scaling * (lora_B @ lora_A)
            error = float(torch.linalg.vector_norm(residual - low_rank) / norm)
            errors.append(error)
            if best is None or error < best[0]:
                best = (error, quantized, lora_A, lora_B)
            residual_target = target - low_rank
    assert best is not None, "loftq_decompose() takes iters >= 1"
    return best[1], best[2], best[3], errors
