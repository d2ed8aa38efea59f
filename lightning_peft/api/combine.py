"""Combine LoRA adapters of one model into a new one: peft's ``add_weighted_adapter``.

Per layer the new adapter holds factors ``(A, B)`` with ``B A ≈ Σ w_i s_i B_i A_i`` (exact for
``cat`` and, up to the rank, ``svd``); the math, and what each combination does, is in
:mod:`lightning_peft.methods.lora_combine`. Here: the checks, the new adapter and the copy::

    lp.add_weighted_adapter(model, ["topic", "style"], [1.0, 0.5], "mix", combination="cat")
    lp.set_adapter(model, "mix")  # the new adapter is not made active
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from lightning_peft.api.inject import activate, inject, remove_added
from lightning_peft.core import state
from lightning_peft.methods import lora_combine
from lightning_peft.methods.lora import LoRAConfig, LoRALayer, LoRALinear
from lightning_peft.methods.lora_conv import LoRAConv
from lightning_peft.methods.lora_embedding import LoRAEmbedding

M = TypeVar("M", bound=nn.Module)


def _factors(layer: LoRALayer) -> lora_combine.Factors:
    if isinstance(layer, LoRAConv):
        return lora_combine.Factors(layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling)
    return lora_combine.Factors(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)


def _params(layer: LoRALayer) -> tuple[Tensor, Tensor]:
    if isinstance(layer, LoRAConv):
        return layer.lora_A.weight, layer.lora_B.weight
    return layer.lora_A, layer.lora_B


def _transposed(layer: LoRALayer) -> bool:
    """Where peft's delta weight is (in, out): embeddings and fan-in-fan-out (Conv1D) layers."""
    return isinstance(layer, LoRAEmbedding) or (isinstance(layer, LoRALinear) and layer.fan_in_fan_out)


def _sites(model: nn.Module, name: str) -> dict[str, LoRALayer]:
    """Adapter ``name``'s LoRA layers by where they sit in the base model, in module order."""
    return {
        state.site_name(model, path): module
        for path, module in state.adapter_modules(model, name)
        if isinstance(module, LoRALayer)
    }


def _union_targets(
    configs: Sequence[LoRAConfig], sites: Sequence[str]
) -> tuple[str | list[str], str | list[str] | None]:
    """``(target_modules, exclude_modules)`` selecting every layer the adapters hold.

    Lists are united, as peft does; where the adapters' options cannot be united as lists (a
    regular expression, ``"all-linear"``, different exclusions), the layers themselves are listed.
    """
    targets = [c.target_modules for c in configs]
    excludes = [c.exclude_modules for c in configs]
    if all(t == targets[0] for t in targets) and all(e == excludes[0] for e in excludes):
        return targets[0], excludes[0]  # type: ignore[return-value]  (resolved: never None)
    if all(isinstance(t, list) for t in targets) and all(e == excludes[0] for e in excludes):
        return list(dict.fromkeys(n for t in targets for n in t)), excludes[0]  # type: ignore[union-attr]
    return list(sites), None


