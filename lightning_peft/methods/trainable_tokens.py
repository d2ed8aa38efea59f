"""Trainable tokens: train only chosen rows of an embedding (peft's ``TrainableTokens``).

For new special tokens added to a vocabulary, training the whole embedding table (``V x d``) is
wasteful: only the k new rows need to change. The layer keeps a trained copy ``T`` (k x d) of the
rows of token ids ``t_1 .. t_k`` and computes the embedding with those rows replaced::

    E'[i] = T[j]    if i = t_j,       E'[i] = E[i]   otherwise
    h = c * E'[x]                     (c: the layer's ``embed_scale``, Gemma's, if it has one)

``T`` starts as the rows themselves (``init_weights=True``: the model is unchanged at init) or
random normal (``False``). Only ``T`` trains, so the gradient reaches only the chosen rows, and
merging writes ``T`` into the table's rows (unmerging writes the original rows back): exact.

Layers tied to the input embedding (one weight for both: an output layer with
``tie_word_embeddings``, an encoder-decoder's own encoder and decoder embeddings) are wrapped too,
reading the same ``T``: an output layer's logits for the chosen tokens are ``x T^T (+ b)``, as
peft's tied layers do. Works standalone (method ``"trainable_tokens"``, peft's ``TRAINABLE_TOKENS``)
and inside LoRA (``LoRAConfig.trainable_token_indices``, peft's option of that name: a list for
the input embedding or ``{module name: ids}``), where peft keys the tensor
``<embedding>.token_adapter.trainable_tokens_delta`` and saves no copy for the tied layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.config import LayerConfig, invalid
from lightning_peft.core.layer import AdapterLayer, AdapterModule
from lightning_peft.core.targeting import find_base_model, select
from lightning_peft.core.wrapping import replace_modules
from lightning_peft.methods import lora
from lightning_peft.registry import Method, PeftFormat, register


@dataclass(kw_only=True)
class TrainableTokensConfig(LayerConfig):
    """Trainable-tokens options.

    Args:
        token_indices: the token ids whose embedding rows train (non-empty, each >= 0).
        init_weights: start the trained rows as the embedding's own (True: the model is
            unchanged at init) or random normal (False), as peft's ``init_weights``.
        target_modules: the embeddings to train rows of (matched as in
            :class:`~lightning_peft.core.config.LayerConfig`); ``None``: the model's input embedding
            (``get_input_embeddings()``), and an output layer tied to it.
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_indices(self, "token_indices", self.token_indices)
        object.__setattr__(self, "token_indices", list(self.token_indices))
        if not isinstance(self.init_weights, bool):
            raise invalid(self, "init_weights", self.init_weights, "True or False")


def check_indices(config: object, name: str, ids: object) -> None:
    """A non-empty list of distinct token ids (ints >= 0)."""
    if (
        not isinstance(ids, (list, tuple))
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        or len(set(ids)) != len(ids)
    ):
        raise invalid(config, name, ids, "a non-empty list of distinct token ids (ints >= 0)")


