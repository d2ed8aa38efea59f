"""Trainable tokens (standalone method and LoRA's ``trainable_token_indices``) against the formula.

``E'[i] = T[j]`` where ``i = t_j``, ``E[i]`` elsewhere; ``h = c * E'[x]``; a tied output layer's
logits for the chosen tokens are ``x T^T``. Peft parity is in tests/interop/parity.py (rows
``*trainable_tokens*`` / ``*trainable_token_indices*``).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import lightning_peft as lp
from lightning_peft.methods.trainable_tokens import LoRATokensLayer, TrainableTokensLayer

IDS = [3, 5, 9]


def _llama(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=tied,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output by ``embed_scale``, as Gemma's does."""

    def __init__(self, *args: int, scale: float, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class Emb(nn.Module):
    """An embedding (scaled or not), then a head."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        emb = (
            nn.Embedding(20, 6, padding_idx=0) if scale is None else ScaledEmbedding(20, 6, padding_idx=0, scale=scale)
        )
        self.emb, self.head = emb, nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def _set_rows(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layer = next(m for m in model.modules() if isinstance(m, TrainableTokensLayer) and m.adapter_names)
    with torch.no_grad():
        layer.trainable_tokens_delta.copy_(torch.randn(layer.trainable_tokens_delta.shape, generator=g))
    return layer.trainable_tokens_delta.detach().clone()


@pytest.mark.parametrize("scale", [None, 2.5])
def test_formula_gradients_and_merge(scale: float | None) -> None:
    model = Emb(scale)
    base_weight = model.emb.weight.detach().clone()
    x = torch.tensor([[0, 3, 4, 9], [5, 5, 1, 3]])
    before = model(x)
    lp.inject(model, "trainable_tokens", target_modules=["emb"], token_indices=IDS)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # init_weights=True: the rows themselves
    rows = _set_rows(model)
    expected_table = base_weight.clone()
    expected_table[IDS] = rows  # E'[t_j] = T[j]
    h = nn.functional.embedding(x, expected_table) * (scale or 1.0)
    expected = model.head.weight @ h.unsqueeze(-1)
    expected = expected.squeeze(-1) + model.head.bias
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.pow(2).sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["emb.trainable_tokens_delta"]
    grad = model.emb.trainable_tokens_delta.grad
    # Token 5 and 3 appear (twice), 9 once: every chosen row that appears gets a gradient.
    assert grad is not None and bool((grad.abs().sum(-1) > 0).all())
    lp.merge(model)
    torch.testing.assert_close(model.emb.base_layer.weight[IDS], rows, rtol=0, atol=0)  # rows written in
    torch.testing.assert_close(model(x), out.detach(), rtol=1e-6, atol=1e-6)
    lp.unmerge(model)
    torch.testing.assert_close(model.emb.base_layer.weight, base_weight, rtol=0, atol=0)  # originals back


def test_gradients_reach_only_the_chosen_rows_delta() -> None:
    """A padding token among the chosen ids does not train (F.embedding never trains padding_idx)."""
    model = Emb()
    lp.inject(model, "trainable_tokens", target_modules=["emb"], token_indices=[0, 3, 7])
    x = torch.tensor([[0, 3, 4, 3]])
    model(x).pow(2).sum().backward()
    grad = model.emb.trainable_tokens_delta.grad
    assert grad is not None
    assert bool((grad[0] == 0).all()), "the padding row trained"
    assert bool((grad[1] != 0).any()), "token 3 appears and must train"
    assert bool((grad[2] == 0).all()), "token 7 does not appear"
    assert model.emb.base_layer.weight.grad is None and not model.emb.base_layer.weight.requires_grad


def test_tied_output_layer_reads_the_same_rows() -> None:
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[3, 1, 5, 7, 9, 2]])
    before = model(ids).logits
    lp.inject(model, "trainable_tokens", token_indices=IDS)  # target: the input embedding, found by name
    assert isinstance(model.lm_head, TrainableTokensLayer) and model.lm_head.adapter_names == ()
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-6, atol=1e-6)
    rows = _set_rows(model)
    hidden = model.model(ids).last_hidden_state
    logits = model(ids).logits
    torch.testing.assert_close(logits[..., IDS], hidden @ rows.t(), rtol=1e-5, atol=1e-5)  # x T^T
    lp.merge(model)
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_tied_head_named_beside_its_embedding_is_the_same_adapter() -> None:
    """{embed_tokens: ids, lm_head: ids} on tied embeddings: the head's rows are the embedding's (as peft ties
    them); other rows for the head, or the head named alone, are refused by name and leave the model as it was."""
    ids = torch.tensor([[3, 1, 5, 7, 9, 2]])
    named = lp.inject(_llama(tied=True), "lora", target_modules=["q_proj"],
                      trainable_token_indices={"embed_tokens": IDS, "lm_head": IDS})  # fmt: skip
    assert isinstance(named.lm_head, LoRATokensLayer) and named.lm_head.adapter_names == ()  # no rows of its own
    alone = lp.inject(_llama(tied=True), "lora", target_modules=["q_proj"],
                      trainable_token_indices={"embed_tokens": IDS})  # fmt: skip

    def trained(model: torch.nn.Module) -> list[str]:
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    assert trained(named) == trained(alone) and "model.embed_tokens.trainable_tokens_delta" in trained(named)
    for rows, match in (
        ({"embed_tokens": IDS, "lm_head": IDS[:1]}, r"gives 'lm_head' the rows \[3\] and the input embedding"),
        ({"lm_head": IDS}, r"names 'lm_head', the output layer tied to the input embedding 'model.embed_tokens'"),
    ):
        model = _llama(tied=True)
        before = model(ids).logits
        with pytest.raises(ValueError, match=match):
            lp.inject(model, "lora", target_modules=["q_proj"], trainable_token_indices=rows)
        assert lp.get_info(model) is None and type(model.lm_head) is torch.nn.Linear
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_as_a_lora_option() -> None:
    model = _llama()
    lp.inject(model, "lora", target_modules=["q_proj"], r=2, trainable_token_indices={"embed_tokens": IDS})
    assert isinstance(model.model.embed_tokens, LoRATokensLayer)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.trainable_tokens_delta" in trained
    assert all("lora_" in n or "trainable_tokens" in n for n in trained)
    listed = _llama()
    lp.inject(listed, "lora", target_modules=["q_proj"], trainable_token_indices=IDS)  # a list: the input embedding
    assert isinstance(listed.model.embed_tokens, LoRATokensLayer)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"token_indices": []}, r"TrainableTokensConfig.token_indices must be a non-empty list"),
        ({"token_indices": [1, 1]}, r"token_indices must be a non-empty list of distinct token ids"),
        ({"token_indices": [-1]}, r"token_indices must be .*; got \[-1\]"),
        ({"token_indices": [1], "init_weights": "yes"}, r"init_weights must be True or False; got 'yes'"),
    ],
)
def test_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lp.inject(_llama(), "trainable_tokens", **options)


def test_layer_errors() -> None:
    with pytest.raises(ValueError, match=r"token index 40 is out of range for Embedding with 32 rows"):
        lp.inject(_llama(), "trainable_tokens", token_indices=[1, 40])
    with pytest.raises(TypeError, match=r"it is a Linear; trainable tokens wrap nn.Embedding"):
        lp.inject(_llama(), "trainable_tokens", target_modules=["q_proj"], token_indices=[1])
    with pytest.raises(ValueError, match=r"LoRAConfig.trainable_token_indices must be None, a non-empty list"):
        lp.inject(_llama(), "lora", target_modules=["q_proj"], trainable_token_indices={"embed_tokens": []})
    with pytest.raises(ValueError, match=r"trainable_token_indices.*nothing_here"):
        lp.inject(_llama(), "lora", target_modules=["q_proj"], trainable_token_indices={"nothing_here": [1]})


@pytest.mark.parametrize("tied", [False, True])
def test_named_adapters_with_disjoint_rows(tied: bool) -> None:
    """Two adapters on one embedding (peft's multiple adapters): each replaces its own rows; the rows
    of both show when both are active, each alone when one is; merging both is exact."""
    model = _llama(tied=tied)
    ids = torch.tensor([[3, 4, 5, 9, 11, 2]])
    lp.inject(model, "trainable_tokens", token_indices=[3, 5], adapter_name="a")
    lp.inject(model, "trainable_tokens", token_indices=[9, 11], adapter_name="b")
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and m.adapter_names]
    assert len(layers) == 2
    table = model.model.embed_tokens.base.weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            layer.trainable_tokens_delta.copy_(torch.randn(layer.trainable_tokens_delta.shape, generator=g))
            table[layer.ids] = layer.trainable_tokens_delta
    lp.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(model.model.embed_tokens(ids), nn.functional.embedding(ids, table), rtol=0, atol=0)
    both = model(ids).logits
    if tied:  # the head's logits of every replaced token are x T^T, whichever adapter trains it
        hidden = model.model(ids).last_hidden_state
        torch.testing.assert_close(both[..., [3, 5, 9, 11]], hidden @ table[[3, 5, 9, 11]].t(), rtol=1e-5, atol=1e-5)
    lp.merge(model)
    torch.testing.assert_close(model(ids).logits, both, rtol=1e-5, atol=1e-5)
    lp.unmerge(model)
    with pytest.raises(ValueError, match=r"token ids \[5\] for 'model.embed_tokens', which adapter 'a' already"):
        lp.inject(model, "trainable_tokens", token_indices=[5, 6], adapter_name="c")


def test_lora_and_trainable_tokens_on_one_embedding_are_refused() -> None:
    model = _llama()
    lp.inject(model, "lora", target_modules=["embed_tokens"], r=2, adapter_name="a")
    with pytest.raises(TypeError, match=r"holds LoRAEmbedding of adapter 'a'; trainable tokens share an embedding"):
        lp.inject(model, "trainable_tokens", token_indices=[3], adapter_name="b")
    other = _llama()
    lp.inject(other, "trainable_tokens", token_indices=[3], adapter_name="a")
    with pytest.raises(TypeError, match=r"cannot share a base layer"):
        lp.inject(other, "lora", target_modules=["embed_tokens"], r=2, adapter_name="b")
