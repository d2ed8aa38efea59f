"""Small LightningModules for Trainer tests (tiny transformers models inside)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests import tiny


class TinyLM(L.LightningModule):
    """A causal LM over a tiny LLaMA; ``build_in_configure_model`` defers creating it."""

    def __init__(
        self, arch: str = "llama", build_in_configure_model: bool = False, seed: int = 0, param_groups: bool = False
    ) -> None:
        super().__init__()
        self.arch, self.seed, self.param_groups = arch, seed, param_groups
        self.model = None if build_in_configure_model else tiny.build(arch, seed=seed).train()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self) -> Any:
        if not self.param_groups:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        # Two groups with their own settings, plus a scheduler: both must survive the restriction.
        decay = [p for n, p in self.named_parameters() if not n.endswith("lora_B")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("lora_B")]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}], lr=1e-2
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DeferredLM(TinyLM):
    """Builds its model in ``configure_model``, as sharded-strategy recipes do."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(build_in_configure_model=True, **kwargs)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny.build(self.arch, seed=self.seed).train()


class StopAfterFirstEpoch(L.Callback):
    """Stops a fit after its first epoch, as a preempted job would be (the plan stays as configured).

    Stopping this way, rather than running a shorter fit, keeps everything that depends on the
    planned length (LR schedules, AdaLoRA's budget) the same as in the uninterrupted run.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def token_loader(n: int = 16, batch_size: int = 4, shuffle: bool = True, seed: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randint(3, tiny.VOCAB, (n, tiny.SEQ), generator=g)), batch_size=batch_size, shuffle=shuffle
    )


def trainer(root: Any, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return L.Trainer(**(defaults | kwargs))


def fit_stop_resume(
    root: Path,
    make_module: Callable[[], L.LightningModule],
    make_loader: Callable[[], DataLoader],
    options: dict[str, Any],
    steps: int = 4,
) -> tuple[L.LightningModule, L.LightningModule, Path]:
    """Fit ``steps`` steps straight, and again stopped at ``steps // 2`` and resumed from that checkpoint.

    Returns (the straight run's module, the resumed run's module, the resumed run's last checkpoint);
    asserts both end with the same adapter, bit for bit (each fit seeds torch with 0 first).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_peft as lp

    def fit(folder: Path, until: int, resume: Path | None = None) -> tuple[L.LightningModule, Path]:
        torch.manual_seed(0)
        module = make_module()
        saves = ModelCheckpoint(dirpath=folder, every_n_train_steps=steps // 2, save_top_k=-1)
        run = trainer(folder, max_steps=until, callbacks=[lp.PEFTCallback("lora", verbose=False, **options), saves])
        run.fit(module, make_loader(), ckpt_path=resume)
        (saved,) = folder.glob(f"*-step={until}.ckpt")
        return module, saved

    straight, _ = fit(root / "full", steps)
    _, half = fit(root / "half", steps // 2)
    resumed, last = fit(root / "resumed", steps, resume=half)
    want, got = lp.trainable_state_dict(straight), lp.trainable_state_dict(resumed)
    assert want and want.keys() == got.keys() and all(torch.equal(t, got[n]) for n, t in want.items())
    return straight, resumed, last
