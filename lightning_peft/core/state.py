"""Freezing, the trainable state dict, and loading it back with validation.

An injected model carries a :class:`PEFTInfo` record (method, resolved config, base-model
fingerprint). Its state dicts carry the same record in torch's per-module ``_metadata`` (the
mechanism torch uses for module versions), so a state dict says what wrote it. Load hooks then
check, before any tensor is copied, that the record is well formed (:func:`validate_record`),
that the method, options and base model match, and that every adapter tensor is present, of the
model's shape and finite; keys the model lacks are refused, frozen base weights may be missing:
the checkpoint holds only what was trained. No blanket ``strict=False``, and a failed load copies
nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core import biases
from lightning_peft.core.config import AdapterConfig
from lightning_peft.core.fingerprint import BaseFingerprint, _decode_sample
from lightning_peft.core.fingerprint import fingerprint as fingerprint  # re-exported: state.fingerprint(model)
from lightning_peft.core.layer import AdapterLayer, AdapterModule

#: Key of our record inside ``state_dict._metadata[prefix]``.
METADATA_KEY = "lightning_peft"
#: Key of the records of further adapters a state dict holds, beside the first one's.
MORE_KEY = "lightning_peft_more"
#: The name of an adapter injected without one (peft's too).
DEFAULT_ADAPTER = "default"
#: The record format written: 2 fingerprints the base by sampled values. Format 1 (checksums) is read.
FORMAT_VERSION = 2


@dataclass
class PEFTInfo:
    """What was injected into a model (kept on the model root as ``_lightning_peft``)."""

    method: str
    config: AdapterConfig
    base_path: str
    fingerprint: BaseFingerprint
    modules: list[str] = field(default_factory=list)
    load_prefix: str = ""
    #: The adapter's name (``inject(..., adapter_name=...)``); a model may hold several.
    name: str = DEFAULT_ADAPTER
    #: The config as injected, where a calibration (EVA's ranks) or a record adopted on load has
    #: replaced ``config`` since (``None`` otherwise); not recorded: ``config`` is what the adapter is.
    injected: AdapterConfig | None = None

    def metadata(self) -> dict[str, Any]:
        """The record written into state dicts and adapter files: plain JSON types only.

        ``adapter`` (the name) is written only for a name other than ``"default"``, so a single
        default adapter's record reads the same in lightning_peft versions before named adapters.
        """
        record = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "base_path": self.base_path,
            "base": self.fingerprint.to_dict(),
        }
        if self.name != DEFAULT_ADAPTER:
            record["adapter"] = self.name
        return record


_INFO_ATTR = "_lightning_peft"  # the table of named adapters, on the module inject() was called on
_ACTIVE_ATTR = "_lightning_peft_active"


def adapters(model: nn.Module) -> dict[str, PEFTInfo]:
    """The adapters injected into ``model`` as a root, by name, in the order they were added."""
    table = model.__dict__.get(_INFO_ATTR)
    return dict(table) if isinstance(table, dict) else {}


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that take part in the forward and train (``set_adapter``)."""
    return list(model.__dict__.get(_ACTIVE_ATTR, []))


def get_info(model: nn.Module, name: str | None = None) -> PEFTInfo | None:
    """The record of adapter ``name`` of ``model`` (``None`` if it has none by that name).

    Without a name: the first active adapter's (the one adapter, for a model that holds one);
    ``None`` if nothing was injected into ``model`` as a root.
    """
    table = adapters(model)
    if name is not None:
        return table.get(name)
    for active in active_adapters(model):
        return table[active]
    return next(iter(table.values()), None)


def unknown_adapter(model: nn.Module, name: Any) -> ValueError:
    """The error for an adapter name ``model`` does not hold, listing the ones it does."""
    names = list(adapters(model))
    held = f"it holds {', '.join(map(repr, names))}" if names else "it holds none"
    return ValueError(f"{type(model).__name__} has no adapter named {name!r}; {held}{_closest(str(name), names)}.")


