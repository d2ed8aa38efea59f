"""Weight tying for a trained copy of the input embedding (peft's ``ensure_weight_tying=True``).

A model with tied word embeddings (``tie_word_embeddings``) computes its logits with the input
embedding's matrix: ``logits = h E^T`` with ``E`` the ``(V, d)`` table that also embeds the input.
Training a copy of the embedding (``modules_to_save=["embed_tokens"]``) breaks that tie: the copy
``E'`` embeds the input while the output layer still reads ``E``, and merged or converted models
disagree about which one the head holds (peft issue 2777). With ``ensure_weight_tying=True`` peft
0.21.2 instead

1. adds the input embedding to ``modules_to_save`` (when an entry there ends in ``embed_tokens`` or
   ``lm_head``, peft's ``EMBEDDING_LAYER_NAMES``) and takes the tied output layers out of it;
2. wraps each tied output layer in a trained copy whose weight *is* ``E'`` (one tensor), so that
   ``embed(x) = E'[x]`` and ``logits = h E'^T`` both read the one trained table, and a step on it
   moves both uses;
3. saves that table under both layers' names (the same values twice).

:func:`resolve` does step 1 on a copy of the config (the user's is never changed), :func:`tie`
step 2 once the embedding's trained copy exists. What peft only warns about (the option with no
tied layer, or with no embedding in ``modules_to_save``) is refused here by name, and so is LoRA on
a tied embedding (``target_modules``), which this module does not implement.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, TypeVar

from torch import nn

from lightning_peft.core.layer import AdapterModule, TrainableModule
from lightning_peft.core.targeting import find_base_model
from lightning_peft.core.wrapping import replace_modules

#: peft's ``EMBEDDING_LAYER_NAMES``: a ``modules_to_save`` entry whose last part is one of these asks for the tie.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
#: What a user can do instead, said by every refusal.
_INSTEAD = "valid: ensure_weight_tying=False"

C = TypeVar("C")


def _input_embedding(model: nn.Module, owner: str) -> tuple[str, nn.Module]:
    """(name inside the transformers model, module) of ``get_input_embeddings()``."""
    _, base = find_base_model(model)
    getter = getattr(base, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    name = next((n for n, m in base.named_modules() if m is embedding and n), None)
    if not isinstance(embedding, nn.Module) or name is None:
        raise ValueError(
            f"{owner}.ensure_weight_tying=True needs a transformers model with input embeddings "
            f"(get_input_embeddings()); {type(base).__name__} has none to tie to ({_INSTEAD})."
        )
    return name, embedding


def _tied_names(base: nn.Module, embedding: nn.Module) -> list[str]:
    """Names (inside ``base``) of the other modules whose weight is the embedding's own tensor.

    None when the model's config says ``tie_word_embeddings=False`` (peft's rule too)."""
    if getattr(getattr(base, "config", None), "tie_word_embeddings", None) is False:
        return []
    weight = getattr(embedding, "weight", None)
    return [
        n
        for n, m in base.named_modules()
        if n and m is not embedding and weight is not None and getattr(m, "weight", None) is weight
    ]


def _embedding_requested(values: Any) -> bool:
    """Whether a list of module names has an entry ending in one of :data:`EMBEDDING_NAMES` (peft's test)."""
    if isinstance(values, str):
        return any(re.fullmatch(values, name) or values == name for name in EMBEDDING_NAMES)
    return any(str(v).split(".")[-1] in EMBEDDING_NAMES for v in values or [])


def resolve(model: nn.Module, config: C) -> C:
    """``config`` with the input embedding in ``modules_to_save`` and the layers tied to it taken out.

    A no-op unless ``config.ensure_weight_tying``. Applying it to a config it returned changes nothing.

    Raises:
        ValueError: naming ``ensure_weight_tying``, the reason and what is valid, where peft 0.21.2
            warns (no tied layer; no embedding in ``modules_to_save``) or ties LoRA layers
            (the embedding in ``target_modules``), and where the embedding or a tied layer
            already holds another adapter.
    """
    if not getattr(config, "ensure_weight_tying", False):
        _warn_untied(model, config)
        return config
    owner = type(config).__name__
    name, embedding = _input_embedding(model, owner)
    _, base = find_base_model(model)
    if isinstance(embedding, AdapterModule) or any(isinstance(m, AdapterModule) for m in embedding.modules()):
        raise ValueError(
            f"{owner}.ensure_weight_tying=True: the input embedding {name!r} already holds another adapter "
            f"({type(embedding).__name__}); tying a second adapter's copy to it is not implemented ({_INSTEAD}, "
            "or one adapter per model)."
        )
    tied = _tied_names(base, embedding)
    if not tied:
        raise ValueError(
            f"{owner}.ensure_weight_tying=True, but no layer of {type(base).__name__} is tied to its input embedding "
            f"{name!r} (no other module holds its weight, or config.tie_word_embeddings=False): there is nothing to "
            f"tie (peft 0.21.2 warns and ties nothing; {_INSTEAD})."
        )
    saved = list(getattr(config, "modules_to_save", None) or [])
    if not _embedding_requested(saved):
        if _embedding_requested(getattr(config, "target_modules", None)):
            raise ValueError(
                f"{owner}.ensure_weight_tying=True with the input embedding in target_modules (LoRA on a tied "
                f"embedding, whose output layer {tied[0]!r} peft 0.21.2 gives the transposed LoRA factors) is not "
                f"implemented in lightning_peft; valid: the embedding in modules_to_save (a trained copy {tied[0]!r} "
                "shares), or ensure_weight_tying=False."
            )
        tokens = (
            " (trainable_token_indices ties the output layer's rows without it)"
            if getattr(config, "trainable_token_indices", None)
            else ""
        )
        raise ValueError(
            f"{owner}.ensure_weight_tying=True, but modules_to_save={saved!r} has no embedding layer "
            f"(an entry ending in {' or '.join(map(repr, EMBEDDING_NAMES))}): there is nothing to tie{tokens}. "
            f"peft 0.21.2 warns and ties nothing; valid: modules_to_save naming {name!r}, or ensure_weight_tying=False."
        )
    for key in tied:
        holder = base.get_submodule(key)
        if not isinstance(holder, nn.Linear) or holder.bias is not None:
            what = "an nn.Linear with a bias" if isinstance(holder, nn.Linear) else f"a {type(holder).__name__}"
            raise ValueError(
                f"{owner}.ensure_weight_tying=True: {key!r}, tied to {name!r}, is {what}; peft 0.21.2's tied copy is "
                f"a bias-free nn.Linear reading the embedding's table, so only such an output layer can be tied "
                f"({_INSTEAD})."
            )
    if name not in saved:
        saved.append(name)
    for key in tied:  # peft's rule: each tied layer takes out the first entry that names it
        hit = next((m for m in saved if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key)), None)
        if hit is not None:
            saved.remove(hit)
    return config.replace(modules_to_save=saved)  # type: ignore[attr-defined,no-any-return]


