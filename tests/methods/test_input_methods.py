"""What the three input-side methods share: padding, heads, generation, limits, hooks and checkpoints.

Parity with peft and each method's own options are in test_prompt_tuning.py, test_p_tuning.py
and test_prefix_tuning.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft import registry
from tests import tiny
from tests.methods.input_reference import greedy_by_scoring

METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]
N = 3
GENERATE = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


def inject(method: str, arch: str, task: str = "lm", **options: object) -> nn.Module:
    model = lp.inject(tiny.build(arch, task), method, **({"num_virtual_tokens": N} | options))
    _perturb(model)
    return model


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, tensor in lp.trainable_state_dict(model).items():
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.3)


def test_the_methods_are_registered_as_input_methods() -> None:
    for method in METHODS:
        assert registry.get(method).kind == "input"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "roberta"])
def test_classifier_reads_the_right_position_in_padded_rows(method: str, arch: str) -> None:
    """A right-padded row is classified as the same row alone (decoders pool the last real token)."""
    model = inject(method, arch, "classify")
    pad = model.config.pad_token_id or 0
    ids = torch.randint(3, tiny.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.full((2, 2), pad)], dim=1)
    padded[1, -2:] = ids[1, :2]  # the second row is 8 real tokens
    mask = (torch.arange(8) < 6).long().expand(2, -1).clone()
    mask[1] = 1
    batch_logits = model(input_ids=padded, attention_mask=mask).logits
    alone = model(input_ids=ids[:1], attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
    torch.testing.assert_close(batch_logits[:1], alone, rtol=0, atol=1e-5)
    assert batch_logits.shape == (2, 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_generation_with_the_cache_agrees_with_scoring_and_with_the_row_alone(method: str, arch: str) -> None:
    model = inject(method, arch)
    batch = tiny.inputs(arch)
    batch.pop("decoder_input_ids", None)
    ids = batch["input_ids"]
    if tiny.FAMILIES[arch] == "decoder":  # decoders generate from left-padded rows
        batch["attention_mask"] = batch["attention_mask"].flip(1)
        batch["input_ids"] = ids.masked_fill(batch["attention_mask"] == 0, 0)
    cached = model.generate(**batch, **GENERATE)
    torch.testing.assert_close(model.generate(**batch, **GENERATE, use_cache=False), cached, rtol=0, atol=0)
    scoring = dict(batch) | ({"decoder_input_ids": cached[:, :1]} if tiny.FAMILIES[arch] == "seq2seq" else {})
    scored = greedy_by_scoring(model, scoring, GENERATE["max_new_tokens"])  # no cache: the whole sequence each step
    torch.testing.assert_close(cached, scored[:, : cached.shape[1]], rtol=0, atol=0)
    real = batch["attention_mask"][0].bool()
    alone = model.generate(input_ids=batch["input_ids"][:1, real], **GENERATE)
    new = cached.shape[1] - (ids.shape[1] if tiny.FAMILIES[arch] == "decoder" else 0)
    torch.testing.assert_close(cached[0, -new:], alone[0, -new:], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_token_type_ids_and_inputs_embeds_are_accepted(method: str) -> None:
    model = inject(method, "bert")
    batch = tiny.inputs("bert")
    plain = model(**batch).logits
    zeros = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).logits
    torch.testing.assert_close(zeros, plain, rtol=0, atol=1e-6)  # BERT's default token types are zeros
    embeds = model.get_input_embeddings()(batch["input_ids"])
    by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(by_embeds, plain, rtol=0, atol=1e-6)
    positional = model(batch["input_ids"], batch["attention_mask"]).logits  # positional arguments too
    torch.testing.assert_close(positional, plain, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_labels_are_padded_for_virtual_tokens(method: str, arch: str) -> None:
    """The loss is the model's loss over the real tokens' labels (virtual positions are -100)."""
    model = inject(method, arch)
    batch = tiny.inputs(arch)
    labels = batch["input_ids"].clone()
    labels[1, 2] = -100
    out = model(**batch, labels=labels)
    shift = out.logits.shape[1] - labels.shape[1]  # N for virtual tokens, 0 for a prefix
    padded = torch.cat([torch.full((2, shift), -100), labels], dim=1)
    if arch == "llama":  # next-token prediction: position t predicts label t + 1
        logits, padded = out.logits[:, :-1], padded[:, 1:]
    else:  # masked LM: position t predicts label t
        logits = out.logits
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), padded.flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert shift == (0 if method == "prefix_tuning" else N)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("arch", "limit"), [("gpt2", 64), ("roberta", 70), ("bart", 64)])
def test_inputs_that_overflow_the_positions_are_refused(method: str, arch: str, limit: int) -> None:
    model = inject(method, arch)
    fits = {"input_ids": torch.randint(3, tiny.VOCAB, (1, limit - N))}
    if tiny.FAMILIES[arch] == "seq2seq":
        if method == "prefix_tuning":  # the prefix is in the decoder
            fits = {"input_ids": fits["input_ids"][:, :4], "decoder_input_ids": fits["input_ids"]}
        else:
            fits["decoder_input_ids"] = fits["input_ids"][:, :4]
    model(**fits)
    key = "decoder_input_ids" if tiny.FAMILIES[arch] == "seq2seq" and method == "prefix_tuning" else "input_ids"
    overflow = dict(fits) | {key: torch.cat([fits[key], fits[key][:, :1]], dim=1)}
    with pytest.raises(
        ValueError,
        match=rf"{method}: {limit - N + 1} tokens plus 3 virtual tokens need {limit + 1} positions, more than the "
        rf"{limit} the model has \(config\.(max_position_embeddings|n_positions)=\d+.*\); keep inputs \(with earlier "
        rf"tokens\) to at most {limit - N} tokens",
    ):
        model(**overflow)


@pytest.mark.parametrize("method", METHODS)
def test_generation_past_the_positions_is_refused(method: str) -> None:
    model = inject(method, "gpt2")
    ids = torch.randint(3, tiny.VOCAB, (1, 58))
    model.generate(input_ids=ids, **(GENERATE | {"max_new_tokens": 3}))  # 3 + 58 + 2 fed back = 63 positions
    with pytest.raises(ValueError, match=rf"{method}: 1 token after 61 earlier ones plus 3 virtual tokens need 65"):
        model.generate(input_ids=ids, **(GENERATE | {"max_new_tokens": 6}))


def test_relative_positions_have_no_limit() -> None:
    model = inject("prompt_tuning", "t5")
    model(input_ids=torch.randint(3, tiny.VOCAB, (1, 200)), decoder_input_ids=torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize("method", METHODS)
def test_a_4d_attention_mask_is_refused(method: str) -> None:
    model = inject(method, "llama")
    with pytest.raises(ValueError, match=rf"{method} extends attention_mask .* 2D \(batch, length\) padding mask"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("method", METHODS)
def test_a_model_without_input_embeddings_is_refused(method: str) -> None:
    message = rf"{method} needs a transformers model with token input embeddings .* Sequential has none"
    with pytest.raises(ValueError, match=message):
        lp.inject(nn.Sequential(nn.Linear(4, 4)), method, num_virtual_tokens=2)
    headless = tiny.build("gpt2")
    headless.get_input_embeddings = lambda: None  # e.g. a model fed only with precomputed features
    with pytest.raises(ValueError, match=rf"{method} needs .* GPT2LMHeadModel has none"):
        lp.inject(headless, method, num_virtual_tokens=2)
    assert not list(headless.named_modules())[-1][0].endswith(method)  # nothing left behind


@pytest.mark.parametrize("method", METHODS)
def test_unload_removes_every_hook_and_a_copy_is_independent(method: str) -> None:
    model = inject(method, "t5")
    batch = tiny.inputs("t5")
    adapted = tiny.logits(model, batch)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(tiny.logits(twin, batch), adapted, rtol=0, atol=0)
    lp.unload(twin, merge=False)
    torch.testing.assert_close(tiny.logits(model, batch), adapted, rtol=0, atol=0)  # the original keeps its hooks
    lp.unload(model, merge=False)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not hasattr(model, method)
    with torch.no_grad():  # the unloaded model is frozen: compare both without autograd (another kernel)
        torch.testing.assert_close(tiny.logits(model, batch), tiny.logits(tiny.build("t5"), batch), rtol=0, atol=0)
    lp.inject(model, method, num_virtual_tokens=2)  # and it takes a new adapter


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_hold_only_the_adapter_and_check_its_options(method: str) -> None:
    model = inject(method, "bert", "classify")
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    state = lp.trainable_state_dict(model)
    assert set(state) == declared
    assert {k for k in state if not k.startswith(f"{method}.")} == {
        "classifier.trained.weight",
        "classifier.trained.bias",
    }
    fresh = lp.inject(tiny.build("bert", "classify"), method, num_virtual_tokens=N)
    fresh.load_state_dict(state)
    batch = tiny.inputs("bert")
    torch.testing.assert_close(tiny.logits(fresh, batch), tiny.logits(model, batch), rtol=0, atol=0)
    other = lp.inject(tiny.build("bert", "classify"), method, num_virtual_tokens=N + 1)
    with pytest.raises(ValueError, match=rf"trained with other {method} options: num_virtual_tokens=3 in the state"):
        other.load_state_dict(state)


@pytest.mark.parametrize("method", METHODS)
def test_injection_into_a_lightning_module_finds_the_inner_model(method: str) -> None:
    from tests.lightning.modules import TinyLM

    module = lp.inject(TinyLM(arch="gpt2"), method, num_virtual_tokens=N)
    assert isinstance(getattr(module.model, method), nn.Module)
    assert all(k.startswith(f"model.{method}.") for k in lp.trainable_state_dict(module))
    ids = tiny.inputs("gpt2")["input_ids"]
    assert torch.isfinite(module.training_step((ids,), 0))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_on_cuda(method: str) -> None:
    model = lp.inject(tiny.build("llama").cuda(), method, num_virtual_tokens=N)
    batch = {k: v.cuda() for k, v in tiny.inputs("llama").items()}
    assert model(**batch, labels=batch["input_ids"]).loss.isfinite()
    assert model.generate(**batch, **GENERATE).device.type == "cuda"
