"""lp.enable_gradient_checkpointing: the same gradients as without it, for less activation memory.

LLaMA, BERT, ViT (transformers' own switch) and a plain module (``blocks=``), both checkpoint
implementations. Memory is measured without timing or CUDA: the bytes of the tensors created in the
forward that are still alive when backward starts (what autograd keeps), counted by a dispatch mode.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lightning_peft as lp
from lightning_peft.core.checkpointing import checkpointed_blocks, disable_gradient_checkpointing
from tests import tiny
from tests.peft_reference import randomize_adapter

ARCHS = ["llama", "bert", "vit", "plain"]
#: A module inside each architecture's first block: its forward runs twice when that block is recomputed.
PROBES = {"llama": "model.layers.0.mlp", "bert": "bert.encoder.layer.0.output", "vit": "vit.layers.0.mlp",
          "plain": "layers.0.fc2"}  # fmt: skip


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return x + self.dropout(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class Plain(nn.Module):
    """No transformers anywhere: embeddings, a ModuleList of residual blocks, a head."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(tiny.VOCAB, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, tiny.VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return tf.modeling_outputs.BaseModelOutput(last_hidden_state=self.head(x))


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "vit":
        config = tf.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.1,
        )  # fmt: skip
        return lp.inject(tf.ViTForImageClassification(config).eval(), "lora", r=4, dropout=0.1)
    if arch == "plain":
        return lp.inject(Plain().eval(), "lora", r=4, dropout=0.1, target_modules=["fc1", "fc2"])
    return lp.inject(tiny.build(arch), "lora", r=4, dropout=0.1)


def inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return tiny.inputs("llama" if arch == "plain" else arch)


def enable(model: nn.Module, arch: str, use_reentrant: bool) -> None:
    blocks = {"blocks": ["layers"]} if arch == "plain" else {}
    assert lp.enable_gradient_checkpointing(model, use_reentrant=use_reentrant, **blocks) is model
    if arch == "plain":
        assert checkpointed_blocks(model) == [f"layers.{i}" for i in range(4)]
    else:
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def loss(model: nn.Module, arch: str) -> torch.Tensor:
    output = model(**inputs(arch))
    logits = output.last_hidden_state if arch == "plain" else output.logits
    return logits.float().pow(2).mean()


def gradients(arch: str, checkpointing: bool, use_reentrant: bool) -> dict[str, torch.Tensor]:
    model = build(arch)
    randomize_adapter(model, std=0.1)  # B != 0, so A gets a gradient too
    if checkpointing:
        enable(model, arch, use_reentrant)
    model.train()
    calls: list[int] = []
    model.get_submodule(PROBES[arch]).register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)  # the same dropout masks: checkpointing replays the RNG state in its recompute
    loss(model, arch).backward()
    assert len(calls) == (2 if checkpointing else 1)  # the block really was recomputed in backward
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


