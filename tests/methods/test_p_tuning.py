"""P-tuning: parity with peft (MLP and LSTM encoders), the encoder written out, and bad input."""

from __future__ import annotations

import peft
import pytest
import torch

import lightning_peft as lp
from lightning_peft.methods.p_tuning import PromptEncoder, PTuningConfig
from tests import tiny
from tests.methods.input_reference import assert_same_generation, assert_same_outputs, twins

N = 3


def twin(arch: str, task: str = "lm", encoder: str = "mlp") -> tuple[torch.nn.Module, torch.nn.Module]:
    def rename(local: str) -> str:
        head, _, rest = local.partition(".")
        return {"embedding": "embedding.weight", "mlp": f"mlp_head.{rest}", "lstm": f"lstm_head.{rest}"}[head]

    return twins(
        "p_tuning",
        arch,
        task,
        {"num_virtual_tokens": N, "encoder": encoder, "encoder_hidden_size": 12},
        lambda task_type: peft.PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=N,
            encoder_reparameterization_type=encoder.upper(),
            encoder_hidden_size=12,
        ),
        rename,
    )


@pytest.mark.parametrize(
    ("arch", "task", "encoder"),
    [
        ("llama", "lm", "mlp"),
        ("llama", "lm", "lstm"),
        ("gpt2", "lm", "mlp"),
        ("bert", "lm", "mlp"),
        ("bert", "classify", "lstm"),
        ("t5", "lm", "mlp"),
        ("bart", "lm", "mlp"),
    ],
)
def test_parity_with_peft(arch: str, task: str, encoder: str) -> None:
    # (For encoder-decoder models peft runs its LSTM over 2N tokens and uses the first N, so only
    # the MLP encoder, which treats tokens independently, can match there.)
    ours, reference = twin(arch, task, encoder)
    assert_same_outputs(ours, reference, arch, task)


@pytest.mark.parametrize(("arch", "encoder"), [("llama", "lstm"), ("gpt2", "mlp"), ("t5", "mlp"), ("bart", "mlp")])
def test_generation_matches_peft(arch: str, encoder: str) -> None:
    ours, reference = twin(arch, encoder=encoder)
    assert_same_generation(ours, reference, arch)


def test_encoders_follow_the_formula() -> None:
    """P = MLP(E), and P = MLP2(BiLSTM(E)); the virtual tokens are P."""
    mlp = lp.inject(tiny.build("gpt2"), "p_tuning", num_virtual_tokens=N, encoder_hidden_size=6).p_tuning
    e = mlp.embedding
    first, _, second, _, third = mlp.mlp
    expected = third(torch.relu(second(torch.relu(first(e)))))
    torch.testing.assert_close(mlp.prompts(), expected)
    assert (first.in_features, first.out_features, third.out_features) == (32, 6, 32)

    lstm = lp.inject(tiny.build("gpt2"), "p_tuning", num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=6)
    module = lstm.p_tuning
    out, _ = module.lstm(module.embedding[None])
    torch.testing.assert_close(module.prompts(), module.mlp(out)[0])
    assert module.lstm.bidirectional and module.lstm.hidden_size == 6 and module.mlp[0].in_features == 12


def test_hidden_size_defaults_to_the_model_and_is_recorded() -> None:
    model = lp.inject(tiny.build("bert"), "p_tuning", num_virtual_tokens=2)
    assert lp.get_info(model).config.encoder_hidden_size == 32
    assert model.p_tuning.mlp[0].out_features == 32


def test_lstm_dropout_trains_and_is_off_in_eval() -> None:
    model = lp.inject(tiny.build("llama"), "p_tuning", num_virtual_tokens=N, encoder="lstm", encoder_dropout=0.5)
    module = model.p_tuning
    assert torch.equal(module.prompts(), module.prompts())
    module.train()
    assert not torch.equal(module.prompts(), module.prompts())


def test_merge_is_refused_with_a_reason() -> None:
    model = lp.inject(tiny.build("t5"), "p_tuning", num_virtual_tokens=2)
    with pytest.raises(TypeError, match=r"p_tuning has nothing to merge into base weights"):
        lp.merge(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, r"PTuningConfig.num_virtual_tokens must be a positive integer; got 0"),
        ({"encoder": "gru"}, r"PTuningConfig.encoder must be one of 'mlp', 'lstm'; got 'gru'"),
        ({"encoder_hidden_size": 0}, r"PTuningConfig.encoder_hidden_size must be a positive integer; got 0"),
        ({"encoder_num_layers": 3}, r"encoder_num_layers must be left at 2 with encoder='mlp' \(LSTM only\); got 3"),
        ({"encoder_dropout": 0.1}, r"encoder_dropout must be 0 with encoder='mlp' \(LSTM only\); got 0.1"),
        ({"encoder": "lstm", "encoder_dropout": 1.0}, r"encoder_dropout must be a number in \[0, 1\); got 1.0"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PTuningConfig(**options)


def test_declared_parameters() -> None:
    model = lp.inject(tiny.build("llama"), "p_tuning", num_virtual_tokens=2, encoder="lstm", encoder_num_layers=1)
    assert isinstance(model.p_tuning, PromptEncoder)
    keys = list(lp.trainable_state_dict(model))
    assert keys[0] == "p_tuning.embedding" and all(k.startswith(("p_tuning.lstm.", "p_tuning.mlp.")) for k in keys[1:])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(keys)
