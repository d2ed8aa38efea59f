"""Merging into a weight that another module shares (tied input/output embeddings) is refused."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import lightning_peft as lp


def tied_llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    model = tf.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("action", [lp.merge, lambda m: lp.unload(m, merge=True)])
def test_merging_lora_on_a_tied_embedding_is_refused_and_changes_nothing(action) -> None:
    model = lp.inject(tied_llama(), "lora", target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()
    ids = torch.randint(0, 64, (1, 6))
    before = model(input_ids=ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'model.embed_tokens'.*tied to 'lm_head'.*untie"):
        action(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # nothing merged, q_proj neither
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_untied_embeddings_merge_exactly() -> None:
    model = tied_llama()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model = lp.inject(model, "lora", target_modules=["embed_tokens"])
    with torch.no_grad():
        model.model.embed_tokens.lora_B.normal_()
    ids = torch.randint(0, 64, (1, 6))
    before = model(input_ids=ids).logits
    lp.merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
