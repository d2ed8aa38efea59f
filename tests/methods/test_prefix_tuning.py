"""Prefix tuning: parity with peft, the cache written out, folding the projection, and bad input."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from transformers import DynamicCache, EncoderDecoderCache

import lightning_peft as lp
from lightning_peft.core.compat import cache_argument, output_cache
from lightning_peft.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig, fold_projection
from tests import tiny
from tests.methods.input_reference import assert_same_generation, assert_same_outputs, twins

N = 3


def tie_decoder_layers(model: torch.nn.Module) -> None:
    """Give every layer layer 0's prefix: peft's encoder-decoder path can express only that.

    peft doubles the prefix tensor along the layer axis and splits it in groups of four, so decoder
    layer l reads the rows of layer 2l mod L (with two layers, both read layer 0's).
    """
    module = model.prefix_tuning
    layers = module.layout[0]
    with torch.no_grad():
        if module.prefix is not None:
            view = module.prefix.view(N, layers, -1)
            view[:, 1:] = view[:, :1]
        else:
            last = module.projection[-1]
            for tensor in (last.weight, last.bias):
                rows = tensor.view(layers, -1, *tensor.shape[1:])
                rows[1:] = rows[:1]


def twin(arch: str, task: str = "lm", projection: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    def rename(local: str) -> str:
        head, _, rest = local.partition(".")
        return {"prefix": "embedding.weight", "embedding": "embedding.weight", "projection": f"transform.{rest}"}[head]

    options = {"num_virtual_tokens": N, "projection": projection}
    if projection:
        options["projection_hidden_size"] = 12
    return twins(
        "prefix_tuning",
        arch,
        task,
        options,
        lambda task_type: peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=12
        ),
        rename,
        prepare=tie_decoder_layers if tiny.FAMILIES[arch] == "seq2seq" else None,
    )


@pytest.mark.parametrize(
    ("arch", "task", "projection"),
    [
        ("llama", "lm", False),
        ("llama", "lm", True),
        ("gpt2", "lm", False),
        ("bert", "lm", True),
        ("bert", "classify", False),
        ("t5", "lm", False),
        ("t5", "lm", True),
        ("bart", "lm", False),
        ("bart", "lm", True),
    ],
)
def test_parity_with_peft(arch: str, task: str, projection: bool) -> None:
    if (arch, task) == ("bert", "classify") and cache_argument(tiny.build(arch).bert) != "past_key_values":
        pytest.skip(
            "peft 0.21 refuses prefix tuning for BertForSequenceClassification when BertModel.forward takes the "
            "cache as cache= (transformers >= 5.24); test_follows_the_definition checks this case, and the "
            "minimum-versions run checks it against peft"
        )
    ours, reference = twin(arch, task, projection)
    assert_same_outputs(ours, reference, arch, task)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_generation_matches_peft(arch: str) -> None:
    ours, reference = twin(arch)
    assert_same_generation(ours, reference, arch)


def _prefix_cache(model: torch.nn.Module, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers, heads, head_dim = model.prefix_tuning.layout
    states = model.prefix_tuning.prefix.detach().view(N, layers, 2, heads, head_dim)
    return [
        (
            states[:, i, 0].transpose(0, 1).expand(batch, -1, -1, -1),
            states[:, i, 1].transpose(0, 1).expand(batch, -1, -1, -1),
        )
        for i in range(layers)
    ]


def _prefix_as_cache(model: torch.nn.Module, batch: int, encoder_decoder: bool) -> DynamicCache | EncoderDecoderCache:
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(_prefix_cache(model, batch)):
        cache.update(keys, values, layer)
    return EncoderDecoderCache(cache, DynamicCache()) if encoder_decoder else cache


@pytest.mark.parametrize(
    ("arch", "task"),
    [("gpt2", "lm"), ("llama", "lm"), ("bert", "lm"), ("bert", "classify"), ("roberta", "classify"), ("bart", "lm")],
)
def test_follows_the_definition(arch: str, task: str) -> None:
    """Layer l attends over [K^P_l; K] and [V^P_l; V]: the base model given that cache, mask [1; m],
    positions + N (decoders and encoders); in encoder-decoders the decoder's self-attention cache."""
    model = lp.inject(tiny.build(arch, task), "prefix_tuning", num_virtual_tokens=N)
    base = tiny.build(arch, task)
    batch = tiny.inputs(arch)
    seq2seq = tiny.FAMILIES[arch] == "seq2seq"
    cache = _prefix_as_cache(model, 2, seq2seq)
    expected_inputs = dict(batch)
    if not seq2seq:
        positions = torch.arange(tiny.SEQ).expand(2, -1) + (2 if arch == "roberta" else 0)  # RoBERTa: after pad
        batch["position_ids"] = positions
        expected_inputs["position_ids"] = positions + N
        expected_inputs["attention_mask"] = torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], 1)
    # The base model's own cache argument (cache= or past_key_values=, by transformers version).
    name = cache_argument(base.get_decoder() if seq2seq else base.base_model)
    expected = base(**expected_inputs, **{name: cache}).logits
    got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.shape == base(**tiny.inputs(arch)).logits.shape  # no extra positions in the output


