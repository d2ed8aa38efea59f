"""Sequence classification over ``AutoModelForSequenceClassification``, with torchmetrics."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from lightning_peft.tasks.base import TaskModule, load_model


class SequenceClassification(TaskModule):
    """Classify texts; logs accuracy and macro F1, precision and recall on validation and test.

    The class labels come from ``labels`` or, when that is ``None``, from the datamodule's
    ``labels`` attribute at setup (``TextClassificationData`` has one). A new classification head
    is put on the pretrained backbone; under ``PEFTCallback`` it trains in full by default.

    Args:
        model_name_or_path: a local folder, a ``.gguf`` file, ``package:<module>/<path>`` for a model
            installed as a Python package, or a Hugging Face Hub id.
        labels: class names in label-id order.
        **kwargs: ``dtype`` and the optimizer's options: see :class:`~lightning_peft.tasks.TaskModule`.
    """

    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, model_name_or_path: str, labels: list[str] | None = None, **kwargs: Any) -> None:
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ValueError(
                f"SequenceClassification.labels must be None or at least two distinct class names; got {labels!r}."
            )
        super().__init__(model_name_or_path, **kwargs)
        self.labels = list(labels) if labels is not None else None

    def _resolve_labels(self) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        labels = getattr(datamodule, "labels", None)
        if self.labels is not None:
            if labels and list(labels) != self.labels:  # the datamodule encodes label ids in its own order
                raise ValueError(
                    f"SequenceClassification.labels={self.labels!r} differ from the datamodule's labels "
                    f"{list(labels)!r}; set the same list on both, or only on the datamodule."
                )
            return self.labels
        if not labels:
            raise ValueError(
                "SequenceClassification.labels is None and there is no datamodule with a `labels` attribute to take "
                "them from; pass labels=[...] (class names in label-id order) or use TextClassificationData."
            )
        return list(labels)

    def build_model(self) -> torch.nn.Module:
        self.labels = self._resolve_labels()
        self.hparams["labels"] = self.labels  # so checkpoints and loggers record the label order
        model = load_model(
            self.auto_class,
            self.source,
            self.hparams.dtype,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
        )
        if model.config.pad_token_id is None:  # decoder models find the last real token through it
            model.config.pad_token_id = self.tokenizer.pad_token_id
        metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(len(self.labels), average="micro"),
                "f1": MulticlassF1Score(len(self.labels), average="macro"),
                "precision": MulticlassPrecision(len(self.labels), average="macro"),
                "recall": MulticlassRecall(len(self.labels), average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        return model

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, prefix: str) -> None:
        out = self.transformer(**self.model_inputs(batch))
        size = batch["input_ids"].shape[0]
        metrics.update(out.logits, batch["labels"])
        self.log(f"{prefix}loss", out.loss, prog_bar=True, batch_size=size)
        self.log_dict(metrics, prog_bar=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val_")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test_")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The predicted class name and its probability for each text."""
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "labels"}
        probs = self.transformer(**inputs).logits.float().softmax(-1)
        scores, ids = probs.max(-1)
        assert self.labels is not None
        texts = batch.get("text") or [None] * len(ids)
        return [
            {"text": text, "label": self.labels[i], "score": round(s, 4)}
            for text, i, s in zip(texts, ids.tolist(), scores.tolist(), strict=True)
        ]