def adapter_of(model: nn.Module, name: str) -> PEFTInfo:
    """The record of adapter ``name``, or :func:`unknown_adapter`'s error."""
    info = adapters(model).get(name) if isinstance(name, str) else None
    if info is None:
        raise unknown_adapter(model, name)
    return info


def require_info(model: nn.Module) -> PEFTInfo:
    info = get_info(model)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has no lightning_peft adapter; call lightning_peft.inject(model, ...) "
            "first (on the same module object you pass here)."
        )
    return info


# --------------------------------------------------------------------------- walking adapters


def adapter_modules(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, AdapterModule]]:
    """(full name, module) for every adapter module in ``model`` (of adapter ``adapter`` only, if given), each once."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule) and (adapter is None or module.adapter_name == adapter):
            yield name, module


def site_name(model: nn.Module, name: str) -> str:
    """Where adapter module ``name`` sits in the base model: its path with the wrappers of other
    adapters that share its base layer taken out (``q_proj.base_layer`` -> ``q_proj``).

    Adapter files key tensors by it, so they do not depend on the order adapters were added in.
    """
    while name.endswith(".base_layer") and isinstance(model.get_submodule(name[: -len(".base_layer")]), AdapterLayer):
        name = name[: -len(".base_layer")]
    return name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _declared(
    model: nn.Module, kind: str, adapter: str | None = None, *, with_biases: bool = True
) -> Iterator[tuple[str, Tensor]]:
    seen: set[int] = set()
    for prefix, module in adapter_modules(model, adapter):
        for local, tensor in getattr(module, kind)():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield _join(prefix, local), tensor
    if kind == "adapter_state" and with_biases:
        for name, bias in trained_biases(model, adapter):
            if id(bias) not in seen:
                seen.add(id(bias))
                yield name, bias


def adapter_state(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, Tensor]]:
    """(full name, tensor) for every declared adapter parameter and buffer (of ``adapter`` only, if given),
    and the base-model biases the adapter trains (:func:`trained_biases`)."""
    return _declared(model, "adapter_state", adapter)


def trained_biases(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, bias) of the base-model biases that adapters (``adapter`` only, if given) train.

    Declared by each adapter's config (``LayerConfig.bias_scope``, LoRA's ``bias``), found by module
    (a module's own ``bias`` parameter, see :mod:`lightning_peft.core.biases`), never by a name.
    """
    for root_name, root in model.named_modules():
        for name, info in adapters(root).items():
            scope = getattr(info.config, "bias_scope", "none")
            if (adapter is not None and name != adapter) or scope == "none":
                continue
            if scope == "all":
                found = biases.base_biases(root)
            else:
                layers = [(p, m) for p, m in adapter_modules(root, name) if isinstance(m, AdapterLayer)]
                found = biases.layer_biases(layers)
            for local, bias in found:
                yield _join(root_name, local), bias


def bias_site(model: nn.Module, full: str, adapter: str) -> str:
    """Where a bias that ``adapter`` trains sits, as files name it (peft's names): ``<site>.base_layer.bias``
    where this adapter wraps the layer, ``<site>.bias`` where it does not, other adapters' wrappers
    taken out (see :func:`site_name`), so the name does not depend on what else the model holds."""
    owner, wrapped = full.removesuffix(".bias"), False
    while owner.endswith(".base_layer"):
        outer = model.get_submodule(owner.removesuffix(".base_layer"))
        if not isinstance(outer, AdapterLayer):
            break
        wrapped = wrapped or outer.adapter_name == adapter
        owner = owner.removesuffix(".base_layer")
    owner = re.sub(r"(\.base_layer)+\.", ".base_layer.", owner)  # a wrapped module's inside, as peft's wrapper has it
    return f"{owner}.base_layer.bias" if wrapped else f"{owner}.bias"


