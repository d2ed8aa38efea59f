"""The multiple-choice DataModule (rank classification over answer choices)."""

from __future__ import annotations

import json
from typing import Any

from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.tasks.batching import IGNORE_INDEX
from lightning_peft.tasks.data_module import TextDataModule
from lightning_peft.tasks.reading import Record


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

    With ``streaming: true`` each record's choices and answer are checked as it is read, and a
    batch that mixes choice counts is refused by :func:`pad_collate` (the up-front count check
    would read the whole stream).

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

    def check_records(self, records: dict[str, Any]) -> None:
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

    def encoding_key(self) -> tuple[Any, ...]:
        return (self.is_encoder_decoder,)

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
