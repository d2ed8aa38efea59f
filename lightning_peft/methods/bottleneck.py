"""Bottleneck adapters: small down-project / non-linearity / up-project blocks inside each layer.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (after the attention and the
feed-forward sublayer); Pfeiffer et al., 2020, "AdapterFusion: Non-Destructive Task Composition
for Transfer Learning" (after the feed-forward sublayer only); He et al., 2022, "Towards a Unified
View of Parameter-Efficient Transfer Learning" (parallel to the sublayer, scaled). With
``adapter(h) = W_up f(W_down h + b_down) + b_up``, ``W_down``: (d/reduction_factor) x d::

    sequential:  y = h + s * adapter(h),      h = sublayer(x)     (wraps the sublayer's output projection)
    parallel:    y = sublayer(x) + s * adapter(x)                 (wraps the whole sublayer)

Initialization: Houlsby et al. 2019's near-identity init (near-zero projections around the skip
connection), as AdapterHub implements it: ``W_down`` from a normal distribution with standard
deviation ``1e-2`` truncated at two standard deviations and ``b_down = 0`` (AdapterHub's
``init_weights="houlsby"``); ``W_up`` and ``b_up`` zero, so the model starts out exactly unchanged
(AdapterHub's ``"mam_adapter"`` init; LoRA's ``B = 0``). The zero ``b_down`` matters for ReLU:
``nn.Linear``'s default bias, uniform in +-1/sqrt(width), outweighs ``W_down h`` for small hidden
states, so a narrow bottleneck (4 units on a width of 64) could start with every unit dead on
every token and never get a gradient. With ``W_up = 0`` the first backward reaches ``W_up`` and
``b_up`` only; ``W_down`` and ``b_down`` get gradients once ``W_up`` has moved (one optimizer step).

Sequential adapters wrap each sublayer's output projection, so they act on its output before the
residual connection and layer norm, in every architecture. Parallel adapters need the sublayer's
input, so they wrap the attention or feed-forward block itself (whose first output is the hidden
states). The adapter is non-linear, so it cannot be merged into a weight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lightning_peft.core.config import LayerConfig, check_choice, check_positive
from lightning_peft.core.layer import AdapterLayer
from lightning_peft.core.targeting import architecture_default, find_base_model, is_linear, model_type
from lightning_peft.core.wrapping import replace_modules, select_targets
from lightning_peft.registry import Method, register

Targets = str | list[str]

_DECODER: dict[str, Targets] = {"attention": ["self_attn.o_proj"], "ffn": ["mlp.down_proj"]}
# BERT-style encoders name both output projections `*.output.dense`; the feed-forward one is
# `layer.<i>.output.dense`, which only a regular expression tells apart.
_BERT: dict[str, Targets] = {"attention": ["attention.output.dense"], "ffn": r".*\.layer\.\d+\.output\.dense"}
_SEQ2SEQ: dict[str, Targets] = {"attention": ["self_attn.out_proj", "encoder_attn.out_proj"], "ffn": ["fc2"]}
_T5: dict[str, Targets] = {"attention": ["SelfAttention.o", "EncDecAttention.o"], "ffn": ["DenseReluDense.wo"]}

#: Sequential placement: the output projection of each sublayer.
SEQUENTIAL_DEFAULTS: dict[str, dict[str, Targets]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER),
    "gpt2": {"attention": ["attn.c_proj"], "ffn": ["mlp.c_proj"]},
    "gpt_neox": {"attention": ["attention.dense"], "ffn": ["mlp.dense_4h_to_h"]},
    "falcon": {"attention": ["self_attention.dense"], "ffn": ["mlp.dense_4h_to_h"]},
    "opt": {"attention": ["self_attn.out_proj"], "ffn": ["fc2"]},
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), _BERT),
    "distilbert": {"attention": ["attention.out_lin"], "ffn": ["ffn.lin2"]},
    **dict.fromkeys(("t5", "mt5"), _T5),
    **dict.fromkeys(("bart", "whisper"), _SEQ2SEQ),
    "vit": {"attention": ["attention.o_proj"], "ffn": ["mlp.fc2"]},
}

#: Parallel placement: the attention / feed-forward block, where the model has it as one module
#: that returns the sublayer's output before the residual connection. BART-style layers compute
#: their feed-forward inline; BERT-style layers also fold the residual and layer norm into both
#: blocks; neither has such a module there.
_BLOCKS: dict[str, Targets] = {"attention": ["self_attn"], "ffn": ["mlp"]}
_T5_BLOCKS: dict[str, Targets] = {"attention": ["SelfAttention", "EncDecAttention"], "ffn": ["DenseReluDense"]}
_SEQ2SEQ_BLOCKS: dict[str, Targets] = {"attention": ["self_attn", "encoder_attn"]}
_NO_BLOCKS: dict[str, Targets] = {}

PARALLEL_DEFAULTS: dict[str, dict[str, Targets]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _BLOCKS),
    "gpt2": {"attention": ["attn"], "ffn": ["mlp"]},
    "gpt_neox": {"attention": ["attention"], "ffn": ["mlp"]},
    "falcon": {"attention": ["self_attention"], "ffn": ["mlp"]},
    "opt": {"attention": ["self_attn"]},
    "distilbert": {"attention": ["attention"], "ffn": ["ffn"]},
    **dict.fromkeys(("t5", "mt5"), _T5_BLOCKS),
    **dict.fromkeys(("bart", "whisper"), _SEQ2SEQ_BLOCKS),
    "vit": {"attention": ["attention"], "ffn": ["mlp"]},
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), _NO_BLOCKS),
}

#: Standard deviation of the down-projection's initial weights (AdapterHub's "houlsby" init;
#: Houlsby et al. 2019 report adapters robust to the init scale up to about this value).
INIT_STD = 1e-2

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_PLACEMENTS = {"attention": ("attention",), "ffn": ("ffn",), "both": ("attention", "ffn")}


@dataclass(kw_only=True)
class BottleneckConfig(LayerConfig):
    """Bottleneck adapter options.

    Args:
        reduction_factor: the bottleneck has ``width / reduction_factor`` units (rounded down),
            ``width`` being the hidden size the adapter reads.
        placement: which sublayers get an adapter when ``target_modules`` is None:
            ``"ffn"`` (Pfeiffer et al.), ``"attention"``, or ``"both"`` (Houlsby et al.).
        variant: ``"sequential"`` (after the sublayer) or ``"parallel"`` (beside it, He et al.).
        activation: the non-linearity between the projections: relu, gelu, silu or tanh.
        scaling: ``s``, the factor on the adapter's output (He et al. use 4 for parallel adapters).
        target_modules: modules to wrap instead of the ``placement`` default: output projections
            for sequential adapters, whole attention / feed-forward blocks for parallel ones.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    reduction_factor: float = 16.0
    placement: Literal["attention", "ffn", "both"] = "ffn"
    variant: Literal["sequential", "parallel"] = "sequential"
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "reduction_factor", self.reduction_factor)
        check_choice(self, "placement", self.placement, _PLACEMENTS)
        check_choice(self, "variant", self.variant, ("sequential", "parallel"))
        check_choice(self, "activation", self.activation, _ACTIVATIONS)
        check_positive(self, "scaling", self.scaling)