def training_state(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, Tensor]]:
    """(full name, tensor) for every buffer that adapter modules keep only for training."""
    return _declared(model, "training_state", adapter)


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) for every parameter that the adapter (``adapter``, or any) trains."""
    for name, tensor in adapter_state(model, adapter):
        if isinstance(tensor, nn.Parameter):
            yield name, tensor


def freeze(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze exactly the declared parameters of the active adapters.

    A model without a record of named adapters (adapter modules built by hand) trains all of them.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    names = active_adapters(model) if adapters(model) else [None]
    for name in names:
        for _, param in adapter_parameters(model, name):
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


# --------------------------------------------------------------------------- state dicts


def trainable_state_dict(
    model: nn.Module, *, training_state: bool = True, adapter_name: str | None = None
) -> OrderedDict[str, Tensor]:
    """The adapters' state only (tensors detached, not copied), keyed like ``model.state_dict()``.

    The returned dict carries the injection records in ``_metadata`` like any torch state dict, so
    ``model.load_state_dict(sd)`` on an injected model validates method, options and base model.

    Args:
        model: a model with an injected adapter.
        training_state: include the buffers adapter modules keep only for training (see
            ``AdapterModule.training_state_names``), as a checkpoint to resume from needs;
            ``save_adapter`` leaves them out.
        adapter_name: only this adapter's state (default: every adapter the model holds).
    """
    require_info(model)
    names = [adapter_of(model, adapter_name).name] if adapter_name is not None else list(adapters(model))
    tensors = [
        item
        for name in names
        for item in [*adapter_state(model, name), *(_declared(model, "training_state", name) if training_state else ())]
    ]
    state: OrderedDict[str, Tensor] = OrderedDict((n, t.detach()) for n, t in tensors)
    records = [adapter_of(model, name).metadata() for name in names]
    root: dict[str, Any] = {"version": model._version, METADATA_KEY: records[0]}
    if len(records) > 1:
        root[MORE_KEY] = records[1:]
    metadata: dict[str, dict[str, Any]] = {"": root}
    for prefix, module in adapter_modules(model):
        metadata.setdefault(prefix, {"version": module._version})
        for sub, child in module.named_modules(prefix=prefix):
            metadata.setdefault(sub, {"version": child._version})
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def read_metadata(state_dict: dict[str, Any], prefix: str = "") -> Any:
    """Our record in a state dict's torch metadata at module path ``prefix`` ('' for the root), as
    stored (:func:`validate_record` checks it), or ``None`` when there is none."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    entry = metadata.get(prefix, {})
    return entry.get(METADATA_KEY) if isinstance(entry, dict) else None


# --------------------------------------------------------------------------- validation

#: The keys of a record and their types; any other key is refused.
RECORD_FIELDS: dict[str, type] = {"format": int, "method": str, "config": dict, "base_path": str, "base": dict}
#: Keys a record may hold, and their types: the adapter's name, where it is not ``"default"``.
OPTIONAL_FIELDS: dict[str, type] = {"adapter": str}
#: The keys of the record's base fingerprint, per format.
FINGERPRINT_FIELDS: dict[int, frozenset[str]] = {
    1: frozenset({"model_type", "structure", "checksums"}),
    2: frozenset({"model_type", "structure", "samples"}),
}


