"""LoRA on nn.Conv1d / Conv2d / Conv3d (grouped too), lora_bias, DoRA on Conv1d/3d, AdaLoRA on Conv2d.

Each against its formula written out here with torch's functional convs, plus merge exactness,
gradients and the refusals (each naming what is refused and why).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods.adalora import SVDConv2d
from lightning_peft.methods.dora import DoRAConv
from lightning_peft.methods.lora import LoRAConfig, LoRALinear
from lightning_peft.methods.lora_conv import LoRAConv

CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


def _conv(dims: int, c_in: int = 4, c_out: int = 6, groups: int = 1, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return CONV[dims][0](c_in, c_out, 3, groups=groups, **kwargs)


def _input(dims: int, channels: int = 4, size: int = 5) -> Tensor:
    return torch.randn(2, channels, *([size] * dims), generator=torch.Generator().manual_seed(1))


def _randomize(layer: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _lora_formula(layer: LoRAConv, x: Tensor, dims: int) -> Tensor:
    """``W * x + b + s (B(A(x)) + c)``: A over every input channel, B pointwise and grouped as the base."""
    conv = CONV[dims][1]
    base = layer.base
    a, b = layer.lora_A.weight, layer.lora_B.weight  # (r, in, *k), (out, r / g, 1, ...)
    out = conv(x, base.weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    h = conv(x, a, None, base.stride, base.padding, base.dilation)  # (N, r, ...)
    update = conv(h, b, None, 1, 0, 1, base.groups)  # (N, out, ...)
    if layer.lora_B.bias is not None:
        update = update + layer.lora_B.bias.view(1, -1, *([1] * dims))
    return out + layer.scaling * update


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_lora_conv_follows_the_formula(dims: int, groups: int, lora_bias: bool) -> None:
    base = _conv(dims, groups=groups, stride=2 if dims == 2 else 1, padding=1)
    x = _input(dims)
    layer = LoRAConv(copy.deepcopy(base), LoRAConfig(r=4, alpha=6, lora_bias=lora_bias))
    assert torch.equal(layer(x), base(x)), "B = 0 (and c = 0) at init: the layer starts as the base layer"
    _randomize(layer)
    assert torch.allclose(layer(x), _lora_formula(layer, x, dims), atol=1e-5)
    assert not torch.allclose(layer(x), base(x), atol=1e-3)
    assert tuple(layer.lora_B.weight.shape) == (6, 4 // groups, *([1] * dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradients_reach_exactly_the_adapter(dims: int) -> None:
    model = nn.Sequential(_conv(dims), nn.ReLU(), _conv(dims, 6, 2))
    lp.inject(model, "lora", target_modules=["0"], r=2, lora_bias=True)
    layer = model[0]
    _randomize(layer)
    model(_input(dims)).square().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"0.lora_A.weight", "0.lora_B.weight", "0.lora_B.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == grads


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merge_is_exact_and_unmerge_restores(dims: int, lora_bias: bool) -> None:
    base = _conv(dims, padding=1, dilation=2 if dims == 1 else 1)
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject(model, "lora", target_modules=["0"], r=3, alpha=5, lora_bias=lora_bias)
    _randomize(model[0])
    x = _input(dims, size=6)
    unmerged = model(x)
    lp.merge(model)
    assert model[0].merged
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    # the merged kernel and bias, written out: W + s B.A, b + s c
    layer: LoRAConv = model[0]
    kernel = base.weight + layer.scaling * torch.einsum(
        "or,ri...->oi...", layer.lora_B.weight.flatten(1), layer.lora_A.weight
    )
    assert torch.allclose(layer.base.weight, kernel, atol=1e-6)
    bias = base.bias + (layer.scaling * layer.lora_B.bias if lora_bias else 0)
    assert torch.allclose(layer.base.bias, bias, atol=1e-6)
    lp.unmerge(model)
    assert torch.allclose(layer.base.weight, base.weight, atol=1e-6)
    assert torch.allclose(layer.base.bias, base.bias, atol=1e-6)
    assert torch.allclose(model(x), unmerged, atol=1e-6)


def test_pointwise_conv3d_merges_exactly() -> None:
    """Kernel (1, 1, 1): the case peft 0.21's delta weight gets wrong (it takes it for a Conv2d 1x1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(5, 10, 1))
    lp.inject(model, "lora", target_modules=["0"], r=4)
    _randomize(model[0])
    x = _input(3, channels=5, size=3)
    unmerged = model(x)
    lp.merge(model)
    assert torch.allclose(model(x), unmerged, atol=1e-5)


