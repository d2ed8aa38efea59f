"""Combine several LoRA adapters of one layer into one: the tensor math of peft's ``add_weighted_adapter``.

Adapter ``i`` adds ``ΔW_i = s_i B_i A_i`` (``A_i``: (r_i, in), ``B_i``: (out, r_i), ``s_i`` its scaling;
conv factors are flattened to that form). Given weights ``w_i`` the combinations are:

* ``cat`` (exact): ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so ``B A = Σ w_i ΔW_i``
  with rank ``Σ r_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (approximate, equal ranks): the
  factors are merged separately, ``A = merge(c_i A_i)``, ``B = merge(|c_i| B_i)`` with
  ``c_i = sign(w_i s_i) sqrt(|w_i s_i|)``; ``B A`` then has cross terms ``B_i A_j``.
* ``svd`` and ``<method>_svd``: ``ΔW = merge(w_i ΔW_i)`` in full, then the best rank-``r`` factors of it,
  ``ΔW ≈ (U_r S_r) V_r^T``: ``B = U_r S_r``, ``A = V_r^T``, optionally clamped to the ``svd_clamp`` quantile
  of their entries.

``merge`` is one of :func:`merge_tensors`' methods. The new adapter's scaling must be 1 (:func:`new_alpha`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *MERGES, *SVD_COMBINATIONS)
#: Combinations that sparsify, hence need ``density``; the ``*ties*`` ones also use ``majority_sign_method``.
NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c.removesuffix("_svd") not in ("linear", "svd", "cat"))
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _invalid(field: str, value: object, expected: str) -> ValueError:
    return ValueError(f"lora_combine: {field} must be {expected}; got {value!r}.")


def _check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _invalid(field, value, "one of " + ", ".join(map(repr, choices)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Factors:
    """One adapter at one layer, laid out as our LoRA layers store it.

    Args:
        A: (r, in) for Linear, (r, num_embeddings) for Embedding, (r, in, kh, kw) for Conv2d.
        B: (out, r) for Linear, (dim, r) for Embedding, (out, r, 1, 1) for Conv2d.
        scaling: the adapter's ``alpha / r`` (or ``alpha / sqrt(r)``) at this layer.
    """

    A: Tensor
    B: Tensor
    scaling: float

    def __post_init__(self) -> None:
        A, B = self.A, self.B
        if A.dim() < 2 or B.dim() < 2 or B.shape[1] != A.shape[0] or math.prod(B.shape[2:]) != 1:
            raise _invalid(
                "Factors (A, B) shapes", (tuple(A.shape), tuple(B.shape)), "(r, in, ...) and (out, r, 1, ...)"
            )
        if not _is_number(self.scaling):
            raise _invalid("Factors.scaling", self.scaling, "a finite number")

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def effective_combination(combination: str, num_adapters: int) -> str:
    """The combination peft really applies: ``linear`` whenever a single adapter is given (any other is ignored)."""
    _check_choice("combination", combination, COMBINATIONS)
    return "linear" if num_adapters == 1 else combination


def new_rank(combination: str, ranks: Sequence[int], svd_rank: int | None = None) -> int:
    """The combined adapter's rank, from each adapter's rank (its largest over layers, as peft uses).

    ``linear`` and its sparsified variants need equal ranks and keep it; ``cat`` sums them; the ``svd``
    ones use ``svd_rank``, by default the largest rank. One adapter means ``linear`` (:func:`effective_combination`).
    """
    if not ranks or not all(_is_positive_int(r) for r in ranks):
        raise _invalid("ranks", ranks, "a non-empty sequence of positive integers")
    if svd_rank is not None and not _is_positive_int(svd_rank):
        raise _invalid("svd_rank", svd_rank, "None or a positive integer")
    combination = effective_combination(combination, len(ranks))
    if combination in MERGES:
        if len(set(ranks)) != 1:
            raise _invalid("ranks", list(ranks), f"all equal for combination {combination!r} (use 'cat' or an svd one)")
        return ranks[0]
    return sum(ranks) if combination == "cat" else svd_rank or max(ranks)


def new_alpha(rank: int) -> float:
    """The combined adapter's ``alpha``: its rank, so that with plain LoRA its scaling ``alpha / r`` is 1.

    That is what peft stores (``lora_alpha = r``). peft copies every other option, ``use_rslora``
    included, from the first adapter, so under rsLoRA its scaling becomes ``r / sqrt(r) = sqrt(r)``
    and its combined update is ``sqrt(r)`` times :func:`combine`'s. Build the new adapter without
    rsLoRA (or with ``alpha = sqrt(r)``) for the combination itself; keep rsLoRA and this alpha to match peft.
    """
    return float(rank)


def _sparsify(t: Tensor, method: str, density: float, generator: torch.Generator | None) -> Tensor:
    if method == "linear" or density >= 1:  # peft skips here, drawing no random numbers
        return t
    if method in ("ties", "magnitude_prune"):
        keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        keep[t.abs().flatten().topk(int(density * t.numel())).indices] = True
        return t * keep.view_as(t)
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype, device=t.device), generator=generator)
    return t * mask / density


def merge_tensors(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge same-shape task tensors ``τ_i`` with weights ``w_i`` (peft's ``merge_utils``).

    * ``linear`` (task arithmetic): ``Σ w_i τ_i``.
    * ``magnitude_prune``: ``Σ w_i trim(τ_i)``; ``trim`` keeps the ``⌊density·numel⌋`` entries largest in ``|τ_i|``.
    * ``dare_linear`` (DARE, Yu et al. 2023, "Language Models are Super Mario"): ``Σ w_i (m_i ⊙ τ_i) / density``,
      ``m_i ~ Bernoulli(density)`` drawn from ``generator`` (default: torch's global RNG, as peft).
    * ``ties`` (TIES-Merging, Yadav et al. 2023): trim ``τ̂_i = trim(τ_i)``; elect a sign per entry,
      ``γ = sign(Σ_i τ̂_i)`` (``"total"``) or ``sign(Σ_i sign τ̂_i)`` (``"frequency"``), +1 on a tie; then the
      disjoint mean ``Σ_i [sign τ̂_i = γ] w_i τ̂_i / max(1, Σ_i [sign τ̂_i = γ])``. Like peft, the sign is
      elected from the unweighted tensors: weights (negative ones too) scale the result but do not vote.
    * ``dare_ties``: ``ties`` with DARE's random drop-and-rescale in place of ``trim``.
    """
    stacked = torch.stack([_sparsify(t, method, density, generator) for t in tensors])  # (n, *shape)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return (stacked * w).sum(0)
    sign = stacked.sign()
    votes = stacked.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)  # (n, *shape)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(
    factors: Sequence[Factors],
    weights: Sequence[float],
    combination: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    generator: torch.Generator | None = None,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """One layer's combined ``(A, B)``, shaped like the inputs' with the new rank; use with scaling 1.

    Pass the adapters present at this layer (peft skips the others) and, for peft's behaviour, the
    model-wide :func:`effective_combination` and :func:`new_rank` (as ``svd_rank``). ``cat`` returns
    ``Σ r_i`` rows, which a wider new adapter pads with zeros. Options a combination does not use are
    ignored, as peft does. Computed in at least float32, returned in the first ``A``'s dtype.

    Args:
        factors: each adapter's factors at this layer.
        weights: one weight per adapter; negative ones subtract.
        combination: one of :data:`COMBINATIONS`.
        density: fraction of entries kept, in (0, 1]; needed by :data:`NEEDS_DENSITY`.
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ``*ties*`` combinations.
        svd_rank: the svd combinations' rank (default: the largest ``r_i``); missing directions are zeros.
        svd_clamp: a quantile ``q`` in [0, 1]: both SVD factors are clamped to ``±`` the q-quantile of their entries.
        svd_full_matrices: full or reduced SVD (same result; peft's default is full).
        generator: the DARE masks' random source (default: the global RNG, reproducing peft under one seed).
        transposed: True where peft's delta weight is (in, out): Embedding and fan-in-fan-out (Conv1D)
            layers. It only changes which DARE masks an svd combination draws, for parity with peft.
    """
    _check_choice("combination", combination, COMBINATIONS)
    _check_choice("majority_sign_method", majority_sign_method, MAJORITY_SIGN_METHODS)
    if not factors or not all(isinstance(f, Factors) for f in factors):
        raise _invalid("factors", factors, "a non-empty sequence of Factors")
    if len(weights) != len(factors):
        raise _invalid("weights", weights, f"one weight per adapter ({len(factors)})")
    if not all(_is_number(w) for w in weights):
        raise _invalid("weights", weights, "finite numbers")
    shapes = {(f.A.shape[1:], f.B.shape[:1] + f.B.shape[2:]) for f in factors}
    if len(shapes) != 1:
        raise _invalid("factors", [(tuple(f.A.shape), tuple(f.B.shape)) for f in factors], "of one layer's shape")
    if combination in NEEDS_DENSITY and not (density is not None and _is_number(density) and 0 < density <= 1):
        raise _invalid("density", density, f"a number in (0, 1] for combination {combination!r}")
    if svd_rank is not None and not _is_positive_int(svd_rank):
        raise _invalid("svd_rank", svd_rank, "None or a positive integer")
    if svd_clamp is not None and not (_is_number(svd_clamp) and 0 <= svd_clamp <= 1):
        raise _invalid("svd_clamp", svd_clamp, "None or a quantile in [0, 1]")
    if transposed and factors[0].A.dim() != 2:
        raise _invalid("transposed", transposed, "False for conv factors")

    dtype = factors[0].A.dtype
    work = torch.promote_types(dtype, torch.float32)
    As = [f.A.to(work) for f in factors]
    Bs = [f.B.to(work) for f in factors]
    scaled = [w * f.scaling for w, f in zip(weights, factors, strict=True)]
    merge = functools.partial(
        merge_tensors, density=density or 1.0, majority_sign_method=majority_sign_method, generator=generator
    )

    if combination == "cat":
        A, B = torch.cat([c * a for c, a in zip(scaled, As, strict=True)]), torch.cat(Bs, dim=1)
    elif combination in MERGES:
        if len({f.rank for f in factors}) != 1:
            raise _invalid("factors' ranks", [f.rank for f in factors], f"equal for combination {combination!r}")
        roots = [math.sqrt(abs(c)) for c in scaled]  # the sign goes on A only, or it would cancel
        A = merge(As, [math.copysign(r, c) for r, c in zip(roots, scaled, strict=True)], combination)
        B = merge(Bs, roots, combination)
    else:
        # Each (out, in·kh·kw); conv factors compose to one conv because B is 1x1.
        deltas = [f.scaling * (b.flatten(1) @ a.flatten(1)) for f, a, b in zip(factors, As, Bs, strict=True)]
        method = "linear" if combination == "svd" else combination.removesuffix("_svd")
        if transposed:  # draw DARE's masks in peft's (in, out) layout
            delta = merge([d.t() for d in deltas], weights, method).t()
        else:
            delta = merge(deltas, weights, method)
        rank = svd_rank or max(f.rank for f in factors)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices)
        k = min(rank, S.numel())
        B, A = U[:, :k] * S[:k], Vh[:k]  # (out, k), (k, in·kh·kw)
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
            B, A = B.clamp(-high, high), A.clamp(-high, high)
        B, A = F.pad(B, (0, rank - k)), F.pad(A, (0, 0, 0, rank - k))
        A = A.reshape(rank, *factors[0].A.shape[1:])
        B = B.reshape(B.shape[0], rank, *factors[0].B.shape[2:])
    return A.to(dtype), B.to(dtype)
