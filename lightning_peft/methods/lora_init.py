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
* ``"eva"`` (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained
  Variance Adaptation"): data-driven. The layers start as ``"kaiming"`` (B = 0), then a pass over a
  few training batches (:mod:`lightning_peft.methods.lora_eva`, through LoRA's calibrate hook) sets
  A's rows to the top right-singular vectors of each layer's inputs; options in ``eva_config``
  (:data:`EVA_DEFAULTS`).

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
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

#: The initializations lightning_peft's own LoRA has, then those taken from peft.
OWN_INITS = ("kaiming", "gaussian", "loftq")
PEFT_INITS = ("random", "pissa", "pissa_niter_<N>", "olora", "orthogonal", "eva", "corda")
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
#: peft initializations lightning_peft does not implement, and why (refused by name).
NOT_IMPLEMENTED = {
    "lora_ga": "LoRA-GA (peft's init from estimated full fine-tuning gradients) is not implemented in lightning_peft",
    "mica": "MiCA (peft's minor-component init with a frozen B) is not implemented in lightning_peft",
}


#: peft 0.21.2's ``EvaConfig`` fields and defaults (the meaning of each: lightning_peft.methods.lora_eva).
EVA_DEFAULTS: dict[str, Any] = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
#: lightning_peft's own EVA options (not in peft's file): ``max_batches`` caps the forward passes
#: the incremental SVD takes to converge (peft cycles through the batches without a limit).
EVA_OWN: dict[str, Any] = {"max_batches": 100}


def eva_options(owner: object, init: str, value: object) -> dict[str, Any] | None:
    """``eva_config`` completed with the defaults (``None`` unless ``init="eva"``), each option checked.

    Raises:
        ValueError: naming the option, its value and what is valid; also for options set while
            ``init`` is not ``"eva"`` (peft ignores them then, with a warning).
    """
    name = f"{type(owner).__name__}.eva_config"
    if value is None:
        return {**EVA_DEFAULTS, **EVA_OWN} if init == "eva" else None
    if init != "eva":
        raise ValueError(f"{name} is set ({value!r}) but init={init!r}: EVA's options are for init='eva' only.")
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be a dict of EVA options ({', '.join(EVA_DEFAULTS)}, max_batches); got {value!r}."
        )
    unknown = sorted(set(value) - set(EVA_DEFAULTS) - set(EVA_OWN), key=str)
    if unknown:
        raise ValueError(
            f"{name} has no option {unknown[0]!r}; valid: {', '.join(map(repr, [*EVA_DEFAULTS, *EVA_OWN]))}."
        )
    options = {**EVA_DEFAULTS, **EVA_OWN, **value}

    def number(key: str) -> bool:
        return isinstance(options[key], (int, float)) and not isinstance(options[key], bool)

    checks = {
        "rho": (number("rho") and options["rho"] >= 1, "a number >= 1"),
        "tau": (number("tau") and 0 <= options["tau"] <= 1, "a number in [0, 1]"),
        "use_label_mask": (isinstance(options["use_label_mask"], bool), "True or False"),
        "label_mask_value": (
            isinstance(options["label_mask_value"], int) and not isinstance(options["label_mask_value"], bool),
            "an int",
        ),
        "whiten": (isinstance(options["whiten"], bool), "True or False"),
        "adjust_scaling_factors": (isinstance(options["adjust_scaling_factors"], bool), "True or False"),
        "max_batches": (
            isinstance(options["max_batches"], int)
            and not isinstance(options["max_batches"], bool)
            and options["max_batches"] > 0,
            "a positive int",
        ),
    }
    for key, (ok, valid) in checks.items():
        if not ok:
            raise ValueError(f"{name}[{key!r}] must be {valid}; got {options[key]!r}.")
    return options


def eva_to_peft(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """peft's ``eva_config`` for ours (its own fields only)."""
    return None if options is None else {key: options[key] for key in EVA_DEFAULTS}


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
    return init in ("olora", "corda") or init.startswith("pissa")


def peft_recomputes(init: str) -> bool:
    """Whether peft, loading an unconverted adapter of ``init`` into the original base, computes the
    same residual base weight again: PiSSA (full SVD) and OLoRA do; a randomized PiSSA
    (``pissa_niter_N``) gives another one, and CorDA cannot without the calibration data."""
    return not rewrites_base(init) or init in ("pissa", "olora")


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
    if value == "corda":
        raise ValueError(CORDA_UNCONVERTED)
    if isinstance(value, str) and (value in PEFT_INITS or value == "gaussian" or _NITER.fullmatch(value)):
        return value
    raise ValueError(
        f"init_lora_weights={value!r} is not one lightning_peft implements; supported: True, False, 'gaussian', "
        "'pissa', 'pissa_niter_<N>', 'olora', 'orthogonal', 'eva'."
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


# --------------------------------------------------------------------------- CorDA's options
# (the algorithm is in lightning_peft.methods.lora_corda; the options live here, below lora.py,
# whose LoRAConfig holds them)

#: Why an unconverted CorDA file is refused: its residual needs the calibration data.
CORDA_UNCONVERTED = (
    "init_lora_weights='corda' is refused: CorDA's adapter applies to the residual base weight W - s B_0 A_0, where "
    "B_0 A_0 comes from the covariance of the layer inputs over the calibration data, which the file does not hold "
    "(peft itself cannot load such a file without running preprocess_corda on that data again: its corda_init "
    "raises without the eigens). Save it converted (peft: save_pretrained(..., path_initial_model_for_weight_"
    "conversion=...); lightning_peft: save_peft_adapter(..., convert_to_standard_lora=True)): that file is a plain "
    "LoRA of the original base (init_lora_weights=True), which loads"
)
CORDA_METHODS = ("ipm", "kpm")


@dataclass(frozen=True, kw_only=True)
class CordaConfig:
    """CorDA's options (``LoRAConfig.corda_config``), as peft's ``CordaConfig`` where peft has them.

    Args:
        corda_method: ``"ipm"`` (instruction-previewed: the adapter takes the r largest components of
            ``W C``, which the task's inputs use most) or ``"kpm"`` (knowledge-preserved: the r
            smallest, leaving the base's main directions to the frozen residual).
        calibration_batches: training batches whose layer inputs give the covariances ``C``
            (peft's ``run_model`` callback; the paper takes 256 samples).
        use_float16_for_covariance: as peft: the inputs are not cast to float32 before the
            covariance is accumulated (it then has the layer input's dtype).
        verbose: log each layer's decomposition (peft prints a progress bar).
        cache_file: refused unless ``None``: peft reads and writes it with pickle (``torch.save``),
            which lightning_peft never loads.
        covariance_file: refused unless ``None``, for the same reason.
        prune_temporary_fields: must be ``True``: lightning_peft keeps no covariance on the modules
            (peft's ``False`` leaves them there).
    """

    corda_method: str = "ipm"
    calibration_batches: int = 8
    use_float16_for_covariance: bool = False
    verbose: bool = False
    cache_file: str | None = None
    covariance_file: str | None = None
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        where = "LoRAConfig.corda_config"
        if self.corda_method not in CORDA_METHODS:
            raise ValueError(f"{where}.corda_method must be 'ipm' or 'kpm'; got {self.corda_method!r}.")
        batches = self.calibration_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"{where}.calibration_batches must be a positive integer; got {batches!r}.")
        for name in ("use_float16_for_covariance", "verbose", "prune_temporary_fields"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}.{name} must be True or False; got {getattr(self, name)!r}.")
        for name in ("cache_file", "covariance_file"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{where}.{name}={getattr(self, name)!r} is refused: peft writes and reads that file with pickle "
                    "(torch.save / torch.load), which lightning_peft never loads; leave it None (the covariances are "
                    "collected again from calibration_batches batches)."
                )
        if not self.prune_temporary_fields:
            raise ValueError(
                f"{where}.prune_temporary_fields=False is refused: lightning_peft keeps no covariance, sample count or "
                "eigens on the modules after calibrating (peft's False leaves them there); leave it True."
            )


def check_corda(owner: Any) -> None:
    """Validate ``owner.corda_config`` (a LoRAConfig) against its ``init``; it is stored as the full dict of
    :class:`CordaConfig`'s fields (JSON-friendly), the defaults where ``init="corda"`` has none (as peft's
    LoraConfig does).

    Raises:
        ValueError: naming the field and value: CorDA options without ``init="corda"`` (peft ignores
            them with a warning), or CorDA with an option it does not combine with.
    """
    name = type(owner).__name__
    value = owner.corda_config
    if isinstance(value, dict):
        try:
            value = CordaConfig(**value)  # validates
        except TypeError as error:
            known = ", ".join(f.name for f in fields(CordaConfig))
            raise ValueError(f"{name}.corda_config={value!r}: {error}; its fields are {known}.") from None
    if value is not None and not isinstance(value, CordaConfig):
        raise ValueError(f"{name}.corda_config must be None, a CordaConfig or a dict of its fields; got {value!r}.")
    if owner.init != "corda":
        if value is not None:
            raise ValueError(
                f"{name}.corda_config is set but init={owner.init!r}: CorDA's options only apply with init='corda' "
                "(peft ignores them with a warning); set init='corda' or leave corda_config None."
            )
        return
    value = value if value is not None else CordaConfig()
    object.__setattr__(owner, "corda_config", {f.name: getattr(value, f.name) for f in fields(CordaConfig)})
    if owner.use_dora is True or owner.target_parameters is not None:
        field_name = "use_dora" if owner.use_dora is True else "target_parameters"
        raise ValueError(
            f"{name}.{field_name}={getattr(owner, field_name)!r} is refused with init='corda': CorDA decomposes "
            "nn.Linear/Conv1D weights into a plain LoRA adapter and a residual (as peft's preprocess_corda does)."
        )


def corda_to_peft(config: Any) -> dict[str, Any] | None:
    """peft's ``corda_config`` for a LoRAConfig (None without CorDA); ``calibration_batches`` is ours alone."""
    options = config.corda_config
    if options is None:
        return None
    return {name: value for name, value in options.items() if name != "calibration_batches"}
