"""LoRAConfig.ensure_weight_tying (peft's option): the tied output layer trains the embedding's copy.

With tied word embeddings, ``embed(x) = E[x]`` and ``logits = h E^T`` read one table ``E``. With the
embedding in ``modules_to_save`` and ``ensure_weight_tying=True`` both uses read its trained copy
``E'``: one tensor, so ``dL/dE' = dL/dE'|_input + dL/dE'|_output`` and a step moves both uses.
Parity with peft 0.21.2 (outputs, merge, both directions) is in tests/interop/parity.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import lightning_peft as lp
from lightning_peft.methods.lora import LoRAConfig
from tests.lightning.modules import TinyLM, fit_stop_resume, token_loader

IDS = torch.tensor([[3, 5, 7, 9, 11, 5], [4, 6, 8, 10, 12, 14]])


def _tied_llama(seed: int = 0, tie: bool = True) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=tie,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _config(**extra: object) -> LoRAConfig:
    options: dict = {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}
    return LoRAConfig(**{**options, **extra})


def _tied(model: tf.LlamaForCausalLM) -> tuple[nn.Module, nn.Module]:
    return model.model.embed_tokens, model.lm_head


def _perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_output_layer_copy_is_the_embedding_copy_and_the_user_config_is_untouched() -> None:
    model = _tied_llama()
    config = _config()
    lp.inject(model, config)
    embed, head = _tied(model)
    assert head.trained.weight is embed.trained.weight  # one tensor
    assert head.base_layer.weight is embed.base_layer.weight  # the frozen originals stay tied too
    assert config.modules_to_save == ["embed_tokens"]  # resolved on a copy
    assert lp.get_info(model).config.modules_to_save == ["embed_tokens", "model.embed_tokens"]  # peft's list
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"model.embed_tokens.trained.weight"}  # named_parameters lists the shared tensor once
    assert [n for n in lp.trainable_state_dict(model) if "lora_" not in n] == ["model.embed_tokens.trained.weight"]


def test_forward_and_gradient_follow_the_formula() -> None:
    """logits = h E'^T; dL/dE' is the sum of the input lookup's and the output layer's gradients."""
    model = _tied_llama()
    lp.inject(model, _config())
    _perturb(model)
    embed, head = _tied(model)
    table = embed.trained.weight
    out = model.model(input_ids=IDS).last_hidden_state  # (B, T, d)
    logits = model.lm_head(out)
    assert torch.allclose(logits, F.linear(out, table), atol=1e-6)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 96), IDS[:, 1:].reshape(-1))
    loss.backward()
    tied_grad = table.grad.clone()

    # The same computation with two separate copies of E': the tied gradient is their sum.
    reference = _tied_llama(tie=False)
    reference.load_state_dict(_tied_llama().state_dict(), strict=False)
    lp.inject(reference, LoRAConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for (name, p), (_, q) in zip(
            ((n, p) for n, p in reference.named_parameters() if p.requires_grad and "lora_" in n),
            ((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n),
            strict=True,
        ):
            assert "lora_" in name
            p.copy_(q)
        reference.model.embed_tokens.trained.weight.copy_(table)
        reference.lm_head.trained.weight.copy_(table)
    ref_logits = reference(input_ids=IDS).logits
    assert torch.allclose(ref_logits, logits, atol=1e-5)
    F.cross_entropy(ref_logits[:, :-1].reshape(-1, 96), IDS[:, 1:].reshape(-1)).backward()
    from_input = reference.model.embed_tokens.trained.weight.grad
    from_output = reference.lm_head.trained.weight.grad
    assert from_input.abs().sum() > 0 and from_output.abs().sum() > 0
    unseen = [i for i in range(96) if i not in IDS.tolist()[0] + IDS.tolist()[1]]
    assert torch.count_nonzero(from_input[unseen]) == 0  # rows never looked up get only the output's gradient
    torch.testing.assert_close(tied_grad, from_input + from_output, atol=1e-6, rtol=1e-5)


def test_the_tie_holds_after_a_step_a_save_and_load_and_a_merge(tmp_path: Path) -> None:
    model = _tied_llama()
    lp.inject(model, _config())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    embed, head = _tied(model)
    assert head.trained.weight is embed.trained.weight
    assert not torch.equal(embed.trained.weight, embed.base_layer.weight)  # it did move
    want = model(input_ids=IDS).logits

    lp.save_adapter(model, tmp_path / "ours")
    fresh = lp.load_adapter(_tied_llama(), tmp_path / "ours")
    embed2, head2 = _tied(fresh)
    assert head2.trained.weight is embed2.trained.weight
    torch.testing.assert_close(fresh(input_ids=IDS).logits, want, atol=1e-6, rtol=0)

    lp.save_peft_adapter(model, tmp_path / "peft")
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    head_key, embed_key = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"
    assert torch.equal(stored[head_key], stored[embed_key])  # peft's file holds the table under both names
    options = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert options["ensure_weight_tying"] is True
    assert options["modules_to_save"] == ["embed_tokens", "model.embed_tokens"]
    back = lp.load_peft_adapter(_tied_llama(), tmp_path / "peft")
    assert _tied(back)[1].trained.weight is _tied(back)[0].trained.weight
    torch.testing.assert_close(back(input_ids=IDS).logits, want, atol=1e-6, rtol=0)

    merged = lp.unload(model, merge=True)
    assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged(input_ids=IDS).logits, want, atol=1e-5, rtol=0)


def test_lm_head_in_modules_to_save_ties_the_same_way() -> None:
    model = _tied_llama()
    lp.inject(model, _config(modules_to_save=["lm_head"]))
    embed, head = _tied(model)
    assert head.trained.weight is embed.trained.weight
    assert lp.get_info(model).config.modules_to_save == ["model.embed_tokens"]


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        (
            lambda: _tied_llama(tie=False),
            {},
            r"LoRAConfig\.ensure_weight_tying=True, but no layer of LlamaForCausalLM is tied to its input embedding "
            r"'model\.embed_tokens'.*valid: ensure_weight_tying=False",
        ),
        (
            _tied_llama,
            {"modules_to_save": ["norm"]},
            r"ensure_weight_tying=True, but modules_to_save=\['norm'\] has no embedding layer .*valid: modules_to_save "
            r"naming 'model\.embed_tokens', or ensure_weight_tying=False",
        ),
        (
            _tied_llama,
            {"modules_to_save": [], "target_modules": ["q_proj", "embed_tokens"]},
            r"ensure_weight_tying=True with the input embedding in target_modules .* is not implemented",
        ),
        (
            _tied_llama,
            {"modules_to_save": [], "trainable_token_indices": [5]},
            r"has no embedding layer .* \(trainable_token_indices ties the output layer's rows without it\)",
        ),
        (
            _tied_llama,
            {"target_modules": ["q_proj", "lm_head"]},
            r"'lm_head', tied to 'model\.embed_tokens', is inside a LoRALinear of this adapter",
        ),
    ],
)
def test_what_peft_only_warns_about_or_does_not_implement_is_refused_by_name(model, options, message) -> None:
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        lp.inject(base, _config(**options))
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_bad_values_and_a_second_adapter_are_refused() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig\.ensure_weight_tying must be True or False; got 'yes'"):
        _config(ensure_weight_tying="yes")
    model = _tied_llama()
    lp.inject(model, _config())
    with pytest.raises(ValueError, match=r"the input embedding 'model\.embed_tokens' already holds another adapter"):
        lp.inject(model, _config(), adapter_name="other")


@pytest.mark.slow
def test_fits_in_a_trainer_and_resumes_exactly(tmp_path: Path) -> None:
    """GPT-2 (lm_head tied to transformer.wte; peft's rule takes lm_head in modules_to_save as the embedding)."""
    options = {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True, "r": 2}
    straight, resumed, _ = fit_stop_resume(
        tmp_path, lambda: TinyLM(arch="gpt2"), lambda: token_loader(n=8, shuffle=False), options
    )
    for module in (straight, resumed):
        wte, head = module.model.transformer.wte, module.model.lm_head
        assert head.trained.weight is wte.trained.weight
        assert not torch.equal(wte.trained.weight, wte.base_layer.weight)


def test_without_the_option_a_copy_of_a_tied_embedding_warns_and_is_untied_as_in_peft() -> None:
    model = _tied_llama()
    with pytest.warns(UserWarning, match=r"the trained copy is untied .* Pass ensure_weight_tying=True"):
        lp.inject(model, _config(ensure_weight_tying=False))
    embed, head = _tied(model)
    assert type(head) is nn.Linear and head.weight is embed.base_layer.weight  # lm_head reads the frozen table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.inject(_tied_llama(tie=False), _config(ensure_weight_tying=False))  # nothing tied: no warning
