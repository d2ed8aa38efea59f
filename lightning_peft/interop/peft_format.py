"""Hugging Face peft's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter trained with lightning_peft can be served by anything that reads peft adapters
(``PeftModel.from_pretrained``, vLLM, TGI), and a peft adapter can be loaded here, for every
method whose registry entry declares a :class:`~lightning_peft.registry.PeftFormat`. Tensor names
come from the adapter layers (``AdapterModule.peft_key``); options from the method's mapping,
which refuses peft options lightning_peft does not implement instead of dropping them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_peft import registry
from lightning_peft.core import state
from lightning_peft.core.inject import inject, resolve
from lightning_peft.core.targeting import find_base_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: peft keys every tensor by its path under ``PeftModel.base_model.model``.
PREFIX = "base_model.model."
M = TypeVar("M", bound=nn.Module)


def check_peft_defaults(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse peft options that lightning_peft's ``method`` does not implement (non-default values).

    Raises:
        ValueError: naming the field, the value in the peft config, and the value supported.
    """
    for field, default in defaults.items():
        value = options.get(field)
        if value in (None, {}, []) or value == default:
            continue
        raise ValueError(
            f"peft {options.get('peft_type', '')} adapter_config.json has {field}={value!r}, which lightning_peft's "
            f"{method} does not implement (supported: {field}={default!r})."
        )


def _format(method: str) -> registry.PeftFormat:
    entry = registry.get(method)
    if entry.peft is None:
        with_peft = [m.name for m in registry.all_methods() if m.peft is not None]
        if entry.peft_type is None:
            what = f"method {method!r} has no Hugging Face peft equivalent"
        else:
            what = (
                f"lightning_peft does not write method {method!r} in Hugging Face peft's format yet "
                f"(peft has it as peft_type={entry.peft_type!r})"
            )
        raise ValueError(
            f"{what}; save it with lightning_peft.save_adapter instead. Methods with a peft format: "
            f"{', '.join(with_peft)}."
        )
    return entry.peft


def _peft_names(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """Our full tensor name -> (peft key, the tensor as peft lays it out), for every adapter tensor."""
    info = state.require_info(model)
    base = f"{info.base_path}." if info.base_path else ""
    names: dict[str, tuple[str, Tensor]] = {}
    for prefix, module in state.adapter_modules(model):
        for local, tensor in module.adapter_state():
            full = f"{prefix}.{local}" if prefix else local
            if not full.startswith(base):
                raise ValueError(
                    f"adapter tensor {full!r} lies outside the transformers model ({info.base_path!r}); peft's "
                    "format only holds tensors of the base model."
                )
            inner = prefix[len(base) :] if prefix.startswith(base) else prefix
            key = module.peft_key(local)
            names[full] = (PREFIX + (f"{inner}.{key}" if inner else key), module.to_peft_tensor(local, tensor))
    return names


def save_peft_adapter(
    model: nn.Module, directory: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapter of ``model`` in Hugging Face peft's format; returns the folder.

    Args:
        model: a model with a lightning_peft adapter (also a LightningModule holding one).
        directory: the folder to write (created if needed).
        base_model_name_or_path: recorded for peft's ``PeftModel.from_pretrained``; defaults to
            the transformers model's ``config._name_or_path``.
    """
    from safetensors.torch import save_file

    info = state.require_info(model)
    fmt = _format(info.method)
    tensors = dict(_peft_names(model).values())
    if base_model_name_or_path is None:
        _, base = find_base_model(model)
        base_model_name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        **fmt.to_peft(info.config),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state.to_cpu_contiguous(tensors), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def _same_base_weights(model: nn.Module, stored: dict[str, Tensor]) -> set[str]:
    """Frozen base weights peft saved beside the adapter (it does for targeted embeddings) that equal ours.

    Any that differ (a resized vocabulary, another base) stay unexpected, so loading fails loudly.
    """
    info = state.require_info(model)
    base = f"{info.base_path}." if info.base_path else ""
    same = set()
    for name, tensor in model.state_dict().items():
        if name.startswith(base) and ".base_layer." in name:
            key = PREFIX + name[len(base) :]
            if key in stored and stored[key].shape == tensor.shape and torch.equal(stored[key].to(tensor), tensor):
                same.add(key)
    return same


def load_peft_adapter(model: M, directory: str | os.PathLike[str]) -> M:
    """Load a Hugging Face peft adapter folder into ``model`` (injecting the method first); returns ``model``.

    Raises:
        FileNotFoundError: when the folder or its files are missing.
        ValueError: for a peft method or option lightning_peft does not implement, a model that
            already has another adapter, or tensors that do not match the model's adapter.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"peft adapter folder {folder} lacks {name}")
    options = json.loads((folder / CONFIG_NAME).read_text())
    peft_type = options.get("peft_type")
    matches = [m for m in registry.all_methods() if m.peft is not None and m.peft.peft_type == peft_type]
    if not matches:
        known = sorted({m.peft.peft_type for m in registry.all_methods() if m.peft is not None})
        raise ValueError(f"peft_type={peft_type!r} has no lightning_peft equivalent; supported: {', '.join(known)}.")
    method = matches[0]
    config = method.peft.from_peft(options)  # type: ignore[union-attr]
    info = state.get_info(model)
    if info is None:
        inject(model, config)
    elif info.method != method.name or info.config.diff(resolve(model, config)):
        raise ValueError(
            f"{type(model).__name__} already has a {info.method} adapter ({info.config}) that differs from the peft "
            f"adapter in {folder} ({config}); load it into a fresh base model."
        )
    stored = load_file(str(folder / WEIGHTS_NAME))
    names = _peft_names(model)
    missing = [key for key, _ in names.values() if key not in stored]
    extra = sorted(set(stored) - {key for key, _ in names.values()} - _same_base_weights(model, stored))
    if missing or extra:
        raise ValueError(
            f"the peft adapter in {folder} does not match this model's {method.name} adapter: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''}. Was it trained on another architecture?"
        )
    shapes = dict(state.adapter_state(model))
    weights = {full: stored[key].reshape(shapes[full].shape) for full, (key, _) in names.items()}
    model.load_state_dict(weights, strict=True)
    return model
