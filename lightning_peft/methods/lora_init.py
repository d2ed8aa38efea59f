"""LoRA initializations beyond the default, as Hugging Face peft has them (its ``init_lora_weights``).

Pure tensor functions (no module of lightning_peft's is imported): :mod:`lightning_peft.methods.lora`
calls them from its layers, and the peft format reads :func:`to_peft` / :func:`from_peft`.

For a weight ``W`` (out x in, float32), rank ``r`` and scale ``s``:

* ``"pissa"`` (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation"): with ``W = U S V^T``, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, and the
  base weight becomes the residual ``W_res = W - s B A``, so the model is unchanged at init but
  the adapter trains the principal directions. ``"pissa_niter_N"`` takes ``U_r, S_r, V_r`` from
  ``torch.svd_lowrank(W, r, niter=N)`` (randomized: it draws from torch's global generator).
* ``"olora"`` (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): with ``W = Q R``,
  ``B = Q[:, :r]``, ``A = R[:r]`` and ``W_res = W - s B A``.
* ``"orthogonal"`` (peft's, after datta0's "rethinking LoRA initialisation"): a random orthogonal
  ``Q`` (r x r) split into odd rows ``Q_o`` and even rows ``Q_e``; ``A = (G_1 Q_o)^T / 10``,
  ``B = G_2^T Q_e / 10`` with Gaussian ``G_1`` (in x r/2), ``G_2`` (r/2 x out). ``B A = 0`` because
  ``Q_e Q_o^T = 0``: the base weight is not touched.

The random draws follow peft's order exactly (peft first builds ``lora_A`` and ``lora_B`` as
``nn.Linear`` layers, whose default init draws from the generator), so the same seed gives the same
adapter here and in peft, and a ``pissa_niter_N`` adapter that peft saved unconverted (peft runs
the randomized SVD again when loading it) loads with the same residual as in peft.

PiSSA and OLoRA rewrite the base weight. peft then has two ways to save: as is (the file says
``init_lora_weights="pissa"``, and a loader must compute the residual again from the original
base weight), or converted to a plain LoRA adapter of rank ``2r`` that applies to the original
base weight: ``A' = [A; A_0]``, ``B' = [B, -B_0]``, ``alpha' = 2 alpha`` (``sqrt(2) alpha`` with
rslora), since ``W_res + s B A = W + s (B A - B_0 A_0)`` (peft's
``path_initial_model_for_weight_conversion``). Each layer keeps its initial ``A_0, B_0`` for that.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

#: The initializations lightning_peft's own LoRA has, then those taken from peft.
OWN_INITS = ("kaiming", "gaussian", "loftq")
PEFT_INITS = ("random", "pissa", "pissa_niter_<N>", "olora", "orthogonal")
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
#: peft initializations lightning_peft does not implement, and why (refused by name).
NOT_IMPLEMENTED = {
    "eva": "EVA (peft's data-driven init from the SVD of layer inputs over a few batches, with its own "
    "rank redistribution) is not implemented in lightning_peft yet",
    "corda": "CorDA (peft's context-oriented decomposition from collected covariance matrices) is not "
    "implemented in lightning_peft yet",
    "lora_ga": "LoRA-GA (peft's init from estimated full fine-tuning gradients) is not implemented in lightning_peft",
    "mica": "MiCA (peft's minor-component init with a frozen B) is not implemented in lightning_peft",
}


def check(owner: object, value: object) -> None:
    """Refuse an unknown ``init``, naming the field, the value and what is valid.

    Raises:
        ValueError: for a value that is not an initialization lightning_peft implements.
    """
    name = type(owner).__name__
    if isinstance(value, str) and (value in OWN_INITS or value in PEFT_INITS or _NITER.fullmatch(value)):
        return
    if isinstance(value, str) and (value in NOT_IMPLEMENTED or value.startswith("pissa_niter_")):
        why = NOT_IMPLEMENTED.get(value, "the iteration count must be a positive integer (pissa_niter_4)")
        raise ValueError(f"{name}.init={value!r} is refused: {why}.")
    raise ValueError(
        f"{name}.init must be one of {', '.join(map(repr, OWN_INITS))}; got {value!r}. peft's initializations are "
        f"accepted too: {', '.join(map(repr, PEFT_INITS))}."
    )


def rewrites_base(init: str) -> bool:
    """Whether ``init`` changes the base weight (to the residual ``W - s B_0 A_0``)."""
    return init == "olora" or init.startswith("pissa")


def to_peft(init: str) -> bool | str:
    """peft's ``init_lora_weights`` for our ``init`` (LoftQ's adapter applies to the already quantized base)."""
    return {"kaiming": True, "random": False, "loftq": True}.get(init, init)


def from_peft(value: Any) -> str:
    """Our ``init`` for peft's ``init_lora_weights``.

    Raises:
        ValueError: naming the value, for an initialization lightning_peft does not implement.
    """
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    if value == "loftq":
        raise ValueError(
            "init_lora_weights='loftq' is refused: peft replaces the base weights by LoftQ's quantized ones when it "
            "loads such an adapter, which lightning_peft does not do on load (its LoftQ, LoRAConfig(init='loftq') "
            "with lightning_peft.methods.lora_loftq.loftq, works on a bitsandbytes 4-bit base)."
        )
    if isinstance(value, str) and value in NOT_IMPLEMENTED:
        raise ValueError(f"init_lora_weights={value!r} is refused: {NOT_IMPLEMENTED[value]}.")
    if isinstance(value, str) and (value in PEFT_INITS or value == "gaussian" or _NITER.fullmatch(value)):
        return value
    raise ValueError(
        f"init_lora_weights={value!r} is not one lightning_peft implements; supported: True, False, 'gaussian', "
        "'pissa', 'pissa_niter_<N>', 'olora', 'orthogonal'."
    )


def pissa(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA's ``(A, B, W_res)`` for ``weight`` (out x in, float32); see the module docstring.

    The operations are peft's, in peft's order, so the result is the same to the last bit.
    """
    match = _NITER.fullmatch(init)
    if match is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r] / scaling, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, r, niter=int(match.group(1)))
        s_r, vh_r = s_r / scaling, v_r.t()
    lora_A = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    lora_B = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


