"""Load a trained adapter for inference: classify texts with the quickstart's checkpoint.

The checkpoint written by ``python -m lightning_peft fit --config configs/quickstart.yaml`` holds
only the adapter (LoRA weights and the classification head: 75,653 parameters, 303 kB in float32),
its optimizer state (Adam's two moments: twice that) and the task's options, 969 kB in all; the
frozen MiniLM weights come from the installed model package. ``load_adapter`` checks that the
checkpoint fits this base model before loading, and ``merge`` folds LoRA into the weights.

    python examples/load_adapter.py lightning_logs/version_0/checkpoints/*.ckpt "Shares fell sharply on Monday"
"""

from __future__ import annotations

import argparse

import torch

import lightning_peft as lp
from lightning_peft.tasks import SequenceClassification


def load(checkpoint: str) -> SequenceClassification:
    """The task module with its adapter, ready for inference."""
    options = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    module = SequenceClassification(**{k: v for k, v in options.items() if not k.startswith("_")})
    module.configure_model()  # builds the base model (with a fresh head), as a Trainer would
    lp.load_adapter(module, checkpoint)  # injects LoRA as recorded in the checkpoint and loads its weights
    lp.merge(module)  # inference at the base model's cost
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt written by PEFTCallback (e.g. by the quickstart)")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    args = parser.parse_args()
    module = load(args.checkpoint)
    batch = module.tokenizer(args.texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        probs = module.model(**batch).logits.softmax(-1)
    for text, p in zip(args.texts, probs, strict=True):
        print(f"{module.labels[int(p.argmax())]:>13} {float(p.max()):.2f}  {text}")


if __name__ == "__main__":
    main()
