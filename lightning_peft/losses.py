"""Training losses for multiple-choice tasks from T-Few (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"), as pure functions.

Every example comes with ``C`` answer choices, each scored as a target sequence given the input;
``targets`` says which choice is correct. With ``log p(y_t)`` the model's log-probability of a
choice's t-th token (given the input and the choice's earlier tokens) and ``T`` its length::

    beta(y)   = (1 / T) sum_t log p(y_t)                                 length-normalized score
    L_LN      = -log( exp(beta(y_correct)) / sum_c exp(beta(y_c)) )      length-normalized loss
    L_UL      = -sum_{c wrong} sum_t log(1 - p(y_c,t)) / sum_{c wrong} T_c   unlikelihood loss

T-Few trains with ``L_LM + L_UL + L_LN`` (``L_LM``: the usual cross-entropy of the correct
choice) and predicts ``argmax_c beta(y_c)``.

Shapes: ``logits`` (B, C, T, V) and ``labels`` (B, C, T) are aligned, so ``logits[..., t, :]``
scores ``labels[..., t]``: for a causal LM pass ``logits[..., :-1, :]`` and ``labels[..., 1:]``.
Positions whose label is ``ignore_index`` (prompt, padding) are not scored. ``targets`` (B,) holds
the index of the correct choice. Computation runs in float32 (or float64) whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def _check(logits: Tensor, labels: Tensor, targets: Tensor | None = None, reduction: str = "mean") -> None:
    if logits.dim() != 4 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            "logits must be (batch, choices, length, vocab) and labels (batch, choices, length); "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    if targets is not None and targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (batch,) = {tuple(logits.shape[:1])}; got {tuple(targets.shape)}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}; got {reduction!r}.")


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def _float(logits: Tensor) -> Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def token_log_probs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``log p(y_t)`` at every position (0 where not scored) and the mask of scored positions.

    Args:
        logits: (..., T, V) scores aligned with ``labels``.
        labels: (..., T) token ids, ``ignore_index`` where nothing is scored.
        ignore_index: the label that marks unscored positions.
    """
    mask = labels != ignore_index
    flat = _float(logits).reshape(-1, logits.shape[-1])
    nll = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return -nll.view(labels.shape), mask


def length_normalized_scores(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``beta(y_c) = (1 / T_c) sum_t log p(y_c,t)`` for every choice: (B, C); rank choices by it.

    Raises:
        ValueError: for mis-shaped inputs, or a choice without any scored token (its score would
            be 0, i.e. probability 1, and it would win every comparison).
    """
    _check(logits, labels)
    log_probs, mask = token_log_probs(logits, labels, ignore_index)
    lengths = mask.sum(-1)  # (B, C)
    if bool((lengths == 0).any()):
        empty = [tuple(i) for i in (lengths == 0).nonzero().tolist()[:3]]
        raise ValueError(
            f"every answer choice needs at least one label other than ignore_index={ignore_index}; "
            f"(example, choice) {', '.join(map(str, empty))} have none."
        )
    return log_probs.sum(-1) / lengths


def length_normalized_loss(
    logits: Tensor, labels: Tensor, targets: Tensor, ignore_index: int = -100, reduction: Reduction = "mean"
) -> Tensor:
    """``L_LN``: cross-entropy of the correct choice under a softmax over length-normalized scores.

    Args:
        logits: (B, C, T, V), aligned with ``labels``.
        labels: (B, C, T), ``ignore_index`` on unscored positions.
        targets: (B,) index of the correct choice.
        ignore_index: the label that marks unscored positions.
        reduction: ``"mean"`` over examples, ``"sum"``, or ``"none"`` for a (B,) tensor.
    """
    _check(logits, labels, targets, reduction)
    scores = length_normalized_scores(logits, labels, ignore_index)  # (B, C)
    return F.cross_entropy(scores, targets, reduction=reduction)


def unlikelihood_loss(
    logits: Tensor, labels: Tensor, targets: Tensor, ignore_index: int = -100, reduction: Reduction = "mean"
) -> Tensor:
    """``L_UL``: pushes down the probability of every token of every wrong choice.

    Per example, ``-sum log(1 - p)`` over the scored tokens of its wrong choices, divided by their
    number (0 for an example without wrong choices). ``log(1 - p_y)`` is computed stably as
    ``logsumexp_{v != y} z_v - logsumexp_v z_v``, so a wrong token with ``p`` near 1 gets a finite
    loss and gradient.

    Args:
        logits: (B, C, T, V), aligned with ``labels``.
        labels: (B, C, T), ``ignore_index`` on unscored positions.
        targets: (B,) index of the correct choice.
        ignore_index: the label that marks unscored positions.
        reduction: ``"mean"`` over examples, ``"sum"``, or ``"none"`` for a (B,) tensor.
    """
    _check(logits, labels, targets, reduction)
    z = _float(logits)
    batch, choices = labels.shape[:2]
    wrong = torch.ones(batch, choices, dtype=torch.bool, device=labels.device)
    wrong[torch.arange(batch, device=labels.device), targets] = False
    mask = (labels != ignore_index) & wrong[..., None]  # (B, C, T)
    index = labels.masked_fill(labels == ignore_index, 0).unsqueeze(-1)  # (B, C, T, 1)
    others = z.scatter(-1, index, float("-inf"))  # every logit but the label's
    log_one_minus_p = others.logsumexp(-1) - z.logsumexp(-1)  # (B, C, T)
    total = (log_one_minus_p.masked_fill(~mask, 0.0)).sum((1, 2))
    per_example = -total / mask.sum((1, 2)).clamp(min=1)
    return _reduce(per_example, reduction)