def olora(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA's ``(A, B, W_res)`` for ``weight`` (out x in, float32): ``W = Q R``, ``B = Q_r``, ``A = R_r``."""
    q, rr = torch.linalg.qr(weight)
    lora_A, lora_B = rr[:r].contiguous(), q[:, :r].contiguous()
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


def orthogonal(r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """peft's orthogonal ``(A, B)`` (r x in, out x r) with ``B A = 0``; ``r`` must be even."""
    if r % 2:
        raise ValueError(f"LoRAConfig.init='orthogonal' needs an even rank r (its A and B split r in two); got r={r}.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]  # (r/2, r) each, orthogonal to each other
    lora_A = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    lora_B = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return lora_A.contiguous(), lora_B.contiguous()


def draw_like_peft(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    """Consume the generator as peft does when it builds ``lora_A``/``lora_B`` (``nn.Linear`` default init).

    Only the draws matter (their values are replaced): they keep the random stream of a
    ``pissa_niter_N`` or ``orthogonal`` init the same as peft's for the same seed.
    """
    for shape in (a_shape, b_shape):
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (out, in) draws U(-1/sqrt(in), 1/sqrt(in))
        torch.empty(shape).uniform_(-bound, bound)


_KEPT: list[list[tuple[Tensor, Tensor]]] = []


@contextlib.contextmanager
def keeping_originals() -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Record ``(base weight, copy of its original values)`` for every base weight an init rewrites inside.

    A loader that may still fail after injecting (``load_peft_adapter``) restores them with
    :func:`restore`, so a failed load leaves the base weights bit for bit as they were.
    """
    kept: list[tuple[Tensor, Tensor]] = []
    _KEPT.append(kept)
    try:
        yield kept
    finally:
        _KEPT.remove(kept)


def remember(weight: Tensor) -> None:
    """Called by a layer right before its init rewrites ``weight`` (only inside :func:`keeping_originals`)."""
    if _KEPT:
        _KEPT[-1].append((weight, weight.detach().clone()))


def restore(kept: list[tuple[Tensor, Tensor]]) -> None:
    """Put back the original values recorded by :func:`keeping_originals`."""
    with torch.no_grad():
        for weight, original in reversed(kept):
            weight.copy_(original)
