"""Adapter files: a few MB that turn a shared base model into a task model.

``save_adapter`` writes ``adapter_config.json`` (method, options, base-model fingerprint) and
``adapter_model.safetensors`` (the trainable tensors). ``load_adapter`` reads that folder, or a
Lightning checkpoint written with :class:`~lightning_peft.PEFTCallback`, injects the method if the
model has none yet, and loads the weights through the validating state-dict hooks; if anything
fails it removes what it injected, so the model is left as it was. Files are read and written
through :mod:`lightning_peft.core.files` (plain-tensor loading, atomic writes).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from lightning_peft import registry
from lightning_peft.api.inject import inject, remove_added
from lightning_peft.core import files, state
from lightning_peft.core.targeting import find_base_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
M = TypeVar("M", bound=nn.Module)
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- adapter files


def site_keys(model: nn.Module, adapter_name: str, *, training_state: bool) -> dict[str, tuple[str, Tensor]]:
    """``{key in an adapter file: (key in model.state_dict(), tensor)}`` for adapter ``adapter_name``.

    A file names each tensor by where its module sits in the base model (``state.site_name``), so
    an adapter saved from a model that holds others loads into one that holds none, and back.
    """
    keys: dict[str, tuple[str, Tensor]] = {}
    for path, module in state.adapter_modules(model, adapter_name):
        site = state.site_name(model, path)
        declared = [*module.adapter_state(), *(module.training_state() if training_state else ())]
        for local, tensor in declared:
            keys[f"{site}.{local}" if site else local] = (f"{path}.{local}" if path else local, tensor)
    declared_ids = {id(t) for _, t in keys.values()}
    for full, bias in state.trained_biases(model, adapter_name):  # base biases the adapter trains (LoRA's bias)
        if id(bias) not in declared_ids:
            declared_ids.add(id(bias))
            keys[state.bias_site(model, full, adapter_name)] = (full, bias)
    return keys


def save_adapter(model: nn.Module, directory: PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` (created if needed); return the folder.

    Without a name, every adapter: ``"default"`` in ``directory`` itself and each other one in
    ``directory/<name>`` (peft's layout); a model with one adapter writes it in ``directory``.
    """
    state.require_info(model)
    out = Path(directory)
    if adapter_name is not None:
        info = state.adapter_of(model, adapter_name)
        # Training-only statistics (see AdapterModule.training_state_names) stay in checkpoints.
        tensors = {key: t.detach() for key, (_, t) in site_keys(model, info.name, training_state=False).items()}
        return write_adapter(info, tensors, out)
    names = list(state.adapters(model))
    for name in names:
        save_adapter(model, out if name == state.DEFAULT_ADAPTER or len(names) == 1 else out / name, name)
    return out


def write_adapter(info: state.PEFTInfo, tensors: Mapping[str, Tensor], directory: PathLike) -> Path:
    """Write already collected adapter ``tensors`` (e.g. gathered from a sharded model) with ``info``'s record.

    Each file is replaced atomically; the config is written last (the record checks its tensors'
    shapes when they load, so a weights file newer than its config is refused, not misread).
    """
    out = Path(directory)
    config = files.json_bytes({state.METADATA_KEY: info.metadata()}, out / CONFIG_NAME)  # refused before any write
    files.save_tensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "method": info.method})
    files.atomic_write(out / CONFIG_NAME, config)
    return out


