"""The base-model fingerprint: what identifies the frozen weights an adapter was trained on.

A state dict's record (:mod:`lightning_peft.core.state`) carries it, so that a load refuses an
adapter trained on another base, a fine-tuned derivative of it included (:class:`BaseFingerprint`
says how samples of the weights tell them apart, across dtypes). Format 2 samples values; format 1
(sums of ``|w|``, within 5 %) is still read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core import quantize
from lightning_peft.core.layer import AdapterModule
from lightning_peft.core.targeting import find_base_model

_SAMPLES = 16  # values sampled per base weight tensor (format 2)
_CHECKSUM_ELEMENTS = 256  # format 1: sum of |w| over the first elements of each tensor ...
_CHECKSUM_RTOL = 5e-2  # ... compared within 5 %


def _sample(tensor: Tensor) -> str | None:
    """``"<dtype>:<base64 of float32 values>"``: up to ``_SAMPLES`` values at positions spread evenly
    from the first element to the last; ``None`` for what holds no comparable values (integers,
    meta tensors, sharded tensors without a flat view)."""
    if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    try:
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _SAMPLES), dtype=torch.float64)
        values = flat[index.round().long().to(flat.device)].to("cpu", torch.float32)
    except (RuntimeError, NotImplementedError):
        return None
    encoded = base64.b64encode(values.numpy().astype("<f4").tobytes()).decode("ascii")
    return f"{str(tensor.dtype).removeprefix('torch.')}:{encoded}"


def _decode_sample(sample: str) -> tuple[torch.dtype, Tensor]:
    """The dtype and values of a :func:`_sample` string; ``ValueError`` naming what is wrong."""
    name, sep, encoded = sample.partition(":")
    dtype = getattr(torch, name, None)
    if not sep or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"sample {sample[:40]!r} does not start with a floating-point dtype name")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise ValueError(f"sample {sample[:40]!r} is not base64 ({error})") from None
    if not raw or len(raw) % 4 or len(raw) > 4 * _SAMPLES:
        raise ValueError(f"sample {sample[:40]!r} holds {len(raw)} bytes, not 1 to {_SAMPLES} float32 values")
    return dtype, torch.frombuffer(bytearray(raw), dtype=torch.float32)


def _same_values(mine: str, theirs: str) -> bool:
    """Whether two samples of a weight are the same values, up to a change of dtype (see BaseFingerprint)."""
    (dtype_a, a), (dtype_b, b) = _decode_sample(mine), _decode_sample(theirs)
    if a.shape != b.shape:
        return False
    coarse, fine = sorted((dtype_a, dtype_b), key=lambda d: torch.finfo(d).eps, reverse=True)
    a, b = a.to(coarse).float(), b.to(coarse).float()
    if dtype_a == dtype_b or torch.finfo(fine).eps <= torch.finfo(torch.float32).eps:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    # Two different 16-bit copies: each was rounded once from the original, one of them twice here.
    atol = max(torch.finfo(d).smallest_normal * torch.finfo(d).eps for d in (dtype_a, dtype_b))
    return bool(torch.isclose(a, b, rtol=torch.finfo(coarse).eps, atol=atol, equal_nan=True).all())


@dataclass
class BaseFingerprint:
    """What identifies the frozen base model an adapter was trained on (record format 2).

    ``structure`` hashes the names and shapes of the base model's weights (parameters and
    persistent buffers, i.e. what its checkpoint holds; buffers computed at init, such as rotary
    frequencies, may differ in the last bit between devices and are left out). ``samples`` holds,
    per weight, 16 values at fixed positions spread from its first element to its last, with the
    weight's dtype.

    Two samples match when, rounded to the coarser of their two dtypes, they are equal. That is
    what "the same weights in another dtype" means: a bf16 copy of a float32 base is each weight
    rounded once, and rounding the float32 samples the same way reproduces it exactly, on any
    device. A tolerance on the raw values cannot do this job: bf16 rounding moves a weight by up to
    2^-8 (0.4 %) of its value, more than a fine-tuned derivative typically differs (1e-3 relative
    noise), so any tolerance loose enough for bf16 would accept the derivative. Rounding does tell
    them apart: at float32 every sample of the derivative differs, and at bf16 such noise carries
    about 15 % of the samples across a rounding boundary, so nearly every tensor of 16 samples
    differs. Only between two different 16-bit copies (fp16 against bf16), each rounded once from
    the original, can the second rounding land one unit in the last place away; there one unit
    (plus fp16's subnormal step) is allowed. A derivative that changed no sampled value (a sparse
    edit) is not detected.

    Args:
        model_type: the transformers ``model_type``, for messages.
        structure: hash of the weights' names and shapes.
        samples: per weight (sorted by name), :func:`_sample`'s string, ``None`` where not comparable.
        names: the weights' names, kept in memory only, for messages.
        legacy: ``(structure, checksums)`` computed as format 1 did, to compare format-1 records with.
    """

    model_type: str | None
    structure: str
    samples: list[str | None]
    names: list[str] = field(default_factory=list, compare=False, repr=False)
    legacy: tuple[str, list[float]] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "structure": self.structure, "samples": list(self.samples)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseFingerprint:
        return cls(data.get("model_type"), data["structure"], list(data["samples"]))

    def _other_architecture(self, other_type: str | None) -> str:
        return (
            f"it was trained on a base model of another architecture or size "
            f"(model_type {other_type!r}, this model is {self.model_type!r}; the frozen "
            f"weights' names or shapes differ)"
        )

    def mismatch(self, other: BaseFingerprint) -> str | None:
        """Why ``other`` (what a state dict was trained on) is not this base, or ``None``."""
        if self.structure != other.structure or len(self.samples) != len(other.samples):
            return self._other_architecture(other.model_type)
        differ = [
            index
            for index, (a, b) in enumerate(zip(self.samples, other.samples, strict=True))
            if a is not None and b is not None and not _same_values(a, b)
        ]
        if not differ:
            return None
        named = [self.names[i] for i in differ[:3]] if len(self.names) == len(self.samples) else []
        return (
            f"it was trained on another base model of the same architecture, or on a fine-tuned derivative of this "
            f"one ({len(differ)} of {len(self.samples)} frozen weight tensors differ"
            + (f", e.g. {', '.join(named)}" if named else "")
            + ")"
        )

    def mismatch_legacy(self, data: dict[str, Any]) -> str | None:
        """As :meth:`mismatch`, for a format-1 record's fingerprint (``structure``, ``checksums``)."""
        if self.legacy is None:
            raise ValueError("this fingerprint was not computed with its format-1 view (state.fingerprint does)")
        structure, checksums = self.legacy
        theirs = [float(x) for x in data["checksums"]]
        if structure != data["structure"] or len(checksums) != len(theirs):
            return self._other_architecture(data.get("model_type"))
        differ = sum(
            1
            for a, b in zip(checksums, theirs, strict=True)
            if not (math.isnan(a) or math.isnan(b)) and not math.isclose(a, b, rel_tol=_CHECKSUM_RTOL, abs_tol=1e-6)
        )
        if differ:
            return (
                f"it was trained on another base model of the same architecture ({differ} of "
                f"{len(checksums)} frozen weight tensors differ)"
            )
        return None


