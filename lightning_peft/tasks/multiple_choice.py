"""Multiple choice with a language model (rank classification), trained with T-Few's losses.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (T-Few). The LM scores every answer choice as a continuation of the prompt (decoder-only:
``prompt + choice``, shifted; encoder-decoder: the prompt to the encoder, the choice as the
decoder's target) and the prediction is the choice with the best length-normalized score
``beta(y) = (1 / T) sum_t log p(y_t)``. Training minimizes

    L = w_LM L_LM + w_UL L_UL + w_LN L_LN

with T-Few's unit weights by default: ``L_LM`` the cross-entropy of the correct choice's tokens
(averaged over the batch's tokens, as transformers' loss is), ``L_UL`` the unlikelihood of the
wrong choices' tokens, ``L_LN`` the cross-entropy of the correct choice under a softmax over the
choices' length-normalized scores. The last two and ``beta`` are the pure functions of
:mod:`lightning_peft.losses`. With ``unlikelihood_weight=0`` and ``length_normalized_weight=0`` it
is ordinary fine-tuning on the correct answer, still evaluated by rank classification.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_peft.core.config import invalid
from lightning_peft.losses import length_normalized_loss, length_normalized_scores, token_log_probs, unlikelihood_loss
from lightning_peft.tasks.base import TaskModule, _load_error, _quiet_transformers, load_model
from lightning_peft.tasks.data import IGNORE_INDEX

#: Loss terms by the name they are logged under (``train_<name>``), with their weight option.
TERMS = {
    "lm_loss": "lm_weight",
    "unlikelihood_loss": "unlikelihood_weight",
    "length_normalized_loss": "length_normalized_weight",
}


class MultipleChoiceLM(TaskModule):
    """Score answer choices with a decoder-only or encoder-decoder LM; T-Few's losses as options.

    Takes the batches of :class:`~lightning_peft.tasks.MultipleChoiceData`: ``labels`` (B, C, T)
    with -100 on the prompt and padding, ``answer`` (B,). The architecture follows the model's
    config (``is_encoder_decoder``): ``AutoModelForSeq2SeqLM`` for T5 / BART, else
    ``AutoModelForCausalLM``. Logs ``train_loss`` and each term it weighs, unweighted
    (``train_lm_loss``, ``train_unlikelihood_loss``, ``train_length_normalized_loss``); ``val_`` / ``test_`` loss and
    accuracy (argmax of the length-normalized scores); ``predict`` returns the chosen answer, its
    index and every choice's score.

    Args:
        model_name_or_path: a local folder, a ``.gguf`` file, ``package:<module>/<path>`` for a model
            installed as a Python package, or a Hugging Face Hub id.
        lm_weight: weight of ``L_LM``, the cross-entropy of the correct choice (T-Few: 1).
        unlikelihood_weight: weight of ``L_UL``, the unlikelihood of the wrong choices (T-Few: 1).
        length_normalized_weight: weight of ``L_LN``, the softmax over length-normalized
            choice scores (T-Few: 1).
        learning_rate: AdamW's peak learning rate (T-Few trains (IA)^3 at 3e-3).
        **kwargs: ``dtype`` and the optimizer's options: see :class:`~lightning_peft.tasks.TaskModule`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        lm_weight: float = 1.0,
        unlikelihood_weight: float = 1.0,
        length_normalized_weight: float = 1.0,
        learning_rate: float = 3e-3,
        **kwargs: Any,
    ) -> None:
        weights = {"lm_weight": lm_weight, "unlikelihood_weight": unlikelihood_weight}
        weights["length_normalized_weight"] = length_normalized_weight
        for field, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise invalid(type(self).__name__, field, value, "a finite number >= 0")
        if not any(weights.values()):
            raise ValueError(
                f"{type(self).__name__}: lm_weight, unlikelihood_weight and length_normalized_weight are all 0; "
                "at least one loss term needs a positive weight."
            )
        super().__init__(model_name_or_path, learning_rate=learning_rate, **kwargs)
        self.weights = {term: float(weights[field]) for term, field in TERMS.items()}
        self._encoder_decoder: bool | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model is encoder-decoder, from its config (read once; no weights are loaded)."""
        if self._encoder_decoder is None:
            from transformers import AutoConfig

            try:
                with _quiet_transformers():
                    config = AutoConfig.from_pretrained(self.source.path, **self.source.kwargs)
            except OSError as err:
                raise _load_error(self.source, "config", err) from err
            self._encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        return self._encoder_decoder

    def build_model(self) -> torch.nn.Module:
        auto_class = "AutoModelForSeq2SeqLM" if self.is_encoder_decoder else "AutoModelForCausalLM"
        model = load_model(auto_class, self.source, self.hparams.dtype)
        self.val_accuracy, self.test_accuracy = MeanMetric(), MeanMetric()
        return model

    # ------------------------------------------------------------------ scoring

    def choice_logits(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Logits (B, C, T', V) and the labels (B, C, T') they score: position t scores label t.

        For decoder-only models T' < T: the leading positions where no choice of the batch has a
        scored token are left out.
        """
        labels = batch["labels"]
        size, choices, length = labels.shape
        if batch["input_ids"].dim() != (2 if self.is_encoder_decoder else 3):
            model, encoding = (
                ("encoder-decoder", "decoder-only") if self.is_encoder_decoder else ("decoder-only", "encoder-decoder")
            )
            raise ValueError(
                f"{type(self).__name__}: the model is {model} but the batch is encoded for {encoding} models "
                f"(input_ids {tuple(batch['input_ids'].shape)}); leave MultipleChoiceData.encoder_decoder at null "
                "so that it follows the model."
            )
        if self.is_encoder_decoder:
            # The prompt is encoded once per choice: plain calls keep working under input-side methods' hooks.
            inputs = {k: batch[k].repeat_interleave(choices, 0) for k in ("input_ids", "attention_mask")}  # (B*C, P)
            logits = self.transformer(**inputs, labels=labels.flatten(0, 1)).logits
            logits = logits[:, -length:]  # (B*C, T, V): label positions only, whatever a method puts before them
        else:
            flat = {k: batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask")}  # (B*C, T)
            # Only positions from the batch's first scored token on need logits (prompts are often long
            # and answers short): keep = T - start + 1 positions score labels[start:]. Virtual tokens of
            # input-side methods come first, so slicing from the end drops them too.
            start = max(int((labels != IGNORE_INDEX).int().argmax(-1).min()), 1)
            keep = length - start + 1
            forward = self.transformer.forward
            options = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(forward).parameters else {}
            logits = self.transformer(**flat, **options).logits[:, -keep:]  # (B*C, keep, V)
            logits, labels = logits[:, :-1], labels[..., start:]  # position t predicts token t + 1
        return logits.reshape(size, choices, -1, logits.shape[-1]), labels

    def loss_terms(self, logits: Tensor, labels: Tensor, answer: Tensor) -> dict[str, Tensor]:
        """The weighted loss (``"loss"``) and each term with a non-zero weight, unweighted."""
        terms: dict[str, Tensor] = {}
        if self.weights["lm_loss"]:
            rows = torch.arange(len(answer), device=answer.device)
            log_probs, mask = token_log_probs(logits[rows, answer], labels[rows, answer])  # (B, T): correct choice
            terms["lm_loss"] = -log_probs.sum() / mask.sum().clamp(min=1)
        if self.weights["unlikelihood_loss"]:
            terms["unlikelihood_loss"] = unlikelihood_loss(logits, labels, answer)
        if self.weights["length_normalized_loss"]:
            terms["length_normalized_loss"] = length_normalized_loss(logits, labels, answer)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, **terms}  # type: ignore[dict-item]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, labels = self.choice_logits(batch)
        terms = self.loss_terms(logits, labels, batch["answer"])
        size = len(batch["answer"])
        self.log("train_loss", terms["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train_{k}": v for k, v in terms.items() if k != "loss"}, batch_size=size)
        return terms["loss"]

    def _evaluate(self, batch: dict[str, Any], accuracy: MeanMetric, prefix: str) -> None:
        logits, labels = self.choice_logits(batch)
        answer = batch["answer"]
        loss = self.loss_terms(logits, labels, answer)["loss"]
        correct = length_normalized_scores(logits, labels).argmax(-1) == answer  # (B,)
        accuracy.update(correct.float())
        self.log(f"{prefix}loss", loss, prog_bar=True, batch_size=len(answer))
        self.log(f"{prefix}accuracy", accuracy, prog_bar=True, batch_size=len(answer))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val_")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test_")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The chosen answer per prompt, its index and the length-normalized score of every choice
        (each prompt through its own adapter if the batch names them)."""
        with self.row_adapters(batch, repeat=batch["labels"].shape[1]) as names:  # the model sees B * C rows
            scores = length_normalized_scores(*self.choice_logits(batch))  # (B, C)
        prompts = batch.get("text") or [None] * len(scores)
        choices = batch.get("choices") or [[None] * scores.shape[1]] * len(scores)
        rows = [
            {"prompt": p, "answer": c[i], "answer_index": i, "scores": [round(s, 4) for s in row]}
            for p, c, i, row in zip(prompts, choices, scores.argmax(-1).tolist(), scores.tolist(), strict=True)
        ]
        return self.tag_adapters(rows, names)
