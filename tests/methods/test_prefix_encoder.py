"""Prefix tuning on the encoder side of T5 and BART (``sides``): the formula, the decoder left as it
was, gradients, save/load, peft's format refused by name, and real Trainer runs (fit, exact resume)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft import PEFTCallback, tasks
from lightning_peft.core import state
from lightning_peft.core.compat import checkpointing_switches
from lightning_peft.methods.prefix_tuning import PrefixTuningConfig
from tests import tiny
from tests.lightning.modules import trainer
from tests.tasks import hub

N = 3
SEQ2SEQ = ["t5", "bart"]
BOTH = ("decoder", "encoder")


def build(arch: str, implementation: str = "eager") -> torch.nn.Module:
    model = tiny.build(arch)
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:  # T5 before transformers 5.24: eager only
        pytest.skip(f"{arch} has no {implementation} attention in this transformers version")
    return model


def prefixed(arch: str, sides: tuple[str, ...] = BOTH, implementation: str = "eager", **options: Any) -> Any:
    return lp.inject(build(arch, implementation), "prefix_tuning", num_virtual_tokens=N, sides=sides, **options)


def encoder_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    encoder = model.get_encoder()
    if hasattr(encoder, "block"):  # T5
        return [block.layer[0].SelfAttention for block in encoder.block]
    return [layer.self_attn for layer in encoder.layers]  # BART


def encoder_prefix(model: torch.nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s encoder prefix (K^P, V^P), each (heads, N, head_dim), read from the tensor's
    documented layout: the decoder's L_d * 2 * heads * head_dim values per token first, then the
    encoder's, layer by layer, the key then the value."""
    module = model.prefix_tuning
    states = module.prefix_states()
    dec_layers, dec_heads, dec_dim = module.layouts.get("decoder", (0, 0, 0))
    layers, heads, head_dim = module.layouts["encoder"]
    encoder = states[:, dec_layers * 2 * dec_heads * dec_dim :].reshape(N, layers, 2, heads, head_dim)
    return encoder[:, layer, 0].transpose(0, 1), encoder[:, layer, 1].transpose(0, 1)


def t5_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional relative-position bucket (Raffel et al. 2020), written out."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    large = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact))
    large = large.long().clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, large)


