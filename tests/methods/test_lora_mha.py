"""LoRA on nn.MultiheadAttention: the formula written out, merge, gradients, peft's files, refusals, a real fit."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from lightning_peft.methods.lora import LoRAConfig
from lightning_peft.methods.lora_mha import LoRAMultiheadAttention
from tests.lightning.modules import StopAfterFirstEpoch, trainer
from tests.peft_reference import randomize_adapter

E, HEADS = 8, 2


class Attend(nn.Module):
    """Cross-attention (``q`` attends over another sequence ``kv``) into a linear head."""

    def __init__(self, batch_first: bool = False, kdim: int | None = None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(E, 3)

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(self.mha(q, kv, kv, key_padding_mask=mask)[0])


def build(batch_first: bool = False, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    model = lp.inject(Attend(batch_first), "lora", **{"r": 3, "alpha": 6, "target_modules": ["mha"], **options})
    randomize_adapter(model, seed=1, std=0.3)  # B != 0: the update is real
    return model.eval()


def attention(q: Tensor, k: Tensor, v: Tensor, w_in: Tensor, b_in: Tensor, w_o: Tensor, b_o: Tensor,
              mask: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multi-head attention written out, sequence first: q (L, N, E), k and v (S, N, E), mask (N, S)."""
    (w_q, w_k, w_v), (b_q, b_k, b_v) = w_in.chunk(3), b_in.chunk(3)
    length, batch, d = q.shape[0], q.shape[1], E // HEADS

    def heads(x: Tensor) -> Tensor:  # (T, N, E) -> (N, h, T, d)
        return x.reshape(x.shape[0], batch, HEADS, d).permute(1, 2, 0, 3)

    Q, K, V = heads(q @ w_q.T + b_q), heads(k @ w_k.T + b_k), heads(v @ w_v.T + b_v)
    scores = Q @ K.transpose(-1, -2) / math.sqrt(d)  # (N, h, L, S)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = (probs @ V).permute(2, 0, 1, 3).reshape(length, batch, E)  # (L, N, E)
    return out @ w_o.T + b_o, probs.mean(1)  # weights averaged over heads, as the module returns them


def adapted(layer: LoRAMultiheadAttention) -> tuple[Tensor, Tensor]:
    """``(W_in + s B A, W_o + s B_o A_o)`` written out from the layer's tensors."""
    s = 6 / 3
    base = layer.attention
    return (
        base.in_proj_weight + s * layer.lora_B @ layer.lora_A,
        base.out_proj.weight + s * layer.out_proj_lora_B @ layer.out_proj_lora_A,
    )


