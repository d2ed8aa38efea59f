"""T-Few's multiple-choice losses against their formulas, written out token by token."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.losses import (
    length_normalized_loss,
    length_normalized_scores,
    token_log_probs,
    unlikelihood_loss,
)

B, C, T, V = 3, 4, 5, 7


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels with a prompt/padding region of -100 of varying length, correct choices."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, C, T), generator=g)
    for b in range(B):
        for c in range(C):
            start = (b + c) % 3  # 0, 1 or 2 ignored positions in front
            labels[b, c, :start] = -100
            if (b * C + c) % 5 == 0:
                labels[b, c, -1] = -100  # and some padding at the end
    targets = torch.tensor([0, 3, 1])
    return logits, labels, targets


def p(logits: torch.Tensor, b: int, c: int, t: int, token: int) -> float:
    row = [math.exp(float(z)) for z in logits[b, c, t]]
    return row[token] / sum(row)


def beta(logits: torch.Tensor, labels: torch.Tensor, b: int, c: int) -> float:
    scored = [(t, int(labels[b, c, t])) for t in range(T) if labels[b, c, t] != -100]
    return sum(math.log(p(logits, b, c, t, y)) for t, y in scored) / len(scored)


def test_length_normalized_scores_follow_the_formula() -> None:
    logits, labels, _ = batch()
    scores = length_normalized_scores(logits, labels)
    expected = torch.tensor([[beta(logits, labels, b, c) for c in range(C)] for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)


def test_length_normalized_loss_follows_the_formula() -> None:
    logits, labels, targets = batch()
    per_example = []
    for b in range(B):
        betas = [beta(logits, labels, b, c) for c in range(C)]
        correct = betas[int(targets[b])]
        per_example.append(-math.log(math.exp(correct) / sum(math.exp(s) for s in betas)))
    expected = torch.tensor(per_example, dtype=torch.float64)
    got = length_normalized_loss(logits, labels, targets, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(length_normalized_loss(logits, labels, targets), expected.mean())
    torch.testing.assert_close(length_normalized_loss(logits, labels, targets, reduction="sum"), expected.sum())


def test_unlikelihood_loss_follows_the_formula() -> None:
    logits, labels, targets = batch(1)
    per_example = []
    for b in range(B):
        total, count = 0.0, 0
        for c in range(C):
            if c == int(targets[b]):
                continue  # only wrong choices are pushed down
            for t in range(T):
                if labels[b, c, t] != -100:
                    total += math.log(1 - p(logits, b, c, t, int(labels[b, c, t])))
                    count += 1
        per_example.append(-total / count)
    expected = torch.tensor(per_example, dtype=torch.float64)
    torch.testing.assert_close(unlikelihood_loss(logits, labels, targets, reduction="none"), expected)
    torch.testing.assert_close(unlikelihood_loss(logits, labels, targets), expected.mean())


def test_unlikelihood_is_finite_for_a_certain_wrong_token() -> None:
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)
    labels = torch.tensor([[[0], [1]]])
    with torch.no_grad():
        logits[0, 1, 0, 1] = 60.0  # p = 1 - 2e-26: naive log(1 - p) is log(0) in float32
    loss = unlikelihood_loss(logits, labels, torch.tensor([0]))
    loss.backward()
    assert math.isclose(loss.item(), 60.0 - math.log(2), rel_tol=1e-5)
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1, 0, 1] > 0.99  # it is pushed down
    assert logits.grad[0, 0].abs().sum() == 0  # the correct choice is left alone


def test_scoring_ranks_choices_and_half_precision_is_upcast() -> None:
    logits, labels, targets = batch(2)
    # Make each example's correct choice the most likely sequence.
    for b in range(B):
        for t in range(T):
            y = int(labels[b, targets[b], t])
            if y != -100:
                logits[b, targets[b], t, y] += 20
    scores = length_normalized_scores(logits.to(torch.bfloat16), labels)
    assert scores.dtype == torch.float32 and torch.equal(scores.argmax(-1), targets)


def test_token_log_probs_mask_ignored_positions() -> None:
    logits, labels, _ = batch()
    log_probs, mask = token_log_probs(logits, labels)
    assert torch.equal(mask, labels != -100) and torch.all(log_probs[~mask] == 0)
    b, c, t = mask.nonzero()[0].tolist()
    assert math.isclose(log_probs[b, c, t].item(), math.log(p(logits, b, c, t, int(labels[b, c, t]))), rel_tol=1e-9)


def test_bad_inputs_are_named() -> None:
    logits, labels, targets = batch()
    with pytest.raises(ValueError, match=r"logits must be \(batch, choices, length, vocab\).*got logits \(3, 4, 5\)"):
        length_normalized_loss(logits[..., 0], labels, targets)
    with pytest.raises(ValueError, match=r"targets must be \(batch,\) = \(3,\); got \(2,\)"):
        unlikelihood_loss(logits, labels, targets[:2])
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        unlikelihood_loss(logits, labels, targets, reduction="avg")  # type: ignore[arg-type]
    labels[1, 2] = -100
    with pytest.raises(ValueError, match=r"needs at least one label other than ignore_index=-100; .* \(1, 2\) have"):
        length_normalized_scores(logits, labels)
