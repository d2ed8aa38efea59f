"""A run killed with SIGKILL in the middle of an epoch resumes to bit-identical adapter weights.

Three processes run the same task-module fit (shuffled data, LoRA dropout on): one uninterrupted,
one that kills itself (a real ``SIGKILL``, no cleanup) right after a mid-epoch checkpoint, and one
that resumes from that checkpoint. The datamodules' ``StatefulDataLoader`` carries the shuffling
order and position into the checkpoint; ``PEFTCallback`` carries the RNG state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tasks import hub

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 9  # 36 training rows (48, a quarter held out) in batches of 4

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from safetensors.torch import save_file

    import lightning_peft as lp
    from lightning_peft.tasks import SequenceClassification, TextClassificationData

    mode, root, model_dir, train, kill_at = sys.argv[1:6]
    root, kill_at = Path(root), int(kill_at)
    root.mkdir(parents=True, exist_ok=True)


    class KillAfterCheckpoint(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == kill_at:  # the checkpoint of step kill_at is on disk
                os.kill(os.getpid(), signal.SIGKILL)


    L.seed_everything(0)
    module = SequenceClassification(model_dir, learning_rate=1e-2)
    data = TextClassificationData(train_file=train, batch_size=4, val_split=0.25)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=kill_at, save_top_k=-1)
    callbacks = [lp.PEFTCallback("lora", r=4, dropout=0.1, verbose=False), checkpoints]
    if mode == "kill":
        callbacks.append(KillAfterCheckpoint())
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks,
    )
    resume = sys.argv[6] if mode == "resume" else None
    trainer.fit(module, data, ckpt_path=resume)
    assert trainer.global_step == {total}, trainer.global_step
    state = {{k: v.contiguous() for k, v in lp.trainable_state_dict(module, training_state=False).items()}}
    save_file(state, str(root / "adapter.safetensors"))
    """
)


def _run(folder: Path, mode: str, kill_at: int, *extra: str) -> subprocess.CompletedProcess[str]:
    script = folder / "fit.py"
    if not script.exists():
        script.write_text(SCRIPT.format(total=2 * STEPS_PER_EPOCH))
    model = hub.save_model(folder / "hub", "bert")
    train = folder / "train.csv"
    if not train.exists():
        hub.write_csv(train, hub.classification_rows(48))
    root = folder / f"{mode}-{kill_at}"
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, str(script), mode, str(root), str(model), str(train), str(kill_at), *extra],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The uninterrupted run (its folder holds the script, model and data the other runs reuse) and its adapter."""
    folder = tmp_path_factory.mktemp("resume")
    result = _run(folder, "straight", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, load_file(str(folder / "straight-0" / "adapter.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [4, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_a_killed_run_resumes_bit_identically(straight: tuple[Path, dict[str, torch.Tensor]], kill_at: int) -> None:
    """Killed after the checkpoint of step 4 (mid-epoch) or of step 9 (the first epoch's last batch)."""
    folder, expected = straight
    killed = _run(folder, "kill", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (checkpoint,) = (folder / f"kill-{kill_at}" / "checkpoints").glob("*.ckpt")
    assert f"step={kill_at}" in checkpoint.name
    assert not (folder / f"kill-{kill_at}" / "adapter.safetensors").exists()

    resumed = _run(folder, "resume", kill_at, str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    got = load_file(str(folder / f"resume-{kill_at}" / "adapter.safetensors"))
    assert expected.keys() == got.keys() and expected
    differences = {name: (got[name] - expected[name]).abs().max().item() for name in expected}
    assert max(differences.values()) == 0, differences
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in got.values())
