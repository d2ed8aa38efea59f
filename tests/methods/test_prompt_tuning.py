"""Prompt tuning: parity with peft, the definition written out, initialization, and bad input."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import lightning_peft as lp
from lightning_peft.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig
from tests import tiny
from tests.methods.input_reference import assert_same_generation, assert_same_outputs, twins

N = 4
WORDS = ["[UNK]", "[PAD]", "classify", "the", "sentiment", "of", "this", "review", "positive", "negative"]


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer over a few words, built in memory (no Hub)."""
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]")


def twin(arch: str, task: str = "lm") -> tuple[torch.nn.Module, torch.nn.Module]:
    return twins(
        "prompt_tuning",
        arch,
        task,
        {"num_virtual_tokens": N},
        lambda task_type: peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=N),
        rename=lambda local: {"embedding": "embedding.weight"}[local],
    )


@pytest.mark.parametrize(
    ("arch", "task"),
    [("llama", "lm"), ("gpt2", "lm"), ("bert", "lm"), ("bert", "classify"), ("t5", "lm"), ("bart", "lm")],
)
def test_parity_with_peft(arch: str, task: str) -> None:
    ours, reference = twin(arch, task)
    assert_same_outputs(ours, reference, arch, task)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_generation_matches_peft(arch: str) -> None:
    ours, reference = twin(arch)
    assert_same_generation(ours, reference, arch)


def test_follows_the_definition() -> None:
    """model([P; E x]) with mask [1; m], token types [0; t], positions [0..N-1; N + p], labels [-100; y]."""
    model = lp.inject(tiny.build("bert"), "prompt_tuning", num_virtual_tokens=N)
    base = tiny.build("bert")
    batch = tiny.inputs("bert")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = torch.ones_like(ids)
    positions = torch.arange(tiny.SEQ).expand(2, -1) + 5
    labels = ids.clone()
    prompt = model.prompt_tuning.embedding.detach().expand(2, -1, -1)
    expected = base(
        inputs_embeds=torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1),
        attention_mask=torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1),
        token_type_ids=torch.cat([torch.zeros(2, N, dtype=types.dtype), types], dim=1),
        position_ids=torch.cat([torch.arange(N).expand(2, -1), positions + N], dim=1),
        labels=torch.cat([torch.full((2, N), -100), labels], dim=1),
    )
    got = model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    assert got.logits.shape == (2, N + tiny.SEQ, tiny.VOCAB)  # outputs include the virtual positions, as in peft


def test_text_init_uses_the_token_embeddings_repeated() -> None:
    model = tiny.build("llama")
    table = model.get_input_embeddings().weight.detach().clone()
    lp.inject(
        model, "prompt_tuning", num_virtual_tokens=5, init="text", init_text="classify this", tokenizer=tokenizer()
    )
    ids = [WORDS.index(w) for w in ["classify", "this", "classify", "this", "classify"]]
    torch.testing.assert_close(model.prompt_tuning.embedding.detach(), table[ids], rtol=0, atol=0)


def test_text_init_loads_the_tokenizer_from_a_path(tmp_path: Path) -> None:
    tokenizer().save_pretrained(tmp_path)
    model = tiny.build("gpt2")
    table = model.get_input_embeddings().weight.detach().clone()
    lp.inject(
        model, "prompt_tuning", num_virtual_tokens=2, init="text", init_text="the review", tokenizer=str(tmp_path)
    )
    torch.testing.assert_close(model.prompt_tuning.embedding.detach(), table[[3, 7]], rtol=0, atol=0)


def test_init_options_are_not_recorded_so_adapters_load_without_the_tokenizer(tmp_path: Path) -> None:
    trained = lp.inject(
        tiny.build("llama"), "prompt_tuning", num_virtual_tokens=3, init="text", init_text="the", tokenizer=tokenizer()
    )
    lp.save_adapter(trained, tmp_path)
    assert '"init_text"' not in (tmp_path / "adapter_config.json").read_text()
    loaded = lp.load_adapter(tiny.build("llama"), tmp_path)  # no tokenizer here
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(loaded, batch), tiny.logits(trained, batch), rtol=0, atol=0)


def test_vocab_and_random_init() -> None:
    model = tiny.build("llama")
    table = model.get_input_embeddings().weight.detach().clone()
    lp.inject(model, "prompt_tuning", num_virtual_tokens=6, init="vocab")
    rows = model.prompt_tuning.embedding.detach()
    assert all(any(torch.equal(row, t) for t in table) for row in rows)  # each a vocabulary embedding
    random = lp.inject(tiny.build("llama"), "prompt_tuning", num_virtual_tokens=64).prompt_tuning.embedding
    assert abs(random.std().item() / table.std().item() - 1) < 0.2  # the vocabulary's spread


def test_bf16_model_gets_bf16_prompts() -> None:
    model = lp.inject(tiny.build("llama").to(torch.bfloat16), "prompt_tuning", num_virtual_tokens=2)
    assert model.prompt_tuning.embedding.dtype == torch.bfloat16
    assert tiny.logits(model, tiny.inputs("llama")).dtype == torch.bfloat16


def test_merge_is_refused_with_a_reason() -> None:
    model = lp.inject(tiny.build("gpt2"), "prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(TypeError, match=r"prompt_tuning has nothing to merge .* 2 virtual tokens are extra inputs"):
        lp.merge(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, r"PromptTuningConfig.num_virtual_tokens must be a positive integer; got 0"),
        ({"num_virtual_tokens": -2}, r"num_virtual_tokens must be a positive integer; got -2"),
        ({"init": "zeros"}, r"PromptTuningConfig.init must be one of 'random', 'vocab', 'text'; got 'zeros'"),
        ({"init": "text", "tokenizer": "x"}, r"init_text must be a non-empty string when init='text'; got None"),
        ({"init": "text", "init_text": "the"}, r"PromptTuningConfig.tokenizer must be a tokenizer, .*; got None"),
        ({"init_text": "the"}, r"init_text must be None unless init='text' \(init='random'\); got 'the'"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(**options)


def test_init_text_longer_than_the_prompt_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"init_text must be at most num_virtual_tokens=2 tokens long \(it has 3 with this tokenizer\)",
    ):
        lp.inject(
            tiny.build("llama"),
            "prompt_tuning",
            num_virtual_tokens=2,
            init="text",
            init_text="classify the review",
            tokenizer=tokenizer(),
        )


def test_prompt_embedding_is_its_declared_parameter() -> None:
    model = lp.inject(tiny.build("t5"), "prompt_tuning", num_virtual_tokens=3)
    assert isinstance(model.prompt_tuning, PromptEmbedding)
    assert list(lp.trainable_state_dict(model)) == ["prompt_tuning.embedding"]
