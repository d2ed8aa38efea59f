"""(IA)^3, bottleneck adapters and DoRA through PEFTCallback: a real fit, adapter-only checkpoints,
exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from tests.lightning.modules import TinyLM, token_loader, trainer

METHODS = {
    "ia3": ("ia3", {}),
    "bottleneck-parallel": ("bottleneck", {"variant": "parallel", "placement": "both", "scaling": 4.0}),
    "dora": ("lora", {"r": 4, "dropout": 0.1, "use_dora": True}),
}


def _run(root: Path, method: str, options: dict[str, Any], epochs: int, ckpt_path: Path | None = None) -> TinyLM:
    L.seed_everything(0)
    module = TinyLM()
    callbacks = [PEFTCallback(method, verbose=False, **options), ModelCheckpoint(dirpath=root, save_last=True)]
    t = trainer(root, max_epochs=epochs, callbacks=callbacks)
    t.fit(module, token_loader(shuffle=True), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("case", list(METHODS))
def test_fit_checkpoint_and_exact_resume(tmp_path: Path, case: str) -> None:
    method, options = METHODS[case]
    initial = {k: v.clone() for k, v in lp.trainable_state_dict(lp.inject(TinyLM(), method, **options)).items()}
    straight = _run(tmp_path / "straight", method, options, epochs=2)
    first = _run(tmp_path / "first", method, options, epochs=1)
    checkpoint = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, _ in state.adapter_state(first)}  # adapter only
    resumed = _run(tmp_path / "second", method, options, epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    trained, again = lp.trainable_state_dict(straight), lp.trainable_state_dict(resumed)
    assert trained.keys() == again.keys() == initial.keys()
    for name in trained:
        assert not torch.equal(trained[name], initial[name]), f"{name} did not train"
        assert torch.equal(trained[name], again[name]), name
