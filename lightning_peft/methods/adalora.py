"""AdaLoRA: adaptive budget allocation (Zhang et al., 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", ICLR 2023).

A frozen weight ``W`` (out x in) gets an update in SVD form::

    h = W x + (alpha / init_r) * P diag(lambda) Q dropout(x),   P: out x r,  lambda: r,  Q: r x in

(peft's ``lora_B``, ``lora_E``, ``lora_A``), with ``lambda = 0`` at init so the model starts out
unchanged. Each triplet ``(P[:, i], lambda_i, Q[i, :])`` is one rank. During training the least
important triplets are pruned (``lambda_i = 0``) until the total budget has fallen from ``init_r``
to ``target_r`` per layer. After optimizer step ``t`` (1, 2, ..., T)::

    sensitivity     I(w) = |w * dL/dw|            for every entry w of P, lambda and Q
    smoothed        Ibar = beta1 * Ibar + (1 - beta1) * I
    uncertainty     Ubar = beta2 * Ubar + (1 - beta2) * |I - Ibar|
    triplet score   S_i  = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji),    s = Ibar * Ubar
    budget          b(t) = b(0)                                                      t <= tinit
                    b(t) = floor(b(T) + (b(0) - b(T)) (1 - (t - tinit) / (T - tfinal - tinit))^3)
                    b(t) = b(T)                                                      t >= T - tfinal

with ``b(0) = init_r * n`` and ``b(T) = target_r * n`` over the ``n`` adapted layers. Every
``delta_t`` steps of the budgeting phase, and at ``T - tfinal``, the ``b(t)`` triplets with the
highest scores (over all layers) are kept and the others' ``lambda`` zeroed; after ``T - tfinal``
that final pattern is re-applied every step. The loss gets the orthogonality penalty::

    R = orth_reg_weight * mean over the 2n matrices of ||Q Q^T - I||_F and ||P^T P - I||_F

On a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (QLoRA) the adapter is created in the
layer's compute dtype and trains on top of the dequantized weight; merging is refused there (it
would mean requantizing), as for LoRA.

On an ungrouped ``nn.Conv2d`` (as peft's ``SVDConv2d``) ``Q`` is ``r x (in kh kw)`` and the update
is a conv whose kernel is ``P diag(lambda) Q`` laid out as the base kernel (out, in, kh, kw), with
the base layer's stride, padding (zeros) and dilation::

    h = W * x + b + (alpha / init_r) * reshape(P diag(lambda) Q) * dropout(x)

so merging adds that kernel to ``W`` (refused where the base pads other than with zeros).

Where it runs: :func:`lightning_peft.api.training.on_step` and ``regularization`` (PEFTCallback
calls both). The kept/pruned pattern is the ``rank_mask`` buffer, saved with the adapter, so loading
restores the pruned ranks; the importance statistics are training state (in checkpoints, not in
adapter files). Differences from peft: exactly ``b(t)`` triplets are kept (peft prunes every
triplet tied with the k-th score), and scores are updated through step ``T - tfinal`` inclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.config import (
    BIAS_SCOPES,
    LayerConfig,
    check_choice,
    check_positive,
    check_positive_int,
    check_probability,
    invalid,
)
from lightning_peft.core.quantize import (
    WeightMergingLayer,
    adapter_factory,
    disable_cpu_repacking,
    features,
    is_quantized,
)
from lightning_peft.core.targeting import is_linear
from lightning_peft.core.wrapping import inject_layers, resolve_targets
from lightning_peft.registry import ALL_SHARDINGS, Method, PeftFormat, register

#: peft's AdaLoRA defaults, so that configs carry over.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def _check_count(config: object, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(config, field, value, "a non-negative integer")


@dataclass(kw_only=True)
class AdaLoRAConfig(LayerConfig):
    """AdaLoRA options (peft's names in brackets where they differ).

    Args:
        init_r: rank of every adapter at the start.
        target_r: average rank per layer at the end: the final budget is ``target_r`` times the
            number of adapted layers, shared out by importance. At most ``init_r``.
        alpha: the update is scaled by ``alpha / init_r`` [lora_alpha].
        dropout: dropout on the adapter's input, in [0, 1) [lora_dropout].
        tinit: warm-up steps before any rank is pruned.
        tfinal: final steps that fine-tune the final rank pattern without changing it.
        delta_t: steps between two budget allocations [deltaT].
        beta1: EMA coefficient of the smoothed sensitivity, in (0, 1).
        beta2: EMA coefficient of the uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality penalty on P and Q (0 turns it off).
        total_step: number of optimizer steps the schedule spans. ``None`` takes it from the
            training loop (PEFTCallback: the Trainer's estimated number of steps).
        bias: base biases that train with the adapter, as LoRA's (peft's AdaLoraConfig has it from
            LoraConfig): ``"none"``, ``"lora_only"`` (the adapted layers' own) or ``"all"``.
        target_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        layers_to_transform: see :class:`~lightning_peft.core.config.LayerConfig`.
        layers_pattern: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "bias", self.bias, BIAS_SCOPES)
        check_positive_int(self, "init_r", self.init_r)
        check_positive_int(self, "target_r", self.target_r)
        if self.target_r > self.init_r:
            raise invalid(self, "target_r", self.target_r, f"at most init_r ({self.init_r})")
        check_positive(self, "alpha", self.alpha)
        check_probability(self, "dropout", self.dropout)
        _check_count(self, "tinit", self.tinit)
        _check_count(self, "tfinal", self.tfinal)
        check_positive_int(self, "delta_t", self.delta_t)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise invalid(self, name, value, "a number in (0, 1)")
        weight = self.orth_reg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise invalid(self, "orth_reg_weight", weight, "a number >= 0")
        if self.total_step is not None:
            check_positive_int(self, "total_step", self.total_step)
            self.check_schedule(self.total_step)

    @property
    def bias_scope(self) -> Literal["none", "adapted", "all"]:
        return BIAS_SCOPES[self.bias]

    def check_schedule(self, total_steps: int, source: str = "total_step") -> None:
        """Raise unless warm-up and final phase leave steps to prune in (``tinit + tfinal < T``)."""
        if self.tinit + self.tfinal >= total_steps:
            raise ValueError(
                f"AdaLoRAConfig.tinit + tfinal must be smaller than the number of training steps "
                f"({source}={total_steps}), so that the budget has steps to fall from init_r to target_r; "
                f"got tinit={self.tinit}, tfinal={self.tfinal}."
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r


def budget(config: AdaLoRAConfig, step: int, total_steps: int, layers: int) -> int:
    """The total number of triplets kept after optimizer step ``step`` (the cubic schedule b(t))."""
    initial, final = config.init_r * layers, config.target_r * layers
    if step <= config.tinit:
        return initial
    if step >= total_steps - config.tfinal:
        return final
    progress = (step - config.tinit) / (total_steps - config.tfinal - config.tinit)
    return int(final + (initial - final) * (1 - progress) ** 3)


def _full(tensor: Tensor) -> Tensor:
    """The whole of a DTensor (FSDP2 shards parameters and gradients; an all-gather, differentiable),
    else the tensor itself. Importance scores and the orthogonality penalty need whole matrices."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class SVDLinear(WeightMergingLayer):
    """AdaLoRA around ``nn.Linear``, transformers' ``Conv1D`` or a bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt`` (the adapter then in the layer's compute dtype; no merge):
    ``h = W x + scaling * P diag(lambda) Q x``.
    """

    adapter_names = ("lora_A", "lora_E", "lora_B", "rank_mask")
    training_state_names = tuple(f"{kind}_{m}" for kind in ("sensitivity", "uncertainty") for m in "AEB")
    method = "adalora"

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig) -> None:
        super().__init__(base_layer)
        base = self.base
        weight = base.weight
        in_features, out_features, factory = self._features(base)
        self.r = config.init_r
        self.scaling = config.scaling
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))  # Q (right singular vectors)
        self.lora_E = nn.Parameter(torch.empty(self.r, **factory))  # lambda (singular values)
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))  # P (left singular vectors)
        self.register_buffer("rank_mask", torch.ones(self.r, dtype=torch.bool, device=weight.device))
        for kind in ("sensitivity", "uncertainty"):
            for m in "AEB":
                shape = getattr(self, f"lora_{m}").shape
                self.register_buffer(f"{kind}_{m}", torch.zeros(shape, dtype=torch.float32, device=weight.device))
        self.reset_adapter_parameters()

    def _features(self, base: nn.Module) -> tuple[int, int, dict[str, Any]]:
        """``(in, out, factory)``: the sizes of ``Q`` (r x in) and ``P`` (out x r), their device and dtype."""
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D: y = x @ W + b
        if is_quantized(base):  # a packed weight: its shape is not (out, in); bitsandbytes layers are nn.Linear
            in_features, out_features = features(base)
            return in_features, out_features, adapter_factory(base)
        in_features, out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        return in_features, out_features, self.adapter_factory(base.weight)

    def reset_adapter_parameters(self) -> None:
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)

    def delta_weight(self) -> Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E[:, None]) * self.scaling  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def _merge(self) -> None:
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))

    def _unmerge(self) -> None:
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.bypassed:
            return result
        lora_A = self.lora_A
        x = self.dropout(x)
        if x.dtype != lora_A.dtype:
            x = x.to(lora_A.dtype)
        hidden = F.linear(x, lora_A * self.lora_E[:, None])  # (..., r)
        return result + (F.linear(hidden, self.lora_B) * self.scaling).to(result.dtype)

    # ------------------------------------------------------------------ budget allocation

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivity ``|w * grad|`` into the smoothed sensitivity and uncertainty."""
        for m in "AEB":
            param = getattr(self, f"lora_{m}")
            if param.grad is None:
                continue
            sensitivity = (_full(param) * _full(param.grad)).abs().float()
            smoothed, uncertainty = getattr(self, f"sensitivity_{m}"), getattr(self, f"uncertainty_{m}")
            smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)

    def triplet_scores(self) -> Tensor:
        """``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ibar * Ubar``; shape (r,)."""
        a = self.sensitivity_A * self.uncertainty_A  # (r, in)
        e = self.sensitivity_E * self.uncertainty_E  # (r,)
        b = self.sensitivity_B * self.uncertainty_B  # (out, r)
        return e + a.mean(dim=1) + b.mean(dim=0)

    @torch.no_grad()
    def apply_rank_mask(self) -> None:
        """Zero the singular values of pruned triplets."""
        values = self.lora_E
        if hasattr(values, "full_tensor"):  # FSDP2: a sharded DTensor; write each rank's shard of the result
            from torch.distributed.tensor import distribute_tensor

            masked = values.full_tensor().masked_fill(~self.rank_mask, 0.0)
            values.copy_(distribute_tensor(masked, values.device_mesh, values.placements))
        else:
            values.masked_fill_(~self.rank_mask, 0.0)

    def extra_repr(self) -> str:
        return f"init_r={self.r}, scaling={self.scaling:g}"


