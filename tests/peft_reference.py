"""Helpers for parity tests against Hugging Face peft (a test-only dependency)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import lightning_peft as lp


def copy_into_peft(ours: nn.Module, peft_model: nn.Module, rename: Callable[[str, str], str]) -> int:
    """Copy every adapter tensor of ``ours`` into ``peft_model``; returns how many were copied.

    ``rename(module_path, local_name)`` gives the peft parameter name (under ``base_model.model.``).
    Fails if a tensor has no counterpart, so a parity test cannot pass by copying nothing.
    """
    targets = dict(peft_model.named_parameters())
    copied = 0
    for name, tensor in lp.trainable_state_dict(ours).items():
        module, _, local = name.rpartition(".")
        key = "base_model.model." + rename(module, local)
        assert key in targets, f"peft has no parameter {key} (for our {name})"
        with torch.no_grad():
            targets[key].copy_(tensor.reshape(targets[key].shape))
        copied += 1
    assert copied, "nothing was copied"
    return copied


def randomize_adapter(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero adapter weights, so parity compares real updates rather than two identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in lp.trainable_state_dict(model).items():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * std)


def skip_if_peft_scales_svd_twice(combination: str, adapters: int) -> None:
    """Skip an SVD-combination parity check against a peft that scaled each adapter twice.

    peft before 0.21 weighted each adapter's delta by ``weight * scaling`` and then took a delta
    that ``get_delta_weight`` had already scaled (fixed in 0.21: ``valid_weights.append(weight)``).
    lightning_peft follows the fixed formula; the run on the newest peft checks it. One adapter is
    a linear combination in every peft, so it is still compared.
    """
    import peft
    import pytest
    from packaging.version import Version

    if combination.endswith("svd") and adapters > 1 and Version(peft.__version__) < Version("0.21"):
        pytest.skip(f"peft {peft.__version__} scales each adapter twice in {combination!r} (fixed in peft 0.21)")
