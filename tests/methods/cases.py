"""Per-method test cases: the options each registered method gets on the tiny models.

The shared tester runs every registered method over every tiny architecture with these options;
a method without a case here fails ``test_every_method_has_a_case``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    """How the shared tester exercises one method.

    Args:
        options: keyword options for ``inject`` given the architecture name.
        identity_at_init: the injected model computes exactly the base model before training.
        archs: architectures the method supports (all by default).
    """

    options: Callable[[str], dict[str, Any]] = lambda arch: {}
    identity_at_init: bool = True
    archs: tuple[str, ...] = field(default=("llama", "gpt2", "bert", "roberta", "t5", "bart"))


CASES: dict[str, Case] = {
    "lora": Case(options=lambda arch: {"r": 4, "alpha": 8}),
    "ia3": Case(),
    "bottleneck": Case(options=lambda arch: {"placement": "both", "reduction_factor": 8, "activation": "gelu"}),
    # Defaults orth_reg_weight=0.5, delta_t=1: the penalty and a reallocation every step are exercised;
    # init_r=3 leaves lora_E's size indivisible by 2 ranks (ZeRO-3 pads its partitions).
    "adalora": Case(options=lambda arch: {"init_r": 3, "target_r": 2, "alpha": 8}),
    # LLaMA and T5 have no bias terms for BitFit to train (tests/methods/test_bitfit.py checks the error).
    "bitfit": Case(archs=("gpt2", "bert", "roberta", "bart")),
    "last_k": Case(options=lambda arch: {"k": 1}),
    "topk": Case(options=lambda arch: {"fraction": 0.05}),
    # Input-side methods add virtual tokens: the model differs from the base from the start.
    "prompt_tuning": Case(options=lambda arch: {"num_virtual_tokens": 3}, identity_at_init=False),
    "p_tuning": Case(
        options=lambda arch: {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8},
        identity_at_init=False,
    ),
    "prefix_tuning": Case(
        options=lambda arch: {"num_virtual_tokens": 3, "projection": True, "projection_hidden_size": 8},
        identity_at_init=False,
    ),
    # Rows of token ids the tiny models' inputs hold; tied output layers (gpt2, t5, bart) read the same rows.
    "trainable_tokens": Case(options=lambda arch: {"token_indices": [3, 5, 7]}),
}