class SVDConv2d(SVDLinear):
    """AdaLoRA around an ungrouped ``nn.Conv2d`` (peft's ``SVDConv2d``): ``Q`` is r x (in kh kw) and
    ``h = W * x + b + scaling * reshape(P diag(lambda) Q) * dropout(x)``, a conv with the base's
    stride, zero padding and dilation."""

    def __init__(self, base_layer: nn.Conv2d, config: AdaLoRAConfig) -> None:
        if base_layer.groups != 1:  # peft reshapes the (out, in kh kw) update into the grouped kernel and fails
            raise TypeError(
                f"it is a Conv2d with groups={base_layer.groups}, which adalora cannot wrap (its update "
                "P diag(lambda) Q reads every input channel, and peft's SVDConv2d fails to lay it out as a grouped "
                "kernel); adalora wraps ungrouped nn.Conv2d"
            )
        super().__init__(base_layer, config)

    def _features(self, base: nn.Module) -> tuple[int, int, dict[str, Any]]:
        self.fan_in_fan_out = False
        weight: Tensor = base.weight  # (out, in, kh, kw)
        return math.prod(weight.shape[1:]), weight.shape[0], self.adapter_factory(weight)

    def delta_weight(self) -> Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E[:, None]) * self.scaling  # (out, in kh kw)
        return delta.reshape(self.base.weight.shape)  # (out, in, kh, kw)

    @property
    def mergeable(self) -> bool:
        return self.base.padding_mode == "zeros" and super().mergeable

    def merge(self) -> None:
        mode = self.base.padding_mode
        if mode != "zeros":  # the update's conv pads with zeros (as peft's does); a merged kernel would not
            raise TypeError(
                f"cannot merge AdaLoRA into a Conv2d with padding_mode={mode!r}: its update's conv pads with zeros, as "
                "peft's does, so the merged kernel would give other outputs at the borders. Keep the adapter "
                "unmerged, or use padding_mode='zeros'."
            )
        super().merge()

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (B, out, H', W')
        if self.bypassed:
            return result
        base = self.base
        x = self.dropout(x)
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        update = F.conv2d(x, self.delta_weight(), None, base.stride, base.padding, base.dilation)
        return result + update.to(result.dtype)


