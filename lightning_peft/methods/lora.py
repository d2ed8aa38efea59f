"""LoRA: low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight ``W`` (out x in) is adapted by a trainable low-rank product::

    h = W x + (alpha / r) * B A dropout(x),      A: r x in,  B: out x r,  B = 0 at init

so the model starts out unchanged. With ``rslora`` the scale is ``alpha / sqrt(r)`` (Kalajdzievski,
2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"). Merging adds
``(alpha / r) B A`` to ``W``, which gives the adapted model at the base model's inference cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core import tying
from lightning_peft.core.config import (
    BIAS_SCOPES,
    LayerConfig,
    check_choice,
    check_module_keys,
    check_pattern_keys,
    check_patterns,
    check_positive,
    check_positive_int,
    check_probability,
    invalid,
)
from lightning_peft.core.quantize import (
    WeightMergingLayer,
    adapter_factory,
    dequantized_weight,
    describe,
    disable_cpu_repacking,
    is_quantized,
    loftq_decompose,
    quant_kind,
    requantized,
)
from lightning_peft.core.shared_input import SharedInputs, attach
from lightning_peft.core.targeting import is_linear, pattern_key
from lightning_peft.core.wrapping import inject_layers, resolve_targets
from lightning_peft.methods import lora_init
from lightning_peft.methods.lora_kernels import FusedLoRALinear, LoRAFromHidden
from lightning_peft.registry import CalibrateFn, Method, PeftFormat, register

#: What LoRA wraps when no target list is given: the attention query and value projections, as in
#: the paper's main experiments (and peft's defaults, so configs carry over).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj", "query", "value"],  # transformers 5 names, then 4.x names
    "whisper": ["q_proj", "v_proj"],
}


@dataclass(kw_only=True)
class LoRAConfig(LayerConfig):
    """LoRA options.

    Args:
        r: rank of the update ``B A``; the adapter has ``r * (in + out)`` parameters per layer.
        alpha: scale numerator: the update is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: dropout on the adapter's input (linear and conv layers), in [0, 1).
        rslora: scale by ``alpha / sqrt(r)``, which keeps the update's size stable as r grows.
        init: ``"kaiming"`` (uniform A as nn.Linear does, B = 0; peft's default),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``"loftq"`` (LoftQ, Li et al., 2023: on
            bitsandbytes 4-bit bases only; the layers start as ``"kaiming"``, then
            :func:`loftq` sets A, B and the quantized weight from the full-precision weights).
            peft's initializations too (formulas in :mod:`lightning_peft.methods.lora_init`):
            ``"random"`` (peft's ``init_lora_weights=False``: A and B as nn.Linear initializes
            them, so the model changes at init), ``"pissa"`` / ``"pissa_niter_<N>"`` and ``"olora"``
            (on float linear layers; they rewrite the base weight to ``W - s B A``) and
            ``"orthogonal"`` (even r) and ``"eva"`` (data-driven: set by :func:`lightning_peft.calibrate`
            from a few training batches, see ``eva_config``). Embeddings start with A = 0, B ~ N(0, 1) for every init
            but ``"random"`` (A, B ~ N(0, 1)), as in peft.
        loftq_iter: with ``init="loftq"``, the number T of alternations between quantizing
            ``W - s B A`` and the rank-r SVD of the residual (see :func:`loftq`).
        eva_config: with ``init="eva"``, EVA's options as peft's ``EvaConfig`` (``rho``, ``tau``,
            ``use_label_mask``, ``label_mask_value``, ``whiten``, ``adjust_scaling_factors``) plus
            ``max_batches``; see :mod:`lightning_peft.methods.lora_eva`. The defaults are peft's.
        corda_config: with ``init="corda"``, CorDA's options (a
            dict of :class:`~lightning_peft.methods.lora_init.CordaConfig`'s fields (or one): ``corda_method``
            ``"ipm"``/``"kpm"``, ``calibration_batches``, ...; see :mod:`lightning_peft.methods.lora_corda`.
        use_dora: DoRA (Liu et al., 2024): split each weight into a trained magnitude per output
            feature and a direction that LoRA updates (see :mod:`lightning_peft.methods.dora`):
            nn.Linear, transformers' Conv1D, ungrouped nn.Conv1d/Conv2d/Conv3d and nn.Embedding.
        lora_bias: give B a bias ``c`` (peft's ``lora_B.bias``, zero at init): the update becomes
            ``s (B A x + c)`` and merging adds ``s c`` to the base bias (refused on a base without
            one). For adapters extracted from a full fine-tune, whose bias changed too. As peft:
            on linear and conv layers, with ``init="kaiming"`` or ``"random"``, not with DoRA.
        target_parameters: bare ``nn.Parameter`` tensors to adapt, matched by full name or dotted
            suffix (``["experts.gate_up_proj", "experts.down_proj"]``: a mixture-of-experts
            layer's 2-D or 3-D expert tensors), as peft's ``target_parameters``; see
            :mod:`lightning_peft.methods.lora_param`. With it, ``target_modules=[]`` wraps no module.
        trainable_token_indices: also train these rows of an embedding (new special tokens), as
            peft's option of that name: a list of token ids for the input embedding, or a dict
            ``{embedding module name: ids}``; see :mod:`lightning_peft.methods.trainable_tokens`.
        ensure_weight_tying: with tied word embeddings and the input embedding in
            ``modules_to_save``, the output layer tied to it trains with it: its copy's weight is
            the embedding copy's (one tensor), as peft's option of that name; see
            :mod:`lightning_peft.core.tying`.
        rank_pattern: per-layer ranks, ``{regex: r}``, as peft's: a layer takes the value of the
            first key that matches its name inside the transformers model whole or after a dot
            (``{"q_proj": 4, "layers\\.0\\.mlp\\..*": 16}``), else ``r``.
        alpha_pattern: per-layer ``alpha``, ``{regex: alpha}``, matched as ``rank_pattern``; a layer's
            scale is its alpha over its r (or sqrt(r) with rslora).
        bias: which base biases train with the adapter (peft's ``bias``): ``"none"``, ``"lora_only"``
            (the adapted layers' own) or ``"all"`` (every module's own ``bias`` parameter). They are
            saved with the adapter (peft's format keeps peft's names) and merging leaves them in
            place; switching the adapter off does not undo them (as in peft).
        target_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        layers_to_transform: see :class:`~lightning_peft.core.config.LayerConfig`.
        layers_pattern: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    loftq_iter: int = 1
    eva_config: dict[str, Any] | None = None
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    corda_config: dict[str, Any] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        no_modules = self.target_modules == [] and bool(self.target_parameters or self.trainable_token_indices)
        if no_modules:  # LayerConfig refuses an empty target list; here the other targets are the adapter
            object.__setattr__(self, "target_modules", None)
        super().__post_init__()
        if no_modules:
            object.__setattr__(self, "target_modules", [])
        check_module_keys(self, "target_parameters", self.target_parameters, allow_str=False)
        if self.target_parameters is not None:
            object.__setattr__(self, "target_parameters", list(self.target_parameters))
        _check_token_indices(self, self.trainable_token_indices)
        check_positive_int(self, "r", self.r)
        check_positive(self, "alpha", self.alpha)
        check_patterns(self, "rank_pattern", self.rank_pattern, check_positive_int)
        check_patterns(self, "alpha_pattern", self.alpha_pattern, check_positive)
        check_choice(self, "bias", self.bias, BIAS_SCOPES)
        check_probability(self, "dropout", self.dropout)
        if not isinstance(self.rslora, bool):
            raise ValueError(f"LoRAConfig.rslora must be True or False; got {self.rslora!r}.")
        if not isinstance(self.ensure_weight_tying, bool):
            raise invalid(self, "ensure_weight_tying", self.ensure_weight_tying, "True or False")
        lora_init.check(self, self.init)
        lora_init.check_corda(self)
        object.__setattr__(self, "eva_config", lora_init.eva_options(self, self.init, self.eva_config))
        check_positive_int(self, "loftq_iter", self.loftq_iter)
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoRAConfig.use_dora must be True or False; got {self.use_dora!r}.")
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"LoRAConfig.lora_bias must be True or False; got {self.lora_bias!r}.")
        if self.lora_bias and self.use_dora:
            raise invalid(self, "lora_bias", True, "False with use_dora=True (DoRA rescales B A; peft refuses it too)")
        if self.lora_bias and self.init not in ("kaiming", "random"):
            raise invalid(self, "init", self.init, "'kaiming' or 'random' with lora_bias=True (as peft allows)")
        if self.init == "loftq" and self.use_dora:
            raise invalid(self, "init", self.init, "'kaiming' or 'gaussian' with use_dora=True (LoftQ is plain LoRA)")
        if self.init == "orthogonal" and self.r % 2:
            raise invalid(self, "r", self.r, "an even number with init='orthogonal' (its A and B split r in two)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def bias_scope(self) -> Literal["none", "adapted", "all"]:
        return BIAS_SCOPES[self.bias]

    def check_selected(self, names: Sequence[str]) -> None:
        """Refuse a ``rank_pattern``/``alpha_pattern`` key that matches none of the targeted modules (a
        typo would silently leave those layers at ``r``/``alpha``; peft only warns). With
        ``target_parameters`` a key may name a parameter instead: :data:`CHECKS` checks both then."""
        if self.target_parameters is None:
            check_pattern_keys(self, ("rank_pattern", "alpha_pattern"), {"modules": names})

    def for_layer(self, name: str) -> LoRAConfig:
        """This config with the ``r`` and ``alpha`` that ``rank_pattern``/``alpha_pattern`` give layer ``name``."""
        r_key, alpha_key = pattern_key(self.rank_pattern, name), pattern_key(self.alpha_pattern, name)
        r = self.r if r_key is None else self.rank_pattern[r_key]
        alpha = self.alpha if alpha_key is None else self.alpha_pattern[alpha_key]
        if (r, alpha) == (self.r, self.alpha):
            return self
        try:
            return self.replace(r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})
        except ValueError as error:
            keys = f"rank_pattern[{r_key!r}]={r}" if r_key is not None else f"alpha_pattern[{alpha_key!r}]={alpha}"
            raise ValueError(f"LoRAConfig.{keys} for layer {name!r}: {error}") from None


def _check_token_indices(config: LoRAConfig, value: object) -> None:
    """``trainable_token_indices``: None, a non-empty list of token ids, or {module name: such a list}."""
    groups = value.values() if isinstance(value, dict) else [value]
    names_ok = not isinstance(value, dict) or (value and all(isinstance(k, str) and k for k in value))
    ids_ok = all(
        isinstance(ids, (list, tuple))
        and ids
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        for ids in groups
    )
    if value is not None and not (names_ok and ids_ok):
        raise invalid(
            config,
            "trainable_token_indices",
            value,
            "None, a non-empty list of token ids (ints >= 0) or a dict {embedding module name: such a list}",
        )


class LoRALayer(WeightMergingLayer):
    """What the LoRA wrappers share: the scale, the merge bookkeeping and the declared weights."""

    adapter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    method = "lora"
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        self.init = config.init
        self.loftq_iter = config.loftq_iter
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.init == "loftq" and quant_kind(self.base) not in ("nf4", "fp4"):
            raise TypeError(
                f"LoRAConfig.init='loftq' needs a bitsandbytes 4-bit base layer (lightning_peft.quantize(model, "
                f"'nf4') first), and this one is a {type(self.base).__name__}"
                + (f" ({quant_kind(self.base)})" if is_quantized(self.base) else "")
                + "; use init='kaiming' or 'gaussian', or exclude it from target_modules"
            )

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` laid out like the base layer's weight."""
        raise NotImplementedError

    def update(self, x: Tensor) -> Tensor:
        """The adapter's term alone, ``scaling * B A dropout(x)``, for inputs ``x`` (a mixed batch's rows)."""
        raise NotImplementedError

    def unmerge(self) -> None:
        if self._merged and self.__dict__.get("_requantized"):
            raise TypeError(
                f"{type(self).__name__} was merged into {describe(self.base)} by quantizing again "
                "(lightning_peft.merge_requantized); the original quantized weights are gone, so it cannot be "
                "unmerged. Load the base model again to get them back."
            )
        super().unmerge()

    def _merge(self) -> None:
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))

    def _unmerge(self) -> None:
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))

    def _add_update(self, result: Tensor, hidden: Tensor) -> Tensor:
        """``result + scaling * hidden @ B^T`` in one fused ``addmm`` (no full-size temporaries)."""
        lora_B = self.lora_B
        if result.dtype != lora_B.dtype:
            return result + (F.linear(hidden, lora_B) * self.scaling).to(result.dtype)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), lora_B.t(), alpha=self.scaling
        )
        return out.view(result.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class LoRALinear(LoRALayer):
    """LoRA around ``nn.Linear``, transformers' ``Conv1D`` (whose weight is stored in x out) or a
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (QLoRA: the adapter in the layer's compute dtype).
    """

    adapter_names = ("lora_A", "lora_B", "lora_B_bias")
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"}

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_layer.weight
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D: y = x @ W + b
        if is_quantized(base_layer):  # a packed weight: its shape is not (out, in)
            in_features, out_features = base_layer.in_features, base_layer.out_features
            factory = adapter_factory(base_layer)
        else:
            in_features, out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
            factory = self.adapter_factory(weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, **factory))
        #: ``lora_bias``: B's bias c (out,), so the update is ``s (B A x + c)``; None without it.
        self.lora_B_bias = nn.Parameter(torch.zeros(out_features, **factory)) if config.lora_bias else None
        # PiSSA's/OLoRA's initial (A_0, B_0), kept to save the adapter converted to plain LoRA (lora_init).
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        #: Set by injection: where layers reading the same input share one ``x [A_1; A_2; ...]^T``.
        self.shared_inputs: SharedInputs | None = None
        if lora_init.rewrites_base(self.init) and (is_quantized(base_layer) or not weight.is_floating_point()):
            raise TypeError(
                f"LoRAConfig.init={self.init!r} rewrites the base weight from its SVD/QR and needs a float one; this "
                f"layer is {describe(base_layer)}. Initialize before quantizing, or use init='kaiming'"
            )
        if self.init == "olora" and self.fan_in_fan_out:
            raise TypeError(
                "LoRAConfig.init='olora' is refused on transformers' Conv1D (its weight is stored in x out, and peft's "
                "OLoRA factors it untransposed, which gives adapters of the wrong shape); use init='pissa' or 'kaiming'"
            )
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        bias = getattr(self, "lora_B_bias", None)
        if bias is not None:  # zero, as peft's; "random" (peft's init False) draws it as nn.Linear(r, out) does
            bound = 1 / math.sqrt(self.r) if self.init == "random" else 0.0
            nn.init.uniform_(bias, -bound, bound)
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        elif self.init == "random":  # peft's init_lora_weights=False: both as nn.Linear initializes its weight
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            return
        elif self.init == "orthogonal":
            lora_init.draw_like_peft(tuple(self.lora_A.shape), tuple(self.lora_B.shape))
            lora_A, lora_B = lora_init.orthogonal(self.r, self.lora_A.shape[1], self.lora_B.shape[0])
            with torch.no_grad():
                self.lora_A.copy_(lora_A)
                self.lora_B.copy_(lora_B)
            return
        elif lora_init.rewrites_base(self.init):
            self._residual_init()
            return
        else:  # "kaiming", and "loftq" until loftq_init: B = 0 keeps the quantized model unchanged
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _residual_init(self) -> None:
        """PiSSA/OLoRA: ``(A, B) = (A_0, B_0)`` from the base weight, which becomes ``W - s B_0 A_0``.

        Once per layer: a second reset (a strategy materializing the module again) takes the kept
        ``A_0, B_0`` back, since the base weight already holds the residual.
        """
        with torch.no_grad():
            if self.lora_A0 is None:
                stored = self.base.weight
                weight = (stored.t() if self.fan_in_fan_out else stored).to(torch.float32)  # (out, in)
                lora_init.draw_like_peft(tuple(self.lora_A.shape), tuple(self.lora_B.shape))
                if self.init == "olora":
                    lora_A, lora_B, residual = lora_init.olora(weight, self.r, self.scaling)
                else:
                    lora_A, lora_B, residual = lora_init.pissa(weight, self.r, self.scaling, self.init)
                lora_init.remember(stored)
                residual = residual.to(stored.dtype)
                stored.copy_(residual.t() if self.fan_in_fan_out else residual)
                self.lora_A0 = lora_A.to(self.lora_A.dtype)
                self.lora_B0 = lora_B.to(self.lora_B.dtype)
            self.lora_A.copy_(self.lora_A0)
            self.lora_B.copy_(self.lora_B0)

    def loftq_init(self, weight: Tensor) -> tuple[float, float]:
        """LoftQ: set A, B and the 4-bit base weight from the full-precision ``weight`` ``W``.

        See :func:`lightning_peft.core.quantize.loftq_decompose` for the alternation; after it
        ``deq(Q_T) + s B A`` approximates ``W`` and the base layer holds ``Q_T``.

        Returns:
            The relative errors ``||W - (deq(Q) + s B A)||_F / ||W||_F`` before and after.
        """
        base = self.base
        in_features, out_features = base.in_features, base.out_features
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(
                f"loftq: the full-precision weight has shape {tuple(weight.shape)}, but the layer is "
                f"(out, in) = {(out_features, in_features)}"
            )
        if self._merged:
            raise TypeError("loftq: the adapter is merged; it initializes unmerged LoRA adapters")
        target = weight.detach().float().to(self.lora_A.device)
        with torch.no_grad():
            before = float(
                torch.linalg.vector_norm(target - dequantized_weight(base).float() - self.delta_weight().float())
                / torch.linalg.vector_norm(target).clamp_min(torch.finfo(torch.float32).tiny)
            )
            new, lora_A, lora_B, errors = loftq_decompose(target, base, self.r, self.scaling, self.loftq_iter)
            self.lora_A.copy_(lora_A.to(self.lora_A.dtype))
            self.lora_B.copy_(lora_B.to(self.lora_B.dtype))
        holder: nn.Module = self
        while holder.base_layer is not base:  # the wrapper, of this adapter or another, right around the base
            holder = holder.base_layer
        holder.base_layer = new
        return before, min(errors)

    def delta_weight(self) -> Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    @property
    def mergeable(self) -> bool:
        return not (self.lora_B_bias is not None and self.base.bias is None) and super().mergeable

    def merge(self) -> None:
        if self.lora_B_bias is not None and self.base.bias is None:
            raise TypeError(
                f"cannot merge LoRA with lora_bias=True into a {type(self.base).__name__} with bias=False: the "
                "update's bias s * c has no base bias to go into (peft refuses this merge too). Keep the adapter "
                "unmerged"
            )
        super().merge()

    def _merge(self) -> None:
        super()._merge()
        if self.lora_B_bias is not None:
            self.base.bias.add_((self.lora_B_bias * self.scaling).to(self.base.bias.dtype))

    def _unmerge(self) -> None:
        super()._unmerge()
        if self.lora_B_bias is not None:
            self.base.bias.sub_((self.lora_B_bias * self.scaling).to(self.base.bias.dtype))

    #: Whether :meth:`merge_requantized` can fold the update into a quantized base (DoRA's rescaled
    #: weight is not an additive update: no).
    requantizable: ClassVar[bool] = True

    def merge_requantized(self) -> float:
        """Fold ``scaling * B A`` into a bitsandbytes base layer: dequantize, add, quantize again.

        The base layer is replaced by the requantized one (the adapter then passes its input
        straight to it). Returns the relative error of the second quantization (see
        :func:`lightning_peft.core.quantize.requantized`).
        """
        base = self.base
        if not is_quantized(base) or not self.requantizable or self._merged or self.lora_B_bias is not None:
            raise TypeError(
                f"{type(self).__name__} on {type(base).__name__} cannot be merged by requantizing: it needs an "
                "unmerged LoRA adapter (not DoRA, no lora_bias) on a bitsandbytes layer; lightning_peft.merge merges "
                "float layers."
            )
        new, error = requantized(base, self.delta_weight())
        holder: nn.Module = self
        while holder.base_layer is not base:  # the wrapper, of this adapter or another, right around the base
            holder = holder.base_layer
        holder.base_layer = new
        self._merged = True
        self.__dict__["_requantized"] = True
        return error

    def update(self, x: Tensor) -> Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        hidden = F.linear(x, self.lora_A)  # (..., r)
        return F.linear(hidden, self.lora_B, self.lora_B_bias) * self.scaling  # (..., out)

    def _can_fuse(self, x: Tensor) -> bool:
        """Whether the fused path computes exactly what ``base_layer(x)`` + update would.

        Only for a plain frozen ``nn.Linear``/``Conv1D`` without hooks (a strategy that gathers
        weights in a forward hook, as DeepSpeed ZeRO-3 does, keeps the generic path), no dropout,
        no autocast and one dtype throughout.
        """
        base = self.base_layer
        weight, bias = base.weight, base.bias
        return (type(base) is nn.Linear or type(base).__name__ == "Conv1D") and not (
            base._forward_hooks
            or base._forward_pre_hooks
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or not isinstance(self.dropout, nn.Identity)
            or self.lora_B_bias is not None
            or torch.is_autocast_enabled(x.device.type)
            or not x.dtype == weight.dtype == self.lora_A.dtype
        )

    def shared_weight(self) -> Tensor:
        """The down-projection that :class:`SharedInputs` concatenates with its peers' (r x in)."""
        return self.lora_A

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        if self.rows is not None:
            return self.mixed_forward(x, self.update)
        shared = self.shared_inputs
        hidden = None
        if shared is not None and isinstance(self.dropout, nn.Identity) and x.dtype == self.lora_A.dtype:
            hidden = shared.project(self, x)  # (..., r), or None: no layer known to share x
        if hidden is not None:
            if not self._can_fuse(x):
                return self._add_update(self.base_layer(x), hidden)
            base = self.base_layer
            w = base.weight if self.fan_in_fan_out else base.weight.t()  # (in, out)
            out = LoRAFromHidden.apply(
                x.reshape(-1, x.shape[-1]), w, base.bias, hidden.reshape(-1, self.r), self.lora_B, self.scaling
            )
            return out.view(*x.shape[:-1], out.shape[-1])
        if self._can_fuse(x):
            base = self.base_layer
            w = base.weight if self.fan_in_fan_out else base.weight.t()  # (in, out)
            return FusedLoRALinear.apply(x, w, base.bias, self.lora_A, self.lora_B, self.scaling)
        result = self.base_layer(x)  # (..., out)
        lora_A = self.lora_A
        x = self.dropout(x)
        if x.dtype != lora_A.dtype:
            x = x.to(lora_A.dtype)
        out = self._add_update(result, F.linear(x, lora_A))  # hidden: (..., r)
        bias = self.lora_B_bias
        return out if bias is None else out + (bias * self.scaling).to(out.dtype)


#: Wrappers for LoRA's variants, by the config flag that selects them: a variant's file builds on
#: this one and adds itself here (``dora.py``: ``use_dora``), so LoRA never imports its variants.
VARIANTS: dict[str, Callable[[nn.Module, LoRAConfig], LoRALayer]] = {}
#: Wrappers for more layer types, by the type they wrap: a file that builds on this one adds itself
#: here (as variants do), so this file stays the plain linear core (``lora_embedding.py``: nn.Embedding).
LAYER_TYPES: dict[type[nn.Module], Callable[[nn.Module, LoRAConfig], LoRALayer]] = {}
#: More steps of :func:`apply`, by the config field that asks for them (run when it is set): a file
#: that builds on this one adds itself here (``lora_param.py``: ``target_parameters``,
#: ``trainable_tokens.py``: ``trainable_token_indices``). Each returns the names it wrapped.
OPTIONS: dict[str, Callable[[nn.Module, LoRAConfig], list[str]]] = {}
#: Checks :func:`apply` runs before it wraps anything, by the config field that asks for them (``lora_param.py``:
#: ``rank_pattern``/``alpha_pattern`` keys against the module and parameter targets, for ``target_parameters``).
CHECKS: dict[str, Callable[[nn.Module, LoRAConfig], None]] = {}
#: The data-driven inits' calibration (see :data:`lightning_peft.registry.CalibrateFn`), by ``init``:
#: their file adds itself here (``lora_eva.py``: ``"eva"``, ``lora_corda.py``: ``"corda"``). Other inits draw no batch.
CALIBRATIONS: dict[str, CalibrateFn] = {}
OPTIONS["ensure_weight_tying"] = tying.tie  # the tied output layer shares the embedding's trained copy


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The LoRA wrapper for one selected module (a variant's, where its flag is set)."""
    for flag, variant in VARIANTS.items():
        if getattr(config, flag):
            return variant(module, config)
    for kind, wrapper in LAYER_TYPES.items():
        if isinstance(module, kind):
            return wrapper(module, config)
    if is_linear(module):
        return LoRALinear(module, config)
    more = "".join(f", {'nn.' * kind.__module__.startswith('torch.nn')}{kind.__name__}" for kind in LAYER_TYPES)
    raise TypeError(
        f"it is a {type(module).__name__}, which lora cannot wrap; lora wraps nn.Linear (bitsandbytes' "
        f"Linear4bit and Linear8bitLt too), transformers' Conv1D{more}"
    )


def apply(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every target (see :func:`wrap`), after making 4-bit bases keep their input gradient."""
    disable_cpu_repacking(model)  # see lightning_peft.core.quantize: else an eval forward stops training
    built: list[LoRALayer] = []

    def build(module: nn.Module, config: LoRAConfig) -> LoRALayer:
        built.append(wrap(module, config))
        return built[-1]

    for option in ("target_parameters", "trainable_token_indices"):
        if getattr(config, option) is not None and option not in OPTIONS:
            raise ValueError(
                f"LoRAConfig.{option} is set, but lightning_peft.methods.lora_param / trainable_tokens, which "
                "implement it, are not imported; import lightning_peft.methods"
            )
    for option, check_first in CHECKS.items():
        if getattr(config, option) is not None:
            check_first(model, config)
    names = inject_layers(model, config, wrap=build) if config.target_modules != [] else []
    for option, step in OPTIONS.items():
        if getattr(config, option) is not None:
            names += step(model, config)
    if config.dropout == 0:  # each layer's own dropout mask would make the inputs differ
        # Layers that read one input (q/k/v, gate/up) project it once (see core.shared_input).
        attach(model, [layer for layer in built if type(layer) is LoRALinear and layer.lora_B_bias is None])
    return names


#: peft LoraConfig fields that say what the file is, not what the adapter computes.
_PEFT_METADATA = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
#: peft LoraConfig fields that lightning_peft implements exactly (read by :func:`from_peft`).
#: ``fan_in_fan_out`` is peft's per-layer layout flag, which peft itself sets from the layer type
#: (True for Conv1D, False for nn.Linear, whatever the file says), as lightning_peft does.
_PEFT_READ = frozenset(
    {
        "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "target_modules",
        "exclude_modules", "modules_to_save", "fan_in_fan_out", "lora_bias", "target_parameters",
        "trainable_token_indices", "rank_pattern", "alpha_pattern", "bias", "layers_to_transform", "layers_pattern",
        "eva_config", "ensure_weight_tying",
    }
)  # fmt: skip
#: Every other field of peft 0.21.2's LoraConfig, with its default: the one value lightning_peft
#: implements. Any other value is refused by name (BD-LoRA, KaSA, VeLoRA, MonteCLoRA,
#: per-layer patterns, biases, trainable tokens, parameter targets, ...), never dropped.
_PEFT_DEFAULTS: dict[str, Any] = {
    "bias": "none",  # read by from_peft (see _PEFT_READ); here for adalora (see lora_bias)
    "lora_bias": False,  # read by from_peft (see _PEFT_READ); here for adalora, whose LoraConfig fields check it
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "use_qalora": False,
    "trainable_token_indices": None,  # read by from_peft; here for adalora (see lora_bias)
    "target_parameters": None,  # read by from_peft; here for adalora (see lora_bias)
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "arrow_config": None,
    "use_bdlora": None,
    "ensure_weight_tying": False,  # read by from_peft; here for adalora (see lora_bias)
    "runtime_config": {"ephemeral_gpu_offload": False},
}
#: Fields that only mean something with another one set; peft ignores them otherwise, and so does
#: lightning_peft (with the other one at its default, which is checked).
#: (peft keeps ``corda_config`` in a converted CorDA file, whose init_lora_weights=True ignores it; an unconverted
#: one, init_lora_weights="corda", is refused by lora_init.from_peft.)
_PEFT_INERT = {
    "qalora_group_size": "use_qalora",
    "megatron_core": "megatron_config",
    "corda_config": "init_lora_weights",
}


def _same_default(value: Any, default: Any) -> bool:
    """Whether a peft field holds its default (None, {} and [] all mean 'unset' in peft's JSON)."""
    unset: tuple[Any, ...] = (None, {}, [])
    return value == default or (value in unset and default in unset)


def check_peft_fields(options: Mapping[str, Any]) -> None:
    """Refuse every peft LoraConfig field that lightning_peft's LoRA does not implement with its value.

    Raises:
        ValueError: naming the field, its value in the file and the value lightning_peft implements
            (or that the field is not one of peft's LoraConfig fields at all).
    """
    for name, value in options.items():
        if name in _PEFT_METADATA or name in _PEFT_READ:
            continue
        if name in _PEFT_INERT:
            continue  # checked through the field it depends on, which is in _PEFT_DEFAULTS
        if name not in _PEFT_DEFAULTS:
            raise ValueError(
                f"peft LORA adapter_config.json has field {name!r}={value!r}, which is not a LoraConfig field "
                "lightning_peft knows; it refuses an option it cannot interpret rather than dropping it."
            )
        if not _same_default(value, _PEFT_DEFAULTS[name]):
            raise ValueError(
                f"peft LORA adapter_config.json has {name}={value!r}, which lightning_peft's lora does not implement "
                f"(supported: {name}={_PEFT_DEFAULTS[name]!r})."
            )


def to_peft(config: LoRAConfig) -> dict[str, Any]:
    """Our options as peft's ``LoraConfig`` fields (``fan_in_fan_out`` is set per layer by peft)."""
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "init_lora_weights": lora_init.to_peft(config.init),
        "eva_config": lora_init.eva_to_peft(config.eva_config),
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save or None,
        "bias": config.bias,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "fan_in_fan_out": False,
        "target_parameters": config.target_parameters,
        "trainable_token_indices": config.trainable_token_indices,
        "corda_config": lora_init.corda_to_peft(config),
        "ensure_weight_tying": config.ensure_weight_tying,
    }


def from_peft(options: dict[str, Any]) -> LoRAConfig:
    """peft's ``LoraConfig`` fields as our options: each field read exactly, or refused by name.

    ``init_lora_weights`` maps one to one (True: ``"kaiming"``, False: ``"random"``, and peft's
    ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"orthogonal"`` by name). A
    PiSSA/OLoRA adapter saved without conversion then gets its base weights' principal part
    subtracted on injection, as peft does when it loads one.
    """
    init = lora_init.from_peft(options.get("init_lora_weights", True))  # first: it names eva_config's reason
    check_peft_fields(options)
    return LoRAConfig(
        r=options["r"],
        alpha=options.get("lora_alpha", 8),
        dropout=options.get("lora_dropout", 0.0),
        rslora=options.get("use_rslora", False),
        use_dora=options.get("use_dora", False),
        lora_bias=options.get("lora_bias", False),
        init=init,
        eva_config=options.get("eva_config") or None,
        target_modules=options.get("target_modules"),
        exclude_modules=options.get("exclude_modules"),
        modules_to_save=list(options.get("modules_to_save") or []),
        target_parameters=options.get("target_parameters") or None,
        trainable_token_indices=options.get("trainable_token_indices") or None,
        rank_pattern=dict(options.get("rank_pattern") or {}),
        alpha_pattern=dict(options.get("alpha_pattern") or {}),
        bias=options.get("bias", "none"),
        layers_to_transform=_layers(options.get("layers_to_transform")),
        layers_pattern=options.get("layers_pattern") or None,
        ensure_weight_tying=options.get("ensure_weight_tying", False),
    )


def _layers(value: Any) -> Any:
    """peft's ``layers_to_transform`` as ours: peft reads ``[]`` as every layer, which is ``None`` here."""
    return None if value == [] else value


def _resolve(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """The architecture's default targets where none are given; with ``target_parameters`` and no
    ``target_modules``, no module at all (peft 0.21.2's rule: its default modules are not matched then)."""
    if config.target_modules is None and config.target_parameters:
        return tying.resolve(model, config.replace(target_modules=[]))
    return tying.resolve(model, resolve_targets(model, config, defaults=DEFAULT_TARGETS, method="lora"))


def _calibrate(model: nn.Module, config: LoRAConfig, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
    CALIBRATIONS[config.init](model, config, batches, loss_fn)


def _calibrates(config: LoRAConfig) -> bool:
    return config.init in CALIBRATIONS


register(
    Method(
        name="lora",
        config_cls=LoRAConfig,
        kind="layer",
        apply=apply,
        resolve=_resolve,
        summary="low-rank update B A added to frozen linear, embedding and conv weights; mergeable",
        paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models",
        calibrate=_calibrate,
        calibrates=_calibrates,
        peft=PeftFormat("LORA", to_peft, from_peft),
    )
)
