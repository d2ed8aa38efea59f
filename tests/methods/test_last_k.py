"""Last-k: exactly the last k blocks train, found per architecture; clear errors for bad k / blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods import last_k
from lightning_peft.methods.last_k import BlockDelta, LastKConfig
from tests import tiny

BLOCKS = {
    "llama": "model.layers",
    "gpt2": "transformer.h",
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "t5": "decoder.block",
    "bart": "model.decoder.layers",
}


@pytest.mark.parametrize("arch", list(BLOCKS))
def test_finds_the_blocks_of_each_architecture(arch: str) -> None:
    name, blocks = last_k.find_blocks(tiny.build(arch), LastKConfig())
    assert name == BLOCKS[arch] and len(blocks) == 2


@pytest.mark.parametrize(("arch", "k"), [("llama", 1), ("gpt2", 2), ("t5", 1)])
def test_trains_exactly_the_last_k_blocks(arch: str, k: int) -> None:
    base = tiny.build(arch)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    prefixes = tuple(f"{BLOCKS[arch]}.{i}." for i in range(2 - k, 2))
    in_blocks = {n for n in before if n.startswith(prefixes)}
    model = lp.inject(copy.deepcopy(base), "last_k", k=k)
    # One dense delta per parameter of those blocks: same names (with the wrapper's) and shapes.
    deltas = {n.replace(".delta.", "."): p.shape for n, p in state.adapter_parameters(model)}
    assert deltas == {n: before[n].shape for n in in_blocks}
    assert all(isinstance(m, BlockDelta) for _, m in state.adapter_modules(model))

    optimizer = torch.optim.AdamW([p for _, p in state.adapter_parameters(model)], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        model(**tiny.inputs(arch, seed=step)).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {n: p.detach() for n, p in lp.unload(lp.merge(model)).named_parameters()}
    assert after.keys() == before.keys()
    for name in before:
        if name in in_blocks:
            assert not torch.equal(after[name], before[name]), f"{name} is in the last {k} blocks but did not train"
        else:
            assert torch.equal(after[name], before[name]), f"{name} is outside the last {k} blocks but changed"


def test_follows_the_formula() -> None:
    """p_eff = p + delta_p for every parameter of the wrapped module."""
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    layer = BlockDelta(copy.deepcopy(base))
    assert set(layer.delta) == {"weight", "bias"}
    for delta in layer.delta.values():
        nn.init.normal_(delta)
    x = torch.randn(2, 4)
    expected = x @ (base.weight + layer.delta["weight"]).T + base.bias + layer.delta["bias"]
    torch.testing.assert_close(layer(x), expected)


def test_explicit_blocks() -> None:
    model = lp.inject(tiny.build("t5"), "last_k", k=2, blocks="encoder.block")
    assert all(n.startswith("encoder.block.") for n in lp.get_info(model).modules)
    assert len({n.split(".")[2] for n in lp.get_info(model).modules}) == 2


def test_k_larger_than_the_number_of_blocks_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"LastKConfig.k must be at most the number of blocks in model.layers \(2\); got 3"
    ):
        lp.inject(tiny.build("llama"), "last_k", k=3)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"k": 0}, ValueError, r"LastKConfig.k must be a positive integer; got 0"),
        (
            {"blocks": ""},
            ValueError,
            r"LastKConfig.blocks must be None or a module name such as 'model.layers'; got ''",
        ),
        (
            {"blocks": "decoder.layers"},
            ValueError,
            r"LastKConfig.blocks='decoder.layers' matched no module of LlamaForCausalLM; it must name one module. "
            r"Lists of blocks it has: model.layers",
        ),
        (
            {"blocks": "self_attn"},
            ValueError,
            r"LastKConfig.blocks='self_attn' matched 2 modules \(model.layers.0.self_attn, model.layers.1.self_attn\)",
        ),
        ({"blocks": "norm"}, ValueError, r"LastKConfig.blocks='norm' names model.norm, which holds no blocks"),
    ],
)
def test_invalid_options_are_refused(options: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        lp.inject(tiny.build("llama"), "last_k", **options)


def test_a_model_without_blocks_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"last_k found no list of repeated blocks in Sequential; pass LastKConfig.blocks"
    ):
        lp.inject(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), "last_k")
