"""Ready LightningModules and DataModules for common Hugging Face tasks.

Task modules hold a transformers model as ``self.model`` (built in ``configure_model``); add a
PEFT method with :class:`~lightning_peft.PEFTCallback`, which injects into the whole module:

================================  ================================  =======================================
task module                       datamodule                        metrics / predict
================================  ================================  =======================================
:class:`SequenceClassification`   :class:`TextClassificationData`   accuracy, F1, precision, recall / labels
:class:`CausalLM`                 :class:`CausalLMData`             loss, perplexity / generated text
:class:`Seq2SeqLM`                :class:`Seq2SeqData`              loss, perplexity / generated text
:class:`ImageClassification`      :class:`ImageClassificationData`  accuracy, F1, precision, recall / labels
:class:`AudioClassification`      :class:`AudioClassificationData`  accuracy, F1, precision, recall / labels
================================  ================================  =======================================

The image and audio tasks also take a plain ``torch.nn.Module`` as ``class:<module>.<Class>``, and read a
folder per class, a CSV of files or a Hugging Face ``datasets`` dataset (see :mod:`~lightning_peft.tasks.media`).

Imports are lazy: ``import lightning_peft.tasks`` loads neither lightning nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TaskModule": "lightning_peft.tasks.base",
    "SequenceClassification": "lightning_peft.tasks.classification",
    "CausalLM": "lightning_peft.tasks.language_modeling",
    "Seq2SeqLM": "lightning_peft.tasks.language_modeling",
    "MultipleChoiceLM": "lightning_peft.tasks.multiple_choice",
    "TextDataModule": "lightning_peft.tasks.data",
    "TextClassificationData": "lightning_peft.tasks.data",
    "CausalLMData": "lightning_peft.tasks.data",
    "Seq2SeqData": "lightning_peft.tasks.data",
    "MultipleChoiceData": "lightning_peft.tasks.data",
    "ImageClassification": "lightning_peft.tasks.vision",
    "ImageClassificationData": "lightning_peft.tasks.vision",
    "AudioClassification": "lightning_peft.tasks.audio",
    "AudioClassificationData": "lightning_peft.tasks.audio",
}

__all__ = [
    "AudioClassification",
    "AudioClassificationData",
    "CausalLM",
    "CausalLMData",
    "ImageClassification",
    "ImageClassificationData",
    "MultipleChoiceData",
    "MultipleChoiceLM",
    "Seq2SeqData",
    "Seq2SeqLM",
    "SequenceClassification",
    "TaskModule",
    "TextClassificationData",
    "TextDataModule",
]

if TYPE_CHECKING:
    from lightning_peft.tasks.audio import AudioClassification, AudioClassificationData
    from lightning_peft.tasks.base import TaskModule
    from lightning_peft.tasks.classification import SequenceClassification
    from lightning_peft.tasks.data import (
        CausalLMData,
        MultipleChoiceData,
        Seq2SeqData,
        TextClassificationData,
        TextDataModule,
    )
    from lightning_peft.tasks.language_modeling import CausalLM, Seq2SeqLM
    from lightning_peft.tasks.multiple_choice import MultipleChoiceLM
    from lightning_peft.tasks.vision import ImageClassification, ImageClassificationData


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft.tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