@pytest.mark.parametrize("arch", sorted(tiny.BUILDERS))
def test_the_prefix_changes_outputs_on_every_family(arch: str) -> None:
    """Not silently inert: with a trained prefix the outputs differ from the base model's."""
    model = lp.inject(tiny.build(arch), "prefix_tuning", num_virtual_tokens=N)
    batch = tiny.inputs(arch)
    with torch.no_grad():
        difference = (model(**batch).logits - tiny.build(arch)(**batch).logits).abs().max()
    assert difference > 1e-3


def test_fold_projection_keeps_outputs_and_leaves_a_plain_prefix(tmp_path: Path) -> None:
    model = lp.inject(tiny.build("llama"), "prefix_tuning", num_virtual_tokens=N, projection=True)
    batch = tiny.inputs("llama")
    before = tiny.logits(model, batch)
    assert fold_projection(model) is model
    torch.testing.assert_close(tiny.logits(model, batch), before, rtol=0, atol=1e-6)
    assert list(lp.trainable_state_dict(model)) == ["prefix_tuning.prefix"]
    assert model.prefix_tuning.prefix.requires_grad and model.prefix_tuning.projection is None
    assert lp.get_info(model).config == PrefixTuningConfig(num_virtual_tokens=N, modules_to_save=[])
    lp.save_adapter(model, tmp_path)
    loaded = lp.load_adapter(tiny.build("llama"), tmp_path)  # injects projection=False from the record
    torch.testing.assert_close(tiny.logits(loaded, batch), before, rtol=0, atol=1e-6)
    fold_projection(loaded)  # nothing left to fold
    with pytest.raises(ValueError, match=r"fold_projection folds a prefix_tuning adapter; .* has 'prompt_tuning'"):
        fold_projection(lp.inject(tiny.build("llama"), "prompt_tuning", num_virtual_tokens=2))


def test_use_cache_false_returns_no_cache_and_generation_agrees() -> None:
    model = lp.inject(tiny.build("llama"), "prefix_tuning", num_virtual_tokens=N)
    batch = tiny.inputs("llama")
    name = cache_argument(model)
    assert output_cache(model(**batch, use_cache=False), name) is None
    assert output_cache(model(**batch, use_cache=True), name).get_seq_length() == N + tiny.SEQ
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(
        model.generate(**batch, **options, use_cache=False), model.generate(**batch, **options), rtol=0, atol=0
    )


def test_architecture_without_a_cache_is_refused() -> None:
    config = tf.DistilBertConfig(vocab_size=tiny.VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    with pytest.raises(
        ValueError,
        match=r"prefix_tuning puts its prefix into the attention's key/value cache, but DistilBertModel.forward "
        r"takes no attention cache \(no cache or past_key_values argument: distilbert attention has no cache\). "
        r"Use prompt_tuning or p_tuning",
    ):
        lp.inject(tf.DistilBertForMaskedLM(config), "prefix_tuning", num_virtual_tokens=2)
    lp.inject(tf.DistilBertForMaskedLM(config), "prompt_tuning", num_virtual_tokens=2)  # the alternative works


def test_gradient_checkpointing_is_refused_in_training() -> None:
    model = lp.inject(tiny.build("llama"), "prefix_tuning", num_virtual_tokens=N)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match=r"prefix_tuning does not work with gradient checkpointing"):
        model(**tiny.inputs("llama"))


def test_merge_is_refused_with_a_reason() -> None:
    model = lp.inject(tiny.build("bert"), "prefix_tuning", num_virtual_tokens=2)
    with pytest.raises(TypeError, match=r"prefix_tuning has nothing to merge into base weights"):
        lp.merge(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, r"PrefixTuningConfig.num_virtual_tokens must be a positive integer; got 0"),
        ({"projection": "yes"}, r"PrefixTuningConfig.projection must be True or False; got 'yes'"),
        ({"projection_hidden_size": 8}, r"projection_hidden_size must be None unless projection=True; got 8"),
        ({"projection": True, "projection_hidden_size": 0}, r"projection_hidden_size must be a positive integer"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixTuningConfig(**options)


@pytest.mark.parametrize(("arch", "size"), [("llama", 2 * 2 * 2 * 8), ("gpt2", 2 * 2 * 32), ("t5", 2 * 2 * 32)])
def test_prefix_covers_every_layer_key_and_value(arch: str, size: int) -> None:
    """Per token: layers x (key, value) x kv_heads x head_dim (LLaMA: 2 of 4 heads are key/value heads)."""
    model = lp.inject(tiny.build(arch), "prefix_tuning", num_virtual_tokens=N)
    assert isinstance(model.prefix_tuning, PrefixEncoder)
    assert model.prefix_tuning.prefix.shape == (N, size)
    default = lp.inject(tiny.build(arch), "prefix_tuning", num_virtual_tokens=N, projection=True)
    assert lp.get_info(default).config.projection_hidden_size == size // 4  # the key size