def test_grouped_conv_refuses_to_merge_and_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(_conv(2, 4, 6, groups=2))
    lp.inject(model, "lora", target_modules=["0"], r=4)
    _randomize(model[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"cannot merge LoRA into a Conv2d with groups=2: its A conv reads every"):
        lp.merge(model)
    assert not model[0].merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refusals_name_the_field_and_the_value() -> None:
    with pytest.raises(TypeError, match=r"LoRAConfig.r=3 must be a multiple of the Conv2d's groups=2"):
        lp.inject(nn.Sequential(_conv(2, 4, 6, groups=2)), "lora", target_modules=["0"], r=3)
    with pytest.raises(TypeError, match=r"LoRAConfig.init='pissa' is for linear layers .* a Conv3d takes"):
        lp.inject(nn.Sequential(_conv(3)), "lora", target_modules=["0"], init="pissa")
    with pytest.raises(ValueError, match=r"LoRAConfig.lora_bias must be False with use_dora=True .*; got True"):
        LoRAConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match=r"LoRAConfig.init must be 'kaiming' or 'random' with lora_bias=True.*'gau"):
        LoRAConfig(lora_bias=True, init="gaussian")
    with pytest.raises(ValueError, match=r"LoRAConfig.lora_bias must be True or False; got 1"):
        LoRAConfig(lora_bias=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn.Embedding, and LoRAConfig.lora_bias=True is for linear and conv layers"):
        lp.inject(nn.Sequential(nn.Embedding(10, 4)), "lora", target_modules=["0"], lora_bias=True)
    with pytest.raises(TypeError, match=r"it is a LayerNorm, which lora cannot wrap; .*nn.Conv1d, nn.Conv2d"):
        lp.inject(nn.Sequential(nn.LayerNorm(4)), "lora", target_modules=["0"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_bias_on_a_base_without_bias_refuses_to_merge(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False) if kind == "linear" else nn.Conv1d(4, 3, 3, bias=False)
    model = nn.Sequential(layer)
    lp.inject(model, "lora", target_modules=["0"], r=2, lora_bias=True)
    _randomize(model[0])
    x = torch.randn(2, 4) if kind == "linear" else _input(1)
    out = model(x)
    with pytest.raises(TypeError, match=r"cannot merge LoRA with lora_bias=True into a (Linear|Conv1d) with bias=Fal"):
        lp.merge(model)
    assert torch.equal(model(x), out)


def test_lora_bias_on_linear_follows_the_formula_and_merges() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject(model, "lora", target_modules=["0"], r=2, alpha=6, lora_bias=True)
    layer: LoRALinear = model[0]
    _randomize(layer)
    x = torch.randn(4, 5)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t() + layer.lora_B_bias)
    assert torch.allclose(model(x), expected, atol=1e-6)
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "0.lora_A",
        "0.lora_B",
        "0.lora_B_bias",
    }
    lp.merge(model)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert torch.allclose(layer.base.bias, base.bias + layer.scaling * layer.lora_B_bias, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 3])
def test_dora_on_conv1d_and_conv3d_follows_the_formula_and_merges(dims: int) -> None:
    base = _conv(dims, padding=1)
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject(model, "lora", target_modules=["0"], r=2, alpha=4, use_dora=True)
    layer: DoRAConv = model[0]
    _randomize(layer)
    x = _input(dims)
    conv = CONV[dims][1]
    delta = layer.scaling * torch.einsum("or,ri...->oi...", layer.lora_B.weight.flatten(1), layer.lora_A.weight)
    combined = base.weight + delta
    norm = torch.linalg.vector_norm(combined, dim=tuple(range(1, combined.dim())))
    kernel = (layer.lora_magnitude / norm).view(-1, *([1] * (dims + 1))) * combined
    expected = conv(x, kernel, base.bias, base.stride, base.padding)
    assert torch.allclose(model(x), expected, atol=1e-5)
    lp.merge(model)
    assert torch.allclose(model(x), expected, atol=1e-5)
    lp.unmerge(model)
    assert torch.allclose(layer.base.weight, base.weight, atol=1e-5)
    assert tuple(layer.to_peft_tensor("lora_magnitude", layer.lora_magnitude).shape) == (1, 6, *([1] * dims))


