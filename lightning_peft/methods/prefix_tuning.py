"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation";
as P-Tuning v2 for understanding tasks: Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be
Comparable to Fine-tuning Universally Across Scales and Tasks").

Every attention layer l of a frozen model attends over N trained keys and values before the real
tokens' own::

    attention_l(Q, [K^P_l; K], [V^P_l; V]),     P = (N, L * 2 * kv_heads * head_dim)

With ``projection=True`` the prefix is reparameterized for training, ``P = W2 tanh(W1 E + b1) + b2``
over N trained embeddings ``E`` (N x kv_dim), which the paper found to stabilize training; after
training :func:`fold_projection` replaces the MLP by the prefix it computes (the same outputs, fewer
parameters, and the adapter becomes a plain ``projection=False`` one). Positions start after the
prefix, as transformers counts a cache. In encoder-decoder models the decoder's self-attention gets
the prefix (as Hugging Face peft does with transformers 5); ``sides=("decoder", "encoder")`` gives
the encoder's self-attention layers prefixes of their own, as P-Tuning v2 prefixes every layer
(the formula, masks and T5's relative bias: :class:`~lightning_peft.core.virtual.KeyValuePrefix`).
Nothing to merge.

The decoder's cross-attention gets no prefix. P-Tuning v2 prefixes each layer's self-attention
(its models are encoders), and with an encoder prefix the memory the cross-attention reads is
already prefix-conditioned in every encoder layer. Li & Liang's BART code also gave the
cross-attention a prefix; that is not offered here (its keys would have to enter the cross-attention
cache, which ``generate`` fills once from the encoder output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.config import AdapterConfig, check_positive_int, invalid
from lightning_peft.core.virtual import (
    PREFIX_SIDES,
    KeyValuePrefix,
    attach,
    is_encoder_decoder,
    kv_layout,
    transformer_of,
)
from lightning_peft.methods.prompt_tuning import peft_prompt_fields, peft_tokens, refuse_peft_fields
from lightning_peft.registry import ALL_SHARDINGS, Method, PeftFormat, register

M = TypeVar("M", bound=nn.Module)


@dataclass(kw_only=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning options.

    Args:
        num_virtual_tokens: N, the prefix length (keys and values per attention layer).
        projection: train the prefix through a two-layer MLP over N embeddings (the paper's
            reparameterization); fold it away after training with :func:`fold_projection`.
        projection_hidden_size: hidden size of that MLP; ``None`` uses the attention's key size
            (kv_heads * head_dim). Only with ``projection=True``.
        sides: which self-attention stacks get a prefix: ``("decoder",)`` (Hugging Face peft's
            behaviour: the decoder of an encoder-decoder model, the only stack of any other), or,
            for encoder-decoder models (T5, BART), ``("decoder", "encoder")`` or ``("encoder",)``:
            every encoder self-attention layer gets N keys and values of its own (P-Tuning v2's
            prefix in every layer). peft's adapter format holds only ``("decoder",)``.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden_size: int | None = None
    sides: tuple[str, ...] = ("decoder",)

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = f"a non-empty tuple of distinct sides out of {PREFIX_SIDES}"
        sides = self.sides
        if isinstance(sides, list):  # from JSON / YAML
            sides = tuple(sides)
        if (
            not isinstance(sides, tuple)
            or not sides
            or any(not isinstance(side, str) or side not in PREFIX_SIDES for side in sides)
            or len(set(sides)) != len(sides)
        ):
            raise invalid(self, "sides", self.sides, valid)
        object.__setattr__(self, "sides", sides)
        check_positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.projection, bool):
            raise invalid(self, "projection", self.projection, "True or False")
        if self.projection_hidden_size is not None:
            if not self.projection:
                raise invalid(
                    self, "projection_hidden_size", self.projection_hidden_size, "None unless projection=True"
                )
            check_positive_int(self, "projection_hidden_size", self.projection_hidden_size)


def prefix_layouts(base: nn.Module, config: PrefixTuningConfig) -> dict[str, tuple[int, int, int]]:
    """(layers, kv heads, head dim) of each side ``config.sides`` names, in the prefix tensor's order."""
    if "encoder" in config.sides and not is_encoder_decoder(base):
        raise ValueError(
            f"PrefixTuningConfig.sides={config.sides!r}: 'encoder' prefixes the encoder of an encoder-decoder model "
            f"(T5, BART), and {type(base).__name__} (model_type {getattr(base.config, 'model_type', '?')!r}) is not "
            "one. Use sides=('decoder',): it prefixes every attention layer of this model."
        )
    return {side: kv_layout(base, side) for side in PREFIX_SIDES if side in config.sides}


def resolve(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """Fill ``projection_hidden_size`` with the attention's key size (of the first prefixed side)."""
    if not config.projection or config.projection_hidden_size is not None:
        return config
    _, heads, head_dim = next(iter(prefix_layouts(transformer_of(model, "prefix_tuning")[1], config).values()))
    return config.replace(projection_hidden_size=heads * head_dim)


class PrefixEncoder(KeyValuePrefix):
    """The trained prefix of prefix tuning: a tensor, or embeddings through an MLP while training."""

    adapter_names = ("prefix", "embedding", "projection")
    method = "prefix_tuning"

    def __init__(self, config: PrefixTuningConfig, base: nn.Module) -> None:
        super().__init__(config.num_virtual_tokens, prefix_layouts(base, config))
        weight = base.get_input_embeddings().weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        n, (_, heads, head_dim) = config.num_virtual_tokens, self.layout
        self.prefix: nn.Parameter | None
        self.embedding: nn.Parameter | None
        self.projection: nn.Sequential | None
        if config.projection:
            assert config.projection_hidden_size is not None, "resolve() fills projection_hidden_size"
            hidden = config.projection_hidden_size
            self.register_parameter("prefix", None)
            self.embedding = nn.Parameter(torch.randn(n, heads * head_dim, **factory))  # (N, kv_dim)
            self.projection = nn.Sequential(
                nn.Linear(heads * head_dim, hidden, **factory),
                nn.Tanh(),
                nn.Linear(hidden, self.state_size, **factory),
            )
        else:
            self.prefix = nn.Parameter(torch.randn(n, self.state_size, **factory))  # (N, sum L * 2 * kv_dim)
            self.register_parameter("embedding", None)
            self.projection = None

    def prefix_states(self) -> Tensor:
        if self.prefix is not None:
            return self.prefix
        assert self.embedding is not None and self.projection is not None
        return self.projection(self.embedding)  # (N, sum L * 2 * kv_dim)

    def fold(self) -> None:
        """Replace the reparameterization MLP by the prefix it computes (same outputs)."""
        if self.prefix is not None:
            return
        with torch.no_grad():
            folded = self.prefix_states().detach().clone()
        self.embedding = None
        self.projection = None
        self.prefix = nn.Parameter(folded)


def fold_projection(model: M) -> M:
    """Fold the reparameterization MLP of a prefix-tuned model into the prefix it computes.

    Call it after training with ``projection=True``: outputs stay the same, the MLP's parameters
    go away, and the model's adapter becomes a ``projection=False`` one, so that ``save_adapter``
    writes the prefix alone and it loads with ``PrefixTuningConfig(projection=False)``. A model
    without a projection is returned as it is.

    Raises:
        ValueError: when ``model`` has no prefix_tuning adapter.
    """
    info = state.require_info(model)
    if info.method != "prefix_tuning":
        raise ValueError(f"fold_projection folds a prefix_tuning adapter; {type(model).__name__} has {info.method!r}.")
    for _, module in state.adapter_modules(model):
        if isinstance(module, PrefixEncoder):
            module.fold()
    info.config = info.config.replace(projection=False, projection_hidden_size=None)
    state.freeze(model)  # the folded prefix trains if training goes on
    return model


def apply(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    def build(base: nn.Module) -> PrefixEncoder:
        layouts = prefix_layouts(base, config)  # refuses 'encoder' for a model without an encoder first
        if "decoder" in layouts:
            KeyValuePrefix.attention_stack(base, "prefix_tuning")  # refuse architectures without a cache first
        return PrefixEncoder(config, base)

    return attach(model, "prefix_tuning", build)


def to_peft(config: PrefixTuningConfig) -> dict[str, Any]:
    """Our options as peft's ``PrefixTuningConfig`` fields.

    The file's tensor is the prefix itself (with ``projection=True``, what the MLP computes, as
    peft saves it); ``token_dim``/``num_layers``/``num_attention_heads`` are left for peft to read
    from the model, as it does for its own configs.

    Raises:
        ValueError: for ``sides`` other than ``("decoder",)``: peft's prefix tuning puts prefixes
            into the decoder's self-attention only, so its format cannot hold an encoder prefix
            (our own format, :func:`lightning_peft.save_adapter`, does).
    """
    if config.sides != ("decoder",):
        raise ValueError(
            f"peft's PREFIX_TUNING format cannot hold PrefixTuningConfig.sides={config.sides!r}: peft puts prefixes "
            "into the decoder's self-attention only (sides=('decoder',)), and an encoder prefix would be dropped. "
            "Save with lightning_peft.save_adapter, which keeps it."
        )
    return {
        **peft_prompt_fields(config),
        "num_virtual_tokens": config.num_virtual_tokens,
        "prefix_projection": config.projection,
        "encoder_hidden_size": config.projection_hidden_size,
        "init_weights": None,
    }


def from_peft(options: dict[str, Any]) -> PrefixTuningConfig:
    """peft's ``PrefixTuningConfig`` fields as our options: each read exactly, or refused by name.

    peft's file holds the prefix (``prefix_projection=True``: the MLP's output, not the MLP), so it
    loads as a ``projection=False`` adapter, the same outputs (what :func:`fold_projection` gives,
    and what peft's inference mode runs). ``encoder_hidden_size`` describes that MLP; peft's
    ``init_weights`` (another prefix init) is refused unless unset.
    """
    refuse_peft_fields(
        "PREFIX_TUNING", options, {"num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "init_weights"}
    )
    if options.get("init_weights") is not None:
        raise ValueError(
            f"peft PREFIX_TUNING adapter_config.json has init_weights={options['init_weights']!r}, which "
            "lightning_peft's prefix_tuning does not implement (supported: None)."
        )
    if not isinstance(options.get("prefix_projection", False), bool):
        raise ValueError(
            f"peft PREFIX_TUNING adapter_config.json has prefix_projection={options['prefix_projection']!r}; "
            "True or False."
        )
    return PrefixTuningConfig(num_virtual_tokens=peft_tokens("PREFIX_TUNING", options))


register(
    Method(
        name="prefix_tuning",
        config_cls=PrefixTuningConfig,
        kind="input",
        sharding=ALL_SHARDINGS,
        peft=PeftFormat("PREFIX_TUNING", to_peft, from_peft),
        apply=apply,
        resolve=resolve,
        summary="N trained keys and values before the real tokens' in every attention layer (P-Tuning v2); "
        "optional MLP reparameterization, folded away after training",
        paper="Li & Liang 2021, Prefix-Tuning; Liu et al. 2022, P-Tuning v2",
    )
)