def _strip_wrappers(name: str) -> str:
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


def _checksum(tensor: Tensor) -> float:
    """Format 1's per-tensor value: the sum of |w| over the first elements."""
    if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
        return math.nan
    try:
        head = tensor.detach().reshape(-1)[:_CHECKSUM_ELEMENTS]
    except RuntimeError:  # sharded tensor subclasses without a flat view
        return math.nan
    return float(head.double().abs().sum())


def _structure(entries: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}:{tuple(entries[name].shape)};".encode())
    return digest.hexdigest()[:32]


def fingerprint(model: nn.Module) -> BaseFingerprint:
    """Fingerprint of the frozen base weights of ``model`` (adapter state excluded)."""
    base_path, base = find_base_model(model)
    # Trained biases stay in: they are the base's own weights, sampled as injection found them.
    modules = [m for m in model.modules() if isinstance(m, AdapterModule)]
    adapter_ids = {id(t) for m in modules for _, t in [*m.adapter_state(), *m.training_state()]}
    # A module that keeps a trained copy of a base module (modules_to_save) holds no identifying weight.
    adapter_ids |= {id(t) for m in modules if not m.fingerprinted for t in [*m.parameters(), *m.buffers()]}
    every: dict[str, Tensor] = {}  # format 1 took every parameter and buffer
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if id(tensor) not in adapter_ids:
            every.setdefault(_strip_wrappers(name), tensor)
    computed = {
        f"{owner}.{local}" if owner else local
        for owner, module in base.named_modules()
        for local in module._non_persistent_buffers_set
    }
    weights = {
        _strip_wrappers(name): tensor
        for name, tensor in [*base.named_parameters(), *base.named_buffers()]
        if id(tensor) not in adapter_ids and name not in computed
    }
    names = sorted(weights)
    samples = [_sample(weights[name]) for name in names]
    # A quantized weight is packed integers, which _sample skips: sample the values it computes with.
    index = {name: i for i, name in enumerate(names)}
    for owner, module in quantize.quantized_layers(base):
        key = _strip_wrappers(f"{owner}.weight")
        if key in index:
            samples[index[key]] = _sample(quantize.dequantized_weight(module))
    kind = getattr(getattr(base, "config", None), "model_type", None)
    return BaseFingerprint(
        kind if isinstance(kind, str) else None,
        _structure(weights),
        samples,
        names=names,
        legacy=(_structure(every), [_checksum(every[name]) for name in sorted(every)]),
    )
