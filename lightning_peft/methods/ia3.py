"""(IA)^3: infused adapter by inhibiting and amplifying inner activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (T-Few). Learned vectors rescale the attention keys and values and the feed-forward
activations, elementwise::

    k = l_k * (W_k x + b_k),    v = l_v * (W_v x + b_v),    h = W_2 (l_ff * f(W_1 x)) + b_2

with every ``l`` initialized to ones, so the model starts out unchanged. Attention targets scale
their output (``y = l * (W x + b)``); feed-forward targets scale their input (``y = W (l * x) + b``),
which for the feed-forward's second projection is exactly the paper's ``l_ff * f(W_1 x)``. Both fold
into the weight: ``W <- diag(l) W, b <- l * b`` and ``W <- W diag(l)`` respectively. The T-Few
training losses live in :mod:`lightning_peft.losses`.

On ``nn.Conv2d`` / ``nn.Conv3d`` (as peft has them, for CNNs) the vector acts per channel: an
attention-style target scales each output channel, ``y[:, o] = l_o * (W * x + b)[:, o]``, a
feed-forward one each input channel, ``y = W * (l[:, None, None] x) + b``. Both fold into the kernel
``W`` (out, in / groups, k...): ``W[o] <- l_o W[o], b <- l * b``, and ``W[o, j] <- l_c W[o, j]`` for
the input channel ``c = (o // (out / groups)) * (in / groups) + j`` that kernel entry reads
(padding is per channel, so scaling the input and the kernel agree exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.config import LayerConfig, check_module_keys, invalid
from lightning_peft.core.quantize import WeightMergingLayer, adapter_factory, disable_cpu_repacking, is_quantized
from lightning_peft.core.targeting import ALL_LINEAR, architecture_default, is_linear, name_matches
from lightning_peft.core.wrapping import replace_modules, select_targets
from lightning_peft.registry import Method, PeftFormat, register

# BERT-style encoders name both the attention and the feed-forward output projection
# `*.output.dense`; only the feed-forward one sits at `layer.<i>.output.dense`.
_BERT_TARGETS = r".*\.(key|value)|.*\.layer\.\d+\.output\.dense"
_BERT_FEEDFORWARD = r".*\.layer\.\d+\.output\.dense"

#: What (IA)^3 wraps by default: keys, values and the feed-forward's second projection, as in the
#: paper. peft's defaults agree for most models; it takes queries instead of keys for gemma and
#: qwen2 and instead of values for opt, and for BERT both `*.output.dense`, the attention one as a
#: feed-forward. Pass peft's lists as target_modules / feedforward_modules to reproduce them.
DEFAULT_TARGETS: dict[str, str | list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"],
    "qwen3": ["k_proj", "v_proj", "down_proj"],
    "gemma": ["k_proj", "v_proj", "down_proj"],
    "gemma2": ["k_proj", "v_proj", "down_proj"],
    "phi3": ["qkv_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "opt": ["k_proj", "v_proj", "fc2"],
    "bert": _BERT_TARGETS,
    "roberta": _BERT_TARGETS,
    "xlm-roberta": _BERT_TARGETS,
    "distilbert": ["k_lin", "v_lin", "lin2"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wo"],
    "bart": ["k_proj", "v_proj", "fc2"],
    "vit": ["k_proj", "v_proj", "mlp.fc2"],
    "whisper": ["k_proj", "v_proj", "fc2"],
}

#: Which of the default targets are feed-forward layers (their input is scaled, not their output).
DEFAULT_FEEDFORWARD: dict[str, str | list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "phi3": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "bert": _BERT_FEEDFORWARD,
    "roberta": _BERT_FEEDFORWARD,
    "xlm-roberta": _BERT_FEEDFORWARD,
    "distilbert": ["lin2"],
    "t5": ["wo"],
    "mt5": ["wo"],
    "bart": ["fc2"],
    "vit": ["mlp.fc2"],
    "whisper": ["fc2"],
}


@dataclass(kw_only=True)
class IA3Config(LayerConfig):
    """(IA)^3 options.

    Args:
        feedforward_modules: which of the targeted modules are feed-forward layers, whose input
            (not output) is rescaled. Matched like ``target_modules`` (a list of names or a regular
            expression); as a list it must be a subset of a ``target_modules`` list. ``None`` uses
            the architecture default (restricted to the given ``target_modules`` when those are a
            list); ``[]`` treats every target as an attention projection.
        target_modules: see :class:`~lightning_peft.core.config.LayerConfig`. The default covers
            keys, values and the feed-forward's second projection.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    feedforward_modules: str | list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_modules
        try:
            check_module_keys(self, "feedforward_modules", ff, allow_str=True, allow_empty=True)
            valid = ff != ALL_LINEAR  # a layer kind, not a name: feed-forward layers must be named
        except ValueError:
            valid = False
        if not valid:
            raise invalid(self, "feedforward_modules", ff, "None, a regular expression or a list of module names")
        if isinstance(ff, tuple):
            object.__setattr__(self, "feedforward_modules", list(ff))
        targets = self.target_modules
        if isinstance(self.feedforward_modules, list) and isinstance(targets, list):
            outside = [m for m in self.feedforward_modules if m not in targets]
            if outside:
                raise invalid(
                    self,
                    "feedforward_modules",
                    self.feedforward_modules,
                    f"a subset of target_modules {targets!r} ({outside!r} are not targets)",
                )


