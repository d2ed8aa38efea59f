"""Freezing, the trainable state dict, and loading it back with validation.

An injected model carries a :class:`PEFTInfo` record (method, resolved config, base-model
fingerprint). Its state dicts carry the same record in torch's per-module ``_metadata`` (the
mechanism torch uses for module versions), so a state dict says what wrote it. Load hooks then
check, before any tensor is copied, that the method, options and base model match, that every
adapter key is present, and they let frozen base weights be missing: the checkpoint holds only
what was trained. No blanket ``strict=False``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_peft.core.config import AdapterConfig
from lightning_peft.core.layer import AdapterLayer, AdapterModule
from lightning_peft.core.targeting import find_base_model

#: Key of our record inside ``state_dict._metadata[prefix]``.
METADATA_KEY = "lightning_peft"
FORMAT_VERSION = 1
_CHECKSUM_ELEMENTS = 256
_CHECKSUM_RTOL = 5e-2  # loose enough for a bf16/fp16 copy of the same base, tight enough for another one


@dataclass
class BaseFingerprint:
    """What identifies the frozen base model an adapter was trained on.

    ``structure`` hashes the names and shapes of the frozen tensors; ``checksums`` holds, per tensor,
    the sum of absolute values of its first elements, which tells two bases of one architecture
    apart while tolerating a change of dtype.
    """

    model_type: str | None
    structure: str
    checksums: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "structure": self.structure, "checksums": list(self.checksums)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseFingerprint:
        return cls(data.get("model_type"), data["structure"], [float(x) for x in data["checksums"]])

    def mismatch(self, other: BaseFingerprint) -> str | None:
        """Why ``other`` (what a state dict was trained on) is not this base, or ``None``."""
        if self.structure != other.structure or len(self.checksums) != len(other.checksums):
            return (
                f"it was trained on a base model of another architecture or size "
                f"(model_type {other.model_type!r}, this model is {self.model_type!r}; the frozen "
                f"weights' names or shapes differ)"
            )
        differ = sum(
            1
            for a, b in zip(self.checksums, other.checksums, strict=True)
            if not (math.isnan(a) or math.isnan(b)) and not math.isclose(a, b, rel_tol=_CHECKSUM_RTOL, abs_tol=1e-6)
        )
        if differ:
            return (
                f"it was trained on another base model of the same architecture ({differ} of "
                f"{len(self.checksums)} frozen weight tensors differ)"
            )
        return None


@dataclass
class PEFTInfo:
    """What was injected into a model (kept on the model root as ``_lightning_peft``)."""

    method: str
    config: AdapterConfig
    base_path: str
    fingerprint: BaseFingerprint
    modules: list[str] = field(default_factory=list)
    load_prefix: str = ""

    def metadata(self) -> dict[str, Any]:
        """The record written into state dicts and adapter files: plain JSON types only."""
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "base_path": self.base_path,
            "base": self.fingerprint.to_dict(),
        }


_INFO_ATTR = "_lightning_peft"


def get_info(model: nn.Module) -> PEFTInfo | None:
    """The injection record of ``model`` (``None`` if nothing was injected into it as a root)."""
    info = model.__dict__.get(_INFO_ATTR)
    return info if isinstance(info, PEFTInfo) else None


def require_info(model: nn.Module) -> PEFTInfo:
    info = get_info(model)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has no lightning_peft adapter; call lightning_peft.inject(model, ...) "
            "first (on the same module object you pass here)."
        )
    return info


# --------------------------------------------------------------------------- walking adapters


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(full name, module) for every adapter module in ``model``, each once."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _declared(model: nn.Module, kind: str) -> Iterator[tuple[str, Tensor]]:
    seen: set[int] = set()
    for prefix, module in adapter_modules(model):
        for local, tensor in getattr(module, kind)():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield _join(prefix, local), tensor


def adapter_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(full name, tensor) for every declared adapter parameter and buffer."""
    return _declared(model, "adapter_state")


def training_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(full name, tensor) for every buffer that adapter modules keep only for training."""
    return _declared(model, "training_state")


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) for every parameter that the adapter trains."""
    for name, tensor in adapter_state(model):
        if isinstance(tensor, nn.Parameter):
            yield name, tensor


def freeze(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze exactly the declared adapter parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in adapter_parameters(model):
        param.requires_grad_(True)


def undeclared_trainable(model: nn.Module) -> list[str]:
    """Parameters that require grad but belong to no adapter: they would train but not be saved."""
    declared = {id(p) for _, p in adapter_parameters(model)}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in declared]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


# --------------------------------------------------------------------------- fingerprint


def _strip_wrappers(name: str) -> str:
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


def _checksum(tensor: Tensor) -> float:
    if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
        return math.nan
    try:
        head = tensor.detach().reshape(-1)[:_CHECKSUM_ELEMENTS]
    except RuntimeError:  # sharded tensor subclasses without a flat view
        return math.nan
    return float(head.double().abs().sum())


def fingerprint(model: nn.Module) -> BaseFingerprint:
    """Fingerprint of the frozen base weights of ``model`` (adapter state excluded)."""
    base_path, base = find_base_model(model)
    adapter_ids = {id(t) for _, t in [*adapter_state(model), *training_state(model)]}
    entries: dict[str, Tensor] = {}
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if id(tensor) not in adapter_ids:
            entries.setdefault(_strip_wrappers(name), tensor)
    digest = hashlib.sha256()
    checksums = []
    for name in sorted(entries):
        digest.update(f"{name}:{tuple(entries[name].shape)};".encode())
        checksums.append(_checksum(entries[name]))
    kind = getattr(getattr(base, "config", None), "model_type", None)
    return BaseFingerprint(kind if isinstance(kind, str) else None, digest.hexdigest()[:32], checksums)