def inputs(batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(5, 2, E, generator=g), torch.randn(4, 2, E, generator=g)  # (L, N, E), (S, N, E)
    mask = torch.tensor([[False, False, False, True], [False, False, False, False]])  # (N, S): one key padded
    if batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv, mask


@pytest.mark.parametrize("batch_first", [False, True])
def test_follows_the_formula(batch_first: bool) -> None:
    """Attention with W_in + s B A on the packed q/k/v projection and W_o + s B_o A_o on out_proj."""
    model = build(batch_first)
    layer = model.mha
    assert isinstance(layer, LoRAMultiheadAttention)
    q, kv, mask = inputs(batch_first)
    out, weights = layer(q, kv, kv, key_padding_mask=mask)
    w_in, w_o = adapted(layer)
    base = layer.attention
    seq_first = (q, kv) if not batch_first else (q.transpose(0, 1), kv.transpose(0, 1))
    expected, expected_weights = attention(
        seq_first[0], seq_first[1], seq_first[1], w_in, base.in_proj_bias, w_o, base.out_proj.bias, mask
    )
    if batch_first:
        expected = expected.transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the base alone differs: the check above can fail
        assert (base(q, kv, kv, key_padding_mask=mask)[0] - out).abs().max() > 1e-2
    with torch.no_grad():  # no_grad takes torch's fused inference path where it can: the same numbers
        torch.testing.assert_close(layer(q, kv, kv, key_padding_mask=mask)[0], out, rtol=1e-5, atol=1e-5)


def test_unbatched_inputs_follow_the_formula() -> None:
    """A (L, E) query without a batch dimension, as peft's custom-model tests feed nn.MultiheadAttention."""
    model = build()
    layer = model.mha
    q, kv, _ = inputs(False)
    out, _ = layer(q[:, 0], kv[:, 0], kv[:, 0])
    w_in, w_o = adapted(layer)
    base = layer.attention
    expected, _ = attention(q[:, :1], kv[:, :1], kv[:, :1], w_in, base.in_proj_bias, w_o, base.out_proj.bias, None)
    torch.testing.assert_close(out, expected[:, 0], rtol=1e-5, atol=1e-5)


def test_the_wrapper_answers_as_the_attention() -> None:
    """Code that reads the attention's attributes through the wrapper gets the attention's values."""
    torch.manual_seed(0)
    model = Attend()
    model.mha = nn.MultiheadAttention(E, HEADS, dropout=0.25)
    lp.inject(model, "lora", r=2, target_modules=["mha"])
    layer = model.mha
    assert (layer.dropout, layer.num_heads, layer.embed_dim, layer.batch_first) == (0.25, HEADS, E, False)
    assert layer.in_proj_bias is layer.attention.in_proj_bias and layer.out_proj is not layer.attention.out_proj
    lp.merge(model)  # merged (or switched off), the base weights are what it computes with
    assert layer.in_proj_weight is layer.attention.in_proj_weight and layer.out_proj is layer.attention.out_proj


def test_identity_at_init() -> None:
    torch.manual_seed(0)
    base = Attend().eval()
    model = lp.inject(copy.deepcopy(base), "lora", r=3, target_modules=["mha"]).eval()
    q, kv, mask = inputs(False)
    torch.testing.assert_close(model(q, kv, mask), base(q, kv, mask), rtol=0, atol=0)
    assert model.mha.lora_B.abs().sum() == 0 and model.mha.out_proj_lora_B.abs().sum() == 0


def test_gradients_reach_the_adapter_only_and_equal_the_formulas() -> None:
    model = build()
    layer = model.mha
    base = layer.attention
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    q, kv, mask = inputs(False)
    model.train()  # attention dropout is 0: training changes nothing in the forward
    model(q, kv, mask).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"mha.lora_A", "mha.lora_B", "mha.out_proj_lora_A", "mha.out_proj_lora_B"}
    assert not any(p.requires_grad for p in [*base.parameters(), *model.head.parameters()])
    for name, tensor in base.named_parameters():  # the forward wrote no base weight, not even to restore it
        assert torch.equal(tensor, frozen[name]), name
    # The same gradients through the formula, with leaf copies of A, B, A_o, B_o.
    factors = (layer.lora_A, layer.lora_B, layer.out_proj_lora_A, layer.out_proj_lora_B)
    a, b, a_o, b_o = (t.detach().clone().requires_grad_() for t in factors)
    w_in, w_o = base.in_proj_weight + 2 * b @ a, base.out_proj.weight + 2 * b_o @ a_o
    out, _ = attention(q, kv, kv, w_in, base.in_proj_bias, w_o, base.out_proj.bias, mask)
    model.head(out).square().sum().backward()
    for ours, ref in zip(factors, (a, b, a_o, b_o), strict=True):
        assert ref.grad is not None and ref.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_merge_and_unmerge_are_exact(batch_first: bool) -> None:
    model = build(batch_first)
    base = model.mha.attention
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    q, kv, mask = inputs(batch_first)
    with torch.no_grad():
        unmerged = model(q, kv, mask)
        w_in, w_o = adapted(model.mha)
        lp.merge(model)
        torch.testing.assert_close(base.in_proj_weight, w_in, rtol=0, atol=1e-6)
        torch.testing.assert_close(base.out_proj.weight, w_o, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(q, kv, mask), unmerged, rtol=1e-5, atol=1e-6)
        lp.unmerge(model)
        for name, tensor in base.named_parameters():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(q, kv, mask), unmerged, rtol=1e-5, atol=1e-6)
        plain = lp.unload(model, merge=True)  # the plain module back, the update in its weights
        assert type(plain.mha) is nn.MultiheadAttention
        torch.testing.assert_close(plain(q, kv, mask), unmerged, rtol=1e-5, atol=1e-6)


def test_transformer_encoder_layers_fused_inference_path_sees_the_adapter() -> None:
    """nn.TransformerEncoderLayer in eval calls a fused kernel with ``self_attn.in_proj_weight`` and
    ``self_attn.out_proj.weight`` instead of the attention's forward: they answer with the adapted weights.
    (peft 0.21.2's wrapper answers with the base weights there, so its eval outputs are the base model's.)"""
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True).eval()
    model = lp.inject(copy.deepcopy(base), "lora", r=3, alpha=6, target_modules=["self_attn"]).eval()
    randomize_adapter(model, seed=1, std=0.3)
    x = torch.randn(2, 5, E)
    reference = copy.deepcopy(base)  # the formula: the same layer holding W + s B A
    w_in, w_o = adapted(model.self_attn)
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(w_in)
        reference.self_attn.out_proj.weight.copy_(w_o)
        fused, expected = model(x), reference(x)
        assert (base(x) - expected).abs().max() > 1e-2
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # grad enabled: the slow path, same numbers


