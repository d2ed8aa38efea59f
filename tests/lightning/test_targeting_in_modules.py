"""Targeting inside a LightningModule: metrics and losses beside the model are never candidates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchmetrics
from torch import nn

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import targeting
from tests.lightning.modules import TinyLM, token_loader, trainer


class WithMetrics(TinyLM):
    """A TinyLM that also holds torchmetrics metrics and a loss module, as task modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=4)
        self.metrics = torchmetrics.MetricCollection({"f1": torchmetrics.classification.MulticlassF1Score(4)})
        self.loss_fn = nn.CrossEntropyLoss()


def test_a_typo_names_model_modules_only(tmp_path: Path) -> None:
    callback = PEFTCallback("lora", target_modules=["q_proj", "v_prj"], verbose=False)
    module = WithMetrics()
    with pytest.raises(ValueError) as err:
        trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, token_loader())
    message = str(err.value)
    assert "LoRAConfig.target_modules=['q_proj', 'v_prj']: 'v_prj' matches no module of WithMetrics" in message
    assert "(closest: 'v_proj'" in message and "embed_tokens, q_proj" in message
    for name in ("accuracy", "metrics", "f1", "loss_fn"):
        assert name not in message, name
    assert lp.get_info(module) is None


def test_a_regex_matching_nothing_lists_model_modules_only() -> None:
    with pytest.raises(ValueError) as err:
        lp.inject(WithMetrics(), "lora", target_modules=r".*\.query")
    message = str(err.value)
    assert "matched no module of WithMetrics. Module names it has include: embed_tokens, q_proj" in message
    assert not any(name in message for name in ("accuracy", "metrics", "f1", "loss_fn"))


def test_metrics_and_losses_are_never_selected_nor_matched() -> None:
    module = WithMetrics()
    everything = targeting.select(module, r".*", None)
    assert everything and not any(n.split(".")[0] in {"accuracy", "metrics", "loss_fn"} for n in everything)
    with pytest.raises(ValueError, match=r"'accuracy' matches no module of WithMetrics \(no name is close\)"):
        targeting.check_listed(module, ["accuracy"], owner="LoRAConfig")
    assert not targeting.is_model_module(module.accuracy) and not targeting.is_model_module(module.loss_fn)
    assert targeting.is_model_module(module.model) and targeting.is_model_module(torch.nn.Linear(2, 2))
