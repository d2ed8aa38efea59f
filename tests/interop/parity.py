"""The shared peft parity tester: one table of (tiny model, peft config) cases, each run both ways.

A row is a model name (:data:`MODELS`), a peft config class and its keyword options, as peft's
own tests write them. :func:`run` takes a row through:

1. peft saves -> we load: ``get_peft_model`` (seeded), non-zero adapter weights, ``save_pretrained``;
   ``load_peft_adapter`` into a fresh copy of the base must give peft's outputs, before and after
   ``lp.merge``.
2. we save -> peft loads: new adapter weights on our model, ``save_peft_adapter`` (converted to
   plain LoRA when the row says so); ``PeftModel.from_pretrained`` must give our outputs, before
   and after peft's merge.

Equal means ``|ours - ref| <= 1e-5 * max(1, |ref|)`` elementwise. A row with ``refused`` instead
expects ``load_peft_adapter`` to refuse peft's adapter with a message matching it (the field or
layer it does not implement) and the model to be left exactly as it was.

Rows come from peft's ``tests/test_custom_models.py`` TEST_CASES (LoRA, IA3, AdaLoRA), its
``tests/test_initialization.py`` init variants, and peft's default configs on tiny transformers
models. A new option joins by adding one row to :data:`CASES`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

import lightning_peft as lp
from lightning_peft.interop import load_peft_adapter, save_peft_adapter

SEED = 11
VOCAB = 96


# --------------------------------------------------------------------------- models and inputs
# Shapes as in peft's custom-model tests (MLP, EmbConv1D, Conv2d, ...), so its rows apply as written.


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.relu(self.lin0(x))), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = tf.pytorch_utils.Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1d(self.emb(x))).flatten(1)  # (N, 10, 1) -> (N, 10)
        return torch.log_softmax(self.lin0(h), dim=-1)


class Conv(nn.Module):
    """A conv layer (``conv1d``/``conv2d``/``conv3d``, grouped or not, kernel 3 or 1, dilated or not) on
    a 3 x ... x 3 input, feeding ``lin0``. A dilated one pads to keep the input's size."""

    def __init__(self, dims: int, groups: int = 1, kernel: int = 3, dilation: int = 1) -> None:
        super().__init__()
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims, self.channels = dims, 16 if groups > 1 else 5
        out = 16 if groups > 1 else 10
        padding = dilation * (kernel - 1) // 2 if dilation > 1 else 0
        conv = cls(self.channels, out, kernel, groups=groups, padding=padding, dilation=dilation)
        setattr(self, f"conv{dims}d", conv)
        self.lin0 = nn.Linear(out * (3 + 2 * padding - dilation * (kernel - 1)) ** dims, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, f"conv{self.dims}d")
        h = conv(x.reshape(x.shape[0], self.channels, *([3] * self.dims)))  # (N, C', 1, ...)
        return torch.log_softmax(self.lin0(torch.relu(h).flatten(1)), dim=-1)


class LinearUsingParameter(nn.Module):
    """peft's ``_LinearUsingParameter``: ``x @ W + b`` with ``W`` a bare (in, out) parameter."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """peft's MLP whose layers are bare parameters: only ``target_parameters`` reaches them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = LinearUsingParameter(10, 20), nn.ReLU(), LinearUsingParameter(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.relu(self.lin0(x))), dim=-1)


class MHA(nn.Module):
    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2, batch_first=batch_first), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x)[0])


