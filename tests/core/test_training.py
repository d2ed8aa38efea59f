"""The generic training hooks (lightning_peft.api.training) and training-only adapter state."""

from __future__ import annotations

from pathlib import Path

import torch

import lightning_peft as lp
from lightning_peft import registry
from lightning_peft.api import training
from lightning_peft.core import fingerprint, state
from tests import tiny
from tests.peft_reference import randomize_adapter


def _lm_loss(model: torch.nn.Module) -> torch.Tensor:
    batch = tiny.inputs("llama")
    return model(**batch, labels=batch["input_ids"]).loss


def test_penalty_gradient_equals_adding_the_penalty_to_the_loss() -> None:
    with_loss = lp.inject(tiny.build("llama"), "adalora", init_r=3, target_r=2, orth_reg_weight=0.4)
    randomize_adapter(with_loss)
    separate = lp.inject(tiny.build("llama"), "adalora", init_r=3, target_r=2, orth_reg_weight=0.4)
    separate.load_state_dict(lp.trainable_state_dict(with_loss))

    (_lm_loss(with_loss) + lp.regularization(with_loss)).backward()
    _lm_loss(separate).backward()
    penalty = training.add_regularization_grad(separate)

    assert penalty is not None and not penalty.requires_grad
    torch.testing.assert_close(penalty, lp.regularization(with_loss).detach())
    for (name, a), (_, b) in zip(state.adapter_parameters(with_loss), state.adapter_parameters(separate), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_methods_without_hooks_need_no_calls() -> None:
    entry = registry.get("lora")
    assert entry.on_step is None and entry.regularization is None
    assert not entry.needs_calibration(entry.make_config())  # its calibrate hook is for the data-driven inits only
    model = lp.inject(tiny.build("llama"), "lora")

    def never() -> object:
        raise AssertionError("lora drew a calibration batch")
        yield

    lp.calibrate(model, never(), _lm_loss)
    lp.on_step(model, 1, 10)
    assert lp.regularization(model) is None and training.add_regularization_grad(model) is None


def test_hooks_are_declared_on_the_registry_entries() -> None:
    declared = {m.name: (m.on_step, m.regularization, m.calibrate) for m in registry.all_methods()}
    assert all(hook is not None for hook in declared["adalora"][:2]) and declared["adalora"][2] is None
    assert declared["topk"][2] is not None


def test_training_state_is_checkpointed_but_not_in_adapter_files(tmp_path: Path) -> None:
    model = lp.inject(tiny.build("llama"), "adalora", init_r=3, target_r=2, total_step=4)
    stats = dict(state.training_state(model))
    assert stats and not set(stats) & {n for n, _ in state.adapter_state(model)}
    with torch.no_grad():
        for tensor in stats.values():
            tensor.fill_(0.5)
    assert set(stats) <= set(lp.trainable_state_dict(model))
    assert not set(stats) & set(lp.trainable_state_dict(model, training_state=False))
    # The base fingerprint ignores training state: it still matches after the statistics moved.
    assert fingerprint.fingerprint(model).mismatch(lp.get_info(model).fingerprint) is None
    # An adapter file without the statistics loads (they are not required), a checkpoint restores them.
    lp.save_adapter(model, tmp_path)
    loaded = lp.load_adapter(tiny.build("llama"), tmp_path)
    assert all(torch.count_nonzero(t) == 0 for _, t in state.training_state(loaded))
    loaded.load_state_dict(lp.trainable_state_dict(model))
    assert all(torch.all(t == 0.5) for _, t in state.training_state(loaded))