# --------------------------------------------------------------------------- state dicts


def trainable_state_dict(model: nn.Module, *, training_state: bool = True) -> OrderedDict[str, Tensor]:
    """The adapter's state only (tensors detached, not copied), keyed like ``model.state_dict()``.

    The returned dict carries the injection record in ``_metadata`` like any torch state dict, so
    ``model.load_state_dict(sd)`` on an injected model validates method, options and base model.

    Args:
        model: a model with an injected adapter.
        training_state: include the buffers adapter modules keep only for training (see
            ``AdapterModule.training_state_names``), as a checkpoint to resume from needs;
            ``save_adapter`` leaves them out.
    """
    info = require_info(model)
    tensors = [*adapter_state(model), *(_declared(model, "training_state") if training_state else ())]
    state: OrderedDict[str, Tensor] = OrderedDict((n, t.detach()) for n, t in tensors)
    metadata: dict[str, dict[str, Any]] = {"": {"version": model._version, METADATA_KEY: info.metadata()}}
    for prefix, module in adapter_modules(model):
        metadata.setdefault(prefix, {"version": module._version})
        for sub, child in module.named_modules(prefix=prefix):
            metadata.setdefault(sub, {"version": child._version})
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def read_metadata(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any] | None:
    """Our record in a state dict's torch metadata at module path ``prefix`` ('' for the root)."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    record = metadata.get(prefix, {}).get(METADATA_KEY)
    return record if isinstance(record, dict) else None


def check_record(info: PEFTInfo, record: dict[str, Any], where: str = "the state dict") -> None:
    """Raise a clear error when ``record`` (what wrote a state dict) does not fit ``info``."""
    from lightning_peft import registry

    if record.get("method") != info.method:
        raise ValueError(
            f"{where} holds a {record.get('method')!r} adapter, but this model has method={info.method!r} "
            f"injected; use PEFTCallback(method={record.get('method')!r}, ...) or another checkpoint."
        )
    theirs = registry.get(info.method).config_cls.from_dict(record.get("config", {}))
    diff = info.config.diff(theirs)
    if diff:
        details = "; ".join(f"{k}={b!r} in {where}, {k}={a!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was trained with other {info.method} options: {details}.")
    problem = info.fingerprint.mismatch(BaseFingerprint.from_dict(record["base"]))
    if problem:
        raise ValueError(f"{where} does not fit this base model: {problem}.")


def _load_pre_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    info = get_info(module)
    if info is None:
        return
    info.load_prefix = prefix
    record = local_metadata.get(METADATA_KEY)
    if record is None:
        return  # a plain tensor dict: torch's strict checks (with frozen keys allowed to be missing) apply
    check_record(info, record)
    merged = [name for name, m in adapter_modules(module) if m.merged]
    if merged:
        raise ValueError(
            f"cannot load adapter weights into merged layers ({', '.join(merged[:3])}, ...); "
            "call lightning_peft.unmerge(model) first."
        )
    missing = [prefix + name for name, _ in adapter_state(module) if prefix + name not in state_dict]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"the state dict was written by lightning_peft ({info.method}) but lacks adapter weights: {shown}. "
            "The checkpoint is incomplete or was trimmed by another tool."
        )


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    """Frozen base weights may be missing from a state dict: they are not part of the adapter."""
    info = get_info(module)
    if info is None:
        return
    prefix = info.load_prefix
    adapter_keys = {prefix + name for name, _ in adapter_state(module)}
    frozen = {prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
    frozen |= {prefix + n for n, _ in module.named_buffers(remove_duplicate=False)}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not (k in frozen and k not in adapter_keys)]


def _state_dict_post_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any]) -> None:
    info = get_info(module)
    if info is not None:
        local_metadata[METADATA_KEY] = info.metadata()


def attach(model: nn.Module, info: PEFTInfo) -> None:
    """Record the injection on ``model`` and install the state-dict hooks that use the record."""
    model.__dict__[_INFO_ATTR] = info
    handles = [
        model.register_load_state_dict_pre_hook(_load_pre_hook),
        model.register_load_state_dict_post_hook(_load_post_hook),
        model.register_state_dict_post_hook(_state_dict_post_hook),
    ]
    model.__dict__["_lightning_peft_hooks"] = handles


def detach(model: nn.Module) -> None:
    """Remove the record and hooks (after :func:`unload`)."""
    for handle in model.__dict__.pop("_lightning_peft_hooks", []):
        handle.remove()
    model.__dict__.pop(_INFO_ATTR, None)


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(full name, wrapper) for every adapter that wraps a base layer."""
    for name, module in adapter_modules(model):
        if isinstance(module, AdapterLayer):
            yield name, module


def to_cpu_contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies safe to serialize (safetensors wants contiguous CPU tensors that share no storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def assert_no_grad_leak(model: nn.Module) -> None:
    """Raise if any parameter would train without being saved (see :func:`undeclared_trainable`)."""
    leaked = undeclared_trainable(model)
    if leaked:
        raise RuntimeError(
            f"parameters {', '.join(leaked[:5])} require grad but belong to no adapter, so they would train "
            "without being checkpointed. Add their modules to modules_to_save instead of unfreezing them."
        )