def _warn_untied(model: nn.Module, config: Any) -> None:
    """Say, as peft 0.21.2 does, that a trained copy of a tied embedding unties it (the option is off)."""
    saved = list(getattr(config, "modules_to_save", None) or [])
    if not _embedding_requested(saved):
        return
    try:
        name, embedding = _input_embedding(model, type(config).__name__)
    except ValueError:
        return
    _, base = find_base_model(model)
    tied = _tied_names(base, embedding)
    if tied and not isinstance(embedding, AdapterModule):
        warnings.warn(
            f"{type(config).__name__}.modules_to_save={saved!r} trains a copy of a layer of the tied pair "
            f"{name!r} / {', '.join(map(repr, tied))} (tie_word_embeddings): the trained copy is untied from the "
            "other layer, which keeps the frozen table (peft 0.21.2 warns the same). Pass ensure_weight_tying=True "
            "to train one table for both.",
            UserWarning,
            stacklevel=2,
        )


def tie(model: nn.Module, config: Any) -> list[str]:
    """Wrap each layer tied to the input embedding's trained copy in a copy that shares its weight.

    Runs after ``modules_to_save`` is wrapped (``inject`` wraps those first); a no-op unless
    ``config.ensure_weight_tying``. Returns the names it wrapped (inside ``model``).
    """
    if not getattr(config, "ensure_weight_tying", False):
        return []
    owner = type(config).__name__
    base_path, base = find_base_model(model)
    name, embedding = _input_embedding(model, owner)
    if not isinstance(embedding, TrainableModule):
        raise ValueError(
            f"{owner}.ensure_weight_tying=True, but the input embedding {name!r} is not a trained copy "
            f"(modules_to_save) after wrapping; it is a {type(embedding).__name__} ({_INSTEAD})."
        )
    prefix = f"{base_path}." if base_path else ""
    tied = [f"{prefix}{n}" for n in _tied_names(base, embedding.base_layer) if not n.startswith(f"{name}.")]
    for key in tied:
        inside = [m for m in _parents(model, key) if isinstance(m, AdapterModule)]
        if inside:
            raise ValueError(
                f"{owner}.ensure_weight_tying=True: {key!r}, tied to {name!r}, is inside a "
                f"{type(inside[0]).__name__} of this adapter; a tied layer takes the embedding's trained copy and no "
                f"other adapter (leave it out of target_modules, or {_INSTEAD})."
            )
    return replace_modules(model, tied, lambda _, module: TrainableModule(module, tied=embedding))


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules on the path to ``name``, ``model`` excluded, the named one included."""
    parts, found, module = name.split("."), [], model
    for part in parts:
        module = module.get_submodule(part)
        found.append(module)
    return found