def _closest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _shown(names: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
    return sep.join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a well-formed record of a format this version reads.

    Raises:
        ValueError: naming the unknown, missing or mistyped key, or the format when it is newer
            than :data:`FORMAT_VERSION` (a newer lightning_peft wrote it).
    """
    from lightning_peft import __version__

    def malformed(problem: str) -> ValueError:
        return ValueError(
            f"{where} carries a malformed lightning_peft record: {problem}. It was damaged or written by another "
            "tool; use another checkpoint, or save the adapter again."
        )

    if not isinstance(record, dict):
        raise malformed(f"expected a mapping, got {type(record).__name__}")
    known_keys = [*RECORD_FIELDS, *OPTIONAL_FIELDS]
    unknown = sorted(set(record) - set(known_keys))
    if unknown:
        key = unknown[0]
        raise malformed(f"unknown key {key!r}{_closest(key, known_keys)}; known: {', '.join(known_keys)}")
    for key, kind in OPTIONAL_FIELDS.items():
        if key in record and (not isinstance(record[key], kind) or not record[key]):
            raise malformed(f"{key} must be a non-empty {kind.__name__}; got {str(record[key])[:60]!r}")
    missing = [key for key in RECORD_FIELDS if key not in record]
    if missing:
        raise malformed(f"it lacks {missing[0]!r}; a record holds {', '.join(RECORD_FIELDS)}")
    version = record["format"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise malformed(f"format must be a positive integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} was written in record format {version} by a newer lightning_peft; this version ({__version__}) "
            f"reads formats 1 to {FORMAT_VERSION}. Upgrade lightning_peft to load it."
        )
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(record[key], kind):
            raise malformed(f"{key} must be a {kind.__name__}; got {str(record[key])[:60]!r}")
    base, known = record["base"], FINGERPRINT_FIELDS[version]
    unknown = sorted(set(base) - known)
    if unknown:
        key = unknown[0]
        raise malformed(f"unknown key base.{key}{_closest(key, sorted(known))}; format {version} has {sorted(known)}")
    missing = [key for key in sorted(known) if key not in base]
    if missing:
        raise malformed(f"it lacks base.{missing[0]}")
    model_type = base["model_type"]
    if not isinstance(base["structure"], str) or not (model_type is None or isinstance(model_type, str)):
        raise malformed("base.structure must be a string and base.model_type a string or null")
    values = base["checksums" if version == 1 else "samples"]
    if not isinstance(values, list):
        raise malformed(f"base.{'checksums' if version == 1 else 'samples'} must be a list")
    for index, value in enumerate(values):
        if version == 1 and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise malformed(f"base.checksums[{index}] must be a number; got {value!r}")
        if version == 2 and value is not None:
            if not isinstance(value, str):
                raise malformed(f"base.samples[{index}] must be a string or null; got {value!r}")
            try:
                _decode_sample(value)
            except ValueError as error:
                raise malformed(f"base.samples[{index}] is not a sample ({error})") from None
    return record


_LOADING_FROM: ContextVar[str] = ContextVar("lightning_peft_loading_from", default="the state dict")

#: How a record may reshape an injected adapter before its tensors load: for a method whose shapes
#: come from a calibration that has not run yet (LoRA's EVA, whose record holds the ranks its
#: calibration gave), ``adopt(model, info, recorded config)`` reshapes the adapter to the record
#: (``info.config`` included) and returns the undo, or returns ``None`` and changes nothing.
#: Methods add theirs (``lightning_peft.methods.lora_eva_ranks``); core imports none.
ADOPTERS: list[Callable[[nn.Module, PEFTInfo, AdapterConfig], Callable[[], None] | None]] = []
#: Inside :func:`all_or_nothing`: the undos of what :data:`ADOPTERS` did, run if the load fails.
_ADOPTED: ContextVar[list[Callable[[], None]] | None] = ContextVar("lightning_peft_adopted", default=None)


@contextlib.contextmanager
def loading_from(where: str) -> Iterator[None]:
    """Name what a ``load_state_dict`` inside reads (a file), for the load hooks' errors."""
    token = _LOADING_FROM.set(where)
    try:
        yield
    finally:
        _LOADING_FROM.reset(token)


def check_record(info: PEFTInfo, record: Any, where: str = "the state dict") -> None:
    """Raise a clear error when ``record`` (what wrote a state dict) is malformed or does not fit ``info``.

    A format-1 record is still read; its base fingerprint (checksums within 5 %) cannot tell a
    fine-tuned derivative from its base, which a warning says.
    """
    record = validate_record(record, where)
    if record["method"] != info.method:
        raise ValueError(
            f"{where} holds a {record['method']!r} adapter, but this model has method={info.method!r} "
            f"injected; use PEFTCallback(method={record['method']!r}, ...) or another checkpoint."
        )
    try:
        theirs = type(info.config).from_dict(record["config"])  # the method is the same: its config class
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} records {info.method} options this lightning_peft cannot use: {error}") from error
    diff = info.config.diff(theirs)
    if diff:
        details = "; ".join(f"{k}={b!r} in {where}, {k}={a!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was trained with other {info.method} options: {details}.")
    if record["format"] == 1:
        warnings.warn(
            f"{where} carries a format-1 lightning_peft record, whose base fingerprint cannot tell a fine-tuned "
            "derivative from its base; it loads with that weaker check. Save the adapter again to upgrade it.",
            UserWarning,
            stacklevel=2,
        )
        problem = info.fingerprint.mismatch_legacy(record["base"])
    else:
        problem = info.fingerprint.mismatch(BaseFingerprint.from_dict(record["base"]))
    if problem:
        raise ValueError(f"{where} does not fit this base model: {problem}.")


