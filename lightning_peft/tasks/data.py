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
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.tasks import datasets
from lightning_peft.tasks.base import ADAPTER_KEY, load_tokenizer
from lightning_peft.tasks.datasets import Record
from lightning_peft.tasks.sources import resolve_model

SPLITS = ("train", "validation", "test", "predict")
IGNORE_INDEX = -100
#: Padding values per batch key; every other list-valued key pads with the tokenizer's pad id.
_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int, *, left: bool = False) -> dict[str, Any]:
    """Batch a list of encoded examples, padding token lists to the longest one in the batch.

    Ints become a tensor; strings and lists of strings stay Python lists. A token list per example
    becomes (B, T); a list of token lists per example (one per answer choice) becomes (B, C, T),
    every choice padded to the longest of the batch. ``left`` pads on the left (decoder-only generation).
    """
    batch: dict[str, Any] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        first = values[0]
        if isinstance(first, str) or (isinstance(first, list) and first and isinstance(first[0], str)):
            batch[key] = values
        elif isinstance(first, int):
            batch[key] = torch.tensor(values)
        else:
            pad = _PAD.get(key, pad_token_id)
            nested = bool(first) and isinstance(first[0], list)
            if nested and len({len(v) for v in values}) > 1:
                raise ValueError(f"pad_collate: {key!r} has {sorted({len(v) for v in values})} choices in one batch.")
            rows = [row for v in values for row in v] if nested else values
            width = max(len(row) for row in rows)
            padded = [[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows]
            tensor = torch.tensor(padded)  # (B, T), or (B * C, T) when nested
            batch[key] = tensor.view(len(values), -1, width) if nested else tensor  # (B, C, T)
    return batch


class EpochShuffle(Sampler[int]):
    """A shuffled order drawn from ``seed + epoch`` alone (as ``DistributedSampler`` draws it), so it resumes exactly.

    Lightning calls ``set_epoch`` before every epoch. Each epoch's permutation depends on nothing but
    the seed and that number: it draws nothing from the global RNG (which a resumed run restores
    before it builds its loaders, so dropout stays in step) and needs no generator history. The
    sampler (its epoch) and its iterators (their position) are ``Stateful`` for torchdata's
    ``StatefulDataLoader``, which Lightning saves in mid-epoch checkpoints.

    Args:
        size: the number of examples.
        seed: the base seed of every epoch's permutation.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> _Position:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return _Position(order.tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch = int(state_dict["epoch"])


class _Position:
    """An iterator over one epoch's order that saves and restores how far it got."""

    def __init__(self, order: list[int]) -> None:
        self.order, self.yielded = order, 0

    def __iter__(self) -> _Position:
        return self

    def __next__(self) -> int:
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.yielded = int(state_dict["yielded"])


def _check_fraction(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise invalid(owner, field, value, "a number in [0, 1)")


class TextDataModule(L.LightningDataModule):
    """Base of the text DataModules (the subclasses say which columns they need and how to encode).

    Args:
        dataset: a named offline dataset (``bbc_news``, ``sms_spam``, ``chatterbot``,
            ``bbc_news_choices``) used as the training records.
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
        seed: seed of the hold-out split and of the training data's shuffling order.
        num_workers: DataLoader worker processes.

    Attributes:
        adapter_column: a column of the predict records naming the adapter that serves each row
            (``None``: none; the CLI's ``--adapter_column`` sets it). Each predict batch then carries
            the names as ``batch["adapter"]``, a list of strings, which the task modules'
            ``predict_step`` serves in one forward (:func:`lightning_peft.mixed_batch`).
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
        self.adapter_column: str | None = None
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
            columns = self.required_columns(split)
            if split == "predict" and self.adapter_column is not None:
                columns = {**columns, "adapter_column": self.adapter_column}
            for option, column in columns.items():
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
                        "use it with a task module that has one (SequenceClassification, CausalLM, Seq2SeqLM, "
                        "MultipleChoiceLM)."
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
                self.encoded[split] = [self._encode(r, split) for r in self.records[split]]

    def _encode(self, record: Record, split: str) -> dict[str, Any]:
        example = self.encode(record, split)
        if split == "predict" and self.adapter_column is not None:
            example[ADAPTER_KEY] = str(record[self.adapter_column])
        return example

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
        """The split's loader: a ``StatefulDataLoader``, whose position and shuffling order Lightning
        saves in checkpoints and restores, so a run resumed from a mid-epoch checkpoint sees the
        same batches as an uninterrupted one (a plain DataLoader starts the epoch over)."""
        if split not in self.encoded:
            if self.records is not None and split not in self.records:
                raise ValueError(self._missing_split(split))
            self.setup({"train": "fit", "validation": "validate", "test": "test"}.get(split, "predict"))
        pad_id = self.tokenizer.pad_token_id
        left = split == "predict" and self.pad_left_for_predict
        with warnings.catch_warnings():
            # torchdata 0.11's constructor calls torch's deprecated set_vital; not about the user's run.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            return StatefulDataLoader(
                self.encoded[split],  # type: ignore[arg-type]
                batch_size=self.batch_size,
                sampler=EpochShuffle(len(self.encoded[split]), self.seed) if shuffle else None,
                # Worker seeds from a generator of its own too: building or iterating a loader then draws
                # nothing from the global RNG, so a resumed run's dropout stays in step with an uninterrupted one.
                generator=torch.Generator().manual_seed(self.seed),
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


class MultipleChoiceData(TextDataModule):
    """Multiple-choice questions for :class:`~lightning_peft.tasks.MultipleChoiceLM` (rank classification).

    Each record has a prompt, its answer choices and, except for ``predict``, the correct one. Every
    choice becomes one sequence in which only the choice's tokens are scored, so a batch holds C
    sequences per example:

    * decoder-only models: ``prompt + separator + choice``, with the prompt's labels -100:
      ``input_ids``, ``attention_mask`` and ``labels`` are (B, C, T);
    * encoder-decoder models: the prompt goes to the encoder once, ``input_ids`` and
      ``attention_mask`` (B, P), and each choice is a decoder target, ``labels`` (B, C, T)
      (tokenized as ``text_target``, so with the tokenizer's EOS; ``separator`` is not used).

    ``answer`` (B,) is the index of the correct choice; ``predict`` batches carry the prompt
    (``text``) and the choices' texts (``choices``) instead. Every batch is padded to its longest
    sequence (labels with -100). A prompt longer than the room ``max_length`` leaves loses its
    beginning (as lm-evaluation-harness does: the question nearest the answer stays), and all
    choices of an example see the same prompt tokens.

    Records: the choices column holds a list of strings, a JSON list in ``.jsonl`` / ``.json`` files
    and a JSON-encoded list (``["yes", "no"]``) in a ``.csv`` / ``.tsv`` cell. The answer column holds
    the 0-based index of the correct choice or its text (a string equal to one of the choices is that
    choice, else a whole number is an index). An example needs at least 2 choices, and all examples
    of a split the same number of them: a choice cannot be left out of the losses' softmax over
    choices, so data with varying counts is split by count instead.

    Args:
        prompt_column: the column holding the question / context.
        choices_column: the column holding the list of answer choices.
        answer_column: the column holding the correct choice (its index or its text).
        separator: text between the prompt and a choice (decoder-only models).
        max_choice_length: tokens per choice at most; below ``max_length``.
        encoder_decoder: whether the model is encoder-decoder (T5, BART); default: asks the task
            module (``MultipleChoiceLM`` reads the model's config).
        **kwargs: where the records come from (``dataset: bbc_news_choices`` has these columns),
            splits and batching: see :class:`TextDataModule`.
    """

    def __init__(
        self,
        *,
        prompt_column: str = "prompt",
        choices_column: str = "choices",
        answer_column: str = "answer",
        separator: str = " ",
        max_choice_length: int = 32,
        encoder_decoder: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        check_positive_int(owner, "max_choice_length", max_choice_length)
        if max_choice_length >= self.max_length:
            raise invalid(owner, "max_choice_length", max_choice_length, f"below max_length={self.max_length}")
        self.prompt_column, self.choices_column, self.answer_column = prompt_column, choices_column, answer_column
        self.separator, self.max_choice_length, self.encoder_decoder = separator, max_choice_length, encoder_decoder

    def required_columns(self, split: str) -> dict[str, str]:
        columns = {"prompt_column": self.prompt_column, "choices_column": self.choices_column}
        return columns if split == "predict" else {**columns, "answer_column": self.answer_column}

    # ------------------------------------------------------------------ reading choices and answers

    def _example(self, record: Record) -> str:
        # Held-out splits are shuffled, so a record is named by its prompt rather than its number.
        prompt = str(record[self.prompt_column])
        return f"the example with prompt {prompt[:40] + ('...' if len(prompt) > 40 else '')!r}"

    def _where(self, split: str, record: Record) -> str:
        return f"{self._describe(split)}, {self._example(record)}"

    def choices(self, record: Record, split: str) -> list[str]:
        """The record's answer choices, checked: a list of at least 2 non-empty strings (or numbers)."""
        owner, value = type(self).__name__, record[self.choices_column]
        parsed = value
        if isinstance(value, str):  # a CSV cell
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
        if not isinstance(parsed, list) or not all(
            isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in parsed
        ):
            raise ValueError(
                f"{owner}.choices_column={self.choices_column!r}: {self._where(split, record)} has {value!r}; "
                'expected a list of answer choices (a JSON list, in a CSV cell JSON-encoded: ["yes", "no"]).'
            )
        choices = [str(c) for c in parsed]
        if len(choices) < 2:
            raise ValueError(
                f"{owner}.choices_column={self.choices_column!r}: {self._where(split, record)} has "
                f"{len(choices)} choice(s) {choices!r}; multiple choice needs at least 2."
            )
        if any(not c.strip() for c in choices):
            raise ValueError(
                f"{owner}.choices_column={self.choices_column!r}: {self._where(split, record)} has an empty choice "
                f"in {choices!r}; every choice needs text to score."
            )
        return choices

    def answer(self, record: Record, split: str, choices: list[str]) -> int:
        """The index of the record's correct choice (the answer column holds it or the choice's text)."""
        owner, value = type(self).__name__, record[self.answer_column]
        field = f"{owner}.answer_column={self.answer_column!r}: {self._where(split, record)}"
        if isinstance(value, str) and value in choices:
            return choices.index(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{field} has the answer {value!r}, which is not one of its choices {choices!r}; give the text of a "
                "choice or its 0-based index."
            )
        if not 0 <= value < len(choices):
            raise ValueError(
                f"{field} has the answer index {value}, out of range for its {len(choices)} choices "
                f"(valid: 0 to {len(choices) - 1})."
            )
        return value

    def check_records(self, records: dict[str, list[Record]]) -> None:
        owner = type(self).__name__
        for split, rows in records.items():
            first: int | None = None
            for row in rows:
                choices = self.choices(row, split)
                if split != "predict":
                    self.answer(row, split, choices)
                if first is None:
                    first = len(choices)
                elif len(choices) != first:
                    raise ValueError(
                        f"{owner}.choices_column={self.choices_column!r}: every example of a split needs the same "
                        f"number of choices; {self._describe(split)} has {first} in its first example and "
                        f"{len(choices)} in {self._example(row)}. Split the data by number "
                        "of choices."
                    )

    # ------------------------------------------------------------------ encoding

    @property
    def is_encoder_decoder(self) -> bool:
        """``encoder_decoder``, else the attached task module's ``is_encoder_decoder``."""
        if self.encoder_decoder is not None:
            return self.encoder_decoder
        module = self.trainer.lightning_module if self.trainer is not None else None
        flag = getattr(module, "is_encoder_decoder", None)
        if flag is None:
            raise ValueError(
                f"{type(self).__name__}.encoder_decoder is None and there is no task module to ask; set it to true "
                "for encoder-decoder models (T5, BART) or false for decoder-only ones, or use MultipleChoiceLM."
            )
        return bool(flag)

    def encode(self, record: Record, split: str) -> dict[str, Any]:
        tokenizer, choices = self.tokenizer, self.choices(record, split)
        prompt = str(record[self.prompt_column])
        example: dict[str, Any]
        if self.is_encoder_decoder:
            ids = tokenizer(prompt)["input_ids"][-self.max_length :]
            targets = [tokenizer(text_target=c)["input_ids"][: self.max_choice_length] for c in choices]
            example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": targets}
        else:
            targets = [
                tokenizer(self.separator + c, add_special_tokens=False)["input_ids"][: self.max_choice_length]
                for c in choices
            ]
            room = self.max_length - max(len(t) for t in targets)  # >= 1: max_choice_length < max_length
            head = tokenizer(prompt)["input_ids"][-room:]
            sequences = [head + t for t in targets]
            example = {
                "input_ids": sequences,
                "attention_mask": [[1] * len(s) for s in sequences],
                "labels": [[IGNORE_INDEX] * len(head) + t for t in targets],
            }
        if split == "predict":
            example.update(text=prompt, choices=choices)
        else:
            example["answer"] = self.answer(record, split, choices)
        return example


def load_records(data: TextDataModule) -> dict[str, list[Record]]:
    """Read and check every configured split now, as ``setup`` would: files, columns, the task's checks.

    The CLI calls it before a model is built, so a missing column fails in a second rather than
    after the model loads; ``setup`` then reuses the records.
    """
    if data.records is None:
        records = data._read()
        data._check_columns(records)
        data.check_records(records)
        data.records = records
    return data.records