def wrap(module: nn.Module, config: AdaLoRAConfig) -> SVDLinear:
    """The AdaLoRA wrapper for one selected module."""
    if isinstance(module, nn.Conv2d):
        return SVDConv2d(module, config)
    if is_linear(module):
        return SVDLinear(module, config)
    raise TypeError(
        f"it is a {type(module).__name__}, which adalora cannot wrap; adalora wraps nn.Linear (bitsandbytes' "
        "Linear4bit and Linear8bitLt too), transformers' Conv1D and ungrouped nn.Conv2d"
    )


def apply(model: nn.Module, config: AdaLoRAConfig) -> list[str]:
    """Wrap every target (see :func:`wrap`), after making 4-bit bases keep their input gradient."""
    disable_cpu_repacking(model)  # see lightning_peft.core.quantize: else an eval forward stops training
    return inject_layers(model, config, wrap=wrap)


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    """(name, layer) for every AdaLoRA layer of ``model``, in module order."""
    return [(n, m) for n, m in state.adapter_modules(model) if isinstance(m, SVDLinear)]


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """The current rank (kept triplets) of every AdaLoRA layer, by module name."""
    return {name: int(layer.rank_mask.sum()) for name, layer in svd_layers(model)}


@torch.no_grad()
def allocate(layers: list[SVDLinear], keep: int) -> None:
    """Keep the ``keep`` triplets with the highest scores over all ``layers``; prune the rest."""
    scores = [layer.triplet_scores() for layer in layers]
    device = scores[0].device
    flat = torch.cat([s.to(device) for s in scores])  # (n * init_r,)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[flat.topk(min(keep, flat.numel())).indices] = True
    for layer, mask in zip(layers, kept.split([s.numel() for s in scores]), strict=True):
        layer.rank_mask.copy_(mask)
        layer.apply_rank_mask()