def test_adalora_on_conv2d_follows_the_formula_merges_and_trains_only_its_triplets() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject(model, "adalora", target_modules=["0"], init_r=3, target_r=2, alpha=6, total_step=10)
    layer: SVDConv2d = model[0]
    assert isinstance(layer, SVDConv2d) and tuple(layer.lora_A.shape) == (3, 4 * 3 * 3)
    _randomize(layer)
    x = _input(2, size=6)
    # h = W * x + b + (alpha / init_r) * reshape(P diag(lambda) Q) * x
    kernel = (layer.lora_B @ (layer.lora_A * layer.lora_E[:, None])).reshape(6, 4, 3, 3) * (6 / 3)
    expected = base(x) + F.conv2d(x, kernel, None, 2, 1)
    assert torch.allclose(model(x), expected, atol=1e-5)
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"0.lora_A", "0.lora_E", "0.lora_B"}
    lp.merge(model)
    assert torch.allclose(model(x), expected, atol=1e-5)
    lp.unmerge(model)
    assert torch.allclose(layer.base.weight, base.weight, atol=1e-6)
    with pytest.raises(TypeError, match=r"it is a Conv2d with groups=2, which adalora cannot wrap"):
        lp.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "adalora", target_modules=["0"], total_step=4)


@pytest.mark.slow
def test_a_conv_adapter_trains_in_a_lightning_run(tmp_path: object) -> None:
    """One real Trainer fit on a tiny Conv1d/Conv3d model: only the adapter moves, the merge is exact."""
    import lightning as L

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8), torch.randint(0, 2, (16,)))
    module = Net()
    base = copy.deepcopy(module.net[0])
    callback = lp.PEFTCallback("lora", target_modules=["net.0"], r=2, lora_bias=True, verbose=False)
    trainer = L.Trainer(
        max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    layer = module.net[0]
    assert isinstance(layer, LoRAConv)
    assert torch.equal(layer.base.weight, base.weight) and torch.equal(layer.base.bias, base.bias)
    assert layer.lora_B.weight.abs().sum() > 0 and layer.lora_B.bias.abs().sum() > 0
    x = torch.randn(2, 3, 8)
    module.eval()
    out = module(x)
    lp.merge(module)
    assert torch.allclose(module(x), out, atol=1e-5)
    assert [n for n, _ in state.adapter_modules(module)] == ["net.0"]


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 27, 2))


def test_own_format_round_trip_with_lora_bias(tmp_path: object) -> None:
    model = lp.inject(_conv_net(), "lora", target_modules=["0", "3"], r=2, lora_bias=True)
    _randomize(model[0])
    _randomize(model[3], seed=4)
    x = _input(3, channels=3, size=3)
    out = model(x)
    lp.save_adapter(model, tmp_path)
    back = lp.load_adapter(_conv_net(), tmp_path)
    assert isinstance(back[0], LoRAConv) and back[0].lora_B.bias is not None
    assert back[3].lora_B_bias is not None
    assert torch.equal(back(x), out)


def test_combining_refuses_lora_bias_and_grouped_convs_by_name() -> None:
    model = lp.inject(_conv_net(), "lora", target_modules=["0"], r=2, lora_bias=True, adapter_name="a")
    with pytest.raises(ValueError, match=r"cannot combine adapters with lora_bias=True.*'a' has lora_bias=True"):
        lp.add_weighted_adapter(model, ["a"], [1.0], "mix", combination="cat")
    torch.manual_seed(0)
    grouped = lp.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "lora", target_modules=["0"], r=2)
    with pytest.raises(ValueError, match=r"cannot combine adapter 'default' at '0': it is a Conv2d with groups=2"):
        lp.add_weighted_adapter(grouped, ["default"], [1.0], "mix", combination="cat")
    assert lp.get_info(grouped) is not None and "mix" not in state.adapters(grouped)


@pytest.mark.slow
def test_adalora_on_conv2d_with_pruned_ranks_loads_in_peft(tmp_path: object) -> None:
    """The pruned ranks reach peft's file as its rank_pattern, and peft computes our outputs from it."""
    import peft
    from packaging.version import Version

    from lightning_peft.interop import save_peft_adapter

    if Version(peft.__version__) < Version("0.21"):
        pytest.skip(f"peft {peft.__version__} has no AdaLoRA on Conv2d (peft 0.21 has)")

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2)).eval()

    model = lp.inject(build(), "adalora", target_modules=["0", "3"], init_r=4, target_r=2, total_step=4).eval()
    _randomize(model[0])
    _randomize(model[3], seed=5)
    with torch.no_grad():
        model[0].rank_mask.copy_(torch.tensor([True, False, True, False]))
        model[0].apply_rank_mask()
    x = _input(2, channels=3, size=4)
    out = model(x)
    save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        ref = theirs(x)
    assert torch.allclose(ref, out, atol=1e-5 * max(1.0, float(ref.abs().max())))


