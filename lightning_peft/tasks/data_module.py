"""The base of the text DataModules: where records come from, held-out splits, tokenizing, loaders.

Records are read through Hugging Face ``datasets`` (:mod:`lightning_peft.tasks.reading`): a
``dataset`` (a named offline dataset, a data file, a saved dataset, a folder, a Hub id) or the
``*_file`` options. Each split is tokenized with ``Dataset.map``, whose results ``datasets`` caches
beside its input's Arrow files (keyed by the records, the options and the tokenizer), so a second
run over the same files reads the tokens back instead of tokenizing again. ``streaming: true``
reads files lazily instead: batches are tokenized as they are drawn.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.tasks.base import ADAPTER_KEY, load_tokenizer
from lightning_peft.tasks.batching import pad_collate, resumable_loader
from lightning_peft.tasks.reading import (
    QUIET_BELOW,
    Data,
    Record,
    Rows,
    ShuffledStream,
    check_dataset,
    describe_sources,
    first_null,
    is_stream,
    open_dataset,
    open_file,
    progress_bars,
)
from lightning_peft.tasks.sources import resolve_model

SPLITS = ("train", "validation", "test", "predict")
_SIMPLE = (str, int, float, bool, type(None), list, tuple)


def _check_fraction(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise invalid(owner, field, value, "a number in [0, 1)")


class TextDataModule(L.LightningDataModule):
    """Base of the text DataModules (the subclasses say which columns they need and how to encode).

    Args:
        dataset: the training records (and validation / test ones, when the source has those
            splits): a named offline dataset (``bbc_news``, ``sms_spam``, ``chatterbot``,
            ``bbc_news_choices``), a data file, a folder saved with ``save_to_disk``, a folder of
            data files, or a Hugging Face Hub dataset id (needs the Hub).
        train_file: training records: ``.csv`` / ``.tsv`` (a header row; cells are strings),
            ``.json`` (a list of objects), ``.jsonl`` (an object per line), ``.parquet``, or ``.txt``
            (one example per non-empty line, in the single column ``text``).
        validation_file: validation records; default: the dataset's validation split, else
            ``val_split`` of the training records.
        test_file: test records; default: the dataset's test split, else ``test_split`` of the
            training records.
        predict_file: records to predict for (only the input columns are needed); default: the
            validation records.
        tokenizer: a tokenizer folder, Hub id or ``package:`` path; default: the task module's.
        max_length: tokens per example at most (longer ones are truncated; shorter ones are only
            padded to the longest in their batch).
        batch_size: examples per batch.
        val_split: fraction of the training records held out for validation without a file.
        test_split: fraction of the training records held out for testing without a file.
        seed: seed of the hold-out split and of the training data's shuffling order.
        num_workers: DataLoader worker processes.
        streaming: read the files lazily (a ``datasets.IterableDataset``), for corpora bigger than
            memory: nothing is held out (give ``validation_file`` or set ``val_split: 0``), training
            records are shuffled in a buffer of ``shuffle_buffer`` records (the same order every
            epoch), and a mid-epoch resume is exact: the training stream is read again from its
            start and the buffer's draws replayed, without tokenizing the records already trained
            on (:class:`~lightning_peft.tasks.reading.ShuffledStream`); other splits go on from the
            stream position ``datasets`` keeps. Without streaming, records are memory-mapped Arrow
            tables.
        shuffle_buffer: records in the shuffling buffer of a streamed training split.
        cache_dir: where ``datasets`` prepares the Arrow files of data files and Hub datasets;
            default: its own cache (``HF_DATASETS_CACHE``, ``~/.cache/huggingface/datasets``).

    Attributes:
        adapter_column: a column of the predict records naming the adapter that serves each row
            (``None``: none; the CLI's ``--adapter_column`` sets it). Each predict batch then carries
            the names as ``batch["adapter"]``, a list of strings, which the task modules'
            ``predict_step`` serves in one forward (:func:`lightning_peft.mixed_batch`).
        records: per split, its records (a sequence of dicts; a stream with ``streaming``).
        encoded: per split, its tokenized examples (a ``datasets.Dataset``, or a stream).
    """

    def __init__(
        self,
        *,
        dataset: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        val_split: float = 0.1,
        test_split: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.files = {"train": train_file, "validation": validation_file, "test": test_file, "predict": predict_file}
        if dataset is not None:
            if train_file is not None:
                raise ValueError(f"{owner}: give dataset or train_file, not both (got {dataset!r} and {train_file!r}).")
            check_dataset(dataset, field=f"{owner}.dataset")
        elif not any(self.files.values()):
            raise ValueError(
                f"{owner} has no data: set dataset ({describe_sources()}) or train_file "
                "(and/or validation_file, test_file, predict_file)."
            )
        for split, path in self.files.items():
            if path is not None and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{owner}.{split}_file={path!r} does not exist.")
        check_positive_int(owner, "max_length", max_length)
        check_positive_int(owner, "batch_size", batch_size)
        check_positive_int(owner, "shuffle_buffer", shuffle_buffer)
        _check_fraction(owner, "val_split", val_split)
        _check_fraction(owner, "test_split", test_split)
        if val_split + test_split >= 1:
            raise invalid(owner, "val_split + test_split", val_split + test_split, "below 1")
        if not isinstance(streaming, bool):
            raise invalid(owner, "streaming", streaming, "true or false")
        self.dataset = dataset
        self.tokenizer_source = resolve_model(tokenizer, field=f"{owner}.tokenizer") if tokenizer else None
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.val_split, self.test_split, self.seed = val_split, test_split, seed
        self.streaming, self.shuffle_buffer, self.cache_dir = streaming, shuffle_buffer, cache_dir
        self.adapter_column: str | None = None
        self.records: dict[str, Any] | None = None
        self.encoded: dict[str, Data] = {}
        self._tokenizer: Any = None
        self._from_dataset: set[str] = set()  # splits the dataset itself holds (not held out, not files)

    # ------------------------------------------------------------------ what subclasses define

    def required_columns(self, split: str) -> dict[str, str]:
        """``{option name: column}`` that each record of ``split`` must have."""
        raise NotImplementedError

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        """One record as token lists (and ints or strings) for :func:`pad_collate`."""
        raise NotImplementedError

    def check_records(self, records: dict[str, Any]) -> None:
        """Task-specific checks over all the records, before anything is tokenized (not run on streams)."""

    def encoding_key(self) -> tuple[Any, ...]:
        """What else ``encode`` depends on beyond the options and the tokenizer (part of the map cache key)."""
        return ()

    pad_left_for_predict = False

    # ------------------------------------------------------------------ reading

    def _source(self, split: str) -> tuple[str, str | None]:
        """(the option the records of ``split`` come from, its value)."""
        path = self.files[split]
        if path is not None:
            return f"{split}_file", path
        if split == "predict" and self.files["validation"] is not None:
            return "validation_file", self.files["validation"]
        if self.dataset is not None:
            return "dataset", self.dataset
        return "train_file", self.files["train"]

    def _describe(self, split: str) -> str:
        """Where the records of ``split`` come from, as the user configured it."""
        option, value = self._source(split)
        if option == "dataset":
            held = split if split in self._from_dataset else "train"
            return f"dataset {value!r}" + (f" (its {held!r} split)" if self._from_dataset - {"train"} else "")
        if value is None:
            return f"no {option} (only {', '.join(f'{s}_file={p!r}' for s, p in self.files.items() if p)})"
        return f"{option}={value!r}"

    def _open_file(self, split: str) -> Data:
        path = self.files[split]
        assert path is not None
        field = f"{type(self).__name__}.{split}_file"
        return open_file(path, field=field, streaming=self.streaming, cache_dir=self.cache_dir)

    def _read(self) -> dict[str, Any]:
        owner = type(self).__name__
        given: dict[str, Data] = {}
        if self.dataset is not None:
            splits = open_dataset(
                self.dataset, field=f"{owner}.dataset", streaming=self.streaming, cache_dir=self.cache_dir
            )
            if "train" not in splits:
                raise ValueError(
                    f"{owner}.dataset={self.dataset!r} has no 'train' split; its splits are: {', '.join(splits)}."
                )
            unused = [s for s in splits if s not in ("train", "validation", "test")]
            if unused:
                rank_zero_warn(
                    f"{owner}.dataset={self.dataset!r}: its splits {unused} are not used (train, validation and "
                    "test are); save the ones you need under those names."
                )
            given = {s: d for s, d in splits.items() if s in ("train", "validation", "test")}
            self._from_dataset = set(given)
        elif self.files["train"] is not None:
            given["train"] = self._open_file("train")
        for split in ("validation", "test", "predict"):
            if self.files[split] is not None:
                given[split] = self._open_file(split)
        for split, data in given.items():
            if not is_stream(data) and len(data) == 0:
                raise ValueError(f"{owner}: {self._describe(split)} holds no records.")
        pool = given.pop("train", None)
        records: dict[str, Any] = {}
        if pool is not None and is_stream(pool):
            for split, field in (("validation", "val_split"), ("test", "test_split")):
                fraction = getattr(self, field)
                if split not in given and fraction > 0:
                    raise ValueError(
                        f"{owner}.{field}={fraction}: a stream (streaming: true) cannot be split at random without "
                        f"reading it all; set {split}_file (or use a dataset with a {split!r} split), or "
                        f"{field}: 0."
                    )
            records["train"] = pool
        elif pool is not None:
            # Hold out validation / test records from the training pool, in a fixed random order.
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed)).tolist()
            total, start = len(pool), 0
            for split, fraction in (("test", self.test_split), ("validation", self.val_split)):
                if split not in given and fraction > 0 and total - start > 1:
                    count = max(1, math.floor(total * fraction))  # a fraction of all training records
                    records[split] = pool.select(order[start : start + count])
                    start += count
            if start < total:
                records["train"] = pool.select(order[start:])
        records.update(given)
        if "predict" not in records and "validation" in records:
            records["predict"] = records["validation"]
        wrapped = {s: d if is_stream(d) else Rows(d) for s, d in records.items()}
        return {split: wrapped[split] for split in SPLITS if split in wrapped}  # checked in this order

    def _missing(self, rows: Any, column: str) -> tuple[int, list[str]] | None:
        """(the index of the first record without ``column``, that record's columns), or None."""
        data = rows.data if isinstance(rows, Rows) else rows
        if is_stream(data):  # only its first record now; the rest as they are read (in _encode)
            first = next(iter(data), None)
            if first is None or first.get(column) is not None:
                return None
            return 0, [k for k, v in first.items() if v is not None]
        if hasattr(data, "column_names"):  # a datasets.Dataset: ask Arrow
            if len(data) == 0:
                return None
            if column not in data.column_names:
                return 0, list(data.column_names)
            at = first_null(data, column)
            return None if at is None else (at, [k for k, v in data[at].items() if v is not None])
        for number, row in enumerate(rows):
            if row.get(column) is None:
                return number, [k for k, v in row.items() if v is not None]
        return None

    def _column_error(self, split: str, option: str, column: str, number: int, columns: list[str]) -> ValueError:
        where = f" (record {number + 1})" if number else ""
        _, value = self._source(split)
        hint = ""
        if isinstance(value, str) and value.lower().endswith(".txt"):
            hint = " (a .txt file has one column, 'text': one example per non-empty line; use .csv or .jsonl for more)"
        return ValueError(
            f"{type(self).__name__}.{option}={column!r}: {self._describe(split)} has no column {column!r}{where}; "
            f"its columns are: {', '.join(map(str, columns))}{hint}."
        )

    def _columns(self, split: str) -> dict[str, str]:
        columns = self.required_columns(split)
        if split == "predict" and self.adapter_column is not None:
            columns = {**columns, "adapter_column": self.adapter_column}
        return columns

    def _check_columns(self, records: dict[str, Any]) -> None:
        for split, rows in records.items():
            for option, column in self._columns(split).items():
                missing = self._missing(rows, column)
                if missing is not None:
                    raise self._column_error(split, option, column, *missing)

    def _load(self) -> dict[str, Any]:
        if self.records is None:
            records = self._read()
            self._check_columns(records)
            self.check_records({s: r for s, r in records.items() if not is_stream(r)})
            self.records = records
        return self.records

    # ------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> Any:
        """The tokenizer option's, else the attached task module's."""
        if self._tokenizer is None:
            if self.tokenizer_source is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_source)
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                if module is None or getattr(module, "tokenizer", None) is None:
                    raise ValueError(
                        f"{type(self).__name__} needs a tokenizer: set tokenizer=<folder, Hub id or package:...>, or "
                        "use it with a task module that has one (SequenceClassification, CausalLM, Seq2SeqLM, "
                        "MultipleChoiceLM)."
                    )
                self._tokenizer = module.tokenizer
        return self._tokenizer

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        records = self._load()
        needed = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(
            stage, ("predict",)
        )
        for split in needed:
            if split == "validation" and stage == "fit" and split not in records:
                continue  # training without validation is allowed
            if split not in records:
                raise ValueError(self._missing_split(split))
            if split not in self.encoded:
                self.encoded[split] = self._tokenize(split)

    def _check_streamed(self, split: str, record: Record, number: int) -> dict[str, Any]:
        """A streamed record's columns, checked as it is read (a table's are checked up front)."""
        for option, column in self._columns(split).items():
            if record.get(column) is None:
                raise self._column_error(split, option, column, number, [k for k, v in record.items() if v is not None])
        return {}

    def _encode(self, record: Record, split: str) -> dict[str, Any]:
        example = self.encode(record, split)
        if split == "predict" and self.adapter_column is not None:
            example[ADAPTER_KEY] = str(record[self.adapter_column])
        return example

    def _tokenize(self, split: str) -> Data:
        """The split's records through ``map(encode)``: cached for file-backed tables, lazy for streams."""
        from datasets.fingerprint import Hasher

        records = self.records[split] if self.records is not None else None
        assert records is not None
        if is_stream(records):
            first = next(iter(records), None)
            if first is None:
                raise ValueError(f"{type(self).__name__}: {self._describe(split)} holds no records.")
            keys = list(self._encode(first, split))
            # Columns are checked in file order (so an error names the record's place), then shuffled.
            stream = records.map(functools.partial(self._check_streamed, split), with_indices=True)
            if split == "train":  # shuffled in a buffer that a resumed run replays (see ShuffledStream)
                encode = functools.partial(self._encode_at, split)
                return ShuffledStream(stream, buffer_size=self.shuffle_buffer, seed=self.seed, encode=encode)
            return stream.map(functools.partial(self._encode_at, split)).select_columns(keys)
        data = records.data
        settings = {k: v for k, v in sorted(vars(self).items()) if isinstance(v, _SIMPLE) and not k.startswith("_")}
        key = [data._fingerprint, type(self).__qualname__, split, settings, self.encoding_key(), self.tokenizer]
        with progress_bars(len(data) >= QUIET_BELOW["records"]):
            return data.map(
                functools.partial(self._encode_at, split),
                remove_columns=data.column_names,
                new_fingerprint=Hasher.hash(key),
                desc=f"Tokenizing {split}",
            )

    def _encode_at(self, split: str, record: Record) -> dict[str, Any]:
        """``_encode`` in the argument order ``map`` calls it."""
        return self._encode(record, split)

    def _missing_split(self, split: str) -> str:
        owner = type(self).__name__
        how = {
            "train": "set dataset or train_file",
            "validation": "set validation_file, or val_split > 0 with training records",
            "test": "set test_file, or test_split > 0 with training records",
            "predict": "set predict_file or validation_file",
        }[split]
        return f"{owner} has no {split} records: {how}."

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The split's loader (see :func:`~lightning_peft.tasks.batching.resumable_loader`)."""
        if split not in self.encoded:
            if self.records is not None and split not in self.records:
                raise ValueError(self._missing_split(split))
            self.setup({"train": "fit", "validation": "validate", "test": "test"}.get(split, "predict"))
        data = self.encoded[split]
        pad_id = self.tokenizer.pad_token_id
        left = split == "predict" and self.pad_left_for_predict
        return resumable_loader(
            data,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=functools.partial(pad_collate, pad_token_id=pad_id, left=left),  # picklable for workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.records is not None and "validation" not in self.records:
            return []  # no validation data: Lightning skips the validation loop
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def load_records(data: TextDataModule) -> dict[str, Any]:
    """Read and check every configured split now, as ``setup`` would: files, columns, the task's checks.

    The CLI calls it before a model is built, so a missing column fails in a second rather than
    after the model loads; ``setup`` then reuses the records.
    """
    return data._load()


__all__ = ["SPLITS", "TextDataModule", "load_records"]
