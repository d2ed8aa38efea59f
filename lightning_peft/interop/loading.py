"""``lightning_peft.load_adapter``: one call for every adapter a user has on disk.

A lightning_peft adapter folder or Lightning checkpoint goes to :func:`lightning_peft.api.io.load_adapter`;
a Hugging Face peft folder (``adapter_config.json`` with a ``peft_type`` and no lightning_peft record,
as peft's ``save_pretrained`` and ``PEFTCallback(peft_dir=True)`` write it) goes to
:func:`~lightning_peft.interop.peft_format.load_peft_adapter`. It sits here, above both, so that the
core loader does not depend on peft's format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from torch import nn

from lightning_peft.api import io
from lightning_peft.core import files, state
from lightning_peft.interop.peft_format import load_peft_adapter

M = TypeVar("M", bound=nn.Module)


def is_peft_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a peft ``adapter_config.json`` (not a lightning_peft one)."""
    config = Path(path) / io.CONFIG_NAME
    if not config.is_file():
        return False
    content = files.read_json(config)
    return isinstance(content, dict) and "peft_type" in content and state.METADATA_KEY not in content


def load_adapter(model: M, path: str | os.PathLike[str], adapter_name: str | None = None) -> M:
    """Load an adapter into ``model``, injecting its method first where needed; returns ``model``.

    Args:
        model: the model to load into.
        path: a lightning_peft adapter folder (``save_adapter``), a Lightning checkpoint of
            PEFTCallback (a file, or a DeepSpeed checkpoint folder), or a Hugging Face peft adapter
            folder (``save_pretrained``, or the ``<checkpoint>.peft`` folder PEFTCallback writes).
        adapter_name: as in :func:`lightning_peft.api.io.load_adapter`.

    All or nothing: when it raises, ``model`` is as it was. Errors are those of the loader the
    file's kind picks.
    """
    if is_peft_folder(path):
        return load_peft_adapter(model, path, adapter_name=adapter_name)
    return io.load_adapter(model, path, adapter_name=adapter_name)