def by_hand(model: torch.nn.Module, arch: str, layer: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One encoder self-attention layer with the prefix, from the formula::

        softmax(s Q [K^P; K]^T + B + M) [V^P; V] W_o

    M admits the N prefix keys (0) and masks padded real keys (-inf); T5: s = 1 and B is the
    relative bias with prefix keys at positions 0..N-1 and queries (and real keys) at N..N+T-1;
    BART: s = head_dim^-1/2, B = 0, projections with biases.
    """
    attention = encoder_attentions(model)[layer]
    k_p, v_p = encoder_prefix(model, layer)  # (H, N, d)
    batch, length, _ = x.shape
    if arch == "t5":
        heads, dim, scale = attention.n_heads, attention.key_value_proj_dim, 1.0
        q, k, v, out = attention.q, attention.k, attention.v, attention.o
    else:
        heads, dim = attention.num_heads, attention.head_dim
        scale = dim**-0.5
        q, k, v, out = attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, dim).transpose(1, 2)  # (B, H, T, d)

    keys = torch.cat([k_p.expand(batch, -1, -1, -1), split(k(x))], dim=2)  # (B, H, N + T, d)
    values = torch.cat([v_p.expand(batch, -1, -1, -1), split(v(x))], dim=2)
    scores = scale * split(q(x)) @ keys.transpose(-1, -2)  # (B, H, T, N + T)
    if arch == "t5":
        first = encoder_attentions(model)[0]  # T5 shares layer 0's bias table with every layer
        query_pos = torch.arange(length)[:, None] + N
        key_pos = torch.arange(N + length)[None, :]
        buckets = t5_bucket(
            key_pos - query_pos, first.relative_attention_num_buckets, first.relative_attention_max_distance
        )
        scores = scores + first.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, N + T)
    admitted = torch.cat([torch.ones(batch, N, dtype=torch.bool), mask.bool()], dim=1)  # (B, N + T)
    scores = scores.masked_fill(~admitted[:, None, None, :], torch.finfo(scores.dtype).min)
    context = scores.softmax(-1) @ values  # (B, H, T, d)
    return out(context.transpose(1, 2).reshape(batch, length, heads * dim))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_every_encoder_layer_is_the_formula(arch: str, implementation: str) -> None:
    model = prefixed(arch, implementation=implementation)
    with torch.no_grad():
        model.prefix_tuning.prefix.mul_(0.5)  # keep the prefix scores of the order of the real ones
    batch = tiny.inputs(arch)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            seen[layer] = (kwargs["hidden_states"], output[0])

        return hook

    handles = [a.register_forward_hook(capture(i), with_kwargs=True) for i, a in enumerate(encoder_attentions(model))]
    with torch.no_grad():
        out = model(**batch)
        bare = tiny.build(arch)(**batch)
    for handle in handles:
        handle.remove()
    assert sorted(seen) == list(range(len(encoder_attentions(model))))
    for layer, (x, got) in seen.items():
        with torch.no_grad():
            want = by_hand(model, arch, layer, x, batch["attention_mask"])
        real = batch["attention_mask"].bool()  # padded rows' outputs are not compared: any value is right there
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5, msg=f"{arch} layer {layer}")
    assert out.encoder_last_hidden_state.shape == bare.encoder_last_hidden_state.shape  # (B, T, H): real tokens only
    assert out.logits.shape == bare.logits.shape
    assert not torch.allclose(out.encoder_last_hidden_state, bare.encoder_last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_the_encoder_prefix_changes_the_encoder_only(arch: str) -> None:
    """sides=("encoder",): the decoder runs as the bare model's on the prefixed encoder's output;
    with both sides, the decoder is the sides=("decoder",) one given that output."""
    batch = tiny.inputs(arch)
    encoder_only = prefixed(arch, sides=("encoder",))
    both = prefixed(arch)
    decoder_only = prefixed(arch, sides=("decoder",))
    decoder_size = decoder_only.prefix_tuning.state_size
    with torch.no_grad():
        both.prefix_tuning.prefix.copy_(
            torch.cat([decoder_only.prefix_tuning.prefix, encoder_only.prefix_tuning.prefix], dim=1)
        )
        assert both.prefix_tuning.state_size == decoder_size + encoder_only.prefix_tuning.state_size
        memory = encoder_only.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        decoder_kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
        bare = tiny.build(arch)(encoder_outputs=memory, **decoder_kwargs).logits
        torch.testing.assert_close(encoder_only(**batch).logits, bare, atol=1e-6, rtol=0)
        reference = decoder_only(encoder_outputs=memory, **decoder_kwargs).logits
        torch.testing.assert_close(both(**batch).logits, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(both(**batch).logits, decoder_only(**batch).logits, atol=1e-4)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("sides", [BOTH, ("encoder",)])
def test_gradients_reach_exactly_the_prefix(sides: tuple[str, ...], projection: bool) -> None:
    options = {"projection": True, "projection_hidden_size": 8} if projection else {}
    model = prefixed("t5", sides=sides, **options).train()
    model(**tiny.inputs("t5"), labels=tiny.inputs("t5")["decoder_input_ids"]).loss.backward()
    declared = {name for name, _ in state.adapter_parameters(model)}
    assert declared == {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == declared
    if not projection:  # every side's part of the tensor is reached
        grad, start = model.prefix_tuning.prefix.grad, 0
        for layers, heads, head_dim in model.prefix_tuning.layouts.values():
            size = layers * 2 * heads * head_dim
            per_layer = grad[:, start : start + size].reshape(N, layers, -1).abs().sum(dim=(0, 2))
            assert (per_layer > 0).all(), per_layer
            start += size


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_generate_with_an_encoder_prefix(arch: str) -> None:
    """generate() runs the encoder once (prefixed) and the decoder step by step from the cache:
    the same tokens as greedy decoding by full forwards."""
    model = prefixed(arch)
    batch = {k: v for k, v in tiny.inputs(arch).items() if not k.startswith("decoder")}
    with torch.no_grad():
        options = {"max_new_tokens": 4, "min_new_tokens": 4, "forced_eos_token_id": None, "forced_bos_token_id": None}
        out = model.generate(**batch, **options, do_sample=False)
        ids = out[:, :1]
        for _ in range(4):
            logits = model(**batch, decoder_input_ids=ids, use_cache=False).logits[:, -1]
            logits[:, model.generation_config.eos_token_id] = -math.inf  # min_new_tokens
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(out, ids)


def test_switched_off_and_unloaded_it_is_the_base_model() -> None:
    model = prefixed("t5")
    batch = tiny.inputs("t5")
    with torch.no_grad():
        bare = build("t5")(**batch).logits
        prefixed_logits = model(**batch).logits
        with lp.disable_adapter(model):
            torch.testing.assert_close(model(**batch).logits, bare, atol=0, rtol=0)
        torch.testing.assert_close(model(**batch).logits, prefixed_logits, atol=0, rtol=0)
        torch.testing.assert_close(lp.unload(model, merge=False)(**batch).logits, bare, atol=0, rtol=0)


def test_saved_and_loaded_in_our_format(tmp_path: Path) -> None:
    model = prefixed("bart", projection=True, projection_hidden_size=8)
    batch = tiny.inputs("bart")
    lp.save_adapter(model, tmp_path / "adapter")
    loaded = lp.load_adapter(build("bart"), tmp_path / "adapter")
    assert lp.get_info(loaded).config.sides == BOTH
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_peft_format_refuses_the_encoder_prefix_by_name(tmp_path: Path) -> None:
    model = prefixed("t5")
    with pytest.raises(ValueError, match=r"sides=\('decoder', 'encoder'\).*decoder's self-attention only"):
        lp.save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sides", [(), ("cross",), ("decoder", "decoder"), "encoder", ("encoder", 1), None], ids=repr)
def test_bad_sides_are_refused_by_name(sides: Any) -> None:
    valid = r"a non-empty tuple of distinct sides out of \(.decoder., .encoder.\); got "
    with pytest.raises(ValueError, match=rf"PrefixTuningConfig\.sides must be {valid}"):
        PrefixTuningConfig(sides=sides)


def test_sides_round_trip_as_a_list() -> None:
    config = PrefixTuningConfig(num_virtual_tokens=2, sides=["encoder", "decoder"])
    assert config.sides == ("encoder", "decoder")
    assert config.to_dict()["sides"] == ["encoder", "decoder"]
    assert PrefixTuningConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_encoder_side_needs_an_encoder_decoder_model(arch: str) -> None:
    with pytest.raises(
        ValueError, match=r"PrefixTuningConfig\.sides=\('decoder', 'encoder'\).*not one.*sides=\('decoder',\)"
    ):
        lp.inject(tiny.build(arch), "prefix_tuning", num_virtual_tokens=N, sides=BOTH)


def test_an_encoder_layer_called_alone_is_refused() -> None:
    model = prefixed("bart")
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="outside the encoder's forward"):
        encoder_attentions(model)[0](x)


def test_gradient_checkpointing_is_refused_on_the_encoder() -> None:
    model = prefixed("t5", sides=("encoder",)).train()
    enable, _, _ = checkpointing_switches(model)
    enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**tiny.inputs("t5"))


# --------------------------------------------------------------------------- real Trainer runs


def _seq2seq(hub_dir: Path, data: Path) -> tuple[tasks.Seq2SeqLM, tasks.Seq2SeqData]:
    rows = [{"source": r["prompt"], "target": r["response"]} for r in hub.qa_rows(repeat=2)]
    train = hub.write_jsonl(data / "pairs.jsonl", rows)
    module = tasks.Seq2SeqLM(str(hub.save_model(hub_dir, "t5")), learning_rate=3e-2, schedule="constant")
    return module, tasks.Seq2SeqData(train_file=str(train), batch_size=4, val_split=0.25)


def _callback() -> PEFTCallback:
    return PEFTCallback("prefix_tuning", num_virtual_tokens=4, sides=BOTH, peft_dir=False, verbose=False)


@pytest.mark.slow
def test_fit_a_seq2seq_task(hub_dir: Path, tmp_path: Path) -> None:
    """A few steps of the Seq2SeqLM task; the peft folder that PEFTCallback writes beside each
    checkpoint by default is refused once, by the option's name, and none is written."""
    module, data = _seq2seq(hub_dir, tmp_path)
    callback = PEFTCallback("prefix_tuning", num_virtual_tokens=4, sides=BOTH, verbose=False)  # peft_dir=True
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, max_steps=8, callbacks=[callback, checkpoints])
    before = t.validate(module, data, verbose=False)[0]["val_loss"]
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if ".prefix_tuning." not in n}
    with pytest.warns(UserWarning, match=r"no peft adapter folder.*sides=\('decoder', 'encoder'\)"):
        t.fit(module, data)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == []  # no peft folder beside it
    after = t.validate(module, data, verbose=False)[0]["val_loss"]
    assert after < before, (before, after)
    declared = {n for n, _ in state.adapter_parameters(module)}
    assert declared and all(".prefix_tuning." in n for n in declared)
    for name, param in module.named_parameters():
        if name not in declared:
            assert torch.equal(param, frozen[name]), name


