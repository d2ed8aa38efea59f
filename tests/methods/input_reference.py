"""Parity helpers for the input-side methods (prompt tuning, P-tuning, prefix tuning) against peft.

peft keeps these methods' parameters in ``prompt_encoder.default.*`` and a trained head in
``base_model.<head>.modules_to_save.default.*``; ours sit in the transformers model as
``<method>.*`` and ``<head>.base_layer.*``. For seq2seq models peft allocates 2N virtual-token rows
and uses the first N; we copy into those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
import torch
from torch import nn

import lightning_peft as lp
from tests import tiny
from tests.peft_reference import randomize_adapter

#: peft task type per (family, task): what the peft wrapper does with the inputs.
PEFT_TASK = {
    ("decoder", "lm"): "CAUSAL_LM",
    ("decoder", "classify"): "SEQ_CLS",
    ("encoder", "lm"): "FEATURE_EXTRACTION",  # prepends and calls the model, as for BertForMaskedLM
    ("encoder", "classify"): "SEQ_CLS",
    ("seq2seq", "lm"): "SEQ_2_SEQ_LM",
}


def copy_to_peft(ours: nn.Module, reference: nn.Module, rename: Callable[[str], str]) -> int:
    """Copy every trainable tensor of ``ours`` into ``reference``; ``rename`` maps the adapter-local
    name (``embedding``, ``mlp.0.weight``) to peft's under ``prompt_encoder.default.``."""
    targets = dict(reference.named_parameters())
    method = lp.get_info(ours).method
    copied = 0
    for name, tensor in lp.trainable_state_dict(ours).items():
        if ".base_layer." in name:
            module, local = name.split(".base_layer.")
            key = f"base_model.{module}.modules_to_save.default.{local}"
        else:
            owner, _, local = name.partition(".")
            assert owner == method, name
            key = "prompt_encoder.default." + rename(local)
        assert key in targets, f"peft has no parameter {key} (for our {name})"
        with torch.no_grad():
            target = targets[key]
            target[: tensor.shape[0]].copy_(tensor) if target.dim() == 2 else target.copy_(tensor)
        copied += 1
    assert copied, "nothing was copied"
    return copied


def twins(
    method: str,
    arch: str,
    task: str,
    options: dict[str, Any],
    peft_config: Callable[..., peft.PeftConfig],
    rename: Callable[[str], str],
    seed: int = 0,
    prepare: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Our injected model and peft's, with the same random adapter (and head) weights."""
    ours = lp.inject(tiny.build(arch, task), method, **options)
    randomize_adapter(ours, seed=seed)
    if prepare is not None:
        prepare(ours)
    task_type = PEFT_TASK[(tiny.FAMILIES[arch], task)]
    reference = peft.get_peft_model(tiny.build(arch, task), peft_config(task_type=task_type)).eval()
    copy_to_peft(ours, reference, rename)
    return ours, reference


def lm_labels(arch: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels for a loss: the input ids (decoder and encoder) or the decoder ids (seq2seq)."""
    labels = batch["decoder_input_ids" if tiny.FAMILIES[arch] == "seq2seq" else "input_ids"].clone()
    labels[0, -1] = -100  # an ignored position of the caller's own
    return labels


def assert_same_outputs(ours: nn.Module, reference: nn.Module, arch: str, task: str) -> float:
    """Logits (and the loss with labels) equal within 1e-5; returns the largest logit difference."""
    batch = tiny.inputs(arch)
    got, expected = ours(**batch).logits, reference(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if PEFT_TASK[(tiny.FAMILIES[arch], task)] != "FEATURE_EXTRACTION":  # peft pads labels only for these
        labels = torch.tensor([1, 0]) if task == "classify" else lm_labels(arch, batch)
        loss, expected_loss = ours(**batch, labels=labels).loss, reference(**batch, labels=labels).loss
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    return float((got - expected).abs().max().detach())


def assert_same_generation(ours: nn.Module, reference: nn.Module, arch: str) -> torch.Tensor:
    """Greedy generation (with the KV cache) identical to peft's; returns our tokens."""
    batch = tiny.inputs(arch)
    batch.pop("decoder_input_ids", None)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # peft drops position ids; no padding
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    got = ours.generate(**batch, **options)
    torch.testing.assert_close(got, reference.generate(**batch, **options), rtol=0, atol=0)
    return got
