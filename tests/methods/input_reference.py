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
        if ".trained." in name:  # a head in modules_to_save: our trained copy is peft's
            module, local = name.split(".trained.")
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


def greedy_by_scoring(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: every step scores the whole sequence so far, with no cache.

    Follows ``generate``'s conventions so the two can be compared token for token: decoders get
    position ids counted over the real tokens of left-padded rows, encoder-decoders start from
    ``decoder_start_token_id``, and a row that produced EOS gets ``pad_token_id`` from then on.
    """
    config = model.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    pad = 0  # the tests' pad_token_id for generate
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seq2seq = "decoder_input_ids" in batch
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = batch["decoder_input_ids"] if seq2seq else ids
    with torch.no_grad():
        for _ in range(steps):
            if seq2seq:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
            else:
                full = torch.cat([mask, torch.ones_like(out[:, mask.shape[1] :])], dim=1)
                positions = (full.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=out, attention_mask=full, position_ids=positions).logits
            token = logits[:, -1].argmax(-1).masked_fill(done, pad)
            done |= torch.isin(token, torch.tensor(eos))
            out = torch.cat([out, token[:, None]], dim=1)
    return out


def assert_same_generation(ours: nn.Module, reference: nn.Module, arch: str) -> torch.Tensor:
    """Our greedy generation (with the KV cache) equals greedy decoding by scoring with peft's
    forward, without a cache; returns our tokens.

    peft's own ``generate`` for input-side methods is not the reference: peft 0.21.2 feeds the
    cache under transformers' old argument name and goes wrong on transformers 5.24.
    """
    batch = tiny.inputs(arch)
    batch.pop("decoder_input_ids", None)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # peft drops position ids; no padding
    steps = 6
    got = ours.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    if tiny.FAMILIES[arch] == "seq2seq":
        batch["decoder_input_ids"] = got[:, :1]  # decoder_start_token_id
    expected = greedy_by_scoring(reference, batch, steps)
    torch.testing.assert_close(got, expected[:, : got.shape[1]], rtol=0, atol=0)
    assert (expected[:, got.shape[1] :] == 0).all(), "generate stopped before every row ended"
    return got