def non_finite_error(found: Sequence[str], where: str) -> ValueError:
    """The error for adapter tensors holding NaN or infinities (``found``: their names, with counts)."""
    return ValueError(
        f"{where} holds non-finite values (NaN or infinity) in adapter tensor(s) {_shown(found, 3)}: the training "
        "that wrote it diverged. Load an earlier checkpoint, or lower the learning rate and train again."
    )


def check_finite(tensors: Mapping[str, Tensor], where: str) -> None:
    """Refuse adapter tensors holding NaN or infinities, naming them."""
    bad = []
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and (tensor.is_floating_point() or tensor.is_complex()) and not tensor.is_meta:
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise non_finite_error(bad, where)


def check_tensors(shapes: Mapping[str, Sequence[int]], tensors: Mapping[str, Any], where: str) -> None:
    """Refuse, before anything is copied, adapter tensors that are missing from ``tensors``, not of
    the shape ``shapes`` gives, or not finite; each is named."""
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(
            f"{where} lacks adapter weights: {_shown(missing)}. It is incomplete or was trimmed by another tool."
        )
    wrong = [
        f"{name} is {tuple(tensors[name].shape) if isinstance(tensors[name], Tensor) else type(tensors[name]).__name__}"
        f" there, {tuple(shape)} here"
        for name, shape in shapes.items()
        if not isinstance(tensors[name], Tensor) or tuple(tensors[name].shape) != tuple(shape)
    ]
    if wrong:
        raise ValueError(
            f"{where} does not fit this model's adapter: {_shown(wrong, 3, '; ')}. It was trained with other "
            "options or on a model of another size."
        )
    check_finite({name: tensors[name] for name in shapes}, where)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, remove: Callable[[nn.Module, list[str], list[str]], None]) -> Iterator[None]:
    """Undo what a load did to ``model`` when it raises inside: adapters it injected (taken out
    with ``remove``, every ``requires_grad`` flag and the active adapters restored), or the
    adapter tensors it overwrote (copied back).

    Args:
        model: the model being loaded into.
        remove: ``remove(model, added, active)`` takes the adapters named ``added`` out again and
            makes ``active`` the active adapters again (``lightning_peft.api.inject.remove_added``).
    """
    held = set(adapters(model))
    active = active_adapters(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    tensors = [*adapter_state(model), *training_state(model)] if held else []
    saved = {name: t.detach().clone() for name, t in tensors}
    adopted: list[Callable[[], None]] = []
    token = _ADOPTED.set(adopted)
    try:
        yield
    except BaseException:
        for undo in reversed(adopted):  # the adapter's old shapes back first: the saved tensors fit those
            undo()
        added = [name for name in adapters(model) if name not in held]
        if added:
            remove(model, added, active)
            for param in model.parameters():
                param.requires_grad_(flags.get(id(param), param.requires_grad))
        with torch.no_grad():
            for name, tensor in tensors:
                tensor.copy_(saved[name])
        raise
    finally:
        _ADOPTED.reset(token)


def _records(local_metadata: Mapping[str, Any], where: str) -> list[Any]:
    """The records a state dict carries at the root: its first adapter's, then any further ones'."""
    record = local_metadata.get(METADATA_KEY)
    if record is None:
        return []
    more = local_metadata.get(MORE_KEY, [])
    if not isinstance(more, list):
        raise ValueError(f"{where} carries a malformed lightning_peft record: {MORE_KEY} must be a list of records.")
    return [record, *more]


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
    """Everything checked before torch copies a tensor, so that a refused load changes nothing.

    The records name the adapters the state dict holds (all of them are required in full); a
    plain state dict without records is held to torch's strict check over every adapter.
    """
    info = get_info(module)
    if info is None:
        return
    info.load_prefix = prefix
    where = _LOADING_FROM.get()
    records = _records(local_metadata, where)
    undos: list[Callable[[], None]] = []
    try:
        _check_records(module, prefix, state_dict, records, strict, where, undos)
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    adopted = _ADOPTED.get()
    if adopted is not None:
        adopted.extend(undos)


def _adopt(module: nn.Module, info: PEFTInfo, record: dict[str, Any]) -> Callable[[], None] | None:
    """Let the :data:`ADOPTERS` reshape adapter ``info`` to ``record``'s config; the undo, if one did."""
    if not ADOPTERS or record["method"] != info.method:
        return None
    try:
        recorded = type(info.config).from_dict(record["config"])
    except (TypeError, ValueError):
        return None  # check_record says what is wrong with it
    return _adopted(module, info, recorded)


def _adopted(module: nn.Module, info: PEFTInfo, config: AdapterConfig) -> Callable[[], None] | None:
    for adopt in ADOPTERS:
        undo = adopt(module, info, config)
        if undo is not None:
            return undo
    return None


def adopt(model: nn.Module, info: PEFTInfo, config: AdapterConfig) -> bool:
    """Reshape adapter ``info`` to ``config`` where an :data:`ADOPTERS` entry can (a file's record of the
    adapter calibrated); whether one did. Inside :func:`all_or_nothing`, a failed load then undoes it.

    Raises:
        RuntimeError: outside :func:`all_or_nothing` (nothing would undo it).
    """
    adopted = _ADOPTED.get()
    if adopted is None:
        raise RuntimeError("lightning_peft.core.state.adopt runs inside state.all_or_nothing only")
    undo = _adopted(model, info, config)
    if undo is not None:
        adopted.append(undo)
    return undo is not None


def _check_records(
    module: nn.Module,
    prefix: str,
    state_dict: dict[str, Any],
    records: list[Any],
    strict: bool,
    where: str,
    undos: list[Callable[[], None]],
) -> None:
    """:func:`_load_pre_hook`'s checks, after any reshaping to the records (whose undos go to ``undos``)."""
    info = require_info(module)
    names: list[str] = []
    for record in records:
        validate_record(record, where)
        name = record.get("adapter", DEFAULT_ADAPTER)
        if name not in adapters(module):
            raise ValueError(
                f"{where} holds adapter {name!r}, which this model does not have "
                f"({', '.join(map(repr, adapters(module)))}); inject it first, or load it with "
                f"lightning_peft.load_adapter(model, path, adapter_name=...)."
            )
        undo = _adopt(module, adapter_of(module, name), record)
        if undo is not None:
            undos.append(undo)
        check_record(adapter_of(module, name), record, where)
        names.append(name)
    module.__dict__["_lightning_peft_loading"] = names if records else list(adapters(module))
    merged = [name for name, m in adapter_modules(module) if m.merged and (not records or m.adapter_name in names)]
    if merged:
        raise ValueError(
            f"cannot load adapter weights into merged layers ({', '.join(merged[:3])}, ...); "
            "call lightning_peft.unmerge(model) first."
        )
    own = {prefix + name: t for name, t in module.state_dict(keep_vars=True).items()}  # extra state too
    if strict:
        unexpected = [key for key in state_dict if key.startswith(prefix) and key not in own]
        if unexpected:
            raise ValueError(
                f"{where} holds tensors this model does not have: {_shown(unexpected)}. Was it trained on another "
                f"architecture, or with another {info.method} configuration?"
            )
    loading = names if records else [None]
    required = {prefix + n: t.shape for a in loading for n, t in adapter_state(module, a)}
    optional = {prefix + n: t.shape for a in loading for n, t in training_state(module, a)}
    if records:  # a lightning_peft state dict holds the whole adapter; a plain one: torch's strict check
        check_tensors(required, state_dict, where)
    present = {key: shape for key, shape in {**required, **optional}.items() if key in state_dict}
    check_tensors(present, state_dict, where)
    frozen = [
        f"{key} is {tuple(state_dict[key].shape)} there, {tuple(own[key].shape)} here"
        for key in state_dict
        if key not in present
        and isinstance(own.get(key), Tensor)
        and isinstance(state_dict[key], Tensor)
        and state_dict[key].shape != own[key].shape
    ]
    if frozen:
        raise ValueError(f"{where} does not fit this model: {_shown(frozen, 3, '; ')}.")


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    """Frozen base weights may be missing from a state dict, and so may the adapters it does not hold."""
    info = get_info(module)
    if info is None:
        return
    prefix = info.load_prefix
    loaded = module.__dict__.pop("_lightning_peft_loading", list(adapters(module)))
    required = {prefix + name for a in loaded for name, _ in adapter_state(module, a)}
    frozen = {prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
    frozen |= {prefix + n for n, _ in module.named_buffers(remove_duplicate=False)}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not (k in frozen and k not in required)]


def _state_dict_post_hook(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any]) -> None:
    records = [info.metadata() for info in adapters(module).values()]
    if records:
        local_metadata[METADATA_KEY] = records[0]
        if len(records) > 1:
            local_metadata[MORE_KEY] = records[1:]