class IA3Layer(WeightMergingLayer):
    """(IA)^3 around ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` or ``nn.Conv3d``: one vector ``ia3_l``.

    Attention layers: ``y = l * (W x + b)`` (``l`` has ``out`` entries, one per output channel of a
    conv). Feed-forward layers: ``y = W (l * x) + b`` (``l`` has ``in`` entries, one per input channel).
    """

    adapter_names = ("ia3_l",)
    method = "ia3"
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module, *, feedforward: bool) -> None:
        conv = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        if not (conv or is_linear(base_layer)):
            raise TypeError(
                f"it is a {type(base_layer).__name__}, which ia3 cannot wrap; ia3 wraps nn.Linear, "
                "transformers' Conv1D, nn.Conv2d and nn.Conv3d"
            )
        super().__init__(base_layer)
        weight: Tensor = base_layer.weight  # type: ignore[assignment]
        self.fan_in_fan_out = not isinstance(base_layer, (nn.Linear, nn.Conv2d, nn.Conv3d))  # Conv1D: y = x @ W + b
        #: For a conv, its number of spatial dimensions (2 or 3): the vector broadcasts over them.
        self.spatial_dims = weight.dim() - 2 if conv else 0
        if conv:
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
            factory = self.adapter_factory(weight)
        elif is_quantized(base_layer):  # bitsandbytes: a packed weight, the vector in the compute dtype
            in_features, out_features = base_layer.in_features, base_layer.out_features
            factory = adapter_factory(base_layer)
        else:
            in_features, out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
            factory = self.adapter_factory(weight)
        self.feedforward = feedforward
        size = in_features if feedforward else out_features
        self.ia3_l = nn.Parameter(torch.empty(size, **factory))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def to_peft_tensor(self, local: str, tensor: Tensor) -> Tensor:
        if self.spatial_dims:  # peft's conv vector: (1, C, 1, 1[, 1]) for both kinds
            return tensor.view(1, -1, *(1,) * self.spatial_dims)
        # peft stores a feed-forward vector as a row (1, in) and an attention one as a column (out, 1).
        return tensor[None, :] if self.feedforward else tensor[:, None]

    def _channel_scale(self) -> Tensor:
        """The vector shaped to multiply an activation: ``(C,)`` on the last dim, ``(C, 1, 1[, 1])`` for a conv."""
        return self.ia3_l.view(-1, *(1,) * self.spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        if self.rows is not None:
            return self._mixed(x)
        scale = self._channel_scale()
        # In the wider of the two dtypes (type promotion): a bfloat16 vector on a float32 activation
        # does not round the activation to bfloat16.
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))  # (..., in)
        result = self.base_layer(x)  # (..., out)
        return (result * scale).to(result.dtype)

    def _mixed(self, x: Tensor) -> Tensor:
        """A mixed batch: the vector scales only this adapter's rows (of the input or of the output)."""
        rows = self.mixed_rows(x)
        scale = self._channel_scale()
        if self.feedforward:
            scaled = (x.index_select(0, rows) * scale).to(x.dtype)
            return self.base_layer(x.index_copy(0, rows, scaled))
        result = self.base_layer(x)
        scaled = (result.index_select(0, rows) * scale).to(result.dtype)
        return result.index_copy(0, rows, scaled)

    def _weight_scale(self, scale: Tensor) -> Tensor:
        """``scale`` shaped to multiply the base weight along the axis it acts on."""
        if self.spatial_dims:  # a conv kernel (out, in / groups, k...)
            kernel = (1,) * self.spatial_dims
            if not self.feedforward:
                return scale.view(-1, 1, *kernel)
            conv = self.base
            groups, per_in = conv.groups, conv.in_channels // conv.groups
            # Kernel entry (o, j) reads input channel (o // (out / groups)) * per_in + j.
            by_group = scale.view(groups, 1, per_in).expand(groups, conv.out_channels // groups, per_in)
            return by_group.reshape(conv.out_channels, per_in, *kernel)
        # nn.Linear stores (out, in), Conv1D (in, out); output scaling acts on `out`, input on `in`.
        along_rows = self.feedforward == self.fan_in_fan_out
        return scale[:, None] if along_rows else scale[None, :]

    def _merge(self) -> None:
        weight, bias, scale = self.weight, self.bias, self.ia3_l
        weight.mul_(self._weight_scale(scale).to(weight.dtype))
        if not self.feedforward and bias is not None:
            bias.mul_(scale.to(bias.dtype))

    def _unmerge(self) -> None:
        weight, bias, scale = self.weight, self.bias, self.ia3_l
        zeros = int((scale == 0).sum())
        if zeros:
            raise ValueError(
                f"cannot unmerge this (IA)^3 layer: its vector has {zeros} zero entries, so merging erased "
                "those parts of the base weight. Reload the base model to get them back."
            )
        weight.div_(self._weight_scale(scale).to(weight.dtype))
        if not self.feedforward and bias is not None:
            bias.div_(scale.to(bias.dtype))

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, size={self.ia3_l.numel()}"


def resolve(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill ``target_modules`` and ``feedforward_modules`` from the architecture defaults."""
    targets = config.target_modules
    feedforward = config.feedforward_modules
    if targets is None:
        targets = architecture_default(model, DEFAULT_TARGETS, method="ia3")
    if feedforward is None:
        feedforward = architecture_default(model, DEFAULT_FEEDFORWARD, method="ia3", field="feedforward_modules")
        if isinstance(feedforward, list) and isinstance(targets, list):
            feedforward = [m for m in feedforward if m in targets]
    return config.replace(target_modules=targets, feedforward_modules=feedforward)


def apply(model: nn.Module, config: IA3Config) -> list[str]:
    """Wrap every target; those that ``feedforward_modules`` matches scale their input."""
    assert config.target_modules is not None and config.feedforward_modules is not None, "resolve() runs first"
    disable_cpu_repacking(model)  # see lightning_peft.core.quantize: else an eval forward stops training
    names = select_targets(model, config)
    feedforward = {n for n in names if name_matches(n, config.feedforward_modules)}

    def build(name: str, module: nn.Module) -> nn.Module:
        try:
            return IA3Layer(module, feedforward=name in feedforward)
        except TypeError as err:
            raise TypeError(f"{type(config).__name__}.target_modules selected {name!r}: {err}") from None

    return replace_modules(model, names, build)


_PAPER = "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"


def to_peft(config: IA3Config) -> dict[str, Any]:
    """Our options as peft's ``IA3Config`` fields.

    Raises:
        ValueError: for ``layers_to_transform``/``layers_pattern``, which peft's IA3Config (0.21.2)
            lacks: peft would adapt every layer of the file's targets.
    """
    for name in ("layers_to_transform", "layers_pattern"):
        if getattr(config, name) is not None:
            raise ValueError(
                f"IA3Config.{name}={getattr(config, name)!r} has no place in peft's format: peft's IA3Config has no "
                f"{name} field, so peft would adapt the targets in every layer. Save it with "
                "lightning_peft.save_adapter, or name the layers in target_modules instead (full names, or a regex)."
            )
    return {
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save or None,
        "init_ia3_weights": True,
        "fan_in_fan_out": False,
    }


#: peft IA3Config fields that say what the file is, or that lightning_peft reads exactly below.
#: ``fan_in_fan_out`` is peft's per-layer layout flag, which peft sets from the layer type itself
#: (True for Conv1D, False for nn.Linear), as lightning_peft does.
_PEFT_READ = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "target_modules", "feedforward_modules", "exclude_modules", "modules_to_save",
        "fan_in_fan_out",
    }
)  # fmt: skip


def from_peft(options: dict[str, Any]) -> IA3Config:
    """peft's ``IA3Config`` fields as our options: each read exactly, or refused by name.

    ``init_ia3_weights=False`` (peft's random vectors instead of ones) is refused: lightning_peft's
    (IA)^3 always starts at the identity.
    """
    for name, value in options.items():
        if name == "init_ia3_weights" and value is not True:
            raise ValueError(
                f"peft IA3 adapter_config.json has init_ia3_weights={value!r}, which lightning_peft's ia3 does not "
                "implement (supported: init_ia3_weights=True, vectors of ones at init)."
            )
        if name not in _PEFT_READ and name != "init_ia3_weights":
            raise ValueError(
                f"peft IA3 adapter_config.json has field {name!r}={value!r}, which is not an IA3Config field "
                "lightning_peft knows; it refuses an option it cannot interpret rather than dropping it."
            )
    return IA3Config(
        target_modules=options.get("target_modules"),
        feedforward_modules=options.get("feedforward_modules") or [],
        exclude_modules=options.get("exclude_modules"),
        modules_to_save=list(options.get("modules_to_save") or []),
    )


register(
    Method(
        name="ia3",
        config_cls=IA3Config,
        kind="layer",
        apply=apply,
        resolve=resolve,
        summary="learned vectors rescaling keys, values and feed-forward activations; mergeable",
        paper=_PAPER,
        peft=PeftFormat("IA3", to_peft, from_peft),
    )
)