def add_weighted_adapter(
    model: M,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    generator: torch.Generator | None = None,
) -> M:
    """Add LoRA adapter ``adapter_name``, the weighted combination of LoRA ``adapters``; return ``model``.

    At each layer ``ΔW ≈ Σ_i w_i ΔW_i`` over the adapters present there (see
    :func:`lightning_peft.methods.lora_combine.combine`). The new adapter has rank
    :func:`~lightning_peft.methods.lora_combine.new_rank` (``cat``: the sum; ``svd*``: ``svd_rank`` or
    the largest; the others: the common rank), ``alpha`` equal to it (scaling 1), targets every layer
    any of ``adapters`` holds, and the first adapter's other options, except that it is plain LoRA:
    no DoRA, no rsLoRA (peft keeps ``use_rslora``, which scales its result by ``sqrt(r)``) and no
    ``modules_to_save`` copies (those are not combined). A layer whose combination has a smaller
    rank (``cat`` where some adapters are absent) is padded with zeros.

    Unlike peft, an ``adapter_name`` already taken is refused (peft returns silently). Like peft,
    the active adapters stay as they were: call ``lightning_peft.set_adapter(model, adapter_name)``
    to use the new one. All or nothing: on an error the new adapter is taken out again.

    Args:
        model: a model holding the LoRA ``adapters`` (``inject(model, "lora", adapter_name=...)``).
        adapters: the names of the adapters to combine (one name means ``linear``, as peft).
        weights: one weight per adapter; negative ones subtract.
        adapter_name: the new adapter's name.
        combination: one of :data:`~lightning_peft.methods.lora_combine.COMBINATIONS`.
        density: fraction of entries kept, in (0, 1], for the ``ties``, ``dare`` and ``magnitude_prune`` ones.
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ``*ties*`` combinations.
        svd_rank: the ``svd*`` combinations' rank (default: the adapters' largest).
        svd_clamp: a quantile in [0, 1] the SVD factors are clamped to.
        svd_full_matrices: full or reduced SVD (the same result).
        generator: DARE's random source (default: torch's global RNG, as peft).

    Raises:
        ValueError: for unknown adapter names (listing those the model holds), non-LoRA or DoRA
            adapters, a taken ``adapter_name``, a ``weights`` of another length, unequal ranks for
            a combination that needs them equal, or options :func:`~lightning_peft.methods.lora_combine.combine`
            refuses (an unknown combination, a missing ``density``, ...).
    """
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names; got {adapters!r}.")
    unknown = [n for n in adapters if n not in state.adapters(model)]
    if unknown:
        raise state.unknown_adapter(model, unknown[0] if len(unknown) == 1 else unknown)
    infos = [state.adapter_of(model, n) for n in adapters]
    for info in infos:
        if info.method != "lora":
            raise ValueError(
                f"add_weighted_adapter combines LoRA adapters only; {info.name!r} is a {info.method!r} adapter."
            )
        if info.config.use_dora:
            raise ValueError(
                f"add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add up); "
                f"{info.name!r} has use_dora=True."
            )
        for field, what in (
            ("target_parameters", "LoRA on bare parameters, whose updates are no layers' B A"),
            ("trainable_token_indices", "trained embedding rows, which replace rows rather than add up"),
        ):
            if getattr(info.config, field):
                raise ValueError(
                    f"add_weighted_adapter cannot combine adapters with {field} ({what}); {info.name!r} has "
                    f"{field}={getattr(info.config, field)!r}."
                )
        if info.config.lora_bias:
            raise ValueError(
                f"add_weighted_adapter cannot combine adapters with lora_bias=True (peft's combinations read A and B "
                f"only, and would drop the biases); {info.name!r} has lora_bias=True."
            )
    if adapter_name in state.adapters(model):
        raise ValueError(
            f"{type(model).__name__} already has an adapter named {adapter_name!r}; pass another adapter_name, "
            f"or call lightning_peft.delete_adapter(model, {adapter_name!r}) first."
        )
    if isinstance(weights, str) or len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: weights must hold one number per adapter ({len(adapters)}); got {weights!r}."
        )
    combination = lora_combine.effective_combination(combination, len(adapters))
    rank = lora_combine.new_rank(combination, [info.config.r for info in infos], svd_rank)

    sources = [_sites(model, n) for n in adapters]
    for name, sites in zip(adapters, sources, strict=True):
        for site, layer in sites.items():
            if isinstance(layer, LoRAConv) and layer.base.groups != 1:
                raise ValueError(
                    f"add_weighted_adapter cannot combine adapter {name!r} at {site!r}: it is a "
                    f"{type(layer.base).__name__} with groups={layer.base.groups}, whose grouped B conv makes B A "
                    "no product of two matrices to combine; exclude that layer from the adapters."
                )
    union = list(dict.fromkeys(site for s in sources for site in s))
    targets, exclude = _union_targets([info.config for info in infos], union)
    config = infos[0].config.replace(
        r=rank,
        alpha=lora_combine.new_alpha(rank),
        rslora=False,
        use_dora=False,
        target_modules=targets,
        exclude_modules=exclude,
        modules_to_save=[],
    )
    previous = state.active_adapters(model)
    inject(model, config, adapter_name=adapter_name)
    try:
        added = _sites(model, adapter_name)
        missing = [site for site in union if site not in added]
        if missing:  # only a bug could get here: targets chosen above select every site
            raise RuntimeError(f"add_weighted_adapter: the new adapter does not wrap {', '.join(missing[:3])}.")
        # In module order, as peft visits the layers: DARE's masks are drawn in this order.
        for site, layer in added.items():
            present = [(s[site], w) for s, w in zip(sources, weights, strict=True) if site in s]
            new_A, new_B = _params(layer)
            with torch.no_grad():
                new_A.zero_()
                new_B.zero_()
                if not present:
                    continue
                A, B = lora_combine.combine(
                    [_factors(m) for m, _ in present],
                    [w for _, w in present],
                    combination,
                    density=density,
                    majority_sign_method=majority_sign_method,
                    svd_rank=rank,
                    svd_clamp=svd_clamp,
                    svd_full_matrices=svd_full_matrices,
                    generator=generator,
                    transposed=_transposed(layer),
                )
                new_A[: A.shape[0]].copy_(A)  # (k, ...) into (rank, ...): zero rows past k
                new_B[:, : B.shape[1]].copy_(B)
        activate(model, previous)
    except BaseException:
        remove_added(model, [adapter_name], previous)
        raise
    return model