def test_transformer_encoders_nested_tensor_path_sees_the_adapter() -> None:
    """nn.TransformerEncoder with a padding mask in inference packs the batch into a nested tensor and runs
    each layer's fused kernel on it: with the adapter's weights, as the same encoder with merged weights does."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    model = lp.inject(copy.deepcopy(base), "lora", r=2, target_modules=["self_attn"]).eval()
    randomize_adapter(model, seed=1, std=0.3)
    merged = lp.unload(lp.merge(copy.deepcopy(model)), merge=True)
    assert type(merged.layers[0].self_attn) is nn.MultiheadAttention
    x, mask = torch.randn(2, 5, E), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        ours, expected = model(x, src_key_padding_mask=mask), merged(x, src_key_padding_mask=mask)
        assert (base(x, src_key_padding_mask=mask) - expected)[~mask].abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # With gradients on, the module path (padded positions are not zeroed there): the same where it counts.
    torch.testing.assert_close(model(x, src_key_padding_mask=mask)[~mask], expected[~mask], rtol=1e-5, atol=1e-5)


def test_peft_files_hold_peft_names_and_half_the_out_proj_b(tmp_path: Path) -> None:
    """peft 0.21.2 adds out_proj's update twice (W_o + 2 s B_o A_o, peft PR #3774): its file holds B_o / 2.

    If peft stops doing so, the first assertion fails and the conversion in lora_mha must go."""
    model = build()
    q, kv, mask = inputs(False)
    with torch.no_grad():
        ours = model(q, kv, mask)
    save_peft_adapter(model, tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.mha."
    assert set(stored) == {prefix + k for k in LoRAMultiheadAttention.peft_names.values()}
    layer = model.mha
    assert torch.equal(stored[prefix + "base_layer.out_proj.lora_B.weight"], layer.out_proj_lora_B * 0.5)
    for local in ("lora_A", "lora_B", "out_proj_lora_A"):
        assert torch.equal(stored[prefix + LoRAMultiheadAttention.peft_names[local]], getattr(layer, local))
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Attend().eval(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(q, kv, mask), ours, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    back = load_peft_adapter(Attend().eval(), tmp_path)
    for local in LoRAMultiheadAttention.adapter_names:
        assert torch.equal(getattr(back.mha, local), getattr(layer, local)), local


@pytest.mark.parametrize("version", ["0.21.2", "0.19.0", "0.21.2@abc123", None, "0.21.3.dev0", "0.22.0"])
def test_peft_files_of_a_later_peft_are_refused_by_version(tmp_path: Path, version: str | None) -> None:
    """The doubled out_proj B is what peft <= 0.21.2 computes; a later peft's file (it may have the fix) is refused."""
    save_peft_adapter(build(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_version"] = version
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = Attend().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    if version is None or version.startswith(("0.21.2", "0.19")):
        load_peft_adapter(fresh, tmp_path)
        return
    with pytest.raises(ValueError, match=rf"peft_version='{re.escape(version)}': LoRA on nn.MultiheadAttention reads "):
        load_peft_adapter(fresh, tmp_path)
    assert fresh.state_dict().keys() == before.keys()  # the adapter it added is removed again
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_own_adapter_files_round_trip(tmp_path: Path) -> None:
    model = build(True)
    lp.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    back = lp.load_adapter(Attend(True).eval(), tmp_path).eval()
    q, kv, mask = inputs(True)
    with torch.no_grad():
        torch.testing.assert_close(back(q, kv, mask), model(q, kv, mask), rtol=0, atol=0)


def _lora_bias() -> dict[str, Any]:
    if "lora_bias" not in LoRAConfig.__dataclass_fields__:
        pytest.skip("this LoRAConfig has no lora_bias")
    return {"lora_bias": True}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kdim": 6}, r"kdim=6, vdim=6 and embed_dim=8 \(_qkv_same_embed_dim=False\)"),
        ({"dropout": 0.1}, r"LoRAConfig\.dropout=0\.1 is refused on a MultiheadAttention"),
        ({"init": "pissa"}, r"LoRAConfig\.init='pissa' is refused on a MultiheadAttention.*'kaiming' or 'gaussian'"),
        ({"use_dora": True}, r"it is a MultiheadAttention, which lora with use_dora=True cannot wrap"),
        ({"target_modules": ["out_proj"]}, r"'mha\.out_proj' is the out_proj of an nn\.MultiheadAttention"),
        ("lora_bias", r"LoRAConfig\.lora_bias=True is refused on a MultiheadAttention"),
    ],
    ids=["kdim", "dropout", "init", "dora", "out_proj", "lora_bias"],
)
def test_refusals_name_the_field_and_leave_the_model(options: Any, message: str) -> None:
    options = _lora_bias() if options == "lora_bias" else dict(options)
    torch.manual_seed(0)
    model = Attend(kdim=options.pop("kdim", None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=message):
        lp.inject(model, "lora", **{"r": 2, "target_modules": ["mha"], **options})
    assert type(model.mha) is nn.MultiheadAttention and lp.get_info(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("method", "options"),
    [("ia3", {"feedforward_modules": []}), ("lora", {"use_dora": True}), ("adalora", {"total_step": 10}),
     ("bitfit", {}), ("lora", {"modules_to_save": ["mha.out_proj"], "target_modules": ["head"]})],
    ids=["ia3", "dora", "adalora", "bitfit", "modules_to_save"],
)  # fmt: skip
def test_no_method_wraps_an_attentions_out_proj(method: str, options: dict[str, Any]) -> None:
    """nn.MultiheadAttention never calls out_proj's forward: any wrapper there would be dead, so each is refused."""
    model = Attend()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"'mha\.out_proj' is the out_proj of an nn\.MultiheadAttention"):
        lp.inject(model, method, **{"target_modules": ["out_proj"], **options})
    assert type(model.mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear" and lp.get_info(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mixed_batches_and_a_second_adapter_are_refused() -> None:
    model = build()
    q, kv, mask = inputs(False)
    refusal = r"'default' \(lora, LoRAMultiheadAttention\) cannot serve single rows"
    with pytest.raises(ValueError, match=refusal), lp.mixed_batch(model, ["default", "__base__"]):
        model(q, kv, mask)
    with pytest.raises(TypeError, match=r"LoRAMultiheadAttention cannot share a base layer with another adapter"):
        lp.inject(model, "lora", adapter_name="second", r=2, target_modules=["mha"])


class Regress(L.LightningModule):
    """A transformer encoder layer (batch first) regressing a target: LoRA trains its self-attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self(x) - y).square().mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(root: Path, *, interrupt: bool = False, ckpt_path: Path | None = None) -> Regress:
    L.seed_everything(0)
    module = Regress()
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(8, 5, E, generator=g), torch.randn(8, 5, generator=g))
    callbacks: list[L.Callback] = [
        lp.PEFTCallback("lora", r=2, alpha=4, target_modules=["self_attn"], verbose=False),
        ModelCheckpoint(dirpath=root, save_last=True),
        *([StopAfterFirstEpoch()] if interrupt else []),
    ]
    run = trainer(root, max_epochs=2, callbacks=callbacks)
    run.fit(module, DataLoader(data, batch_size=4, shuffle=True), ckpt_path=ckpt_path)
    return module


def test_fits_in_a_trainer_resumes_exactly_and_peft_loads_the_result(tmp_path: Path) -> None:
    """fit 4 steps == fit 2, stop, resume, fit 2 more (bit for bit); the checkpoint and its peft folder load."""
    torch.manual_seed(0)
    base = Regress().eval()
    module = _fit(tmp_path / "straight")
    layer = module.encoder.self_attn
    assert module.trainer.global_step == 4 and isinstance(layer, LoRAMultiheadAttention)
    assert layer.lora_B.abs().sum() > 0 and layer.out_proj_lora_B.abs().sum() > 0
    for name, tensor in base.encoder.self_attn.named_parameters():  # the base weights did not move
        assert torch.equal(layer.attention.get_parameter(name), tensor), name
    assert _fit(tmp_path / "first", interrupt=True).trainer.global_step == 2
    resumed = _fit(tmp_path / "second", ckpt_path=tmp_path / "first" / "last.ckpt")
    straight, again = lp.trainable_state_dict(module), lp.trainable_state_dict(resumed)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    x = torch.randn(2, 5, E)
    module.eval()
    with torch.no_grad():
        ours = module(x)
        assert (base(x) - ours).abs().max() > 1e-3
        checkpoint = tmp_path / "straight" / "last.ckpt"  # loads back here (strict, weights only): the same outputs
        torch.testing.assert_close(lp.load_adapter(Regress(), checkpoint).eval()(x), ours, rtol=0, atol=0)
    # The peft folder PEFTCallback writes beside the checkpoint, read by peft itself.
    theirs = peft.PeftModel.from_pretrained(base, checkpoint.with_suffix(".peft"))
    theirs.train()  # peft's wrapper answers the fused eval path with its base weights: compare on the module path
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, rtol=1e-5, atol=1e-5)


def test_a_module_put_between_the_wrapper_and_the_attention_is_refused() -> None:
    model = build()
    layer = model.mha

    class Around(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner(*args, **kwargs)

    layer.base_layer = Around(layer.base_layer)  # as a strategy's wrapper would be: the weight names miss it
    q, kv, _ = inputs(False)
    with pytest.raises(TypeError, match=r"its base layer is a Around around it"):
        layer(q, kv, kv)
