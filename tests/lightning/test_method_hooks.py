"""Methods with training hooks (AdaLoRA, top-k) and the selective methods through PEFTCallback in real fits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.api import training
from lightning_peft.core import state
from lightning_peft.methods import adalora
from tests.lightning.modules import StopAfterFirstEpoch, TinyLM, token_loader, trainer

#: (method, options, architecture) for the resume round trip; AdaLoRA's schedule is mid-way at the cut.
RESUMABLE = [
    ("adalora", {"init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 2, "dropout": 0.1}, "llama"),
    ("topk", {"fraction": 0.05, "calibration_batches": 2}, "llama"),
    ("bitfit", {}, "gpt2"),
    ("last_k", {"k": 1}, "llama"),
]


def _state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Adapter tensors and training-only state (AdaLoRA's importance statistics)."""
    return {k: v.detach().clone() for k, v in [*state.adapter_state(module), *state.training_state(module)]}


def _run(
    root: Path, method: str, options: dict, arch: str, *, interrupt: bool = False, ckpt_path: Path | None = None
) -> L.LightningModule:
    L.seed_everything(0)
    module = TinyLM(arch=arch)
    callbacks = [PEFTCallback(method, verbose=False, **options), ModelCheckpoint(dirpath=root, save_last=True)]
    t = trainer(root, max_epochs=2, callbacks=callbacks + ([StopAfterFirstEpoch()] if interrupt else []))
    t.fit(module, token_loader(shuffle=True), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(("method", "options", "arch"), RESUMABLE, ids=[m for m, _, _ in RESUMABLE])
def test_resume_is_exact(tmp_path: Path, method: str, options: dict, arch: str) -> None:
    """fit 2N steps == fit N, stop, resume, fit N more: adapter and training state bit for bit."""
    straight = _state(_run(tmp_path / "straight", method, options, arch))
    first = _run(tmp_path / "first", method, options, arch, interrupt=True)
    assert first.trainer.global_step == 4
    resumed = _state(_run(tmp_path / "second", method, options, arch, ckpt_path=tmp_path / "first" / "last.ckpt"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_adalora_through_the_trainer_equals_the_plain_loop(tmp_path: Path) -> None:
    """The callback runs the penalty and the budget update where a hand-written loop does."""
    options = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "orth_reg_weight": 0.5}
    steps = 8
    L.seed_everything(0)
    fitted = TinyLM()
    t = trainer(tmp_path, max_steps=steps, callbacks=[PEFTCallback("adalora", verbose=False, **options)])
    t.fit(fitted, token_loader(n=32, shuffle=False))

    L.seed_everything(0)
    looped = TinyLM()
    lp.inject(looped, "adalora", **options)
    optimizer = torch.optim.AdamW([p for _, p in state.adapter_parameters(looped)], lr=1e-2)
    for step, (ids,) in enumerate(token_loader(n=32, shuffle=False), start=1):
        loss = looped.model(input_ids=ids, labels=ids).loss + lp.regularization(looped)
        loss.backward()
        optimizer.step()
        lp.on_step(looped, step, total_steps=steps)
        optimizer.zero_grad()

    assert adalora.rank_pattern(fitted) == adalora.rank_pattern(looped)
    assert sum(adalora.rank_pattern(fitted).values()) == 2 * 4  # the final budget, target_r per layer
    for (name, a), (_, b) in zip(state.adapter_state(fitted), state.adapter_state(looped), strict=True):
        # The penalty's gradient is added separately rather than through backward: float rounding only.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_adalora_schedule_is_checked_against_the_trainers_steps(tmp_path: Path) -> None:
    callback = PEFTCallback("adalora", tinit=3, tfinal=3, verbose=False)
    with pytest.raises(
        ValueError, match=r"AdaLoRAConfig.tinit \+ tfinal must be smaller than the number of training steps \(total_st"
    ):
        trainer(tmp_path, max_steps=5, callbacks=[callback]).fit(TinyLM(), token_loader())


def test_topk_calibrates_at_train_start_and_changes_only_selected_entries(tmp_path: Path) -> None:
    module = TinyLM()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    logger = CSVLogger(tmp_path)
    callback = PEFTCallback("topk", fraction=0.02, calibration_batches=2, verbose=False)
    t = trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[callback])
    t.fit(module, token_loader())
    layers = list(state.adapter_modules(module))
    assert layers and all(bool(layer.selected) for _, layer in layers)
    for name, layer in layers:
        for param, base in layer.base_layer.named_parameters(recurse=False):
            key = f"{name}.{param}".replace(".base_layer", "")
            changed = (layer.effective_parameters()[param] != before[key]).reshape(-1).nonzero().flatten()
            assert set(changed.tolist()) <= set(layer.indices[param].tolist()) and changed.numel(), key
            assert torch.equal(base, before[key])
    # Calibration went through training_step with logging muted: only the 3 training steps logged.
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert sum(1 for line in metrics[1:] if line.split(",")[-1]) == 3


@pytest.mark.parametrize(("method", "options", "arch"), RESUMABLE[1:], ids=[m for m, _, _ in RESUMABLE[1:]])
def test_selective_checkpoints_hold_only_what_trains(tmp_path: Path, method: str, options: dict, arch: str) -> None:
    module = TinyLM(arch=arch)
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(method, verbose=False, **options)])
    t.fit(module, token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {n for n, _ in state.adapter_state(module)}
    trained = sum(p.numel() for _, p in state.adapter_parameters(module))
    assert trained < sum(p.numel() for p in module.parameters()) / 2
    bare = lp.load_adapter(TinyLM(arch=arch).model.eval(), tmp_path / "a.ckpt")
    from tests import tiny

    batch = tiny.inputs(arch)
    torch.testing.assert_close(tiny.logits(bare, batch), tiny.logits(module.model.eval(), batch), rtol=0, atol=0)


def test_on_step_runs_once_per_optimizer_step_with_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int | None]] = []
    run_on_step = training.on_step

    def spy(model: torch.nn.Module, step: int, total_steps: int | None = None) -> None:
        calls.append((step, total_steps))
        run_on_step(model, step, total_steps)

    monkeypatch.setattr(training, "on_step", spy)
    callback = PEFTCallback("adalora", init_r=4, target_r=2, verbose=False)
    t = trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[callback])
    t.fit(TinyLM(), token_loader(n=24))  # 6 batches -> 3 optimizer steps
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert t.global_step == 3