@pytest.mark.slow
def test_lora_bias_on_a_4bit_base_follows_the_formula() -> None:
    """QLoRA with lora_bias (peft's bnb layers have it): ``deq(W) x + b + s (B A x + c)``; requantizing refused."""
    pytest.importorskip("bitsandbytes")
    from lightning_peft.core.quantize import dequantized_weight

    torch.manual_seed(0)
    model = lp.quantize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), "nf4")
    lp.inject(model, "lora", target_modules=["0"], r=2, lora_bias=True)
    layer: LoRALinear = model[0]
    _randomize(layer)
    x = torch.randn(3, 64)
    lora = x @ layer.lora_A.t() @ layer.lora_B.t() + layer.lora_B_bias
    expected = x @ dequantized_weight(layer.base).float().t() + layer.base.bias + layer.scaling * lora
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(TypeError, match=r"no lora_bias"):
        lp.merge_requantized(model)


# --------------------------------------------------------------------------- dilated convs and peft's format


def _undilated_update(layer: LoRAConv, x: Tensor, dims: int) -> Tensor:
    """What peft 0.21.2's A computes on the same layer: the base's kernel, stride and padding, no dilation."""
    conv, base = CONV[dims][1], layer.base
    h = conv(x, layer.lora_A.weight, None, base.stride, base.padding)
    return layer.scaling * conv(h, layer.lora_B.weight, None, 1, 0, 1, base.groups)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_dilated_conv_keeps_its_dilation_natively(dims: int, tmp_path: object) -> None:
    """``W *_d x + b + s B(A *_d x)``: A convolves with the base's dilation d; merged and saved alike."""
    base = _conv(dims, dilation=2, padding=2, stride=2 if dims == 2 else 1)
    model = lp.inject(nn.Sequential(copy.deepcopy(base)), "lora", target_modules=["0"], r=4, alpha=6)
    layer = model[0]
    assert isinstance(layer, LoRAConv) and layer.lora_A.dilation == (2,) * dims
    _randomize(layer)
    x = _input(dims, size=6)
    out = model(x)
    assert torch.allclose(out, _lora_formula(layer, x, dims), atol=1e-5)
    # The dilation matters here: without it the update has another shape or other values.
    undilated = _undilated_update(layer, x, dims)
    assert undilated.shape != out.shape or not torch.allclose(base(x) + undilated, out, atol=1e-3)
    lp.save_adapter(model, tmp_path)
    back = lp.load_adapter(nn.Sequential(copy.deepcopy(base)), tmp_path)
    assert torch.equal(back(x), out)
    lp.merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_format_refuses_a_dilated_conv_by_name(use_dora: bool, tmp_path: object) -> None:
    """peft 0.21.2's conv A has no dilation: saving ours in peft's format is refused, naming the layer and value."""
    from lightning_peft.interop import save_peft_adapter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=(1, 2)), nn.ReLU(), nn.Conv2d(6, 2, 1))
    model = lp.inject(net, "lora", target_modules=["0", "2"], r=2, use_dora=use_dora)
    name = "DoRA" if use_dora else "LoRA"
    with pytest.raises(
        ValueError,
        match=rf"adapter 'default', layer '0': "
        rf"{name} on a Conv2d\(4, 6, kernel_size=\(3, 3\), dilation=\(1, 2\)\): dilation=\(1, 2\) cannot go "
        r"through Hugging Face peft's format\. .* Save the adapter with lightning_peft\.save_adapter .* or leave the "
        r"dilated conv out of target_modules",
    ):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()  # type: ignore[operator]
    assert model[0].peft_refusal() is not None and model[2].peft_refusal() is None


def test_peft_format_takes_dilated_pointwise_and_undilated_convs(tmp_path: object) -> None:
    """A kernel of size 1 (any dilation) and dilation 1 (any kernel) go through peft's format: peft computes ours."""
    import peft

    from lightning_peft.interop import save_peft_adapter
    from tests.interop.parity import assert_parity

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, 1, dilation=3), nn.ReLU(), nn.Conv2d(6, 2, 3, padding=1)).eval()

    model = lp.inject(net(), "lora", target_modules=["0", "2"], r=2)
    for layer in (model[0], model[2]):
        _randomize(layer)
    x = _input(2, size=5)
    ours = model(x)
    save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(net(), tmp_path).eval()
    with torch.no_grad():
        assert_parity(theirs(x), ours, "peft loading a dilated kernel-1 and an undilated conv")