def on_step(model: nn.Module, config: AdaLoRAConfig, step: int, total_steps: int | None) -> None:
    """Update importance scores and, on the schedule, reallocate the rank budget (see the module doc)."""
    total = config.total_step if config.total_step is not None else total_steps
    if total is None:
        raise ValueError(
            "adalora needs the number of training steps for its budget schedule: set AdaLoRAConfig.total_step, "
            "or pass total_steps to on_step (PEFTCallback takes it from the Trainer's max_steps / max_epochs)."
        )
    config.check_schedule(total, "total_step" if config.total_step is not None else "total_steps")
    layers = [layer for _, layer in svd_layers(model)]
    final_step = total - config.tfinal
    if step > final_step:
        for layer in layers:
            layer.apply_rank_mask()  # the optimizer may have moved pruned singular values off zero
        return
    for layer in layers:
        layer.update_importance(config.beta1, config.beta2)
    if step == final_step or (step > config.tinit and step % config.delta_t == 0):
        allocate(layers, budget(config, step, total, len(layers)))


def regularization(model: nn.Module, config: AdaLoRAConfig) -> Tensor | None:
    """``orth_reg_weight`` times the mean of ``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` over all layers."""
    if config.orth_reg_weight == 0:
        return None
    terms: list[Tensor] = []
    for _, layer in svd_layers(model):
        lora_A, lora_B = _full(layer.lora_A), _full(layer.lora_B)
        eye = torch.eye(layer.r, device=lora_A.device, dtype=lora_A.dtype)
        terms.append(torch.linalg.matrix_norm(lora_A @ lora_A.T - eye))
        terms.append(torch.linalg.matrix_norm(lora_B.T @ lora_B - eye))
    device = terms[0].device
    return config.orth_reg_weight * torch.stack([t.to(device) for t in terms]).mean()


#: peft AdaLoraConfig fields that lightning_peft's adalora reads exactly (see :func:`from_peft`), by our name.
_PEFT_NAMES = {
    "init_r": "init_r", "target_r": "target_r", "lora_alpha": "alpha", "lora_dropout": "dropout", "tinit": "tinit",
    "tfinal": "tfinal", "deltaT": "delta_t", "beta1": "beta1", "beta2": "beta2",
    "orth_reg_weight": "orth_reg_weight", "total_step": "total_step",
}  # fmt: skip


