"""Tiny transformers models built from configs (random init, milliseconds per forward).

One builder per architecture family the suite covers: decoder (LLaMA, GPT-2), encoder (BERT,
RoBERTa) and encoder-decoder (T5, BART). ``inputs`` gives a matching batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn

VOCAB = 96
SEQ = 8


def _llama(task: str) -> nn.Module:
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return tf.LlamaForSequenceClassification(config) if task == "classify" else tf.LlamaForCausalLM(config)


def _gpt2(task: str) -> nn.Module:
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return tf.GPT2ForSequenceClassification(config) if task == "classify" else tf.GPT2LMHeadModel(config)


def _bert(task: str) -> nn.Module:
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return tf.BertForSequenceClassification(config) if task == "classify" else tf.BertForMaskedLM(config)


def _roberta(task: str) -> nn.Module:
    config = tf.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=72,
        pad_token_id=1,
    )
    return tf.RobertaForSequenceClassification(config) if task == "classify" else tf.RobertaForMaskedLM(config)


def _t5(task: str) -> nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return tf.T5ForConditionalGeneration(config)


def _bart(task: str) -> nn.Module:
    config = tf.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return tf.BartForConditionalGeneration(config)


BUILDERS: dict[str, Callable[[str], nn.Module]] = {
    "llama": _llama,
    "gpt2": _gpt2,
    "bert": _bert,
    "roberta": _roberta,
    "t5": _t5,
    "bart": _bart,
}
FAMILIES = {
    "llama": "decoder",
    "gpt2": "decoder",
    "bert": "encoder",
    "roberta": "encoder",
    "t5": "seq2seq",
    "bart": "seq2seq",
}
#: The four the parity tests run over (one per family, plus GPT-2 for its Conv1D layers).
PARITY_ARCHS = ["llama", "gpt2", "bert", "t5"]


def build(arch: str, task: str = "lm", seed: int = 0) -> nn.Module:
    """A tiny ``arch`` model in eval mode, with fixed random weights."""
    torch.manual_seed(seed)
    return BUILDERS[arch](task).eval()


def inputs(arch: str, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch for ``arch`` (token ids avoid the special ids 0-2; seq2seq models get decoder ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row exercises attention masks
    batch_inputs = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[arch] == "seq2seq":
        batch_inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq // 2), generator=g)
    return batch_inputs


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits
