"""The task modules' learning-rate schedule: linear warmup from 0, then linear decay to 0 over the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_peft import PEFTCallback
from lightning_peft.tasks import SequenceClassification, TextClassificationData
from tests.lightning.modules import trainer
from tests.tasks import hub


class RecordLR(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("schedule", "warmup", "factors"),
    [
        # step < warmup: (step + 1) / (warmup + 1); then (total - step) / (total - warmup), total = 6 steps
        ("linear", 2, [1 / 3, 2 / 3, 1, 3 / 4, 2 / 4, 1 / 4]),
        ("linear", 0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
        ("constant", 2, [1 / 3, 2 / 3, 1, 1, 1, 1]),
    ],
)
def test_the_rate_follows_the_formula(
    hub_dir: Path, tmp_path: Path, schedule: str, warmup: int, factors: list[float]
) -> None:
    train = hub.write_csv(tmp_path / "train.csv", hub.classification_rows(24))
    data = TextClassificationData(train_file=str(train), batch_size=4, val_split=0)
    module = SequenceClassification(
        str(hub.save_model(hub_dir, "bert")), learning_rate=0.1, warmup_steps=warmup, schedule=schedule
    )
    record = RecordLR()
    t = trainer(tmp_path, max_epochs=1, callbacks=[PEFTCallback("lora", r=2, verbose=False), record])
    t.fit(module, data)
    assert t.global_step == 6
    assert record.rates == pytest.approx([0.1 * f for f in factors])
