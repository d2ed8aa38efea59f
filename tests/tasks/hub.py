"""Tiny model folders, as ``from_pretrained`` expects them, plus small data files for task tests.

A word-level tokenizer (with a chat template) and tiny random transformers models built from
configs: folders load in milliseconds and need no network, like ``tests/tiny.py`` for the core.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import transformers as tf

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "horrible"]
NEUTRAL = ["the", "a", "movie", "food", "day", "weather", "was", "is", "it", "very"]
QUESTIONS = [
    ("what is ai", "ai is a branch of computer science"),
    ("who are you", "i am a small bot"),
    ("hello", "hi there"),
    ("how are you", "i am fine thank you"),
    ("what is python", "python is a programming language"),
    ("do you like music", "yes i like music very much"),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _words() -> list[str]:
    words = {*POSITIVE, *NEGATIVE, *NEUTRAL, ".", ",", "?", "!"}
    for question, answer in QUESTIONS:
        words.update(question.split() + answer.split())
    return sorted(words)


def tokenizer(chat_template: bool = True) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the test vocabulary: BOS first, EOS ``<|end|>`` (as chat turns end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + _words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    # Like LLaMA's: BOS before each text when special tokens are added.
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(arch: str, vocab: int) -> tf.PretrainedConfig:
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "bert":
        return tf.BertConfig(vocab_size=vocab, max_position_embeddings=128, **small)
    if arch == "electra":  # an architecture with no LoRA default targets
        return tf.ElectraConfig(vocab_size=vocab, embedding_size=32, max_position_embeddings=128, **small)
    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=vocab,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            **small,
        )
    if arch == "t5":
        return tf.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    if arch == "gpt2":  # a decoder with biases (LLaMA has none) and Conv1D layers
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    if arch == "bart":  # an encoder-decoder with biases (T5 has none) and learned positions
        return tf.BartConfig(
            vocab_size=vocab,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
            forced_eos_token_id=3,
        )
    raise ValueError(arch)


_AUTO = {
    "bert": tf.BertModel,
    "electra": tf.ElectraModel,
    "llama": tf.LlamaForCausalLM,
    "t5": tf.T5ForConditionalGeneration,
    "gpt2": tf.GPT2LMHeadModel,
    "bart": tf.BartForConditionalGeneration,
}


def save_model(root: Path, arch: str, seed: int = 0) -> Path:
    """A folder with a tiny ``arch`` model (random weights, fixed seed) and the test tokenizer."""
    folder = root / arch
    if not (folder / "config.json").exists():
        tok = tokenizer()
        torch.manual_seed(seed)
        # Encoders are saved as bare backbones, as pretrained checkpoints usually are: the task
        # module adds a new classification head.
        _AUTO[arch](_config(arch, len(tok))).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def classification_rows(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """Sentences whose label is the sentiment of their one positive or negative word."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label, words = ("pos", POSITIVE) if i % 2 == 0 else ("neg", NEGATIVE)
        filler = [NEUTRAL[j] for j in torch.randint(len(NEUTRAL), (3,), generator=g).tolist()]
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        rows.append({"text": " ".join([*filler[:2], word, filler[2]]), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(repeat: int = 4) -> list[dict[str, str]]:
    return [{"prompt": q, "response": a} for _ in range(repeat) for q, a in QUESTIONS]


def choice_rows(repeat: int = 4, choices: int = 3) -> list[dict[str, object]]:
    """Multiple choice over the questions: the right answer among the next questions' answers.

    Answers have different lengths (2 to 7 words), and the right one's index cycles through the choices.
    """
    answers = [a for _, a in QUESTIONS]
    rows: list[dict[str, object]] = []
    for r in range(repeat):
        for i, (question, _) in enumerate(QUESTIONS):
            options = [answers[(i + k) % len(answers)] for k in range(choices)]
            shift = (i + r) % choices
            options = options[-shift:] + options[:-shift] if shift else options
            rows.append({"prompt": question, "choices": options, "answer": options.index(answers[i])})
    return rows
