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
the prefix (as Hugging Face peft does with transformers 5). Nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.config import AdapterConfig, check_positive_int, invalid
from lightning_peft.core.virtual import KeyValuePrefix, attach, kv_layout, transformer_of
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
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.projection, bool):
            raise invalid(self, "projection", self.projection, "True or False")
        if self.projection_hidden_size is not None:
            if not self.projection:
                raise invalid(
                    self, "projection_hidden_size", self.projection_hidden_size, "None unless projection=True"
                )
            check_positive_int(self, "projection_hidden_size", self.projection_hidden_size)


def resolve(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """Fill ``projection_hidden_size`` with the attention's key size."""
    if not config.projection or config.projection_hidden_size is not None:
        return config
    _, heads, head_dim = kv_layout(transformer_of(model, "prefix_tuning")[1])
    return config.replace(projection_hidden_size=heads * head_dim)


class PrefixEncoder(KeyValuePrefix):
    """The trained prefix of prefix tuning: a tensor, or embeddings through an MLP while training."""

    adapter_names = ("prefix", "embedding", "projection")
    method = "prefix_tuning"

    def __init__(self, config: PrefixTuningConfig, base: nn.Module) -> None:
        super().__init__(config.num_virtual_tokens, kv_layout(base))
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
            self.prefix = nn.Parameter(torch.randn(n, self.state_size, **factory))  # (N, L * 2 * kv_dim)
            self.register_parameter("embedding", None)
            self.projection = None

    def prefix_states(self) -> Tensor:
        if self.prefix is not None:
            return self.prefix
        assert self.embedding is not None and self.projection is not None
        return self.projection(self.embedding)  # (N, L * 2 * kv_dim)

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
        KeyValuePrefix.attention_stack(base, "prefix_tuning")  # refuse architectures without a cache first
        return PrefixEncoder(config, base)

    return attach(model, "prefix_tuning", build)


def to_peft(config: PrefixTuningConfig) -> dict[str, Any]:
    """Our options as peft's ``PrefixTuningConfig`` fields.

    The file's tensor is the prefix itself (with ``projection=True``, what the MLP computes, as
    peft saves it); ``token_dim``/``num_layers``/``num_attention_heads`` are left for peft to read
    from the model, as it does for its own configs.
    """
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
