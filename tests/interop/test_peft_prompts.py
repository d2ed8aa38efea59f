"""peft's format both ways for prompt tuning, P-tuning, prefix tuning, and AdaLoRA's rank pattern.

Prompt-learning rows run on a tiny Llama causal LM (peft's ``task_type="CAUSAL_LM"``): peft's
``get_peft_model`` (random prompt), ``save_pretrained`` -> ``load_peft_adapter`` must give peft's
logits; our adapter (new values) -> ``save_peft_adapter`` -> ``PeftModel.from_pretrained`` must
give ours. Equal means ``<= 1e-5 * max(1, |ref|)`` (tests/interop/parity.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.interop import load_peft_adapter, save_peft_adapter
from tests import tiny
from tests.interop.parity import VOCAB, assert_parity

peft = pytest.importorskip("peft")


def _llama(kv_heads: int = 2) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: the prompt's mask and positions must agree with peft's
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[:, -batch["input_ids"].shape[1] :][batch["attention_mask"].bool()]  # the real tokens' logits


PROMPT_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("prompt tuning", "PromptTuningConfig", {"num_virtual_tokens": 4}),
    ("prompt tuning vocab init", "PromptTuningConfig", {"num_virtual_tokens": 3, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    ("p-tuning MLP", "PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ("p-tuning LSTM", "PromptEncoderConfig",
     {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    ("prefix tuning", "PrefixTuningConfig", {"num_virtual_tokens": 3}),
    ("prefix tuning projection", "PrefixTuningConfig",
     {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}),
]  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=g) * 0.5)


@pytest.mark.parametrize(("row", "cls", "options"), PROMPT_ROWS, ids=[r[0] for r in PROMPT_ROWS])
def test_prompt_methods_both_ways(row: str, cls: str, options: dict[str, Any], tmp_path: Path) -> None:
    base, batch = _llama(), _batch()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(task_type="CAUSAL_LM", **options))
    _randomize(theirs, seed=1)
    theirs.eval()
    ref = _logits(theirs, batch)
    assert not torch.allclose(ref, _logits(base, batch), atol=1e-3), "the prompt changes nothing: a vacuous row"
    theirs.save_pretrained(tmp_path / "peft")
    # peft -> ours
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_parity(_logits(ours, batch), ref, f"{row}: peft's adapter loaded here")
    expected = "prefix_tuning" if cls == "PrefixTuningConfig" else "prompt_tuning"  # P-tuning's file: its output
    assert lp.get_info(ours).method == expected
    # ours -> peft, from an adapter of the method itself (P-tuning with its encoder, prefix with its MLP)
    method = {"PromptTuningConfig": "prompt_tuning", "PromptEncoderConfig": "p_tuning"}.get(cls, "prefix_tuning")
    mine_options = {
        "prompt_tuning": {"num_virtual_tokens": 4},
        "p_tuning": {"num_virtual_tokens": 4, "encoder": options.get("encoder_reparameterization_type", "MLP").lower()},
        "prefix_tuning": {"num_virtual_tokens": 3, "projection": bool(options.get("prefix_projection"))},
    }[method]
    torch.manual_seed(4)
    mine_model = lp.inject(copy.deepcopy(base), method, **mine_options).eval()
    _randomize(mine_model, seed=2)
    mine = _logits(mine_model, batch)
    save_peft_adapter(mine_model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == theirs.peft_config["default"].peft_type
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_parity(_logits(back, batch), mine, f"{row}: our adapter loaded by peft")
    # and our file back here
    again = load_peft_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_parity(_logits(again, batch), mine, f"{row}: our peft file loaded here")


def test_prefix_tuning_without_gqa(tmp_path: Path) -> None:
    """As many key/value heads as heads: peft's token_dim is then the hidden size."""
    base, batch = _llama(kv_heads=4), _batch()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    _randomize(theirs, seed=1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_parity(_logits(ours, batch), _logits(theirs, batch), "prefix without GQA")


def _edited(tmp_path: Path, cls: str, edit: dict[str, Any], **options: Any) -> Path:
    theirs = peft.get_peft_model(_llama(), getattr(peft, cls)(task_type="CAUSAL_LM", **options))
    theirs.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    return tmp_path / "peft"


@pytest.mark.parametrize(
    ("cls", "edit", "match"),
    [
        ("PromptTuningConfig", {"num_transformer_submodules": 2}, r"num_transformer_submodules=2"),
        ("PromptTuningConfig", {"prompt_tuning_init": "MAGIC"}, r"prompt_tuning_init='MAGIC'"),
        ("PromptTuningConfig", {"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
        ("PromptTuningConfig", {"task_type": "SEQ_CLS"}, r"task_type='SEQ_CLS'.*task_type='CAUSAL_LM'"),
        ("PromptTuningConfig", {"num_virtual_tokens": 5}, r"prompt_embeddings is \(3, 32\) there, \(5, 32\) here"),
        ("PromptTuningConfig", {"num_virtual_tokenz": 3}, r"'num_virtual_tokenz'.*did you mean 'num_virtual_tokens'"),
        ("PromptEncoderConfig", {"encoder_reparameterization_type": "GRU"}, r"encoder_reparameterization_type='GRU'"),
        (
            "PrefixTuningConfig",
            {"num_layers": 3},
            r"num_layers=3, but LlamaForCausalLM's attention cache takes num_layers=2",
        ),
        ("PrefixTuningConfig", {"num_attention_heads": 4}, r"num_attention_heads=4.*num_attention_heads=2"),
        ("PrefixTuningConfig", {"init_weights": "zeros"}, r"init_weights='zeros'"),
    ],
)
def test_prompt_fields_refused_by_name(cls: str, edit: dict[str, Any], match: str, tmp_path: Path) -> None:
    folder = _edited(tmp_path, cls, edit, num_virtual_tokens=3)
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(model, folder)
    assert lp.get_info(model) is None and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prompt_save_refuses_other_heads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tf.LlamaModel(_llama().config)
    lp.inject(model, "prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(ValueError, match=r"for \*ForCausalLM models .* LlamaModel is not one"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- AdaLoRA's rank pattern


def _train_peft_adalora(model: Any, batch: dict[str, torch.Tensor], steps: int) -> None:
    """Real peft AdaLoRA training: loss, backward, step, ``update_and_allocate`` (its budget schedule)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def test_adalora_rank_pattern_both_ways(tmp_path: Path) -> None:
    base, batch = _llama(), _batch()
    options = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "total_step": 5, "lora_alpha": 6}
    torch.manual_seed(5)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], **options)
    )
    _train_peft_adalora(theirs, batch, steps=5)
    pattern = theirs.peft_config["default"].rank_pattern
    assert pattern and any(not all(mask) for mask in pattern.values()), "peft pruned nothing: a vacuous test"
    ref = _logits(theirs, batch)
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_parity(_logits(ours, batch), ref, "peft's pruned AdaLoRA loaded here")
    from lightning_peft.methods import adalora

    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved.items()} == adalora.rank_pattern(ours)
    lp.merge(ours)
    assert_parity(_logits(ours, batch), ref, "peft's pruned AdaLoRA loaded here, merged")
    lp.unmerge(ours)

    # ours, pruned by our own schedule, -> peft
    mine_model = lp.inject(copy.deepcopy(base), "adalora", init_r=4, target_r=1, tinit=0, tfinal=0, total_step=3,
                           target_modules=["q_proj", "v_proj"])  # fmt: skip
    optimizer = torch.optim.SGD([p for p in mine_model.parameters() if p.requires_grad], lr=0.5)
    for step in range(1, 4):
        mine_model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        lp.on_step(mine_model, step)
        optimizer.zero_grad()
    mine_model.eval()
    ranks = adalora.rank_pattern(mine_model)
    assert sum(ranks.values()) == len(ranks), "the budget fell to target_r=1 per layer on average"
    mine = _logits(mine_model, batch)
    save_peft_adapter(mine_model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"]
    assert {k: sum(v) for k, v in written.items()} == {f"{k}.lora_E": v for k, v in ranks.items()}
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_parity(_logits(back, batch), mine, "our pruned AdaLoRA loaded by peft")
    again = load_peft_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_parity(_logits(again, batch), mine, "our pruned AdaLoRA file loaded here")
    assert adalora.rank_pattern(again) == ranks


def test_adalora_bad_rank_pattern_refused(tmp_path: Path) -> None:
    model = lp.inject(_llama(), "adalora", init_r=4, target_r=2, total_step=3, target_modules=["q_proj"])
    save_peft_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(file.read_text())
    for pattern, match in [
        ({"model.layers.9.self_attn.q_proj.lora_E": [True] * 4}, r"rank_pattern names .*layers.9"),
        ({"model.layers.0.self_attn.q_proj.lora_E": [True, False]}, r"not a list of init_r=4 booleans"),
        (
            {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True]},
            r"lora_A is \(4, 32\) there, \(3, 32\)",
        ),
    ]:
        file.write_text(json.dumps({**config, "rank_pattern": pattern}))
        fresh = _llama()
        with pytest.raises(ValueError, match=match):
            load_peft_adapter(fresh, tmp_path / "a")
        assert lp.get_info(fresh) is None


def test_adalora_total_step_from_the_loop(tmp_path: Path) -> None:
    model = lp.inject(_llama(), "adalora", init_r=4, target_r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"requires total_step .* pass total_step=<steps> to save_peft_adapter"):
        save_peft_adapter(model, tmp_path / "a")
    save_peft_adapter(model, tmp_path / "a", total_step=7)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["total_step"] == 7


def test_a_prompt_encoder_in_training_mode_is_exported_without_its_dropout_or_a_draw() -> None:
    """Checkpoints write the peft folder mid-training: the file holds the inference prompt, and the
    run's random stream is left as it was (else a resumed run would differ)."""
    from lightning_peft.interop.peft_layouts import prompt_tensor

    torch.manual_seed(0)
    model = lp.inject(tiny.build("llama"), "p_tuning", num_virtual_tokens=4, encoder="lstm", encoder_dropout=0.5)
    encoder = next(m for _, m in state.adapter_modules(model))
    encoder.train()
    with torch.no_grad():
        expected = encoder.eval().prompts()
    encoder.train()
    before = torch.random.get_rng_state()
    got = prompt_tensor(encoder)
    assert torch.equal(torch.random.get_rng_state(), before) and encoder.training
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
