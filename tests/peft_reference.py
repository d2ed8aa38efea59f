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