def _features(module: nn.Module, hidden_size: int | None) -> tuple[int, int]:
    """(input, output) width of a linear layer, or of a block.

    A block (an attention or feed-forward module) maps the model's hidden size to itself; outside
    transformers models, where there is no ``config.hidden_size``, its widths are read from its
    first and last linear layers (in registration order).
    """
    linears: list[Any] = [m for m in module.modules() if is_linear(m)]
    if not linears:
        raise TypeError(
            f"it is a {type(module).__name__} without linear layers, which bottleneck cannot wrap; bottleneck "
            "wraps a linear layer (sequential) or an attention / feed-forward block (parallel)"
        )
    if hidden_size is not None and not is_linear(module):
        return hidden_size, hidden_size
    first, last = linears[0], linears[-1]
    in_features = first.weight.shape[0] if not isinstance(first, nn.Linear) else first.in_features
    out_features = last.weight.shape[1] if not isinstance(last, nn.Linear) else last.out_features
    return in_features, out_features


class BottleneckAdapter(AdapterLayer):
    """A module (output projection or whole block) followed by, or beside, a bottleneck adapter.

    Args:
        base_layer: the module to wrap.
        config: the adapter's options.
        hidden_size: the model's hidden size, the width of a wrapped block (None: read it from the
            block's linear layers).
    """

    adapter_names = ("adapter_down", "adapter_up")
    method = "bottleneck"
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig, hidden_size: int | None = None) -> None:
        in_features, out_features = _features(base_layer, hidden_size)
        parallel = config.variant == "parallel"
        width = in_features if parallel else out_features
        size = int(width // config.reduction_factor)
        if size < 1:
            raise ValueError(
                f"BottleneckConfig.reduction_factor={config.reduction_factor!r} leaves no bottleneck unit for its "
                f"width of {width}; use a reduction_factor of at most {width}"
            )
        super().__init__(base_layer)
        self.parallel = parallel
        self.scaling = config.scaling
        factory = self.adapter_factory(next(base_layer.parameters()))
        self.adapter_down = nn.Linear(width, size, **factory)
        self.activation = _ACTIVATIONS[config.activation]()
        self.adapter_up = nn.Linear(size, out_features, **factory)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Houlsby et al.'s near-identity init, made exact by a zero up-projection (see the module docstring)."""
        nn.init.trunc_normal_(self.adapter_down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        nn.init.zeros_(self.adapter_down.bias)  # not nn.Linear's uniform bias, which can leave every ReLU dead
        nn.init.zeros_(self.adapter_up.weight)  # a zero up-projection: exactly the identity at init
        nn.init.zeros_(self.adapter_up.bias)

    def adapter(self, hidden: Tensor) -> Tensor:
        """``s * (W_up f(W_down h + b_down) + b_up)``: (..., width) -> (..., out)."""
        down = self.adapter_down
        out = self.adapter_up(self.activation(down(hidden.to(down.weight.dtype))))  # (..., out)
        return out * self.scaling

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.bypassed:
            return self.base_layer(*args, **kwargs)
        output = self.base_layer(*args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output  # attention blocks return tuples
        if not isinstance(hidden, Tensor):
            raise TypeError(
                f"bottleneck wraps modules that return a tensor or a tuple starting with one; "
                f"{type(self.base_layer).__name__} returned {type(output).__name__}"
            )
        source = self._block_input(args, kwargs) if self.parallel else hidden
        if self.rows is None:
            hidden = hidden + self.adapter(source).to(hidden.dtype)
        else:  # a mixed batch: only this adapter's rows (batch first)
            rows = self.mixed_rows(hidden)
            hidden = hidden.index_add(0, rows, self.adapter(source.index_select(0, rows)).to(hidden.dtype))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _block_input(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor:
        source = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(source, Tensor):
            raise TypeError(
                f"a parallel bottleneck adapter reads the hidden states its block is called with (first argument "
                f"or hidden_states=...); {type(self.base_layer).__name__} got none"
            )
        return source

    def merge(self) -> None:
        raise TypeError(
            f"{type(self).__name__} (bottleneck) has nothing to merge into base weights: the adapter is non-linear "
            "(down-projection, activation, up-projection), so it stays a module of its own. "
            "Use lightning_peft.unload(model, merge=False) to remove it."
        )

    def unmerge(self) -> None:
        self.merge()

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind}, bottleneck={self.adapter_down.out_features}, scaling={self.scaling:g}"


def _as_regex(targets: Targets) -> str:
    if isinstance(targets, str):
        return f"(?:{targets})"
    return r"(?:.*\.)?(?:" + "|".join(map(re.escape, targets)) + ")"  # exact name or dotted suffix


def _combine(parts: list[Targets]) -> Targets:
    if all(isinstance(p, list) for p in parts):
        return [name for p in parts for name in p]
    return "|".join(_as_regex(p) for p in parts)


def resolve(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """Fill ``target_modules`` from the default of the model's architecture, variant and placement."""
    if config.target_modules is not None:
        return config
    table = SEQUENTIAL_DEFAULTS if config.variant == "sequential" else PARALLEL_DEFAULTS
    parts = _PLACEMENTS[config.placement]
    kind = model_type(model)
    if kind in table and not all(p in table[kind] for p in parts):
        missing = " and ".join(p for p in parts if p not in table[kind])
        raise ValueError(
            f"bottleneck has no default {config.variant} placement for the {missing} sublayer(s) of architecture "
            f"{kind!r}: a parallel adapter wraps a module that takes the sublayer's input and returns its output "
            f"before the residual connection, and {kind} has no such module there. Use variant='sequential', "
            "another placement, or pass target_modules naming such blocks."
        )
    defaults = {k: _combine([v[p] for p in parts]) for k, v in table.items() if all(p in v for p in parts)}
    return config.replace(target_modules=architecture_default(model, defaults, method="bottleneck"))


def apply(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Wrap every module that ``target_modules`` selects."""
    assert config.target_modules is not None, "resolve() runs first"
    names = select_targets(model, config)
    hidden_size = getattr(getattr(find_base_model(model)[1], "config", None), "hidden_size", None)

    def build(name: str, module: nn.Module) -> nn.Module:
        try:
            return BottleneckAdapter(module, config, hidden_size if isinstance(hidden_size, int) else None)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{type(config).__name__}.target_modules selected {name!r}: {err}") from None

    return replace_modules(model, names, build)


register(
    Method(
        name="bottleneck",
        config_cls=BottleneckConfig,
        kind="layer",
        apply=apply,
        resolve=resolve,
        summary="bottleneck adapters (down-project, non-linearity, up-project) after or beside sublayers; "
        "not mergeable",
        paper="Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022 (parallel)",
    )
)