class TinySeq2Seq(L.LightningModule):
    """The tiny T5 and its own loss, dropout off (a resumed run then depends on the weights and data only)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny.build("t5").train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask = batch
        return self.model(input_ids=ids, attention_mask=mask, labels=ids[:, :4].contiguous()).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _run(root: Path, epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    ids = torch.randint(3, tiny.VOCAB, (8, tiny.SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0  # padded rows: the encoder prefix's mask extension is on the path
    loader = DataLoader(TensorDataset(ids, mask), batch_size=4, shuffle=True)
    module = TinySeq2Seq()
    t = trainer(root, max_epochs=epochs, callbacks=[_callback(), ModelCheckpoint(dirpath=root, save_last=True)])
    t.fit(module, loader, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in lp.trainable_state_dict(module).items()}


@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path) -> None:
    """fit 2 epochs == fit 1, stop, resume from the adapter-only checkpoint, fit 1 more."""
    straight = _run(tmp_path / "straight", epochs=2)
    _run(tmp_path / "first", epochs=1)
    checkpoint = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["model.prefix_tuning.prefix"]  # the adapter only, both sides
    assert checkpoint["state_dict"]["model.prefix_tuning.prefix"].shape == straight["model.prefix_tuning.prefix"].shape
    resumed = _run(tmp_path / "second", epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
