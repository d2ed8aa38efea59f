"""Text DataModules for classification, causal LM (instruction or plain text) and seq2seq tasks."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_peft.core.config import check_positive_int
from lightning_peft.tasks.batching import IGNORE_INDEX
from lightning_peft.tasks.data_module import TextDataModule
from lightning_peft.tasks.reading import QUIET_BELOW, Record, is_stream, progress_bars


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
        if self.streaming and self.labels is None:
            raise ValueError(
                f"{type(self).__name__}.labels is None with streaming: true; the classes of a stream cannot be read "
                'without reading it all: give them in label-id order, e.g. labels: ["neg", "pos"].'
            )

    def required_columns(self, split: str) -> dict[str, str]:
        if split == "predict":
            return {"text_column": self.text_column}
        return {"text_column": self.text_column, "label_column": self.label_column}

    def check_records(self, records: dict[str, Any]) -> None:
        owner = type(self).__name__
        found: dict[str, str] = {}  # label -> the split it was first seen in
        for split, rows in records.items():
            if split != "predict":
                values = rows.data[self.label_column] if hasattr(rows, "data") else [r[self.label_column] for r in rows]
                for value in values:
                    found.setdefault(str(value), split)
        if self.labels is None and not found:
            sources = ", ".join(f"{s}_file={p!r}" for s, p in self.files.items() if p) or "no file"
            raise ValueError(
                f"{owner}.labels is not set and there are no labelled records to read the classes from (only "
                f"{sources}, whose records need no {self.label_column!r} column). Give the classes in the label-id "
                'order the model was trained with: --data.labels \'["neg", "pos"]\' on the command line, '
                'labels: ["neg", "pos"] in a config (a checkpoint of fit records them in '
                "hyper_parameters.labels), or a train_file / validation_file to read them from."
            )
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
            label = str(record[self.label_column])
            if label not in self.labels:  # a streamed record: its label was not checked up front
                raise ValueError(
                    f"{type(self).__name__}.labels={self.labels!r} lacks {label!r}, found in {self._describe(split)}."
                )
            example["labels"] = self.labels.index(label)
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
        self._filtered: set[str] = set()  # splits whose examples without a response token were dropped

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
            if rows is None or split in self._filtered:
                continue
            self._filtered.add(split)
            if is_stream(rows):  # not counted: a stream is filtered as it is read
                self.encoded[split] = rows.filter(_learns_something, input_columns="labels")
                continue
            with progress_bars(len(rows) >= QUIET_BELOW["records"]):
                kept = rows.filter(_learns_something, input_columns="labels")
            if len(kept) < len(rows):
                rank_zero_warn(
                    f"{type(self).__name__}: {len(rows) - len(kept)} {split} examples have no response token "
                    f"within max_length={self.max_length} and are skipped; raise max_length."
                )
                if not len(kept):
                    raise ValueError(
                        f"{type(self).__name__}: no {split} example keeps a response token within "
                        f"max_length={self.max_length}; raise max_length."
                    )
                self.encoded[split] = kept


def _learns_something(labels: list[int]) -> bool:
    return any(t != IGNORE_INDEX for t in labels)


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