def read_adapter(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(validated record, tensors) from an adapter folder or a Lightning checkpoint file.

    Raises:
        FileNotFoundError: when the path or its files are missing.
        files.FileContentError: when a file is truncated, corrupt, or holds a pickled object.
        ValueError: when the file holds no lightning_peft adapter, or its record is malformed.
    """
    path = Path(path)
    if path.is_dir():
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for required in (config_file, weights_file):
            if not required.is_file():
                raise FileNotFoundError(f"adapter folder {path} lacks {required.name}")
        content = files.read_json(config_file)
        record = content.get(state.METADATA_KEY) if isinstance(content, dict) else None
        if not isinstance(record, dict):
            raise ValueError(f"{config_file} is not a lightning_peft adapter config (no {state.METADATA_KEY!r} key)")
        if set(content) != {state.METADATA_KEY}:
            extra = sorted(set(content) - {state.METADATA_KEY})
            raise ValueError(
                f"{config_file} has unknown top-level key(s) {', '.join(map(repr, extra))}; a lightning_peft adapter "
                f"config holds only {state.METADATA_KEY!r}. Was it written by another tool?"
            )
        return state.validate_record(record, str(config_file)), files.load_tensors(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter folder or checkpoint file at {path}")
    checkpoint = files.load_torch(path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    record = state.read_metadata(state_dict) if isinstance(state_dict, dict) else None
    if record is None:
        raise ValueError(
            f"{path} holds no lightning_peft adapter (its state dict carries no {state.METADATA_KEY!r} record); "
            "expected a checkpoint written with PEFTCallback or a folder from save_adapter()."
        )
    assert isinstance(state_dict, dict)
    return state.validate_record(record, str(path)), dict(state_dict)


def rebase(tensors: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    """Move keys from one base-model path to another (a Lightning checkpoint into a bare model)."""
    if old == new:
        return tensors
    old_prefix, new_prefix = (f"{old}." if old else ""), (f"{new}." if new else "")
    moved = {}
    for key, value in tensors.items():
        if not key.startswith(old_prefix):
            raise ValueError(
                f"adapter tensor {key!r} lies outside the base model ({old!r}) it was saved with, so it cannot "
                "be placed into this model; load it into the same LightningModule class instead."
            )
        moved[new_prefix + key[len(old_prefix) :]] = value
    return moved


def load_adapter(model: M, path: PathLike, adapter_name: str | None = None) -> M:
    """Load an adapter into ``model``, injecting its method first where needed; returns ``model``.

    Args:
        model: the model to load into.
        path: an adapter folder (``save_adapter``) or a Lightning checkpoint of PEFTCallback.
        adapter_name: the adapter to load into: one the model holds is overwritten; another name is
            added beside the adapters it has (and becomes the active one). Without a name: into the
            active adapter, or, for a model without adapters, as the name the file records.

    All or nothing: when it raises, ``model`` is as it was (an adapter it injected is removed).

    Raises:
        FileNotFoundError: when the folder, checkpoint or one of their files is missing.
        files.FileContentError: when a file is truncated, corrupt, or holds a pickled object.
        ValueError: when the record is malformed or from a newer lightning_peft, the adapter was
            trained with another method or options or on another base model, or a tensor is
            missing, of another shape, or not finite.
    """
    record, tensors = read_adapter(path)
    try:
        method = registry.get(record["method"])
    except ValueError as error:
        raise ValueError(f"{path} holds an adapter of a method this lightning_peft does not have: {error}") from error
    current = state.get_info(model)
    target = adapter_name or (current.name if current else record.get("adapter", state.DEFAULT_ADAPTER))
    with state.all_or_nothing(model, remove=remove_added):
        if state.get_info(model, target) is None:
            try:
                config = method.config_cls.from_dict(record["config"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path} records options this lightning_peft cannot use: {error}") from error
            inject(model, config, adapter_name=target)
        base_path, _ = find_base_model(model)
        keys = site_keys(model, target, training_state=True)
        stored = rebase(tensors, record["base_path"], base_path)
        # A checkpoint keys tensors as the model it was written from held them: an adapter that
        # sat inside other adapters' wrappers there (``q_proj.base_layer.lora_A``) is at its site here.
        ordered: OrderedDict[str, Tensor] = OrderedDict(
            (keys[_chain_free(key)][0] if _chain_free(key) in keys else key, value) for key, value in stored.items()
        )
        record = {**record, "adapter": target} if target != state.DEFAULT_ADAPTER else _without_name(record)
        ordered._metadata = {"": {state.METADATA_KEY: record}}  # type: ignore[attr-defined]
        with state.loading_from(str(path)):
            model.load_state_dict(ordered, strict=True)
    return model


def _chain_free(key: str) -> str:
    """``key`` without the ``.base_layer`` steps of a wrapper chain (adapter tensors never lie inside a base layer)."""
    return re.sub(r"(\.base_layer)+\.", ".", key)


def _without_name(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "adapter"}