class InitModule(nn.Module):
    """peft's initialization tests' module (smaller): a linear layer, an embedding and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.embed = nn.Linear(40, 40), nn.Embedding(40, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :4].abs() * 10).long().clamp_max(39)  # (N, 4)
        return torch.cat([self.linear(x), self.embed(ids).flatten(1)], dim=-1)  # (N, 40 + 160)


def _llama(**extra: Any) -> nn.Module:
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **extra,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config)


def _mistral() -> nn.Module:
    config = tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, sliding_window=None,
    )  # fmt: skip
    return tf.MistralForCausalLM(config)


def _gemma() -> nn.Module:
    config = tf.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return tf.GemmaForCausalLM(config)


def _moe(name: str) -> nn.Module:
    """A mixture-of-experts model whose experts are 3-D parameters: Mixtral's (E, out, in), GPT-OSS's (E, in, out)."""
    shapes = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    config = getattr(tf, f"{name}Config")(vocab_size=VOCAB, pad_token_id=0, **shapes)
    return getattr(tf, f"{name}ForCausalLM")(config)


def _gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _bert(cls: type = tf.BertForMaskedLM, config_cls: type = tf.BertConfig, **extra: Any) -> nn.Module:
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=72, **extra,
    )  # fmt: skip
    return cls(config)


def _t5() -> nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(config)


def _bart(**extra: Any) -> nn.Module:
    config = tf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **extra,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config)


def _vit() -> nn.Module:
    config = tf.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return tf.ViTForImageClassification(config)


def _whisper() -> nn.Module:
    config = tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    return tf.WhisperForConditionalGeneration(config)


#: name -> builder of the base model (random weights, seeded by :func:`build`).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: Conv(1),
    "Conv2d": lambda: Conv(2),
    "Conv2dGroups": lambda: Conv(2, groups=8),
    "Conv2dGroups2": lambda: Conv(2, groups=2),
    "Conv1dGroups": lambda: Conv(1, groups=2),
    "Conv3dGroups": lambda: Conv(3, groups=8),
    "Conv3d1x1": lambda: Conv(3, kernel=1),
    "Conv2dDilated": lambda: Conv(2, dilation=2),
    "Conv2d1x1Dilated": lambda: Conv(2, kernel=1, dilation=2),
    "MlpUsingParameters": MlpUsingParameters,
    "mixtral": lambda: _moe("Mixtral"),
    "gpt-oss": lambda: _moe("GptOss"),
    "Conv3d": lambda: Conv(3),
    "MHA": MHA,
    "MHA-batch-first": lambda: MHA(batch_first=True),
    "Init": InitModule,
    "llama": _llama,
    "llama-tied": lambda: _llama(tie_word_embeddings=True),
    "llama-bias": lambda: _llama(attention_bias=True, mlp_bias=True),
    "mistral": _mistral,
    "gemma": _gemma,
    "gpt2": _gpt2,
    "bert": _bert,
    "roberta": lambda: _bert(tf.RobertaForMaskedLM, tf.RobertaConfig, pad_token_id=1),
    "t5": _t5,
    "bart": _bart,
    "bart-scaled": lambda: _bart(scale_embedding=True, tie_word_embeddings=False),  # untied: see the README
    "vit": _vit,
    "whisper": _whisper,
}
_SEQ2SEQ = {"t5", "bart", "bart-scaled"}


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model]().eval()


def inputs(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if model in ("MLP", "MlpUsingParameters"):
        return {"x": torch.randn(4, 10, generator=g)}
    if model == "EmbConv1D":
        return {"x": torch.randint(0, 100, (4, 10), generator=g)}
    if model.startswith("Conv"):
        conv = build(model)
        return {"x": torch.randn(4, conv.channels * 3**conv.dims, generator=g)}
    if model.startswith("MHA"):
        return {"x": torch.randn(3, 4, 10, generator=g)}
    if model == "Init":
        return {"x": torch.rand(4, 40, generator=g) * 3}
    if model == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    if model == "whisper":
        return {
            "input_features": torch.randn(2, 8, 16, generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 4), generator=g),
        }
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model in _SEQ2SEQ:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 4), generator=g)
    return batch


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if "x" in batch:
            return model(batch["x"])
        return model(**batch).logits


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Obj:
    """A peft config object inside a row's options (``KasaConfig()``), built when the row runs."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One parity row.

    Args:
        id: the row's name (peft's own where it comes from peft's table).
        model: a key of :data:`MODELS`.
        config: peft's config class name (``"LoraConfig"``).
        options: its keyword options, as peft's tests write them.
        refused: a regex the refusal must match (the field or layer named), or None when it must match.
        why: for a refused row, why (the README's and the report's count groups by it).
        convert: save ours in peft's converted form (``convert_to_standard_lora=True``).
        edit: fields written into peft's saved ``adapter_config.json`` before loading it (for a
            config peft cannot build without data, such as CorDA's).
        source: where the row comes from.
        slow: mark the row slow.
        needs_peft: the oldest peft that has the row's option (older ones skip the row).
        unmergeable: a regex our merge refusal must match, for a row whose adapter peft refuses to
            merge too (LoRA on a grouped conv): both sides must refuse, leaving the outputs unmerged.
        peft_merge_fails: a regex peft's own merge error must match, where peft fails to merge an
            adapter we merge exactly (peft 0.21's delta of a pointwise Conv3d); newer pefts that
            merge it are held to the merged parity as usual.
    """

    id: str
    model: str
    config: str
    options: dict[str, Any]
    refused: str | None = None
    why: str = ""
    convert: bool = False
    edit: dict[str, Any] = field(default_factory=dict)
    source: str = "custom_models"
    slow: bool = False
    needs_peft: str | None = None
    unmergeable: str | None = None
    peft_merge_fails: str | None = None

    def peft_config(self) -> Any:
        import peft

        def make(value: Any) -> Any:
            return getattr(peft, value.cls)(**value.kwargs) if isinstance(value, Obj) else value

        return getattr(peft, self.config)(**{k: make(v) for k, v in self.options.items()})


LAYER = "layer types lightning_peft's method does not wrap (issue 16 point 5)"
OPTION = "peft options not implemented yet (issue 16 point 5/6)"
VARIANT = "LoRA variants lightning_peft does not have"
MHA_REFUSED = (
    "nn.MultiheadAttention: what peft refuses (DoRA) or accepts and never applies (lora_dropout; LoRA on out_proj "
    "alone, whose forward the attention never calls)"
)
INIT = "data-driven or other inits not implemented"
NOTHING = "a bias option that would train no bias (peft accepts it and trains nothing)"
UNTIED = "ensure_weight_tying with nothing to tie (peft 0.21.2 warns and ties nothing)"

_L, _I, _A, _T = "LoraConfig", "IA3Config", "AdaLoraConfig", "TrainableTokensConfig"
_NOT_WRAPPED = r"which lora (with use_dora=True )?cannot wrap"
#: LoRA on a grouped conv: A reads every input channel, so the update is no grouped kernel (peft refuses too).
_GROUPED = r"cannot merge LoRA into a Conv\dd with groups=\d+"
_PEFT_1X1 = r"The size of tensor a \(10\) must match the size of tensor b \(8\)"
DILATED = "a dilated conv (kernel > 1): peft 0.21.2's LoRA/DoRA A has no dilation, so its update means another one"
_DILATED = r"[LD]oRA on a Conv2d\(5, 10, kernel_size=\(3, 3\), dilation=\(2, 2\)\): dilation=\(2, 2\) cannot go through"
DORA_GROUPED = "peft's DoRA on a grouped conv takes the norm of B.A reshaped as if ungrouped, which is no weight norm"

# fmt: off
CASES: list[Case] = [
    # ---- peft tests/test_custom_models.py TEST_CASES: LoRA
    Case("Vanilla MLP 1 LoRA", "MLP", _L, {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LoRA", "MLP", _L, {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LoRA", "MLP", _L, {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LoRA", "MLP", _L, {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LoRA", "MLP", _L, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 LoRA", "MLP", _L, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    Case("Vanilla MLP 7 LoRA with DoRA", "MLP", _L, {"target_modules": ["lin0"], "use_dora": True}),
    Case("Vanilla MLP 8 LoRA with DoRA", "MLP", _L, {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    Case("Vanilla MLP 9 LoRA with DoRA", "MLP", _L, {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    Case("Vanilla MLP 1 LoRA with KaSA", "MLP", _L,
         {"target_modules": ["lin0"], "kasa_config": Obj("KasaConfig"), "r": 4},
         refused=r"kasa_config=", why=VARIANT, needs_peft="0.21"),
    Case("Vanilla MLP 1 LoRA with MiCA", "MLP", _L, {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
         refused=r"init_lora_weights='mica' is refused: MiCA", why=INIT, needs_peft="0.21"),
    Case("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", _L,
         {"target_modules": ["lin0"], "velora_config": Obj("VeloraConfig", {"num_groups": 2, "init_type": "random"})},
         refused=r"velora_config=", why=VARIANT, needs_peft="0.21"),
    Case("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", _L,
         {"target_modules": ["lin0", "lin1"],
          "velora_config": Obj("VeloraConfig", {"num_groups": 2, "init_type": "batch_average"})},
         refused=r"velora_config=", why=VARIANT, needs_peft="0.21"),
    Case("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", _L,
         {"target_modules": ["lin0"],
          "velora_config": Obj("VeloraConfig", {"num_groups": 2, "init_type": "batch_average_once"})},
         refused=r"velora_config=", why=VARIANT, needs_peft="0.21"),
    Case("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", _L, {"target_modules": ["conv1d"]}),
    Case("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", _L, {"target_modules": ["emb"]}),
    Case("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", _L, {"target_modules": ["emb", "conv1d"]}),
    Case("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", _L, {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", _L, {"target_modules": ["emb"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", _L,
         {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", _L,
         {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    # peft's TrainableTokens rows (custom models, tests/test_trainable_tokens.py): standalone and inside LoRA,
    # tied input/output embeddings, Gemma's scaled embedding
    Case("Embedding + transformers Conv1D 1 trainable_tokens", "EmbConv1D", _T,
         {"target_modules": ["emb"], "token_indices": [3, 10, 13], "init_weights": False}),  # ids the inputs hold
    Case("llama trainable_tokens default target", "llama", _T, {"token_indices": [0, 5, 8]}, source="trainable_tokens"),
    Case("llama tied trainable_tokens", "llama-tied", _T, {"token_indices": [5, 8]}, source="trainable_tokens"),
    Case("t5 trainable_tokens shared embedding", "t5", _T, {"token_indices": [5, 8]}, source="trainable_tokens",
         slow=True),
    Case("bart LoRA trainable_token_indices shared embedding", "bart", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": [5, 8]}, source="trainable_tokens", slow=True),
    Case("llama tied LoRA trainable_token_indices list", "llama-tied", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": [5, 8]}, source="trainable_tokens"),
    Case("llama tied LoRA trainable_token_indices naming the tied head", "llama-tied", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [5, 8], "lm_head": [5, 8]}},
         source="trainable_tokens"),
    Case("llama tied LoRA trainable_token_indices other rows for the tied head", "llama-tied", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [5, 8]}},
         edit={"trainable_token_indices": {"embed_tokens": [5, 8], "lm_head": [5, 9]}},
         refused=r"gives 'lm_head' the rows \[5, 9\] and the input embedding 'model.embed_tokens'",
         source="trainable_tokens", why="peft refuses it too: tied layers train the same rows"),
    Case("llama LoRA trainable_token_indices all-linear", "llama", _L,
         {"target_modules": "all-linear", "trainable_token_indices": [1, 2, 3]}, source="trainable_tokens"),
    Case("gemma scaled trainable_tokens", "gemma", _T,
         {"target_modules": ["embed_tokens"], "token_indices": [0, 5, 13]}, source="trainable_tokens"),
    Case("gemma scaled LoRA trainable_token_indices", "gemma", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [0, 5, 13]}},
         source="trainable_tokens"),
    Case("Conv1d LoRA", "Conv1d", _L, {"target_modules": ["conv1d"]}),
    Case("Conv1d LoRA with DoRA", "Conv1d", _L, {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Conv2d 1 LoRA", "Conv2d", _L, {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LoRA", "Conv2d", _L, {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 1 LoRA with DoRA", "Conv2d", _L, {"target_modules": ["conv2d"], "use_dora": True}),
    Case("Conv2d 2 LoRA with DoRA", "Conv2d", _L, {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    Case("Conv2d Groups LoRA", "Conv2dGroups", _L, {"target_modules": ["conv2d"]}, unmergeable=_GROUPED),
    Case("Conv2d Groups2 LoRA", "Conv2dGroups2", _L, {"target_modules": ["conv2d"]}, unmergeable=_GROUPED),
    Case("Conv2d Groups LoRA with DoRA", "Conv2dGroups", _L, {"target_modules": ["conv2d"], "use_dora": True},
         refused=r"it is a Conv2d with groups=8, which lora with use_dora=True cannot wrap", why=DORA_GROUPED),
    Case("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", _L, {"target_modules": ["conv2d"], "use_dora": True},
         refused=r"it is a Conv2d with groups=2, which lora with use_dora=True cannot wrap", why=DORA_GROUPED),
    Case("Conv3d 1 LoRA", "Conv3d", _L, {"target_modules": ["conv3d"]}),
    Case("Conv3d 2 LoRA", "Conv3d", _L, {"target_modules": ["conv3d", "lin0"]}),
    Case("Conv3d 1 LoRA with DoRA", "Conv3d", _L, {"target_modules": ["conv3d"], "use_dora": True}),
    Case("Conv3d 2 LoRA with DoRA", "Conv3d", _L, {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    # peft 0.21 merges a pointwise Conv3d's B.A as if it were a Conv2d's and fails (peft #3768); ours merges exactly
    Case("Conv3d 1x1 LoRA", "Conv3d1x1", _L, {"target_modules": ["conv3d"]}, peft_merge_fails=_PEFT_1X1),
    Case("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", _L, {"target_modules": ["conv3d"], "use_dora": True},
         peft_merge_fails=_PEFT_1X1),
    Case("Vanilla MLP 1 LoRA with lora_b bias", "MLP", _L,
         {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv2d 1 LoRA with lora_b bias", "Conv2d", _L,
         {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv3d 1 LoRA with lora_b bias", "Conv3d", _L,
         {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    # ---- more conv cases (peft's table has these layers, not these combinations)
    Case("Conv2d dilated LoRA", "Conv2dDilated", _L, {"target_modules": ["conv2d"]}, refused=_DILATED, why=DILATED),
    Case("Conv2d dilated LoRA with DoRA", "Conv2dDilated", _L, {"target_modules": ["conv2d"], "use_dora": True},
         refused=_DILATED, why=DILATED),
    # a kernel of size 1 is the same dilated or not: peft's undilated A computes it
    Case("Conv2d 1x1 dilated LoRA", "Conv2d1x1Dilated", _L, {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv1d Groups LoRA", "Conv1dGroups", _L, {"target_modules": ["conv1d"], "r": 4}, unmergeable=_GROUPED,
         source="issue"),
    Case("Conv3d Groups LoRA", "Conv3dGroups", _L, {"target_modules": ["conv3d"]}, unmergeable=_GROUPED,
         source="issue"),
    Case("Conv1d LoRA with lora_b bias rslora", "Conv1d", _L,
         {"target_modules": ["conv1d", "lin0"], "lora_bias": True, "use_rslora": True, "r": 4, "lora_alpha": 6},
         source="issue"),
    Case("Conv2d Groups LoRA with lora_b bias", "Conv2dGroups", _L,
         {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}, unmergeable=_GROUPED, source="issue"),
    Case("Conv2d LoRA with lora_b bias and DoRA", "Conv2d", _L, {"target_modules": ["conv2d"]},
         edit={"lora_bias": True, "use_dora": True}, refused=r"LoRAConfig.lora_bias must be False with use_dora=True",
         why="peft refuses it too: DoRA rescales B A, a bias has no place in its norm", source="issue"),
    Case("Embedding LoRA with lora_b bias", "EmbConv1D", _L, {"target_modules": ["conv1d"]},
         edit={"lora_bias": True, "target_modules": ["emb"]}, refused=r"nn.Embedding, and LoRAConfig.lora_bias=True",
         why="peft refuses it too: lora_bias is for linear and conv layers", source="issue"),
    Case("MHA 1 LoRA", "MHA", _L, {"target_modules": ["mha"]}),
    Case("MHA 2 LoRA", "MHA", _L, {"target_modules": ["mha", "lin0"]}),
    # nn.MultiheadAttention beyond peft's two rows: its unload test's config, options, batch_first, refusals
    Case("MHA LoRA init False", "MHA", _L, {"target_modules": ["mha"], "init_lora_weights": False}),
    Case("MHA LoRA modules_to_save", "MHA", _L, {"target_modules": ["mha"], "modules_to_save": ["lin0"]},
         source="issue"),
    Case("MHA LoRA rslora", "MHA", _L, {"target_modules": ["mha"], "r": 4, "lora_alpha": 6, "use_rslora": True},
         source="issue"),
    Case("MHA batch_first LoRA", "MHA-batch-first", _L, {"target_modules": ["mha", "lin0"]}, source="issue"),
    Case("MHA LoRA with DoRA", "MHA", _L, {"target_modules": ["mha"]}, edit={"use_dora": True},
         refused=r"MultiheadAttention, which lora with use_dora=True cannot wrap", why=MHA_REFUSED, source="issue"),
    Case("MHA LoRA dropout", "MHA", _L, {"target_modules": ["mha"], "lora_dropout": 0.1},
         refused=r"LoRAConfig\.dropout=0\.1 is refused on a MultiheadAttention", why=MHA_REFUSED, source="issue"),
    Case("MHA out_proj LoRA", "MHA", _L, {"target_modules": ["out_proj"]},
         refused=r"the out_proj of an nn\.MultiheadAttention", why=MHA_REFUSED, source="issue"),
    Case("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", _L, {"target_parameters": ["lin0.weight"]}),
    Case("MLP 2 using nn.Parameter LoRA", "MLP", _L,
         {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    # rank_pattern / alpha_pattern keys naming a parameter target ("<module>.<parameter>"): peft applies them
    # (while warning that they matched no module), with target_modules beside or without
    Case("MLP 2 using nn.Parameter rank_pattern alpha_pattern", "MLP", _L,
         {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"], "rank_pattern": {"lin1.weight": 3},
          "alpha_pattern": {"lin1.weight": 5}}, source="patterns"),
    Case("MLP 2 using nn.Parameter pattern regexes", "MLP", _L,
         {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"], "rank_pattern": {r"lin.\.weight": 2,
          "lin0": 4}, "alpha_pattern": {"weight": 3}}, source="patterns"),
    Case("MLP using nn.Parameter rank_pattern", "MlpUsingParameters", _L,
         {"target_parameters": ["lin0.weight", "lin1.weight"], "rank_pattern": {"lin0.weight": 2}}, source="patterns"),
    # peft's multi-adapter rows' configs (one adapter each here), then MoE experts as 3-D parameters (peft 0.19
    # reads every 3-D tensor as (E, in, out), Mixtral's (E, out, in) too; 0.21 reads the module's is_transposed)
    Case("MLP using nn.Parameter LoRA init False", "MlpUsingParameters", _L,
         {"target_parameters": ["lin0.weight", "lin1.weight"], "init_lora_weights": False}),
    Case("MLP using nn.Parameter LoRA rslora", "MlpUsingParameters", _L,
         {"target_parameters": ["lin1.weight"], "use_rslora": True, "r": 2, "lora_alpha": 4}),
    Case("mixtral experts target_parameters", "mixtral", _L,
         {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 2},
         source="issue", needs_peft="0.21"),
    Case("mixtral experts and default modules", "mixtral", _L,
         {"target_parameters": ["experts.down_proj"], "r": 2}, source="issue", needs_peft="0.21"),
    Case("mixtral experts rank_pattern alpha_pattern", "mixtral", _L,
         {"target_modules": ["q_proj"], "target_parameters": ["experts.down_proj"], "r": 2,
          "rank_pattern": {"experts.down_proj": 3},
          "alpha_pattern": {r"layers\.0\.mlp\.experts\.down_proj": 5, "q_proj": 4}}, source="patterns",
         needs_peft="0.21"),
    Case("gpt-oss experts target_parameters", "gpt-oss", _L,
         {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 2},
         source="issue", needs_peft="0.21"),
    # peft tests/test_target_parameters.py's configs (its Llama4/GPT-OSS rows, on the tiny GPT-OSS here)
    Case("gpt-oss down_proj target_parameters", "gpt-oss", _L,
         {"target_modules": [], "target_parameters": ["mlp.experts.down_proj"]}, source="target_parameters",
         needs_peft="0.21"),
    Case("gpt-oss q_proj v_proj and down_proj", "gpt-oss", _L,
         {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.experts.down_proj"]},
         source="target_parameters", needs_peft="0.21"),
    Case("gpt-oss rank_pattern alpha_pattern on experts", "gpt-oss", _L,
         {"target_modules": [], "r": 4, "lora_alpha": 32, "init_lora_weights": False,
          "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
          "rank_pattern": {"experts.gate_up_proj": 1}, "alpha_pattern": {"experts.down_proj": 8}},
         source="target_parameters", needs_peft="0.21"),
    Case("target_parameters with dropout", "MlpUsingParameters", _L, {"target_parameters": ["lin0.weight"]},
         edit={"lora_dropout": 0.1}, refused=r"dropout must be 0 with target_parameters",
         why="peft refuses it too: dropout cannot reach a weight's input from outside the module", source="issue"),
    Case("Vanilla MLP 1 LoRA with Monteclora", "MLP", _L,
         {"target_modules": ["lin0"], "monteclora_config": Obj("MontecloraConfig", {"num_samples": 2})},
         refused=r"monteclora_config=", why=VARIANT, needs_peft="0.21"),
    # ---- the same table: IA3
    Case("Vanilla MLP 1 IA3", "MLP", _I, {"target_modules": "lin0", "feedforward_modules": []}),
    Case("Vanilla MLP 2 IA3", "MLP", _I, {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    Case("Vanilla MLP 3 IA3", "MLP", _I, {"target_modules": ["lin0"], "feedforward_modules": []}),
    Case("Vanilla MLP 4 IA3", "MLP", _I, {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    Case("Vanilla MLP 5 IA3", "MLP", _I, {"target_modules": ["lin1"], "feedforward_modules": []}),
    Case("Vanilla MLP 6 IA3", "MLP", _I, {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    Case("Vanilla MLP 7 IA3", "MLP", _I, {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    Case("Vanilla MLP 8 IA3", "MLP", _I, {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 9 IA3", "MLP", _I,
         {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}),
    Case("transformers Conv1D 1 IA3", "EmbConv1D", _I,
         {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
    Case("transformers Conv1D 2 IA3", "EmbConv1D", _I,
         {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
    Case("transformers Conv1D 3 IA3", "EmbConv1D", _I,
         {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    *[Case(f"Conv{d}d {i} IA3", f"Conv{d}d", _I, {"target_modules": targets, "feedforward_modules": ff})
      for d in (2, 3)
      for i, (targets, ff) in enumerate([
          ([f"conv{d}d"], []), ([f"conv{d}d"], [f"conv{d}d"]), ([f"conv{d}d", "lin0"], []),
          ([f"conv{d}d", "lin0"], [f"conv{d}d"]), ([f"conv{d}d", "lin0"], [f"conv{d}d", "lin0"]),
      ], start=1)],
    # ---- the same table: AdaLoRA
    Case("Vanilla MLP 1 AdaLoRA", "MLP", _A,
         {"target_modules": ["lin0"], "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0}),
    Case("Vanilla MLP 2 AdaLoRA", "MLP", _A,
         {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1}),
    Case("Conv2d 1 AdaLoRA", "Conv2d", _A, {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1},
         needs_peft="0.21"),
    Case("Conv2d 2 AdaLoRA", "Conv2d", _A,
         {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1}, needs_peft="0.21"),
    Case("Conv2d AdaLoRA options", "Conv2d", _A,
         {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 4, "init_r": 4,
          "target_r": 2, "lora_alpha": 12, "lora_dropout": 0.1}, needs_peft="0.21", source="issue"),
    Case("Conv2d Groups AdaLoRA", "Conv2dGroups", _A,
         {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1},
         refused=r"it is a Conv2d with groups=8, which adalora cannot wrap",
         why="peft fails too: its SVDConv2d cannot lay out the update as a grouped kernel", needs_peft="0.21",
         source="issue"),
    Case("llama default AdaLoRA", "llama", _A, {"total_step": 10, "init_r": 6, "target_r": 4}, source="defaults"),
    Case("gpt2 AdaLoRA", "gpt2", _A, {"total_step": 10, "init_r": 4, "target_r": 2, "lora_dropout": 0.1},
         source="defaults"),
    Case("AdaLoRA layers_to_transform", "llama", _A,
         {"target_modules": ["q_proj"], "total_step": 4, "init_r": 4, "target_r": 2, "layers_to_transform": [0]},
         source="issue"),
    Case("AdaLoRA bias all", "llama-bias", _A,
         {"target_modules": ["q_proj"], "total_step": 4, "init_r": 4, "target_r": 2, "bias": "all"}, source="issue"),
    Case("AdaLoRA bias lora_only", "MLP", _A,
         {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1, "bias": "lora_only"},
         source="issue", needs_peft="0.21"),
    Case("AdaLoRA target_r above init_r", "MLP", _A, {"target_modules": ["lin0"], "total_step": 4, "init_r": 4},
         refused=r"target_r must be at most init_r \(4\); got 8", why="a budget that would grow: peft allows it, "
         "lightning_peft's schedule prunes only", source="issue"),
    # ---- peft tests/test_initialization.py: LoRA init variants (and what peft saves for each)
    Case("init False", "Init", _L, {"target_modules": ["linear", "embed"], "init_lora_weights": False}, source="init"),
    Case("init gaussian", "Init", _L, {"target_modules": ["linear", "embed"], "init_lora_weights": "gaussian"},
         source="init"),
    Case("init orthogonal", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "orthogonal"},
         source="init"),
    Case("init pissa", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8}, source="init"),
    Case("init pissa converted", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8},
         convert=True, source="init"),
    Case("init pissa rslora converted", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8, "use_rslora": True}, convert=True,
         source="init"),
    Case("init pissa with embedding converted", "Init", _L,
         {"target_modules": ["linear", "embed"], "init_lora_weights": "pissa", "r": 8}, convert=True, source="init"),
    Case("init pissa_niter_16", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa_niter_16", "r": 8},
         source="init"),
    Case("init pissa_niter_4 converted", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa_niter_4", "r": 8}, convert=True, source="init"),
    Case("init olora", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "olora", "r": 8}, source="init"),
    Case("init olora converted", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "olora", "r": 8},
         convert=True, source="init"),
    Case("init olora rslora converted", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "olora", "r": 8, "use_rslora": True}, convert=True,
         source="init"),
    Case("init pissa DoRA", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8, "use_dora": True}, source="init"),
    Case("init pissa llama", "llama", _L, {"init_lora_weights": "pissa", "r": 4}, source="init", slow=True),
    Case("init pissa gpt2 Conv1D", "gpt2", _L, {"init_lora_weights": "pissa", "r": 4}, source="init"),
    Case("init olora llama converted", "llama", _L, {"init_lora_weights": "olora", "r": 4}, convert=True,
         source="init", slow=True),
    Case("init pissa rank_pattern", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8, "rank_pattern": {"linear": 4}},
         source="init"),
    Case("init pissa alpha_pattern", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8, "alpha_pattern": {"linear": 4}},
         source="init"),
    Case("init pissa rank_pattern converted", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "pissa", "r": 8, "rank_pattern": {"linear": 4}},
         convert=True, source="init"),
    Case("init eva", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "eva"}, source="init"),
    # what peft's file holds after EVA redistributed the ranks (and adjusted the scales)
    Case("init eva redistributed", "Init", _L,
         {"target_modules": ["linear"], "init_lora_weights": "eva", "r": 8, "rank_pattern": {"linear": 4},
          "alpha_pattern": {"linear": 4.0}, "eva_config": {"rho": 2.0, "whiten": True}}, source="init"),
    # what peft 0.21.2 writes after EVA moved a budget of r=2 per layer to ranks 3, 1 and 4 on llama
    Case("init eva redistributed on llama", "llama", _L,
         {"target_modules": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                             "model.layers.1.self_attn.o_proj"],
          "init_lora_weights": "eva", "r": 2, "lora_alpha": 8,
          "rank_pattern": {"model.layers.0.self_attn.o_proj": 3, "model.layers.0.mlp.down_proj": 1,
                           "model.layers.1.self_attn.o_proj": 4},
          "alpha_pattern": {"model.layers.0.self_attn.o_proj": 12.0, "model.layers.0.mlp.down_proj": 4.0,
                            "model.layers.1.self_attn.o_proj": 16.0},
          "eva_config": {"rho": 2.0}}, source="init"),
    Case("init corda", "Init", _L, {"target_modules": ["linear"]},
         edit={"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}},
         refused=r"init_lora_weights='corda' is refused: CorDA's adapter applies to the residual", source="init",
         why="an unconverted CorDA file: its residual base needs the calibration data (peft cannot load it either)"),
    # peft's converted CorDA file: a plain LoRA (init_lora_weights=True) that keeps corda_config, ignored.
    Case("init corda converted", "Init", _L, {"target_modules": ["linear"]},
         edit={"corda_config": {"corda_method": "kpm", "cache_file": None, "covariance_file": None, "verbose": False,
                                "use_float16_for_covariance": False, "prune_temporary_fields": True}},
         source="init"),
    Case("init lora_ga", "Init", _L, {"target_modules": ["linear"], "init_lora_weights": "lora_ga"},
         refused=r"init_lora_weights='lora_ga' is refused", why=INIT, source="init"),
    # ---- options peft has that refuse by field (issue 16)
    Case("BD-LoRA nblocks=2", "llama", _L,
         {"target_modules": ["q_proj", "o_proj"],
          "use_bdlora": Obj("BdLoraConfig", {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["o_proj"],
                                             "nblocks": 2})},
         refused=r"use_bdlora=", why=VARIANT, source="issue"),
    # ensure_weight_tying: the tied lm_head's trained copy is the embedding's (one tensor, saved under both names)
    Case("ensure_weight_tying", "llama-tied", _L,
         {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
         source="issue"),
    Case("ensure_weight_tying lm_head saved", "llama-tied", _L,
         {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True},
         source="issue"),
    Case("ensure_weight_tying LoRA on the tied embedding", "llama-tied", _L,
         {"target_modules": ["q_proj", "embed_tokens"], "ensure_weight_tying": True},
         refused=r"ensure_weight_tying=True with the input embedding in target_modules .* is not implemented",
         why=OPTION, source="issue"),
    Case("ensure_weight_tying AdaLoRA", "llama-tied", _A,
         {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True,
          "total_step": 10, "init_r": 4, "target_r": 2},
         refused=r"ensure_weight_tying=True, which lightning_peft's adalora does not implement", why=OPTION,
         source="issue"),
    Case("ensure_weight_tying trainable_token_indices", "llama-tied", _L,
         {"target_modules": ["q_proj"], "trainable_token_indices": [5, 8], "ensure_weight_tying": True},
         refused=r"has no embedding layer .* \(trainable_token_indices ties the output layer's rows without it\)",
         why=UNTIED, source="issue"),
    Case("ensure_weight_tying untied model", "llama", _L,
         {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
         refused=r"ensure_weight_tying=True, but no layer of LlamaForCausalLM is tied", why=UNTIED, source="issue"),
    Case("ensure_weight_tying nothing saved", "llama-tied", _L,
         {"target_modules": ["q_proj"], "ensure_weight_tying": True},
         refused=r"ensure_weight_tying=True, but modules_to_save=\[\] has no embedding layer", why=UNTIED,
         source="issue"),
    Case("layers_to_transform", "llama", _L, {"target_modules": ["q_proj"], "layers_to_transform": [0]},
         source="issue"),
    Case("bias all", "llama-bias", _L, {"target_modules": ["q_proj"], "bias": "all"}, source="issue"),
    Case("bias all without biases", "llama", _L, {"target_modules": ["q_proj"], "bias": "all"},
         refused=r"LoRAConfig.bias='all' would train no bias: no module of LlamaForCausalLM has a bias", why=NOTHING,
         source="issue"),
    Case("bias lora_only without biases", "llama", _L, {"target_modules": ["q_proj"], "bias": "lora_only"},
         refused=r"LoRAConfig.bias='lora_only' would train no bias", why=NOTHING, source="issue"),
    # ---- per-layer control (issue 16 point 6): patterns, layer indices, biases, in peft's TEST_CASES style
    Case("Vanilla MLP rank_pattern LoRA", "MLP", _L, {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin0": 4}},
         source="patterns"),
    Case("Vanilla MLP alpha_pattern LoRA", "MLP", _L,
         {"target_modules": ["lin0", "lin1"], "alpha_pattern": {"lin1": 4}}, source="patterns"),
    Case("Vanilla MLP rank_pattern alpha_pattern rslora LoRA", "MLP", _L,
         {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin.": 2, "lin1": 6}, "alpha_pattern": {"lin0": 3},
          "use_rslora": True}, source="patterns"),
    Case("Vanilla MLP rank_pattern alpha_pattern DoRA", "MLP", _L,
         {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin0": 4}, "alpha_pattern": {"lin0": 2},
          "use_dora": True}, source="patterns"),
    Case("Embedding + transformers Conv1D rank_pattern LoRA", "EmbConv1D", _L,
         {"target_modules": ["emb", "conv1d"], "rank_pattern": {"emb": 2}, "alpha_pattern": {"conv1d": 5}},
         source="patterns"),
    Case("Conv2d rank_pattern LoRA", "Conv2d", _L,
         {"target_modules": ["conv2d", "lin0"], "rank_pattern": {"conv2d": 3}}, source="patterns"),
    Case("llama rank_pattern alpha_pattern regex", "llama", _L,
         {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 6},
          "alpha_pattern": {"q_proj": 4}}, source="patterns"),
    Case("llama layers_to_transform layers_pattern", "llama", _L,
         {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
         source="patterns"),
    Case("llama layers_to_transform and a full name", "llama", _L,
         {"target_modules": ["q_proj", "model.layers.0.self_attn.v_proj"], "layers_to_transform": [1]},
         source="patterns"),
    Case("gpt2 layers_to_transform int", "gpt2", _L,
         {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": 1, "layers_pattern": ["h"]}, source="patterns"),
    Case("bert layers_to_transform", "bert", _L, {"target_modules": ["query", "value"], "layers_to_transform": [0]},
         source="patterns"),
    Case("llama layers_to_transform DoRA", "llama", _L,
         {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "use_dora": True}, source="patterns"),
    # (peft 0.19 saves no bias for bias="lora_only": it looks for lin0.bias, not lin0.base_layer.bias)
    Case("Vanilla MLP bias all LoRA", "MLP", _L, {"target_modules": ["lin0"], "bias": "all"}, source="patterns"),
    Case("Vanilla MLP bias lora_only LoRA", "MLP", _L, {"target_modules": ["lin0"], "bias": "lora_only"},
         source="patterns", needs_peft="0.21"),
    Case("Vanilla MLP bias lora_only DoRA", "MLP", _L,
         {"target_modules": ["lin0", "lin1"], "bias": "lora_only", "use_dora": True}, source="patterns",
         needs_peft="0.21"),
    Case("Vanilla MLP bias lora_only modules_to_save", "MLP", _L,
         {"target_modules": ["lin0"], "bias": "lora_only", "modules_to_save": ["lin1"]}, source="patterns",
         needs_peft="0.21"),
    Case("Vanilla MLP bias all modules_to_save", "MLP", _L,
         {"target_modules": ["lin0"], "bias": "all", "modules_to_save": ["lin1"]}, source="patterns"),
    Case("Embedding + transformers Conv1D bias all", "EmbConv1D", _L,
         {"target_modules": ["emb", "conv1d"], "bias": "all"}, source="patterns"),
    Case("Conv2d bias lora_only", "Conv2d", _L, {"target_modules": ["conv2d"], "bias": "lora_only"},
         source="patterns", needs_peft="0.21"),
    Case("gpt2 bias lora_only", "gpt2", _L, {"target_modules": ["c_attn"], "bias": "lora_only"}, source="patterns",
         needs_peft="0.21"),
    Case("bert bias all layers_to_transform", "bert", _L,
         {"target_modules": ["query"], "bias": "all", "layers_to_transform": [1], "rank_pattern": {"query": 2}},
         source="patterns"),
    # ---- scaled embeddings (embed_scale): Gemma's embed_tokens, BART with scale_embedding=True
    Case("gemma embed_tokens", "gemma", _L, {"target_modules": ["embed_tokens", "q_proj"], "r": 4},
         source="embed_scale"),
    Case("bart scaled embed_tokens", "bart-scaled", _L,
         {"target_modules": ["embed_tokens", "q_proj"], "r": 4}, source="embed_scale", slow=True),
    Case("gemma embed_tokens DoRA", "gemma", _L,
         {"target_modules": ["embed_tokens", "q_proj"], "r": 4, "use_dora": True}, source="embed_scale"),
    # ---- IA3 on grouped convs (peft's table has none): the feed-forward vector spread over the groups
    # (peft 0.19 merges that vector as if the conv were ungrouped and fails; 0.21 spreads it as we do)
    Case("Conv2d Groups IA3 output", "Conv2dGroups", _I, {"target_modules": ["conv2d"], "feedforward_modules": []},
         source="issue"),
    Case("Conv2d Groups IA3 feedforward", "Conv2dGroups", _I,
         {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}, source="issue", needs_peft="0.21"),
    # ---- peft's default configs on tiny transformers models
    *[Case(f"{arch} default LoRA", arch, _L, {}, source="defaults", slow=arch in ("llama", "mistral", "t5", "bart"))
      for arch in ("llama", "mistral", "gpt2", "bert", "roberta", "t5", "bart")],
    *[Case(f"{arch} default IA3", arch, _I, {}, source="defaults", slow=arch in ("t5", "bart"))
      for arch in ("llama", "mistral", "gpt2", "bert", "roberta", "t5", "bart")],
    # peft has no default targets for ViT and Whisper: the attention projections, as its examples do
    Case("vit LoRA", "vit", _L, {"target_modules": ["q_proj", "v_proj"]}, source="defaults"),
    Case("vit IA3", "vit", _I, {"target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
         source="defaults"),
    Case("whisper LoRA", "whisper", _L, {"target_modules": ["q_proj", "v_proj"]}, source="defaults", slow=True),
    Case("whisper IA3", "whisper", _I, {"target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
         source="defaults", slow=True),
    Case("llama all LoRA options", "llama", _L,
         {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "r": 4, "lora_alpha": 12,
          "use_rslora": True, "lora_dropout": 0.1, "modules_to_save": ["lm_head"]}, source="defaults"),
]
# fmt: on


# --------------------------------------------------------------------------- running a row


def assert_parity(actual: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """``|actual - ref| <= 1e-5 * max(1, |ref|)`` elementwise."""
    bound = 1e-5 * ref.abs().clamp_min(1)
    excess = (actual - ref).abs() - bound
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert bool((excess <= 0).all()), f"{what}: differs by {float((actual - ref).abs().max()):.3g}"


def _randomize(model: nn.Module, seed: int, names: list[str] | None = None) -> None:
    """Add noise to every trainable tensor (or those named), so both sides compare real updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
        assert params, "nothing to randomize"
        for _, param in params:
            param.add_(torch.randn(param.shape, generator=g) * 0.3)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
    }