def attach(model: nn.Module, info: PEFTInfo) -> None:
    """Record adapter ``info`` on ``model`` (making it the active one) and, for the first adapter,
    install the state-dict hooks that use the records."""
    table = model.__dict__.setdefault(_INFO_ATTR, {})
    if not table:
        handles = [
            model.register_load_state_dict_pre_hook(_load_pre_hook),
            model.register_load_state_dict_post_hook(_load_post_hook),
            model.register_state_dict_post_hook(_state_dict_post_hook),
        ]
        model.__dict__["_lightning_peft_hooks"] = handles
    table[info.name] = info
    model.__dict__[_ACTIVE_ATTR] = [info.name]


def set_active(model: nn.Module, names: Sequence[str]) -> None:
    """Record which adapters are active (``lightning_peft.set_adapter`` also switches their modules)."""
    model.__dict__[_ACTIVE_ATTR] = list(names)


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name``'s record (every record if ``None``), and the hooks with the last one."""
    table: dict[str, PEFTInfo] = model.__dict__.get(_INFO_ATTR, {})
    for removed in list(table) if name is None else [name]:
        table.pop(removed, None)
    model.__dict__[_ACTIVE_ATTR] = [n for n in active_adapters(model) if n in table]
    if not table:
        for handle in model.__dict__.pop("_lightning_peft_hooks", []):
            handle.remove()
        model.__dict__.pop(_INFO_ATTR, None)
        model.__dict__.pop(_ACTIVE_ATTR, None)


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
