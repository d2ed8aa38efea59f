"""LoRA: parity with Hugging Face peft, the formula, every layer type, merge/unmerge/unload."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.methods.lora import LoRAConfig, LoRALinear
from lightning_peft.methods.lora_conv import LoRAConv
from lightning_peft.methods.lora_embedding import LoRAEmbedding
from tests import more_archs, tiny
from tests.peft_reference import copy_into_peft, randomize_adapter


def lora_rename(module: str, local: str) -> str:
    # The weights of our LoRALinear/Conv2d map to peft's lora_A/lora_B sub-layers; embeddings to
    # peft's lora_embedding_A/B parameters.
    if (
        module.endswith("embed_tokens")
        or module.endswith("wte")
        or module.endswith("word_embeddings")
        or module.endswith("shared")
    ):
        return f"{module}.lora_embedding_{local[-1]}.default"
    return f"{module}.{local}.default.weight"


@pytest.mark.parametrize("arch", tiny.PARITY_ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft(arch: str, rslora: bool) -> None:
    ours = lp.inject(tiny.build(arch), "lora", r=4, alpha=8, rslora=rslora, dropout=0.1)
    targets = lp.get_info(ours).config.target_modules
    reference = peft.get_peft_model(
        tiny.build(arch),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.1, target_modules=targets),
    ).eval()
    randomize_adapter(ours)
    assert copy_into_peft(ours, reference, lora_rename) == 2 * len(lp.get_info(ours).modules)
    batch = tiny.inputs(arch)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_parity_with_peft_on_embeddings_and_all_linear(arch: str) -> None:
    embed = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}[arch]
    ours = lp.inject(
        tiny.build(arch),
        "lora",
        r=4,
        alpha=8,
        target_modules=[*{"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}[arch], embed],
    )
    # peft selects by the same rules; give it the resolved names so both wrap the same set.
    names = lp.get_info(ours).modules
    reference = peft.get_peft_model(tiny.build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
    reference.eval()
    randomize_adapter(ours, seed=3)
    copy_into_peft(ours, reference, lora_rename)
    batch = tiny.inputs(arch)
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.conv(x)))  # (B, 8, H, W)
        return self.head(h.mean(dim=(2, 3)))


def test_conv2d_parity_with_peft() -> None:
    torch.manual_seed(0)
    base = ConvNet()
    ours = lp.inject(copy.deepcopy(base), "lora", r=2, alpha=4, target_modules=["conv", "point"])
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"])
    )
    randomize_adapter(ours)
    # Our conv adapters are sub-convs (conv.lora_A.weight); peft's are conv.lora_A.default.weight.
    copy_into_peft(ours, reference, lambda m, local: f"{m}.default.{local}")
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)
    assert isinstance(ours.conv, LoRAConv)


def test_linear_follows_the_formula() -> None:
    """h = W x + b + (alpha / r) B A x, written out."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), LoRAConfig(r=3, alpha=6))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 7, 6)
    expected = x @ base.weight.T + base.bias + (6 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    rs = LoRALinear(copy.deepcopy(base), LoRAConfig(r=4, alpha=6, rslora=True))
    assert math.isclose(rs.scaling, 6 / 2)


def test_embedding_follows_the_formula() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0)
    layer = LoRAEmbedding(copy.deepcopy(base), LoRAConfig(r=2, alpha=2))
    nn.init.normal_(layer.lora_A)
    ids = torch.tensor([[1, 2, 0], [9, 3, 3]])
    expected = base.weight[ids] + layer.lora_A.T[ids] @ layer.lora_B.T
    torch.testing.assert_close(layer(ids), expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d", "conv2d-1x1"])
def test_merge_unmerge_is_exact(kind: str) -> None:
    torch.manual_seed(0)
    from transformers.pytorch_utils import Conv1D

    base, x = {
        "linear": (nn.Linear(8, 6), torch.randn(3, 8)),
        "conv1d": (Conv1D(6, 8), torch.randn(3, 8)),
        "embedding": (nn.Embedding(12, 6), torch.randint(0, 12, (3, 5))),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
        "conv2d-1x1": (nn.Conv2d(3, 4, 1), torch.randn(2, 3, 5, 5)),
    }[kind]
    original = base.weight.detach().clone()
    model = nn.Sequential(base)
    lp.inject(model, "lora", r=3, alpha=5, target_modules=["0"])
    randomize_adapter(model)
    adapted = model(x)
    lp.merge(model)
    assert model[0].merged
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(model[0].base_layer(x), adapted, rtol=0, atol=1e-5)  # really in the weight
    lp.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, original, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


def test_eval_never_merges() -> None:
    model = lp.inject(tiny.build("llama"), "lora")
    model.eval()
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_modules_to_save_head_trains_in_full_and_is_saved() -> None:
    model = lp.inject(tiny.build("bert", "classify"), "lora", r=2)
    sd = lp.trainable_state_dict(model)
    assert {"classifier.trained.weight", "classifier.trained.bias"} <= set(sd)
    assert model.classifier.weight.requires_grad and model.classifier.out_features == 2  # attribute passthrough
    none = lp.inject(tiny.build("bert", "classify"), "lora", r=2, modules_to_save=[])
    assert not any("classifier" in k for k in lp.trainable_state_dict(none))


def test_gaussian_init_and_zero_update() -> None:
    layer = LoRALinear(nn.Linear(64, 64), LoRAConfig(r=8, init="gaussian"))
    assert torch.count_nonzero(layer.lora_B) == 0
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.02


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), LoRAConfig(r=4, dropout=0.5))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_bf16_base_gets_bf16_adapter() -> None:
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), LoRAConfig(r=2))
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", list(more_archs.BUILDERS))
def test_defaults_on_the_other_named_architectures(arch: str) -> None:
    """Every architecture with a default selects layers, starts as the identity and then adapts."""
    batch = more_archs.inputs(arch)
    base = more_archs.build(arch)(**batch).logits
    model = lp.inject(more_archs.build(arch), "lora", r=2)
    assert lp.get_info(model).modules, arch
    torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-6)
    randomize_adapter(model, std=0.5)
    assert not torch.allclose(model(**batch).logits, base, atol=1e-4)


def test_merging_lora_into_a_conv_that_pads_otherwise_is_refused_and_changes_nothing() -> None:
    """The A conv pads with zeros (as peft's does): a reflect-padded kernel with B A merged would differ."""
    import lightning_peft as lp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    lp.inject(model, "lora", r=2, target_modules=["0"])
    torch.nn.init.normal_(model[0].lora_B.weight)
    x = torch.randn(1, 3, 6, 6)
    before, weight = model(x), model[0].base_layer.weight.clone()
    with pytest.raises(TypeError, match=r"cannot merge LoRA into a Conv2d with padding_mode='reflect'"):
        lp.merge(model)
    assert torch.equal(model[0].base_layer.weight, weight)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
