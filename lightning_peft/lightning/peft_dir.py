"""A Hugging Face peft adapter folder beside every checkpoint a Trainer writes (``PEFTCallback(peft_dir=True)``).

For a checkpoint ``<dir>/<stem>.ckpt`` (a file, or the folder DeepSpeed writes) the folder is
``<dir>/<stem>.peft/`` (``adapter_config.json`` + ``adapter_model.safetensors``), which
``PeftModel.from_pretrained(base, folder)``, transformers' ``model.load_adapter(folder)`` and
``lightning_peft.load_peft_adapter`` read. It goes where the checkpoint goes (never the current
folder unless the checkpoint does), is written by global rank 0 only, atomically (see
:func:`lightning_peft.interop.peft_format.write_peft_folder`), and is removed with its checkpoint
when ``ModelCheckpoint`` drops one (``save_top_k``).

Lightning tells callbacks nothing about a checkpoint's path, so the strategy's ``save_checkpoint``
and ``remove_checkpoint`` are wrapped on the Trainer's strategy instance when a fit is set up
(once: a second fit replaces the wrappers); every checkpoint, ``ModelCheckpoint``'s or
``trainer.save_checkpoint``'s (after the fit too), goes through them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy

from lightning_peft.interop import peft_format
from lightning_peft.lightning import strategies
from lightning_peft.lightning.base import clean_name

#: The folder name's ending, after the checkpoint's stem.
SUFFIX = ".peft"


def peft_dir_of(checkpoint: str | Path) -> Path:
    """The peft adapter folder beside ``checkpoint``: ``<stem>.peft`` in the same folder."""
    path = Path(checkpoint)
    return path.with_name((path.stem if path.suffix else path.name) + SUFFIX)


def write(trainer: pl.Trainer, checkpoint: str | Path, adapter_name: str, total_step: int | None) -> Path | None:
    """Write the peft folder of ``checkpoint`` for adapter ``adapter_name``; call on every rank.

    Under a sharded PEFT strategy every rank gathers the adapter (a collective); rank 0 writes.
    Returns the folder on global rank 0, else ``None``.
    """
    strategy = trainer.strategy
    _, root = strategies.adapter_root(trainer.lightning_module)
    values = strategy.adapter_state_dict() if isinstance(strategy, strategies.PEFTStrategy) else None
    if not trainer.is_global_zero:
        return None
    return peft_format.write_peft_folder(
        root, peft_dir_of(checkpoint), adapter_name, total_step=total_step, values=values, clean=clean_name
    )


def install(strategy: Strategy, on_save: Callable[[Path], None]) -> None:
    """Wrap ``strategy.save_checkpoint`` (then call ``on_save(path)``) and ``remove_checkpoint``
    (also removing the peft folder) on this strategy instance."""
    uninstall(strategy)
    save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        save(checkpoint, filepath, storage_options)
        on_save(Path(filepath))

    def remove_checkpoint(filepath: Any) -> None:
        remove(filepath)
        if strategy.is_global_zero:
            shutil.rmtree(peft_dir_of(filepath), ignore_errors=True)

    strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    strategy.remove_checkpoint = remove_checkpoint  # type: ignore[method-assign]


def uninstall(strategy: Strategy) -> None:
    """Undo :func:`install` (the class's methods show through again)."""
    strategy.__dict__.pop("save_checkpoint", None)
    strategy.__dict__.pop("remove_checkpoint", None)
