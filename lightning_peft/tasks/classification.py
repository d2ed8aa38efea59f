"""Sequence classification over ``AutoModelForSequenceClassification``, with torchmetrics."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from lightning_peft.core import state
from lightning_peft.core.config import invalid
from lightning_peft.tasks.base import TaskModule, load_model


class SequenceClassification(TaskModule):
    """Classify texts; logs accuracy and macro F1, precision and recall on validation and test.

    The class labels come from ``labels`` or, when that is ``None``, from the datamodule's
    ``labels`` attribute at setup (``TextClassificationData`` has one). A new classification head
    is put on the pretrained backbone; under ``PEFTCallback`` it trains in full by default.

    Several adapters on one base (``lp.load_adapter(module, path, adapter_name=...)``) may each
    predict classes of their own: ``adapter_labels`` maps an adapter's name to its class names
    (the CLI's ``--adapters`` fills it from each checkpoint's recorded labels), and ``predict``
    names each row's class from the labels of the adapter that served it. All heads of one base
    have one width (``num_labels``), which a mixed batch needs too.

    Args:
        model_name_or_path: a local folder, a ``.gguf`` file, ``package:<module>/<path>`` for a model
            installed as a Python package, or a Hugging Face Hub id.
        labels: class names in label-id order.
        num_labels: the head's outputs; default ``len(labels)``. A larger width lets an adapter of a
            task with fewer classes share one base model with adapters of more classes (heads are
            saved per adapter and must have one shape); outputs past the labels are never a target,
            so training pushes them down, and metrics and predictions leave them out.
        **kwargs: ``dtype`` and the optimizer's options: see :class:`~lightning_peft.tasks.TaskModule`.
    """

    auto_class = "AutoModelForSequenceClassification"

    def __init__(
        self, model_name_or_path: str, labels: list[str] | None = None, num_labels: int | None = None, **kwargs: Any
    ) -> None:
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ValueError(
                f"SequenceClassification.labels must be None or at least two distinct class names; got {labels!r}."
            )
        floor = max(2, len(labels or ()))
        if num_labels is not None and (
            isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < floor
        ):
            raise invalid("SequenceClassification", "num_labels", num_labels, f"None or an integer of at least {floor}")
        super().__init__(model_name_or_path, **kwargs)
        self.labels = list(labels) if labels is not None else None
        self.num_labels = num_labels
        #: class names per adapter name, for adapters that predict other classes than ``labels``
        self.adapter_labels: dict[str, list[str]] = {}

    def labels_for(self, adapter: str | None = None) -> list[str]:
        """The class names adapter ``adapter`` predicts (default: the one active adapter's, else ``labels``)."""
        if adapter is None:
            active = state.active_adapters(self)
            adapter = active[0] if len(active) == 1 else None
        labels = self.adapter_labels.get(adapter, self.labels) if adapter is not None else self.labels
        assert labels is not None, "labels are resolved when the model is built"
        return labels

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
        width = self.num_labels or len(self.labels)
        if width < len(self.labels):
            expected = f"None or an integer of at least {len(self.labels)} (the number of labels)"
            raise invalid("SequenceClassification", "num_labels", width, expected)
        names = [*self.labels, *(f"unused_{i}" for i in range(len(self.labels), width))]
        model = load_model(
            self.auto_class,
            self.source,
            self.hparams.dtype,
            num_labels=width,
            id2label=dict(enumerate(names)),
            label2id={label: i for i, label in enumerate(names)},
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
        assert self.labels is not None
        metrics.update(out.logits[:, : len(self.labels)], batch["labels"])  # (B, classes): without unused outputs
        self.log(f"{prefix}loss", out.loss, prog_bar=True, batch_size=size)
        self.log_dict(metrics, prog_bar=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val_")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test_")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The predicted class name and its probability for each text, among the classes of the
        adapter that served it (each text through its own adapter if the batch names them)."""
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "labels"}
        with self.row_adapters(batch) as names:
            logits = self.transformer(**inputs).logits.float()  # (B, num_labels)
        served: list[str | None] = list(names) if names is not None else [None] * len(logits)
        classes = [self.labels_for(name) for name in served]  # per row
        counts = torch.tensor([len(c) for c in classes], device=logits.device)  # (B,)
        unused = torch.arange(logits.shape[-1], device=logits.device) >= counts[:, None]  # (B, num_labels)
        scores, ids = logits.masked_fill(unused, float("-inf")).softmax(-1).max(-1)
        texts = batch.get("text") or [None] * len(ids)
        rows = [
            {"text": text, "label": row_classes[i], "score": round(s, 4)}
            for text, row_classes, i, s in zip(texts, classes, ids.tolist(), scores.tolist(), strict=True)
        ]
        return self.tag_adapters(rows, names)
