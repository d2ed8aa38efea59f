"""The tiny CLI config every CLI test starts from: LoRA on a tiny BERT classifying ``hub.classification_rows``.

One builder instead of a near-copy per test file; each test changes what it needs (``None``
removes a key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.tasks import hub

LORA_R4: dict[str, Any] = {"class_path": "lightning_peft.methods.lora.LoRAConfig", "init_args": {"r": 4}}


def _merged(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    out = {**base, **(changes or {})}
    return {k: v for k, v in out.items() if v is not None}


def tiny_config(
    folder: Path,
    hub_dir: Path,
    *,
    rows: list[dict[str, str]] | None = None,
    name: str = "tiny.yaml",
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
    method: Any = None,
) -> Path:
    """Write ``folder/name``: a one-epoch fit of LoRA (r=4) on ``folder/train.csv`` (24 rows by default).

    Args:
        folder: where the config, ``train.csv`` and (by default) the run's files go.
        hub_dir: the session's folder of tiny models (the ``hub_dir`` fixture).
        rows: the training records (default: ``hub.classification_rows(24)``, labels neg/pos).
        name: the config's file name.
        model, data, trainer: options changed from the defaults below (a value of None removes one).
        checkpoint: ModelCheckpoint's options; the callback is added (before PEFTCallback) when given.
        method: PEFTCallback's method (default: LoRA r=4).
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = hub.write_csv(folder / "train.csv", rows if rows is not None else hub.classification_rows(24))
    callbacks: list[dict[str, Any]] = []
    if checkpoint is not None:
        callbacks.append({"class_path": "ModelCheckpoint", "init_args": checkpoint})
    # Last: `--trainer.callbacks.method.r 2` on the command line edits the last callback.
    callbacks.append({"class_path": "lightning_peft.PEFTCallback", "init_args": {"method": method or LORA_R4}})
    config = {
        "seed_everything": 1,
        "model": {
            "class_path": "lightning_peft.tasks.SequenceClassification",
            "init_args": _merged(
                {"model_name_or_path": str(hub.save_model(hub_dir, "bert")), "learning_rate": 0.05}, model
            ),
        },
        "data": {
            "class_path": "lightning_peft.tasks.TextClassificationData",
            "init_args": _merged({"train_file": str(train), "batch_size": 8, "val_split": 0.25}, data),
        },
        "trainer": _merged(
            {
                "accelerator": "cpu",
                "max_epochs": 1,
                "default_root_dir": str(folder),
                "logger": False,
                "enable_progress_bar": False,
                "callbacks": callbacks,
            },
            trainer,
        ),
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path
