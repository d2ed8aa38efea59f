"""DataModules for text tasks: read records, split, tokenize, batch with dynamic padding.

Records come from a named offline dataset (``dataset: bbc_news``) or local files
(``train_file``, ``validation_file``, ``test_file``, ``predict_file``; see
:mod:`lightning_peft.tasks.datasets` for the formats). Without a validation (test) file, a
``val_split`` (``test_split``) fraction of the training records is held out, with a fixed seed.

The tokenizer is the task module's (``trainer.lightning_module.tokenizer``) unless ``tokenizer``
names one, so a config names the model once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.tasks import datasets
from lightning_peft.tasks.base import load_tokenizer
from lightning_peft.tasks.datasets import Record
from lightning_peft.tasks.sources import resolve_model

SPLITS = ("train", "validation", "test", "predict")
IGNORE_INDEX = -100
#: Padding values per batch key; every other list-valued key pads with the tokenizer's pad id.
_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int, *, left: bool = False) -> dict[str, Any]:
    """Batch a list of encoded examples, padding token lists to the longest one in the batch.

    Ints become a tensor, strings a list; ``left`` pads on the left (decoder-only generation).
    """
    batch: dict[str, Any] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], str):
            batch[key] = values
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            width, pad = max(len(v) for v in values), _PAD.get(key, pad_token_id)
            rows = [[pad] * (width - len(v)) + v if left else v + [pad] * (width - len(v)) for v in values]
            batch[key] = torch.tensor(rows)  # (B, T)
    return batch


def _check_fraction(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise invalid(owner, field, value, "a number in [0, 1)")


class TextDataModule(L.LightningDataModule):
    """Base of the text DataModules (the subclasses say which columns they need and how to encode).

    Args:
        dataset: a named offline dataset (``bbc_news``, ``sms_spam``, ``chatterbot``) used as
            the training records.
        train_file: training records (``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or ``.txt``).
        validation_file: validation records; default: ``val_split`` of the training records.
        test_file: test records; default: ``test_split`` of the training records.
        predict_file: records to predict for (only the input columns are needed); default: the
            validation records.
        tokenizer: a tokenizer folder, Hub id or ``package:`` path; default: the task module's.
        max_length: tokens per example at most (longer ones are truncated; shorter ones are only
            padded to the longest in their batch).
        batch_size: examples per batch.
        val_split: fraction of the training records held out for validation without a file.
        test_split: fraction of the training records held out for testing without a file.
        seed: seed of the hold-out split.
        num_workers: DataLoader worker processes.
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
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.files = {"train": train_file, "validation": validation_file, "test": test_file, "predict": predict_file}
        if dataset is not None:
            if train_file is not None:
                raise ValueError(f"{owner}: give dataset or train_file, not both (got {dataset!r} and {train_file!r}).")
            datasets.check_named(dataset, owner=owner)
        elif not any(self.files.values()):
            raise ValueError(
                f"{owner} has no data: set dataset (one of {', '.join(map(repr, datasets.NAMED))}) or train_file "
                "(and/or validation_file, test_file, predict_file)."
            )
        for split, path in self.files.items():
            if path is not None and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{owner}.{split}_file={path!r} does not exist.")
        check_positive_int(owner, "max_length", max_length)
        check_positive_int(owner, "batch_size", batch_size)
        _check_fraction(owner, "val_split", val_split)
        _check_fraction(owner, "test_split", test_split)
        if val_split + test_split >= 1:
            raise invalid(owner, "val_split + test_split", val_split + test_split, "below 1")
        self.dataset = dataset
        self.tokenizer_source = resolve_model(tokenizer, field=f"{owner}.tokenizer") if tokenizer else None
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.val_split, self.test_split, self.seed = val_split, test_split, seed
        self.records: dict[str, list[Record]] | None = None
        self.encoded: dict[str, list[dict[str, Any]]] = {}
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ what subclasses define

    def required_columns(self, split: str) -> dict[str, str]:
        """``{option name: column}`` that each record of ``split`` must have."""
        raise NotImplementedError

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        """One record as token lists (and ints or strings) for :func:`pad_collate`."""
        raise NotImplementedError

    def check_records(self, records: dict[str, list[Record]]) -> None:
        """Task-specific checks over all the records, before anything is tokenized."""

    pad_left_for_predict = False

    # ------------------------------------------------------------------ reading

    def _describe(self, split: str) -> str:
        """Where the records of ``split`` come from, as the user configured it."""
        path = self.files[split]
        if path is None and split == "predict" and self.files["validation"] is not None:
            split, path = "validation", self.files["validation"]
        elif path is None:  # held out of the training records
            if self.dataset is not None:
                return f"dataset {self.dataset!r}"
            split, path = "train", self.files["train"]
        return f"{split}_file={path!r}"

    def _read(self) -> dict[str, list[Record]]:
        owner = type(self).__name__
        pool: list[Record] = []
        if self.dataset is not None:
            pool = datasets.load_named(self.dataset, owner=owner)
        elif self.files["train"] is not None:
            pool = datasets.read_file(self.files["train"], field=f"{owner}.train_file")
        if (self.dataset or self.files["train"]) and not pool:
            raise ValueError(f"{owner}: {self._describe('train')} holds no records.")
        records: dict[str, list[Record]] = {}
        for split in ("validation", "test", "predict"):
            if self.files[split] is not None:
                records[split] = datasets.read_file(self.files[split], field=f"{owner}.{split}_file")
                if not records[split]:
                    raise ValueError(f"{owner}: {self._describe(split)} holds no records.")
        # Hold out validation / test records from the training pool, in a fixed random order.
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed)).tolist()
        pool = [pool[i] for i in order]
        total = len(pool)
        for split, fraction in (("test", self.test_split), ("validation", self.val_split)):
            if split not in records and fraction > 0 and len(pool) > 1:
                count = max(1, math.floor(total * fraction))  # a fraction of all training records
                records[split], pool = pool[:count], pool[count:]
        if pool:
            records["train"] = pool
        if "predict" not in records and "validation" in records:
            records["predict"] = records["validation"]
        return {split: records[split] for split in SPLITS if split in records}  # checked in this order

    def _check_columns(self, records: dict[str, list[Record]]) -> None:
        owner = type(self).__name__
        for split, rows in records.items():
            for option, column in self.required_columns(split).items():
                for number, row in enumerate(rows):
                    if column not in row or row[column] is None:
                        where = f" (record {number + 1})" if number else ""
                        raise ValueError(
                            f"{owner}.{option}={column!r}: {self._describe(split)} has no column {column!r}{where}; "
                            f"its columns are: {', '.join(map(str, row))}."
                        )

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
                        "use it with a task module that has one (SequenceClassification, CausalLM, Seq2SeqLM)."
                    )
                self._tokenizer = module.tokenizer
        return self._tokenizer

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        if self.records is None:
            records = self._read()
            self._check_columns(records)
            self.check_records(records)
            self.records = records
        needed = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(
            stage, ("predict",)
        )
        for split in needed:
            if split == "validation" and stage == "fit" and split not in self.records:
                continue  # training without validation is allowed
            if split not in self.records:
                raise ValueError(self._missing_split(split))
            if split not in self.encoded:
                self.encoded[split] = [self.encode(r, split) for r in self.records[split]]

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
        if split not in self.encoded:
            if self.records is not None and split not in self.records:
                raise ValueError(self._missing_split(split))
            self.setup({"train": "fit", "validation": "validate", "test": "test"}.get(split, "predict"))
        pad_id = self.tokenizer.pad_token_id
        left = split == "predict" and self.pad_left_for_predict
        return DataLoader(
            self.encoded[split],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
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


class TextClassificationData(TextDataModule):
    """Texts with class labels, for :class:`~lightning_peft.tasks.SequenceClassification`.

    Args:
        text_column: the column holding the text.
        label_column: the column holding the class (any value; compared as a string).
        labels: class names in label-id order; default: the sorted distinct labels in the data
            (numerically when all are integers).
        **kwargs: where the records come from, splits and batching: see :class:`TextDataModule`.
    """

    def __init__(
        self,
        *,
        text_column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_column, self.label_column = text_column, label_column
        self.labels: list[str] | None = [str(label) for label in labels] if labels is not None else None

    def required_columns(self, split: str) -> dict[str, str]:
        if split == "predict":
            return {"text_column": self.text_column}
        return {"text_column": self.text_column, "label_column": self.label_column}

    def check_records(self, records: dict[str, list[Record]]) -> None:
        owner = type(self).__name__
        found: dict[str, str] = {}  # label -> the split it was first seen in
        for split, rows in records.items():
            if split != "predict":
                for row in rows:
                    found.setdefault(str(row[self.label_column]), split)
        if self.labels is None:
            if len(found) < 2:
                raise ValueError(
                    f"{owner}.label_column={self.label_column!r} has only one class "
                    f"({', '.join(map(repr, found))}) in {self._describe('train')}; classification needs at least two."
                )
            numeric = all(label.lstrip("-").isdigit() for label in found)
            self.labels = sorted(found, key=int if numeric else str)
        else:
            unknown = [label for label in found if label not in self.labels]
            if unknown:
                where = self._describe(found[unknown[0]])
                raise ValueError(f"{owner}.labels={self.labels!r} lacks {unknown[0]!r}, found in {where}.")

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        assert self.labels is not None
        text = str(record[self.text_column])
        example: dict[str, Any] = dict(self.tokenizer(text, truncation=True, max_length=self.max_length))
        if split == "predict":
            example["text"] = text
        else:
            example["labels"] = self.labels.index(str(record[self.label_column]))
        return example


class CausalLMData(TextDataModule):
    """Instruction (prompt -> response) or plain-text data for :class:`~lightning_peft.tasks.CausalLM`.

    Instruction records are rendered with the tokenizer's chat template (a user turn, then the
    assistant's response) and the prompt's tokens get label -100, so only the response is learned.
    Without a chat template (or with ``chat_template: false``) the text is
    ``"{prompt}\\n{response}{eos}"``. With ``text_column`` set, each record is plain text and every
    token is learned. ``predict`` renders the prompt only (with the generation prompt) and pads left.

    Args:
        prompt_column: the column holding the instruction / question.
        response_column: the column holding the answer to learn.
        text_column: train on plain text from this column instead of prompt/response pairs.
        system_prompt: a system message put before each prompt.
        chat_template: use the tokenizer's chat template when it has one.
        mask_prompt: leave the prompt's tokens out of the loss.
        **kwargs: where the records come from (``dataset: chatterbot`` has prompt/response columns),
            splits and batching: see :class:`TextDataModule`.
    """

    pad_left_for_predict = True

    def __init__(
        self,
        *,
        prompt_column: str = "prompt",
        response_column: str = "response",
        text_column: str | None = None,
        system_prompt: str | None = None,
        chat_template: bool = True,
        mask_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt_column, self.response_column, self.text_column = prompt_column, response_column, text_column
        self.system_prompt, self.chat_template, self.mask_prompt = system_prompt, chat_template, mask_prompt

    def required_columns(self, split: str) -> dict[str, str]:
        if self.text_column is not None:
            return {"text_column": self.text_column}
        if split == "predict":
            return {"prompt_column": self.prompt_column}
        return {"prompt_column": self.prompt_column, "response_column": self.response_column}

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts are rendered with the tokenizer's chat template."""
        return self.text_column is None and self.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str, response: str | None) -> tuple[str, str]:
        """(prompt text, response text): their concatenation is the whole training example."""
        tokenizer = self.tokenizer
        if self.uses_chat_template:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": prompt})
            head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if response is None:
                return head, ""
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if not full.startswith(head):
                raise ValueError(
                    f"{type(self).__name__}: the tokenizer's chat template does not render the prompt with the "
                    "generation prompt as a prefix of the whole conversation, so the prompt tokens cannot be masked; "
                    "set chat_template: false."
                )
            return head, full[len(head) :]
        head = f"{self.system_prompt}\n\n{prompt}\n" if self.system_prompt else f"{prompt}\n"
        return head, "" if response is None else f"{response}{tokenizer.eos_token or ''}"

    def _ids(self, text: str, *, first: bool) -> list[int]:
        # Special tokens (BOS) only at the start of plain text; chat templates write their own.
        add = first and not self.uses_chat_template
        return self.tokenizer(text, add_special_tokens=add)["input_ids"] if text else []

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        if self.text_column is not None:
            text = str(record[self.text_column])
            if split == "predict":
                ids = self._ids(text, first=True)[: self.max_length]
                return {"input_ids": ids, "attention_mask": [1] * len(ids), "text": text}
            ids = self._ids(text + (self.tokenizer.eos_token or ""), first=True)[: self.max_length]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
        prompt = str(record[self.prompt_column])
        if split == "predict":
            head, _ = self.render(prompt, None)
            ids = self._ids(head, first=True)[-self.max_length :]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "text": prompt}
        head, tail = self.render(prompt, str(record[self.response_column]))
        prompt_ids, response_ids = self._ids(head, first=True), self._ids(tail, first=False)
        ids = (prompt_ids + response_ids)[: self.max_length]
        masked = [IGNORE_INDEX] * len(prompt_ids) if self.mask_prompt else prompt_ids
        labels = (masked + response_ids)[: self.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # An example whose prompt fills max_length has nothing left to learn: drop it (its loss is 0/0).
        for split in ("train", "validation", "test"):
            rows = self.encoded.get(split)
            if rows and any("labels" in r for r in rows):
                kept = [r for r in rows if any(t != IGNORE_INDEX for t in r["labels"])]
                if len(kept) < len(rows):
                    rank_zero_warn(
                        f"{type(self).__name__}: {len(rows) - len(kept)} {split} examples have no response token "
                        f"within max_length={self.max_length} and are skipped; raise max_length."
                    )
                    if not kept:
                        raise ValueError(
                            f"{type(self).__name__}: no {split} example keeps a response token within "
                            f"max_length={self.max_length}; raise max_length."
                        )
                    self.encoded[split] = kept


class Seq2SeqData(TextDataModule):
    """Source -> target pairs for :class:`~lightning_peft.tasks.Seq2SeqLM` (T5 / BART style).

    Args:
        source_column: the column holding the input text (truncated to ``max_length`` tokens).
        target_column: the column holding the text to generate.
        max_target_length: target tokens per example at most.
        **kwargs: where the records come from, splits and batching: see :class:`TextDataModule`.
    """

    def __init__(
        self,
        *,
        source_column: str = "source",
        target_column: str = "target",
        max_target_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int(type(self).__name__, "max_target_length", max_target_length)
        self.source_column, self.target_column, self.max_target_length = source_column, target_column, max_target_length

    def required_columns(self, split: str) -> dict[str, str]:
        if split == "predict":
            return {"source_column": self.source_column}
        return {"source_column": self.source_column, "target_column": self.target_column}

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        source = str(record[self.source_column])
        example: dict[str, Any] = dict(self.tokenizer(source, truncation=True, max_length=self.max_length))
        if split == "predict":
            example["text"] = source
        else:
            target = self.tokenizer(
                text_target=str(record[self.target_column]), truncation=True, max_length=self.max_target_length
            )
            example["labels"] = target["input_ids"]
        return example