def run(case: Case, tmp_path: Path) -> str:
    """Run one row both ways; returns ``"pass"`` or ``"refused"`` (any mismatch fails an assert)."""
    import peft
    import pytest
    from packaging.version import Version

    if case.needs_peft and Version(peft.__version__) < Version(case.needs_peft):
        pytest.skip(f"peft {peft.__version__} has no {case.id!r} (peft {case.needs_peft} has)")
    base = build(case.model)
    batch = inputs(case.model)
    torch.manual_seed(SEED)
    theirs = peft.get_peft_model(copy.deepcopy(base), case.peft_config())
    _randomize(theirs, seed=1)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    if case.edit:
        config_file = tmp_path / "peft" / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **case.edit}))
    fresh = copy.deepcopy(base)
    if case.refused is not None:
        before = _snapshot(fresh)
        try:
            load_peft_adapter(fresh, tmp_path / "peft")
        except (ValueError, TypeError) as error:
            assert re.search(case.refused, str(error)), f"refused for another reason: {error}"
        else:
            raise AssertionError(f"{case.id}: loaded, but the row expects a refusal matching {case.refused!r}")
        after = _snapshot(fresh)
        assert lp.get_info(fresh) is None and after["modules"] == before["modules"]
        for name, tensor in before["tensors"].items():
            assert torch.equal(after["tensors"][name], tensor), f"a refused load changed {name}"
        return "refused"
    ref = outputs(theirs, batch)
    assert not torch.allclose(ref, outputs(base, batch), atol=1e-4), "the adapter changes nothing: a vacuous row"
    # 1. peft saves -> we load (the same seed: a randomized init draws what peft's load draws)
    torch.manual_seed(SEED)
    ours = load_peft_adapter(fresh, tmp_path / "peft").eval()
    assert_parity(outputs(ours, batch), ref, f"{case.id}: peft's adapter loaded here")
    if case.unmergeable:
        with pytest.raises(TypeError, match=case.unmergeable):
            lp.merge(ours)
        assert_parity(outputs(ours, batch), ref, f"{case.id}: peft's adapter loaded here, merge refused")
    else:
        lp.merge(ours)
        assert_parity(outputs(ours, batch), ref, f"{case.id}: peft's adapter loaded here, merged")
        lp.unmerge(ours)
    # 2. we save -> peft loads
    _randomize(ours, seed=2)
    mine = outputs(ours, batch)
    save_peft_adapter(ours, tmp_path / "ours", convert_to_standard_lora=case.convert)
    torch.manual_seed(SEED)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_parity(outputs(back, batch), mine, f"{case.id}: our adapter loaded by peft")
    if case.unmergeable:
        with pytest.raises(NotImplementedError, match="groups > 1"):
            back.merge_adapter()
        return "pass"
    if case.peft_merge_fails and Version(peft.__version__) < Version("0.22"):
        with pytest.raises(RuntimeError, match=case.peft_merge_fails):
            back.merge_adapter()
        return "pass"
    back.merge_adapter()
    assert_parity(outputs(back, batch), mine, f"{case.id}: our adapter loaded by peft, merged by peft")
    return "pass"