def to_peft(config: AdaLoRAConfig) -> dict[str, Any]:
    """Our options as peft's ``AdaLoraConfig`` fields.

    ``rank_pattern`` (which ranks budget allocation kept) is written by the interop layer from the
    layers' ``rank_mask``; ``total_step`` must be known, as peft's config refuses ``None``.

    Raises:
        ValueError: when ``total_step`` is ``None`` (the schedule was left to the training loop).
    """
    if config.total_step is None:
        raise ValueError(
            "peft's AdaLoraConfig requires total_step (a positive int), and this adapter's AdaLoRAConfig.total_step "
            "is None (the schedule took it from the training loop); pass total_step=<steps> to save_peft_adapter "
            "(PEFTCallback passes the Trainer's), or set AdaLoRAConfig.total_step."
        )
    out: dict[str, Any] = {peft: getattr(config, ours) for peft, ours in _PEFT_NAMES.items()}
    return {
        **out,
        "r": config.init_r,  # peft's AdaLoRA ignores r (it warns unless r is LoraConfig's default 8)
        "init_lora_weights": True,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save or None,
        "bias": config.bias,
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
    }


def from_peft(options: dict[str, Any]) -> AdaLoRAConfig:
    """peft's ``AdaLoraConfig`` fields as our options: each read exactly, or refused by name.

    AdaLoraConfig is a LoraConfig: its LoRA fields must hold the value peft's AdaLoRA implements
    (``use_dora``, ``use_rslora``, patterns, ... refused otherwise). ``r`` is ignored by peft's AdaLoRA
    (``init_r`` is the rank), so it is here; ``init_lora_weights`` True or False only picks the
    starting values that the file's tensors replace. ``rank_pattern`` is read by the interop layer
    (it sets the layers' ``rank_mask``).
    """
    from lightning_peft.methods import lora  # peft's LoraConfig fields, which AdaLoraConfig inherits

    for name, value in options.items():
        if name in lora._PEFT_METADATA or name in _PEFT_NAMES or name in ("r", "target_modules", "exclude_modules"):
            continue
        if name in (
            "modules_to_save",
            "fan_in_fan_out",
            "rank_pattern",
            "layers_to_transform",
            "layers_pattern",
            "bias",
        ):
            continue  # fan_in_fan_out: set per layer type, by peft as here; rank_pattern: the interop layer's
        if name in lora._PEFT_INERT:
            continue
        supported = {"init_lora_weights": True, "use_dora": False, "use_rslora": False}
        if name == "init_lora_weights":
            if not isinstance(value, bool):
                raise ValueError(
                    f"peft ADALORA adapter_config.json has init_lora_weights={value!r}, which lightning_peft's adalora "
                    "does not implement (supported: True or False)."
                )
            continue
        default = supported.get(name, lora._PEFT_DEFAULTS.get(name, _UNKNOWN))
        if default is _UNKNOWN:
            raise ValueError(
                f"peft ADALORA adapter_config.json has field {name!r}={value!r}, which is not an AdaLoraConfig field "
                "lightning_peft knows; it refuses an option it cannot interpret rather than dropping it."
            )
        if not lora._same_default(value, default):
            raise ValueError(
                f"peft ADALORA adapter_config.json has {name}={value!r}, which lightning_peft's adalora does not "
                f"implement (supported: {name}={default!r})."
            )
    read = {ours: options[peft] for peft, ours in _PEFT_NAMES.items() if options.get(peft) is not None}
    return AdaLoRAConfig(
        **read,
        target_modules=options.get("target_modules"),
        exclude_modules=options.get("exclude_modules"),
        modules_to_save=list(options.get("modules_to_save") or []),
        layers_to_transform=None if options.get("layers_to_transform") == [] else options.get("layers_to_transform"),
        layers_pattern=options.get("layers_pattern") or None,
        bias=options.get("bias", "none"),
    )


_UNKNOWN = object()


register(
    Method(
        name="adalora",
        config_cls=AdaLoRAConfig,
        kind="layer",
        apply=apply,
        resolve=partial(resolve_targets, defaults=DEFAULT_TARGETS, method="adalora"),
        on_step=on_step,
        on_step_uses_adapter=True,
        regularization=regularization,
        # The hooks read whole parameters and param.grad: the strategies make them whole for the hooks
        # (FSDP2's shards are gathered here) and write the penalty's and on_step's edits back.
        sharding=ALL_SHARDINGS,
        peft=PeftFormat("ADALORA", to_peft, from_peft),
        summary="SVD-form low-rank updates P diag(lambda) Q whose rank budget is pruned by importance "
        "on a cubic schedule; mergeable",
        paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    )
)
