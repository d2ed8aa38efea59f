"""PEFTCallback on a plain ``nn.Module`` that is not a transformers model.

A small MLP is first trained on one task; LoRA then adapts it to a related task while its own
weights stay frozen. Without an architecture to take defaults from, ``target_modules`` names the
layers to adapt. At the end the update is merged into the weights for inference at no extra cost.

    python examples/plain_module.py
    python examples/plain_module.py --max-steps 20
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft import PEFTCallback


class Regressor(L.LightningModule):
    """y = mlp(x), trained with mean squared error."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)  # (B,)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def task(weights: torch.Tensor, n: int = 2048, seed: int = 0) -> TensorDataset:
    """y = sin(x . w): two tasks differ only in w."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, torch.sin(x @ weights))


def mse(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300, help="steps per phase")
    args = parser.parse_args()
    L.seed_everything(0)
    w = torch.randn(8, generator=torch.Generator().manual_seed(1))
    task_a, task_b = task(w), task(w + 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(2)))

    def trainer(*callbacks: L.Callback) -> L.Trainer:
        return L.Trainer(
            max_steps=args.max_steps,
            callbacks=list(callbacks),
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    model = Regressor()
    trainer().fit(model, DataLoader(task_a, batch_size=64, shuffle=True))
    print(f"pretrained:   mse on task A {mse(model, task_a):.4f}, on task B {mse(model, task_b):.4f}")

    # LoRA on the two hidden layers; the MLP's own weights stay frozen.
    peft = PEFTCallback("lora", r=4, alpha=8, target_modules=["mlp.0", "mlp.2"])
    trainer(peft).fit(model, DataLoader(task_b, batch_size=64, shuffle=True))
    print(lp.summary(model))
    print(f"with LoRA:    mse on task B {mse(model, task_b):.4f}")

    lp.merge(model)  # fold (alpha / r) B A into the weights: a plain MLP's cost at inference
    print(f"merged:       mse on task B {mse(model, task_b):.4f}")


if __name__ == "__main__":
    main()