class TrainableTokensLayer(AdapterLayer):
    """Replaces rows ``token_indices`` of an ``nn.Embedding`` (or of a tied output ``nn.Linear``) by trained ones."""

    adapter_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)
    method: ClassVar[str] = "trainable_tokens"

    @property
    def stackable(self) -> bool:  # type: ignore[override]
        """Only while trainable tokens are added (:func:`inject_tokens`, which checks the chain holds
        trainable-tokens adapters of disjoint rows only): a LoRA embedding and these rows in one chain
        would each miss the other's update (peft refuses that pair too)."""
        return _STACKING[0]

    def __init__(
        self, base_layer: nn.Module, ids: list[int], init_weights: bool, tied: TrainableTokensLayer | None = None
    ) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        special = isinstance(base_layer, nn.Embedding) and (
            base_layer.max_norm is not None or base_layer.scale_grad_by_freq or base_layer.sparse
        )
        if special:
            raise TypeError(
                "trainable tokens need an nn.Embedding without max_norm, scale_grad_by_freq or sparse gradients "
                f"(this one: max_norm={base_layer.max_norm}, scale_grad_by_freq={base_layer.scale_grad_by_freq}, "
                f"sparse={base_layer.sparse})"
            )
        if not isinstance(base_layer, nn.Embedding) and not (isinstance(base_layer, nn.Linear) and tied is not None):
            raise TypeError(
                f"it is a {type(base_layer).__name__}; trainable tokens wrap nn.Embedding layers (and an output "
                "nn.Linear tied to the input embedding, which they find themselves)"
            )
        if max(ids) >= weight.shape[0]:
            raise ValueError(
                f"token index {max(ids)} is out of range for {type(base_layer).__name__} with {weight.shape[0]} rows "
                "(resize the embedding for new tokens first: model.resize_token_embeddings)"
            )
        self.ids = list(ids)
        self.register_buffer("token_indices", torch.tensor(ids, device=weight.device), persistent=False)
        self.register_buffer("trainable_tokens_original", weight.detach()[self.token_indices].clone(), persistent=False)
        #: The layer whose trained rows this one reads (a tied output layer), kept out of the module tree.
        self._tied = [tied] if tied is not None else []
        if tied is None:
            self.trainable_tokens_delta = nn.Parameter(torch.empty_like(self.trainable_tokens_original))
            self._init_weights = init_weights
            self.reset_adapter_parameters()
        else:
            # The tied layer's tensor is the embedding's, declared once (peft's standalone files repeat
            # it under this layer's name: see peft_copies).
            self.adapter_names = ()  # type: ignore[misc]  # per instance: a tied layer declares none

    @property
    def trained_rows(self) -> Tensor:
        """``T``: the trained rows (k x d), the tied embedding's for a tied output layer."""
        return self._tied[0].trainable_tokens_delta if self._tied else self.trainable_tokens_delta

    def reset_adapter_parameters(self) -> None:
        if self._tied:
            return
        with torch.no_grad():
            if self._init_weights:
                self.trainable_tokens_delta.copy_(self.trainable_tokens_original)
            else:
                self.trainable_tokens_delta.normal_()

    def _trained(self) -> Tensor:
        """``T``, with a row of the embedding's ``padding_idx`` detached (F.embedding never trains that row)."""
        rows = self.trained_rows
        pad = getattr(self.base, "padding_idx", None)
        if pad is not None and pad in self.ids:
            keep = (self.token_indices == pad).unsqueeze(-1)  # (k, 1)
            rows = torch.where(keep, rows.detach(), rows)
        return rows

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        result = self.base_layer(x)
        rows = self._trained().to(result.dtype)
        if isinstance(self.base, nn.Linear):  # tied output layer: logits of the chosen tokens, x T^T + b
            new = F.linear(x, rows, None if self.base.bias is None else self.base.bias[self.token_indices])
            return result.index_copy(-1, self.token_indices, new.to(result.dtype))  # (..., V)
        hit = x.unsqueeze(-1) == self.token_indices  # (..., k)
        found = hit.any(-1, keepdim=True)  # (..., 1)
        picked = F.embedding(hit.int().argmax(-1), rows)  # (..., d): T[j] where x = t_j
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:
            picked = picked * (scale.to(picked.dtype) if isinstance(scale, Tensor) else scale)
        return torch.where(found, picked, result)

    def _merge(self) -> None:
        weight = self.base.weight
        weight.index_copy_(0, self.token_indices, self.trained_rows.to(weight.dtype))

    def _unmerge(self) -> None:
        weight = self.base.weight
        weight.index_copy_(0, self.token_indices, self.trainable_tokens_original.to(weight.dtype))

    def peft_copies(self) -> dict[str, tuple[AdapterModule, str]]:
        """A tied layer's rows, which peft's standalone format stores again under the layer's own name."""
        return {"trainable_tokens_delta": (self._tied[0], "trainable_tokens_delta")} if self._tied else {}

    def extra_repr(self) -> str:
        return f"token_indices={self.ids}" + (", tied" if self._tied else "")


class LoRATokensLayer(TrainableTokensLayer):
    """Trainable tokens as part of a LoRA adapter (``LoRAConfig.trainable_token_indices``), as peft keys them."""

    method = "lora"
    peft_names: ClassVar[dict[str, str]] = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}

    def peft_copies(self) -> dict[str, tuple[AdapterModule, str]]:
        return {}  # with LoRA, peft saves a tied layer's rows once (the embedding's)


