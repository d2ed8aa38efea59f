"""What image and audio classification share: labelled files in, class logits out.

:class:`MediaClassification` is :class:`~lightning_peft.tasks.SequenceClassification` (label
resolution, per-adapter labels, the metrics) over a model whose input is one tensor per example
(``pixel_values``, ``input_features`` or ``input_values``) rather than token ids; the loss is
cross-entropy over the labels' logits, computed here so that a plain ``torch.nn.Module`` that returns
logits (``class:<module>.<Class>``) trains the same as a transformers ``*For*Classification`` model.

:class:`MediaData` reads labelled items from one of three layouts and holds out validation/test
fractions: a folder per class (``root/<label>/<file>``, torchvision's ImageFolder and ``datasets``'
imagefolder/audiofolder layout), a CSV of file paths and labels, or a Hugging Face ``datasets``
dataset (an object, a folder written by ``save_to_disk``, or a name for ``load_dataset``), read row by
row, so an Arrow-backed dataset stays memory-mapped. Subclasses turn one item into model inputs.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.tasks.base import load_model
from lightning_peft.tasks.batching import resumable_loader
from lightning_peft.tasks.classification import SequenceClassification

CLASS_PREFIX = "class:"
SPLITS = ("train", "validation", "test", "predict")


def import_class(path: str, *, field: str) -> type[nn.Module]:
    """``"package.module.Class"`` -> the class, with an error naming ``field`` when it cannot be imported."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{field}={path!r}: cannot import {name!r} from {module_name!r} ({err}).") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{field}={path!r} must name a torch.nn.Module subclass as <module>.<Class>; got {cls!r}.")
    return cls


