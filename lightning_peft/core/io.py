"""Adapter files: a few MB that turn a shared base model into a task model.

``save_adapter`` writes ``adapter_config.json`` (method, options, base-model fingerprint) and
``adapter_model.safetensors`` (the trainable tensors). ``load_adapter`` reads that folder, or a
Lightning checkpoint written with :class:`~lightning_peft.PEFTCallback`, injects the method if the
model has none yet, and loads the weights through the validating state-dict hooks.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_peft import registry
from lightning_peft.core import state
from lightning_peft.core.inject import inject
from lightning_peft.core.targeting import find_base_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
M = TypeVar("M", bound=nn.Module)


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed) and return the folder."""
    # Training-only statistics (see AdapterModule.training_state_names) stay in checkpoints.
    tensors = state.trainable_state_dict(model, training_state=False)
    return write_adapter(state.require_info(model), tensors, directory)


def write_adapter(info: state.PEFTInfo, tensors: dict[str, Tensor], directory: str | os.PathLike[str]) -> Path:
    """Write already collected adapter ``tensors`` (e.g. gathered from a sharded model) with ``info``'s record."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        state.to_cpu_contiguous(tensors), str(out / WEIGHTS_NAME), metadata={"format": "pt", "method": info.method}
    )
    (out / CONFIG_NAME).write_text(json.dumps({state.METADATA_KEY: info.metadata()}, indent=2, sort_keys=True))
    return out


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(record, tensors) from an adapter folder or a Lightning checkpoint file.

    Raises:
        FileNotFoundError: when the path or its files are missing.
        ValueError: when the file holds no lightning_peft adapter.
    """
    path = Path(path)
    if path.is_dir():
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for required in (config_file, weights_file):
            if not required.is_file():
                raise FileNotFoundError(f"adapter folder {path} lacks {required.name}")
        from safetensors.torch import load_file

        record = json.loads(config_file.read_text()).get(state.METADATA_KEY)
        if not isinstance(record, dict):
            raise ValueError(f"{config_file} is not a lightning_peft adapter config (no {state.METADATA_KEY!r} key)")
        return record, load_file(str(weights_file))
    if not path.is_file():
        raise FileNotFoundError(f"no adapter folder or checkpoint file at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    record = state.read_metadata(state_dict) if isinstance(state_dict, dict) else None
    if record is None:
        raise ValueError(
            f"{path} holds no lightning_peft adapter (its state dict carries no {state.METADATA_KEY!r} record); "
            "expected a checkpoint written with PEFTCallback or a folder from save_adapter()."
        )
    return record, dict(state_dict)


def _rebase(tensors: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
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


def load_adapter(model: M, path: str | os.PathLike[str]) -> M:
    """Load an adapter into ``model`` (injecting its method first if needed); returns ``model``.

    Raises:
        ValueError: when the adapter was trained with another method or options, or on another
            base model, or its tensors do not cover every adapter weight.
    """
    record, tensors = read_adapter(path)
    method = registry.get(record.get("method", ""))
    if state.get_info(model) is None:
        inject(model, method.config_cls.from_dict(record["config"]))
    base_path, _ = find_base_model(model)
    ordered: OrderedDict[str, Tensor] = OrderedDict(_rebase(tensors, record.get("base_path", ""), base_path))
    ordered._metadata = {"": {state.METADATA_KEY: record}}  # type: ignore[attr-defined]
    model.load_state_dict(ordered, strict=True)
    return model