class LiveBytes(TorchDispatchMode):
    """Records every tensor an op creates; ``held()`` sums the storages still alive (parameters excluded)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: list[weakref.ref[torch.Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def held(self) -> int:
        storages = {}
        for ref in self.refs:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self.params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


def activation_bytes(arch: str, checkpointing: bool, use_reentrant: bool) -> int:
    model = build(arch)
    if checkpointing:
        enable(model, arch, use_reentrant)
    model.train()
    torch.manual_seed(0)
    with LiveBytes(model) as mode:
        value = loss(model, arch)
    held = mode.held()  # just before backward: what autograd (and the loss) keep
    value.backward()  # and the graph was complete
    return held


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_gradients_with_and_without_checkpointing(arch: str, use_reentrant: bool) -> None:
    plain = gradients(arch, checkpointing=False, use_reentrant=use_reentrant)
    checkpointed = gradients(arch, checkpointing=True, use_reentrant=use_reentrant)
    expected = {name for name, p in build(arch).named_parameters() if p.requires_grad}
    assert set(plain) == set(checkpointed) == expected  # every trainable tensor, the first block's too
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_holds_less_activation_memory(arch: str, use_reentrant: bool) -> None:
    plain = activation_bytes(arch, checkpointing=False, use_reentrant=use_reentrant)
    checkpointed = activation_bytes(arch, checkpointing=True, use_reentrant=use_reentrant)
    assert activation_bytes(arch, checkpointing=True, use_reentrant=use_reentrant) == checkpointed  # deterministic
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


def test_reentrant_checkpointing_needs_the_input_grad_hook() -> None:
    """Without any input-grad hook (transformers' removed), reentrant checkpointing trains nothing; ours is enough."""
    model = lp.inject(tiny.build("llama"), "lora", r=4)
    randomize_adapter(model, std=0.1)
    lp.enable_gradient_checkpointing(model, use_reentrant=True).train()
    model.disable_input_require_grads()  # transformers 5 adds its own hook for input_ids models: not ours
    batch = tiny.inputs("llama")
    assert model(**batch).logits.requires_grad  # our hook alone keeps the graph
    model.model.embed_tokens._forward_hooks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        logits = model(**batch).logits
    assert not logits.requires_grad  # control: checkpointed layers saw no grad-requiring input, nothing trains


def test_plain_blocks_by_class_eval_mode_disable_and_deepcopy() -> None:
    model = build("plain")
    lp.enable_gradient_checkpointing(model, blocks=[Block], use_reentrant=True)
    assert checkpointed_blocks(model) == [f"layers.{i}" for i in range(4)]
    copied = copy.deepcopy(model)  # its wrappers call the copy's own blocks
    calls: list[int] = []
    model.layers[0].fc2.register_forward_pre_hook(lambda *_: calls.append(1))
    assert checkpointed_blocks(copied) == checkpointed_blocks(model)
    copied.train()
    loss(copied, "plain").backward()
    assert len(calls) == 0 and all(p.grad is None for p in model.parameters())  # not the original's
    assert all(p.grad is not None for p in copied.parameters() if p.requires_grad)
    model.eval()
    loss(model, "plain").backward()  # eval mode: no checkpoint, one forward
    assert len(calls) == 1
    assert disable_gradient_checkpointing(model) is model and checkpointed_blocks(model) == []
    assert "forward" not in vars(model.layers[0])
    model.train()
    loss(model, "plain").backward()
    assert len(calls) == 2  # plain forward again, no recompute


def test_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"Sequential is not a transformers model that supports gradient checkpointing.*"
                                        r"blocks=\['layers'\]"):  # fmt: skip
        lp.enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"use_reentrant must be True or False; got 'yes'"):
        lp.enable_gradient_checkpointing(tiny.build("llama"), use_reentrant="yes")  # type: ignore[arg-type]
    model = Plain()
    with pytest.raises(ValueError, match=r"blocks entry 'layer' names no module of Plain; did you mean one of "):
        lp.enable_gradient_checkpointing(model, blocks=["layer"])
    with pytest.raises(ValueError, match=r"blocks entry 'nowhere' names no module of Plain\.$"):
        lp.enable_gradient_checkpointing(model, blocks=["nowhere"])
    with pytest.raises(ValueError, match=r"blocks entry Conv2d matches no module of Plain"):
        lp.enable_gradient_checkpointing(model, blocks=[nn.Conv2d])
    with pytest.raises(TypeError, match=r"each blocks entry must be a module name \(str\) or an nn.Module subclass"):
        lp.enable_gradient_checkpointing(model, blocks=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"blocks must be a non-empty list of module names or module classes"):
        lp.enable_gradient_checkpointing(model, blocks="layers")
    with pytest.raises(TypeError, match=r"blocks must be a non-empty list"):
        lp.enable_gradient_checkpointing(model, blocks=[])
    with pytest.raises(ValueError, match=r"blocks \['layers.0.dropout.x'\]|names no module"):
        lp.enable_gradient_checkpointing(model, blocks=["layers.0.dropout.x"])
    assert checkpointed_blocks(model) == []  # nothing wrapped by a refused call
