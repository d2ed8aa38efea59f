"""Causal (decoder-only) and sequence-to-sequence language models: loss, perplexity, generation.

Instruction tuning needs nothing here: the datamodule sets the labels of prompt tokens to -100,
which transformers' loss and the perplexity metric both skip.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.text import Perplexity

from lightning_peft.core.config import check_positive, check_positive_int
from lightning_peft.tasks.base import TaskModule, load_model

IGNORE_INDEX = -100


class _LanguageModel(TaskModule):
    """What causal and seq2seq LMs share; ``shift`` says whether logits predict the next label.

    Args:
        model_name_or_path: a local folder, a ``.gguf`` file, ``package:<module>/<path>`` for a model
            installed as a Python package, or a Hugging Face Hub id.
        max_new_tokens: how many tokens ``predict`` generates at most.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with ``do_sample``). These three are not saved in
            checkpoints, so ``predict --ckpt_path ...`` takes them from the config or command line.
        learning_rate: AdamW's peak learning rate.
        **kwargs: ``dtype`` and the optimizer's options: see :class:`~lightning_peft.tasks.TaskModule`.
    """

    shift: bool = True
    not_hyperparameters = ("max_new_tokens", "do_sample", "temperature")

    def __init__(
        self,
        model_name_or_path: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        learning_rate: float = 2e-4,
        **kwargs: Any,
    ) -> None:
        check_positive_int(type(self).__name__, "max_new_tokens", max_new_tokens)
        check_positive(type(self).__name__, "temperature", temperature)
        super().__init__(model_name_or_path, learning_rate=learning_rate, **kwargs)
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature

    def build_model(self) -> torch.nn.Module:
        model = load_model(self.auto_class, self.source, self.hparams.dtype)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        return model

    def _evaluate(self, batch: dict[str, Any], perplexity: Perplexity, prefix: str) -> None:
        out = self.transformer(**self.model_inputs(batch))
        labels = batch["labels"]
        # Input-side methods (prompt tuning, P-tuning) put N virtual tokens before the input, so the
        # model returns N more positions than there are labels; they come first: keep the last T.
        logits = out.logits[:, -labels.shape[1] :].float()  # (B, T, V)
        if self.shift:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        perplexity.update(logits, labels)
        size = labels.shape[0]
        self.log(f"{prefix}loss", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{prefix}perplexity", perplexity, prog_bar=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_perplexity, "val_")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_perplexity, "test_")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Decoded continuations of a batch of prompts (new tokens only)."""
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            options["temperature"] = self.temperature
        out = self.transformer.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        if self.shift:  # decoder-only output repeats the prompt
            out = out[:, input_ids.shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate a response for each prompt of the batch (each through its own adapter if the batch names them)."""
        with self.row_adapters(batch) as names:
            responses = self.generate(batch["input_ids"], batch["attention_mask"])
        prompts = batch.get("text") or [None] * len(responses)
        rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        return self.tag_adapters(rows, names)


class CausalLM(_LanguageModel):
    """A decoder-only LM (``AutoModelForCausalLM``): plain-text or instruction tuning.

    Logs loss and perplexity (over the tokens that count: prompt tokens masked by the
    datamodule do not); ``predict`` generates a response per prompt.
    """

    auto_class = "AutoModelForCausalLM"
    shift = True


class Seq2SeqLM(_LanguageModel):
    """An encoder-decoder LM (``AutoModelForSeq2SeqLM``, T5 / BART style): source in, target out.

    Logs loss and perplexity over the target tokens; ``predict`` generates a target per source.
    """

    auto_class = "AutoModelForSeq2SeqLM"
    shift = False