class MediaClassification(SequenceClassification):
    """Base of :class:`ImageClassification` and :class:`AudioClassification` (see the module docstring).

    Args:
        model_name_or_path: a transformers model (folder, Hub id or ``package:<module>/<path>``) loaded
            with :attr:`auto_class`, or ``class:<module>.<Class>``: a ``torch.nn.Module`` whose forward
            maps the input tensor to logits (B, classes), built as ``Class(num_classes=K, **model_init_args)``.
        labels: class names in label-id order (default: the datamodule's).
        model_init_args: keyword arguments of a ``class:`` model's constructor.
        **kwargs: ``num_labels``, ``dtype`` and the optimizer options of
            :class:`~lightning_peft.tasks.SequenceClassification`.
    """

    #: the batch keys the model takes (the first one present is a ``class:`` model's input), and the
    #: data module that fills them (for messages)
    input_keys: tuple[str, ...] = ("pixel_values",)
    data_class = ""
    #: the name of the item a prediction row names (``"image"``, ``"audio"``)
    item = "item"

    def __init__(
        self,
        model_name_or_path: str,
        labels: list[str] | None = None,
        *,
        model_init_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        try:
            super().__init__(model_name_or_path, labels, **kwargs)
        except ValueError as err:  # the parent names itself; say which class the user built
            raise ValueError(str(err).replace("SequenceClassification", name)) from None
        self.model_class: type[nn.Module] | None = None
        if model_name_or_path.startswith(CLASS_PREFIX):
            path = model_name_or_path[len(CLASS_PREFIX) :]
            self.model_class = import_class(path, field=f"{name}.model_name_or_path")
            if "num_classes" not in inspect.signature(self.model_class).parameters:
                raise ValueError(
                    f"{name}.model_name_or_path={model_name_or_path!r}: {path} takes no num_classes argument; "
                    "a class: model is built as Class(num_classes=K, **model_init_args)."
                )
        elif model_init_args:
            raise invalid(name, "model_init_args", model_init_args, "None unless model_name_or_path is class:...")
        if model_init_args is not None and not isinstance(model_init_args, dict):
            raise invalid(name, "model_init_args", model_init_args, "a dict of constructor arguments or None")
        self.model_init_args = dict(model_init_args or {})

    @property
    def tokenizer(self) -> Any:
        raise AttributeError(f"{type(self).__name__} has no tokenizer; {self.data_class} uses `processor`.")

    #: What :meth:`load_processor` loads, for messages ("image processor", "feature extractor").
    processor_kind: ClassVar[str] = "processor"

    def load_processor(self, path: str) -> Any:
        """The model's transformers preprocessor saved at ``path`` (each task its own kind)."""
        raise NotImplementedError

    @property
    def processor(self) -> Any:
        """The model's transformers preprocessor (loaded once, on first use), or ``None`` for a ``class:`` model."""
        if self.model_class is not None:
            return None
        if getattr(self, "_processor", None) is None:
            from lightning_peft.tasks.base import _load_error, _quiet_transformers

            try:
                with _quiet_transformers():
                    self._processor = self.load_processor(self.source.path)
            except OSError as err:
                raise _load_error(self.source, self.processor_kind, err) from err
        return self._processor

    def _resolve_labels(self) -> list[str]:
        try:
            return super()._resolve_labels()
        except ValueError as err:
            text = str(err).replace("SequenceClassification", type(self).__name__)
            raise ValueError(text.replace("TextClassificationData", self.data_class)) from None

    def build_model(self) -> nn.Module:
        self.labels = self._resolve_labels()
        self.hparams["labels"] = self.labels
        width = self.num_labels or len(self.labels)
        if width < len(self.labels):
            raise invalid(type(self).__name__, "num_labels", width, f"at least {len(self.labels)} (the labels)")
        names = [*self.labels, *(f"unused_{i}" for i in range(len(self.labels), width))]
        if self.model_class is not None:
            model = self.model_class(num_classes=width, **self.model_init_args)
        else:
            model = load_model(
                self.auto_class,
                self.source,
                self.hparams.dtype,
                num_labels=width,
                id2label=dict(enumerate(names)),
                label2id={label: i for i, label in enumerate(names)},
                ignore_mismatched_sizes=True,  # a pretrained head of other classes is replaced by a new one
            )
        k = len(self.labels)
        metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(k, average="micro"),
                "f1": MulticlassF1Score(k, average="macro"),
                "precision": MulticlassPrecision(k, average="macro"),
                "recall": MulticlassRecall(k, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        return model

    #: modules a transformers ``*For*Classification`` model adds on the backbone, which start new
    new_heads: tuple[str, ...] = ("projector", "classifier")

    def on_train_start(self) -> None:
        """Refuse a frozen new head, and keep frozen batch norms in eval mode.

        A frozen batch norm keeps its pretrained running statistics: an adapter checkpoint holds
        the adapter only, so statistics drifted in training would be lost on reload, while the
        adapter was fit to them.
        """
        model = self.transformer
        if all(p.requires_grad for p in model.parameters()):
            return  # full fine-tuning
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        heads = [n for n in self.new_heads if isinstance(getattr(model, n, None), nn.Module)]
        frozen = [n for n in heads if not any(p.requires_grad for p in getattr(model, n).parameters())]
        if frozen:
            raise ValueError(
                f"{type(self).__name__}: the new head modules {frozen} are frozen, so the adapter would train against "
                f"random outputs; add modules_to_save={heads!r} to the PEFT method's options."
            )

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in self.input_keys}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, num_labels) logits of a batch, from either kind of model."""
        if self.model_class is not None:
            return self.transformer(next(batch[k] for k in self.input_keys if k in batch))
        return self.transformer(**self.model_inputs(batch)).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all outputs (unused ones included, so training pushes them down)."""
        return F.cross_entropy(logits.float(), labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.logits(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, prefix: str) -> None:
        logits, size = self.logits(batch), len(batch["labels"])
        assert self.labels is not None
        metrics.update(logits[:, : len(self.labels)], batch["labels"])
        self.log(f"{prefix}loss", self.loss(logits, batch["labels"]), prog_bar=True, batch_size=size)
        self.log_dict(metrics, prog_bar=True, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``{item: its file or row, "label": the predicted class, "score": its probability}`` per example."""
        with self.row_adapters(batch) as names:
            logits = self.logits(batch).float()  # (B, num_labels)
        served: list[str | None] = list(names) if names is not None else [None] * len(logits)
        classes = [self.labels_for(name) for name in served]
        counts = torch.tensor([len(c) for c in classes], device=logits.device)  # (B,)
        unused = torch.arange(logits.shape[-1], device=logits.device) >= counts[:, None]  # (B, num_labels)
        scores, ids = logits.masked_fill(unused, float("-inf")).softmax(-1).max(-1)
        rows = [
            {self.item: source, "label": row_classes[i], "score": round(s, 4)}
            for source, row_classes, i, s in zip(batch["source"], classes, ids.tolist(), scores.tolist(), strict=True)
        ]
        return self.tag_adapters(rows, names)


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One labelled example before decoding: a file path or a dataset row's value."""

    value: Any  # a path (str), or what a ``datasets`` row holds (a PIL image, an audio dict, bytes...)
    label: str | None
    source: str  # what a prediction names: the path, or ``row <i>`` of a dataset


def _list_folder(root: Path, extensions: tuple[str, ...], field: str) -> list[Item]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{field}={str(root)!r} has no class subfolders; the layout is <folder>/<label>/<file>.")
    items = [
        Item(str(f), c.name, str(f))
        for c in classes
        for f in sorted(c.rglob("*"))
        if f.is_file() and f.suffix.lower() in extensions
    ]
    if not items:
        raise ValueError(f"{field}={str(root)!r} holds no files ending in {', '.join(extensions)}.")
    return items


def _read_csv(path: Path, file_column: str, label_column: str, field: str, owner: str) -> list[Item]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{field}={str(path)!r} holds no rows.")
    columns = list(rows[0])
    if file_column not in columns:
        raise ValueError(f"{owner}.file_column={file_column!r}: {path} has no such column; it has {columns}.")
    items = []
    for row in rows:
        file = Path(row[file_column]).expanduser()
        file = file if file.is_absolute() else path.parent / file  # relative to the CSV
        if not file.is_file():
            raise FileNotFoundError(f"{field}={str(path)!r} names {row[file_column]!r}, which does not exist ({file}).")
        items.append(Item(str(file), row.get(label_column) or None, str(file)))
    return items


class _Rows(Sequence[Item]):
    """A ``datasets.Dataset`` seen as items, one row decoded at a time (Arrow stays memory-mapped)."""

    def __init__(self, data: Any, column: str, label_column: str, names: list[str] | None) -> None:
        self.data, self.column, self.label_column, self.names = data, column, label_column, names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.data[int(i)]
        label = row.get(self.label_column)
        if label is not None and self.names is not None and isinstance(label, int):
            label = self.names[label]
        return Item(row[self.column], None if label is None else str(label), f"row {int(i)}")

    def labels(self) -> list[str | None]:
        if self.label_column not in self.data.column_names:
            return [None] * len(self)
        values = self.data[self.label_column]  # one column, without decoding the media column
        return [None if v is None else str(self.names[v] if self.names and isinstance(v, int) else v) for v in values]


class _Subset(Sequence[Item]):
    def __init__(self, items: Sequence[Item], index: list[int]) -> None:
        self.items, self.index = items, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.items[self.index[i]]


def _labels_of(items: Sequence[Item]) -> list[str | None]:
    """Each item's label, without decoding items that can tell their labels apart (dataset rows)."""
    if isinstance(items, _Subset):
        labels = _labels_of(items.items)
        return [labels[i] for i in items.index]
    if hasattr(items, "labels"):
        return items.labels()
    return [item.label for item in items]


class _Encoded(Dataset):
    def __init__(self, data: MediaData, items: Sequence[Item], split: str) -> None:
        self.data, self.items, self.split = data, items, split

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"item": self.data.load(item), "label": item.label, "source": item.source, "split": self.split}


class MediaData(L.LightningDataModule):
    """Base of :class:`ImageClassificationData` and :class:`AudioClassificationData`.

    Each of ``train``, ``validation``, ``test`` and ``predict`` is a folder per class
    (``<folder>/<label>/<file>``) or a ``.csv`` file with ``file_column`` and ``label_column`` (paths
    relative to the CSV), or a file kind the subclass reads (MNIST-style IDX files for images).
    ``dataset`` instead gives all splits as Hugging Face ``datasets``: a
    ``Dataset`` / ``DatasetDict`` object, a folder written by ``save_to_disk``, or a name or folder for
    ``datasets.load_dataset`` (``"imagefolder"`` needs ``data_dir`` then: use the folder layout above).
    Without validation (test) data, ``val_split`` (``test_split``) of the training items are held
    out with a fixed seed; predict defaults to the validation items, else the test items.

    Args:
        train: training data (a class-per-folder directory or a CSV file).
        validation: validation data; default: ``val_split`` of the training data.
        test: test data; default: ``test_split`` of the training data.
        predict: data to predict for (labels not needed); default: the validation data.
        dataset: a ``datasets`` dataset (see above), or the name of an offline dataset the subclass
            knows (``fashion_mnist`` for images), instead of the four paths.
        file_column: the CSV column (or the ``datasets`` column) holding each item.
        label_column: the column holding each item's class name (or ``ClassLabel`` id).
        labels: class names in label-id order; default: the sorted names found in the training data.
        batch_size: examples per batch.
        val_split: fraction of the training items held out for validation without validation data.
        test_split: fraction held out for testing without test data.
        limit: use at most this many items of each split (a quick run on a subset); ``None``: all.
        seed: seed of the hold-out split, the subset and the training order.
        num_workers: DataLoader worker processes.
    """

    #: file suffixes read from class folders
    extensions: tuple[str, ...] = ()
    #: the ``datasets`` column that holds the item by default
    default_column = ""

    def __init__(
        self,
        *,
        train: str | None = None,
        validation: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        dataset: Any = None,
        file_column: str | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        batch_size: int = 16,
        val_split: float = 0.1,
        test_split: float = 0.0,
        limit: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.paths = {"train": train, "validation": validation, "test": test, "predict": predict}
        if dataset is not None and any(self.paths.values()):
            raise ValueError(f"{owner}: give dataset or train/validation/test/predict paths, not both.")
        if dataset is None and not any(self.paths.values()):
            raise ValueError(f"{owner} has no data: set train (a folder per class or a CSV file) or dataset.")
        for split, path in self.paths.items():
            if path is None:
                continue
            p = Path(path).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"{owner}.{split}={path!r} does not exist.")
            if p.is_file() and p.suffix.lower() != ".csv" and not self.reads_file(p):
                raise invalid(owner, split, path, f"a folder with one subfolder per class, or {self.file_kinds}")
        check_positive_int(owner, "batch_size", batch_size)
        if limit is not None:
            check_positive_int(owner, "limit", limit)
        for field, value in (("val_split", val_split), ("test_split", test_split)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise invalid(owner, field, value, "a number in [0, 1)")
        if val_split + test_split >= 1:
            raise invalid(owner, "val_split + test_split", val_split + test_split, "below 1")
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise invalid(owner, "labels", labels, "None or at least two distinct class names")
        self.dataset = dataset
        self.file_column = file_column or ("file" if dataset is None else self.default_column)
        self.label_column = label_column
        self.labels: list[str] | None = list(labels) if labels is not None else None
        self.batch_size, self.val_split, self.test_split = batch_size, val_split, test_split
        self.limit, self.seed, self.num_workers = limit, seed, num_workers
        self.items: dict[str, Sequence[Item]] | None = None
        self.adapter_column: str | None = None

    # ------------------------------------------------------------------ what subclasses define

    def load(self, item: Item) -> Any:
        """Decode one item (read its file, or take its dataset value): called in the loader's workers."""
        raise NotImplementedError

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Decoded items as the model's input tensors, ``"labels"`` (B,) and ``"source"`` (a list of names)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reading

    #: what files a split may be, for messages
    file_kinds = "a .csv file"

    def reads_file(self, path: Path) -> bool:
        """Whether the subclass reads this file itself (see :meth:`read_file`), other than a CSV."""
        return False

    def read_file(self, split: str, path: Path) -> Sequence[Item]:
        raise NotImplementedError

    def _read_path(self, split: str, path: str) -> Sequence[Item]:
        owner, p = type(self).__name__, Path(path).expanduser()
        if p.is_dir():
            return _list_folder(p, self.extensions, f"{owner}.{split}")
        if self.reads_file(p):
            return self.read_file(split, p)
        return _read_csv(p, self.file_column, self.label_column, f"{owner}.{split}", owner)

    def _read_dataset(self) -> dict[str, Sequence[Item]]:
        import datasets as hf

        owner, data = type(self).__name__, self.dataset
        if isinstance(data, str) and data in self.named_datasets():
            return self.named_datasets()[data]()
        if isinstance(data, (str, Path)):
            folder = Path(data).expanduser()
            if folder.is_dir() and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
                data = hf.load_from_disk(str(folder))
            else:
                try:
                    data = hf.load_dataset(str(data))
                except Exception as err:
                    raise ValueError(
                        f"{owner}.dataset={self.dataset!r}: not a folder written by save_to_disk, and load_dataset "
                        f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
                    ) from err
        splits = dict(data) if isinstance(data, hf.DatasetDict) else {"train": data}
        if not all(isinstance(d, hf.Dataset) for d in splits.values()):
            raise invalid(owner, "dataset", self.dataset, "a datasets Dataset/DatasetDict, a saved folder or a name")
        aliases = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation"}
        aliases.update({"test": "test", "predict": "predict"})
        out: dict[str, Sequence[Item]] = {}
        for name, split in splits.items():
            if name not in aliases:
                raise ValueError(f"{owner}.dataset has a split {name!r}; splits must be among {sorted(aliases)}.")
            if self.file_column not in split.column_names:
                raise ValueError(
                    f"{owner}.file_column={self.file_column!r}: dataset split {name!r} has no such column; "
                    f"its columns are {split.column_names}."
                )
            feature = split.features.get(self.label_column)
            names = list(feature.names) if isinstance(feature, hf.ClassLabel) else None
            out[aliases[name]] = _Rows(self.prepare_dataset(split), self.file_column, self.label_column, names)
        return out

    def named_datasets(self) -> dict[str, Any]:
        """Offline datasets known by name: ``{name: () -> {split: items}}``."""
        return {}

    def prepare_dataset(self, split: Any) -> Any:
        """A hook to cast a ``datasets`` split before reading (audio: no decoding by ``datasets``)."""
        return split

    def _read(self) -> dict[str, Sequence[Item]]:
        owner = type(self).__name__
        if self.dataset is not None:
            found = self._read_dataset()
        else:
            found = {s: self._read_path(s, p) for s, p in self.paths.items() if p is not None}
        pool = found.pop("train", None)
        items: dict[str, Sequence[Item]] = dict(found)
        if pool is not None:
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed)).tolist()
            total = len(order)
            for split, fraction in (("test", self.test_split), ("validation", self.val_split)):
                if split not in items and fraction > 0 and len(order) > 1:
                    count = max(1, math.floor(total * fraction))
                    items[split], order = _Subset(pool, order[:count]), order[count:]
            items["train"] = _Subset(pool, order)
        if "predict" not in items and ("validation" in items or "test" in items):
            items["predict"] = items["validation"] if "validation" in items else items["test"]
        if self.limit is not None:
            items = {s: (_Subset(v, list(range(self.limit))) if len(v) > self.limit else v) for s, v in items.items()}
        for split, values in items.items():
            if split != "predict":
                missing = [i for i, label in enumerate(_labels_of(values)) if label is None]
                if missing:
                    raise ValueError(f"{owner}: {split} item {values[missing[0]].source} has no label.")
        if self.labels is None and getattr(pool, "names", None):
            self.labels = list(pool.names)  # a ClassLabel's (or a named dataset's) order
        if "train" in items:
            found_labels = sorted({label for label in _labels_of(items["train"]) if label is not None})
            if self.labels is None:
                if len(found_labels) < 2:
                    raise ValueError(f"{owner}: the training data has one class only ({found_labels}); it needs two.")
                self.labels = found_labels
        if self.labels is None:
            raise ValueError(f"{owner}: without training data, set labels=[...] (class names in label-id order).")
        for split, values in items.items():
            if split == "predict":
                continue
            known = set(self.labels)
            unknown = sorted({str(label) for label in _labels_of(values) if label not in known})
            if unknown:
                raise ValueError(f"{owner}: {split} data has labels {unknown} not among labels={self.labels}.")
        return items

    @property
    def records(self) -> dict[str, list[dict[str, Any]]]:
        """Per split, ``{"source", "label"}`` of each item (without decoding it)."""
        if self.items is None:
            self.items = self._read()
        return {
            split: [{"source": item.source, "label": item.label} for item in items]
            for split, items in self.items.items()
        }

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        if self.items is None:
            self.items = self._read()
        needed = {"fit": ("train",), "validate": ("validation",), "test": ("test",)}.get(stage, ("predict",))
        for split in needed:
            if split not in self.items:
                raise ValueError(f"{type(self).__name__} has no {split} data: set {split} (or a hold-out split).")

    def label_id(self, label: str | None) -> int:
        assert self.labels is not None
        return -100 if label is None else self.labels.index(label)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if self.items is None:
            self.setup({"train": "fit", "validation": "validate", "test": "test"}.get(split, "predict"))
        assert self.items is not None
        if split not in self.items:
            raise ValueError(f"{type(self).__name__} has no {split} data: set {split} (or a hold-out split).")
        data = _Encoded(self, self.items[split], split)
        return resumable_loader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.items is not None and "validation" not in self.items:
            return []
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def module(self) -> Any:
        """The attached task module (it knows the model's processor), or ``None``."""
        trainer = self.trainer
        return trainer.lightning_module if trainer is not None else None
