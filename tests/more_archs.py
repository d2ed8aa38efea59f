"""Tiny builds of the architectures that per-architecture defaults name beyond ``tests/tiny.py``.

Only for checking that each method's defaults select modules (and run) on them; parity and the
shared tester use ``tests/tiny.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_SIZES, **_TOKENS, num_key_value_heads=2)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_SIZES, **_TOKENS, num_key_value_heads=2)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_SIZES, **_TOKENS, num_key_value_heads=2, head_dim=8)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_SIZES, **_TOKENS, num_key_value_heads=4)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_SIZES, **_TOKENS)),
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, **_TOKENS)
    ),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=64,
            word_embed_proj_dim=32,
            **_TOKENS,
        )
    ),
    "distilbert": lambda: tf.DistilBertForMaskedLM(
        tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=64, pad_token_id=0)
    ),
    "vit": lambda: tf.ViTForImageClassification(
        tf.ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=4
        )
    ),
    "whisper": lambda: tf.WhisperForConditionalGeneration(
        tf.WhisperConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=64,
            num_mel_bins=8,
            max_source_positions=16,
            decoder_start_token_id=1,
            **_TOKENS,
        )
    ),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    ids = torch.randint(3, 64, (2, 6), generator=g)
    if arch == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids}
    return {"input_ids": ids}