def _input_embedding(model: nn.Module, required: bool = True) -> str | None:
    """The name of the model's input embedding (the transformers model's ``get_input_embeddings()``
    inside ``model``), else ``"embed_tokens"`` (peft's rule), which must then exist."""
    _, base = find_base_model(model)
    getter = getattr(base, "get_input_embeddings", None)
    embedding = None
    with contextlib.suppress(NotImplementedError, AttributeError):
        embedding = getter() if callable(getter) else None
    layer = embedding.base if isinstance(embedding, AdapterLayer) else embedding  # resolved again once injected
    names = [n for n, m in model.named_modules() if n and embedding is not None and m is embedding]
    fallback = [n for n, _ in model.named_modules() if n == "embed_tokens" or n.endswith(".embed_tokens")]
    if (embedding is not None and not isinstance(layer, nn.Embedding)) or (embedding is None and not fallback):
        if not required:
            return None
        what = f"a {type(layer).__name__}" if embedding is not None else "nothing"
        raise ValueError(
            f"trainable_tokens needs a transformers model with token input embeddings: {type(model).__name__}'s "
            f"input embedding (get_input_embeddings(), else a module named embed_tokens) is {what}, not an "
            "nn.Embedding; pass target_modules naming an nn.Embedding"
        )
    return names[0] if names else "embed_tokens"


def _tied_layers(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Names of the other layers whose weight is the embedding's (tied word embeddings): an output
    ``nn.Linear``, and the encoder's and decoder's own embeddings of an encoder-decoder (T5, BART)."""
    weight = embedding.weight
    return [
        n
        for n, m in model.named_modules()
        if m is not embedding and isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is weight
    ]


def _drop_tied(model: nn.Module, plan: dict[str, list[int]], input_name: str | None, field: str, owner: str) -> None:
    """Take out of ``plan`` the layers tied to the input embedding that ``plan`` names with the same rows.

    Those rows train with the embedding's, as one tensor (as peft ties them); other rows, or a tied
    output layer named without its embedding, are refused by name.
    """
    if input_name is None:
        return
    for name in _tied_layers(model, model.get_submodule(input_name)):
        if name not in plan:
            continue
        if input_name not in plan:
            if isinstance(model.get_submodule(name), nn.Linear):
                raise ValueError(
                    f"{owner}.{field} names {name!r}, the output layer tied to the input embedding {input_name!r}; "
                    f"name the embedding instead: the tied layer's rows train with it, as one tensor"
                )
            continue
        if sorted(plan[name]) != sorted(plan[input_name]):
            raise ValueError(
                f"{owner}.{field} gives {name!r} the rows {plan[name]} and the input embedding {input_name!r}, "
                f"whose weight it shares, the rows {plan[input_name]}; tied layers train the same rows (peft "
                "refuses this too): give both the same indices, or name the embedding only"
            )
        del plan[name]


#: Set while :func:`inject_tokens` adds a named adapter's rows to embeddings that already hold others'.
_STACKING = [False]


def _check_chain(model: nn.Module, name: str, ids: list[int], field: str, owner: str) -> None:
    """Refuse rows on an embedding that holds another kind of adapter, or rows another adapter trains."""
    module = model.get_submodule(name)
    while isinstance(module, AdapterLayer):
        if not isinstance(module, TrainableTokensLayer):
            raise TypeError(
                f"{owner}.{field} selects {name!r}, which holds {type(module).__name__} of adapter "
                f"{module.adapter_name!r}; trainable tokens share an embedding only with other trainable-tokens "
                "adapters (peft refuses LoRA and trainable tokens on one embedding too)"
            )
        overlap = sorted(set(ids) & set(module.ids))
        if overlap:
            raise ValueError(
                f"{owner}.{field} has token ids {overlap} for {name!r}, which adapter {module.adapter_name!r} "
                "already trains there; adapters on one embedding need disjoint token ids (as in peft)"
            )
        module = module.base_layer


def inject_tokens(
    model: nn.Module, targets: dict[str, list[int]], init_weights: bool, *, standalone: bool, owner: str, field: str
) -> list[str]:
    """Wrap the selected embeddings (and, for the input embedding, the output layers tied to it)."""
    input_name = _input_embedding(model, required=False)
    plan: dict[str, list[int]] = {}
    for key, ids in targets.items():
        for name in select(model, [key], None, field=field, owner=owner):
            plan[name] = ids
    _drop_tied(model, plan, input_name, field, owner)
    for name, ids in plan.items():
        _check_chain(model, name, ids, field, owner)
    layer_cls = TrainableTokensLayer if standalone else LoRATokensLayer
    built: dict[str, TrainableTokensLayer] = {}

    def build(name: str, module: nn.Module) -> nn.Module:
        built[name] = layer_cls(module, plan[name], init_weights)
        return built[name]

    _STACKING[0] = True
    try:
        names = replace_modules(model, list(plan), build)
        inputs = [n for n in names if n == input_name]
        if inputs:
            embedding = built.get(inputs[0]) or model.get_submodule(inputs[0])
            assert isinstance(embedding, TrainableTokensLayer)
            tied = [n for n in _tied_layers(model, embedding.base) if n not in plan]
            for name in tied:
                _check_chain(model, name, embedding.ids, field, owner)
            names += replace_modules(
                model, tied, lambda _, m: layer_cls(m, embedding.ids, init_weights, tied=embedding)
            )
    finally:
        _STACKING[0] = False
    return names


def apply(model: nn.Module, config: TrainableTokensConfig) -> list[str]:
    """Wrap every selected embedding (see :func:`inject_tokens`)."""
    assert config.target_modules is not None, "resolve() fills target_modules"
    names = select(model, config.target_modules, config.exclude_modules, owner=type(config).__name__)
    targets = {name: config.token_indices for name in names}
    return inject_tokens(
        model, targets, config.init_weights, standalone=True, owner=type(config).__name__, field="target_modules"
    )


def resolve(model: nn.Module, config: TrainableTokensConfig) -> TrainableTokensConfig:
    """``target_modules=None`` -> the model's input embedding (peft's default)."""
    if config.target_modules is not None:
        return config
    return config.replace(target_modules=[str(_input_embedding(model))])


def apply_with_lora(model: nn.Module, config: lora.LoRAConfig) -> list[str]:
    """``LoRAConfig.trainable_token_indices``: a list is for the input embedding, a dict names the embeddings."""
    value = config.trainable_token_indices
    assert value is not None
    targets = dict(value) if isinstance(value, dict) else {str(_input_embedding(model)): list(value)}
    for key, ids in targets.items():
        check_indices(
            config, f"trainable_token_indices[{key!r}]" if isinstance(value, dict) else "trainable_token_indices", ids
        )
    return inject_tokens(
        model, targets, True, standalone=False, owner=type(config).__name__, field="trainable_token_indices"
    )


lora.OPTIONS["trainable_token_indices"] = apply_with_lora


def to_peft(config: TrainableTokensConfig) -> dict[str, Any]:
    """Our options as peft's ``TrainableTokensConfig`` fields (it has no exclude_modules or modules_to_save)."""
    for name in ("exclude_modules", "modules_to_save"):
        if getattr(config, name):
            raise ValueError(
                f"TrainableTokensConfig.{name}={getattr(config, name)!r} has no place in peft's TrainableTokensConfig "
                f"(it has no {name}); save this adapter with lightning_peft.save_adapter, or leave {name} empty."
            )
    return {
        "token_indices": config.token_indices,
        "target_modules": config.target_modules,
        "init_weights": config.init_weights,
    }


_PEFT_METADATA = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)


def from_peft(options: dict[str, Any]) -> TrainableTokensConfig:
    """peft's ``TrainableTokensConfig`` fields as our options (every field of it is implemented)."""
    unknown = sorted(set(options) - _PEFT_METADATA - {"token_indices", "target_modules", "init_weights"})
    if unknown:
        raise ValueError(
            f"peft TRAINABLE_TOKENS adapter_config.json has field(s) {unknown}, which lightning_peft's "
            "trainable_tokens does not know; it refuses an option it cannot interpret rather than dropping it."
        )
    return TrainableTokensConfig(
        token_indices=list(options["token_indices"]),
        target_modules=options.get("target_modules"),  # a string is a regex in peft and here
        init_weights=options.get("init_weights", True),
        modules_to_save=[],
    )


register(
    Method(
        name="trainable_tokens",
        config_cls=TrainableTokensConfig,
        kind="layer",
        apply=apply,
        resolve=resolve,
        summary="only chosen rows of the embedding (new tokens) train, as a k x d table; mergeable",
        paper="Hugging Face peft's TrainableTokens (2025): sparse training of new token embeddings",
        peft=PeftFormat("TRAINABLE_TOKENS", to_peft, from_peft),
        sharding=frozenset(),  # not yet run under a sharded strategy on two ranks
    )
)
