"""Training-step benchmark: lightning_peft against peft, full fine-tuning and the frozen floor.

Each mode runs in its own process (so peak memory is its own), and the modes are interleaved
round by round (A B C A B C ...) so that drift of the machine hits every mode alike::

    python -m benchmarks.step --rounds 3            # the table (CPU: 2 threads)
    python -m benchmarks.step worker --mode lp_lora  # one measurement, printed as JSON
    python -m benchmarks.step paired --steps 60     # floor, peft LoRA, ours: one process, paired steps

The per-process table is the one for memory; on a shared machine its step times drift from one
process to the next by more than the differences it measures, so ``paired`` runs every mode on
its own copy of the model in one process, steps interleaved one by one, and reports the median
of the per-step ratios.

Modes:
    floor            every weight frozen; backward reaches the input embeddings only (the least
                     any PEFT step can cost)
    full             full fine-tuning with AdamW
    peft_<method>    Hugging Face peft's implementation (where peft has the method)
    lp_<method>      lightning_peft's pure-PyTorch core (inject + a plain loop)
    lp_lora_separate the same without shared input projections (each layer its own x A^T)
    lp_<method>_trainer  the same through a Lightning Trainer with PEFTCallback
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: The model of the issue: a LLaMA-style decoder built from config (~33 M parameters).
MODEL = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1376,
    vocab_size=8000,
    max_position_embeddings=256,
)
BATCH, SEQ = 8, 128
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class MethodBench:
    """How one registered method is benchmarked: our options and peft's equivalent config."""

    ours: dict[str, Any]
    peft: Callable[[], Any] | None  # builds the peft config; None where peft has no such method
    method: str | None = None  # the registered method, when the row is an option of another (DoRA)


def _peft(kind: str, **options: Any) -> Callable[[], Any]:
    def build() -> Any:
        import peft

        return getattr(peft, kind)(**options)

    return build


_LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": BLOCK_LINEARS}
_PEFT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": BLOCK_LINEARS}
#: Every registered method that runs on a LLaMA model (BitFit has no biases to train there).
METHODS: dict[str, MethodBench] = {
    "lora": MethodBench(_LORA, _peft("LoraConfig", **_PEFT_LORA)),
    "dora": MethodBench(_LORA | {"use_dora": True}, _peft("LoraConfig", use_dora=True, **_PEFT_LORA), "lora"),
    "ia3": MethodBench(
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        _peft("IA3Config", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "adalora": MethodBench(
        {
            "init_r": 16,
            "target_r": 8,
            "alpha": 32,
            "target_modules": BLOCK_LINEARS,
            "tinit": 2,
            "tfinal": 2,
            "total_step": 50,
        },
        _peft(
            "AdaLoraConfig",
            init_r=16,
            target_r=8,
            lora_alpha=32,
            target_modules=BLOCK_LINEARS,
            tinit=2,
            tfinal=2,
            total_step=50,
        ),
    ),
    "bottleneck": MethodBench({"placement": "both", "reduction_factor": 16}, None),
    # Input-side methods: 20 virtual tokens in front of the 128 real ones (peft's causal-LM task wrapper).
    "prompt_tuning": MethodBench(
        {"num_virtual_tokens": 20}, _peft("PromptTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20)
    ),
    "p_tuning": MethodBench(
        {"num_virtual_tokens": 20, "encoder": "mlp", "encoder_hidden_size": 128},
        _peft(
            "PromptEncoderConfig",
            task_type="CAUSAL_LM",
            num_virtual_tokens=20,
            encoder_reparameterization_type="MLP",
            encoder_hidden_size=128,
        ),
    ),
    "prefix_tuning": MethodBench(
        {"num_virtual_tokens": 20}, _peft("PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20)
    ),
    "last_k": MethodBench({"k": 2}, None),
    "topk": MethodBench({"fraction": 0.01, "target_modules": BLOCK_LINEARS, "calibration_batches": 1}, None),
}


def modes() -> list[str]:
    out = ["floor", "full"]
    for name, bench in METHODS.items():
        if bench.peft is not None:
            out.append(f"peft_{name}")
        out += [f"lp_{name}", f"lp_{name}_separate", f"lp_{name}_trainer"] if name == "lora" else [f"lp_{name}"]
    return out


# ----------------------------------------------------------------------------- worker


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_model(dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL)
    return LlamaForCausalLM(config).to(device=_device(), dtype=dtype)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mb()


def _checkpoint_bytes(payload: dict[str, Any]) -> int:
    import torch

    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        torch.save(payload, f.name)
        return os.path.getsize(f.name)


def saved_mb(model: Any, forward: Callable[[], Any]) -> float:
    """MiB of activations one forward keeps for backward: the distinct storages held by the autograd
    graph's nodes, not counting the model's own parameters (which exist either way). Exact, and
    independent of the machine's load, unlike peak RSS. Read from the graph, not with saved-tensor
    hooks, which would change what some layers keep (see lightning_peft.core.saved_input)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    loss = forward()
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        tensors: list[Any] = []
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's context
            tensors += list(node.saved_tensors)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                tensors += value if isinstance(value, (tuple, list)) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in params:
                    kept[storage.data_ptr()] = storage.nbytes()
        stack += [fn for fn, _ in node.next_functions]
    del loss
    return sum(kept.values()) / 2**20


def _loop(model: Any, step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    import torch

    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


@dataclass
class Prepared:
    """One mode set up on its own copy of the model: the step to time and what to report beside it."""

    model: Any
    step: Callable[[], None]
    forward: Callable[[], Any]  # one forward's loss, for saved_mb
    optimizer: Any  # None for the floor


def prepare(mode: str, model: Any, ids: Any) -> Prepared:
    """Set ``mode`` up on ``model`` (its own copy): the floor's frozen model, full fine-tuning, peft's
    or lightning_peft's method, each with AdamW and the methods' own training hooks."""
    import torch

    separate = mode.endswith("_separate")  # without shared input projections (core.shared_input)
    mode = mode.removesuffix("_separate")
    method = mode.split("_", 1)[1] if mode.startswith(("lp_", "peft_")) else None

    if mode == "floor":
        model.requires_grad_(False)
        embed = model.get_input_embeddings()

        def floor_forward() -> Any:
            return model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss

        return Prepared(model, lambda: floor_forward().backward(), floor_forward, None)
    if mode == "full":
        pass
    elif mode.startswith("peft_"):
        import peft

        model = peft.get_peft_model(model, METHODS[method].peft())
    elif mode.startswith("lp_"):
        import lightning_peft as lp

        lp.inject(model, METHODS[method].method or method, **METHODS[method].ours)
        if separate:
            from lightning_peft.core import shared_input

            shared_input.detach(model)
        lp.calibrate(model, [ids], lambda batch: model(input_ids=batch, labels=batch).loss)
    else:
        raise SystemExit(f"unknown mode {mode!r}; modes: {', '.join(modes())}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    counter = iter(range(1, 10**9))

    def forward() -> Any:
        return model(input_ids=ids, labels=ids).loss

    def step() -> None:
        # The methods' own training hooks run as a user's loop would run them (AdaLoRA's
        # penalty and budget update; peft's AdaLoRA adds its penalty inside forward).
        loss = forward()
        if mode.startswith("lp_"):
            penalty = lp.regularization(model)
            loss = loss if penalty is None else loss + penalty
        loss.backward()
        optimizer.step()
        n = next(counter)
        if mode.startswith("lp_"):
            lp.on_step(model, n, total_steps=50)
        elif method == "adalora":
            model.base_model.update_and_allocate(n)
        optimizer.zero_grad(set_to_none=True)

    return Prepared(model, step, forward, optimizer)


def _batch() -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=g).to(_device())


def run_worker(mode: str, warmup: int, steps: int, dtype_name: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    model = _build_model(dtype).train()
    ids = _batch()
    result: dict[str, Any] = {"mode": mode, "dtype": dtype_name, "device": _device()}

    if mode.endswith("_trainer"):
        return result | _run_trainer(model, mode.removeprefix("lp_").removesuffix("_trainer"), ids, warmup, steps)
    run = prepare(mode, model, ids)
    saved = saved_mb(run.model, run.forward)
    times = _loop(run.model, run.step, warmup, steps)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    result |= {"step_s": statistics.median(times), "peak_mb": _peak_mb(), "trainable": trainable, "saved_mb": saved}
    if run.optimizer is not None:
        result["checkpoint_bytes"] = _checkpoint_bytes(_trained_state(mode, run))
    return result


def _trained_state(mode: str, run: Prepared) -> dict[str, Any]:
    if mode.startswith("lp_"):
        import lightning_peft as lp

        weights = lp.trainable_state_dict(run.model)
    elif mode.startswith("peft_"):
        import peft

        weights = peft.get_peft_model_state_dict(run.model)
    else:
        weights = run.model.state_dict()
    return {"state_dict": weights, "optimizer": run.optimizer.state_dict()}


def run_paired(modes_: list[str], warmup: int, steps: int, dtype_name: str) -> dict[str, Any]:
    """Every mode on its own copy of one model in ONE process, their steps interleaved one by one
    (the order rotating every step): each step of a mode has a step of every other mode beside it,
    taken under the same machine load, so the ratio of the two is paired and the drift of a shared
    machine cancels out of it. Reports each mode's median step and the median of its per-step
    ratios to the floor and to peft LoRA. Peak memory cannot be told apart here: see the per-process
    table for it."""
    import copy

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = _build_model(getattr(torch, dtype_name)).train()
    ids = _batch()
    runs = {mode: prepare(mode, copy.deepcopy(base), ids) for mode in modes_}
    del base
    times: dict[str, list[float]] = {mode: [] for mode in modes_}
    order = list(modes_)
    for i in range(warmup + steps):
        for mode in order:
            if i < warmup:
                runs[mode].step()
            else:
                times[mode] += _loop(runs[mode].model, runs[mode].step, 0, 1)
        order = order[1:] + order[:1]
    result: dict[str, Any] = {"device": _device(), "dtype": dtype_name, "steps": steps, "modes": {}}
    for mode in modes_:
        row: dict[str, Any] = {"step_s": statistics.median(times[mode])}
        for ref in ("floor", "peft_lora"):
            if ref in times and ref != mode:
                row[f"x_{ref}"] = statistics.median(a / b for a, b in zip(times[mode], times[ref], strict=True))
        result["modes"][mode] = row
    result["times"] = times
    return result


def paired_table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | step (s) | x floor (paired median) | x peft LoRA (paired median) |",
        "|---|---:|---:|---:|",
    ]
    for mode, row in result["modes"].items():
        floor = f"{row['x_floor']:.3f}" if "x_floor" in row else "1.000" if mode == "floor" else "-"
        peft = f"{row['x_peft_lora']:.3f}" if "x_peft_lora" in row else "1.000" if mode == "peft_lora" else "-"
        lines.append(f"| {mode} | {row['step_s']:.4f} | {floor} | {peft} |")
    return "\n".join(lines)


def _run_trainer(model: Any, method: str, ids: Any, warmup: int, steps: int) -> dict[str, Any]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    import lightning_peft as lp

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    module = Module()
    loader = DataLoader([ids.cpu()] * (warmup + steps), batch_size=None)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lp.PEFTCallback(method, verbose=False, **METHODS[method].ours), Timer()],
        accelerator="auto",
        devices=1,
    )
    trainer.fit(module, loader)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        trainer.save_checkpoint(path)
        size = path.stat().st_size
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "step_s": statistics.median(times[warmup:]),
        "peak_mb": _peak_mb(),
        "trainable": trainable,
        "checkpoint_bytes": size,
    }


# ----------------------------------------------------------------------------- driver


def _spawn(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.step",
        "worker",
        "--mode",
        mode,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--dtype",
        args.dtype,
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "-"


def _fmt_mb(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def table(rows: dict[str, dict[str, Any]]) -> str:
    floor, peft = rows.get("floor", {}), rows.get("peft_lora", {})
    lines = [
        "| mode | step (s) | x floor | x peft LoRA | peak MB | x floor | saved for backward MB | x floor "
        "| trainable | checkpoint bytes | x (params+AdamW) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in rows.items():
        ckpt = r.get("checkpoint_bytes")
        budget = 3 * 4 * r["trainable"] if r.get("trainable") else None
        lines.append(
            f"| {mode} | {r['step_s']:.4f} | {_fmt_ratio(r['step_s'], floor.get('step_s'))} | "
            f"{_fmt_ratio(r['step_s'], peft.get('step_s'))} | {r['peak_mb']:.0f} | "
            f"{_fmt_ratio(r['peak_mb'], floor.get('peak_mb'))} | {_fmt_mb(r.get('saved_mb'))} | "
            f"{_fmt_ratio(r.get('saved_mb'), floor.get('saved_mb'))} | {r.get('trainable', 0):,} | "
            f"{ckpt if ckpt is not None else '-'} | {_fmt_ratio(ckpt, budget)} |"
        )
    return "\n".join(lines)


def _paired(args: argparse.Namespace) -> str:
    selected = args.modes or ["floor", "peft_lora", "lp_lora", "lp_lora_separate"]
    unknown = [m for m in selected if m not in modes() or m.endswith("_trainer")]
    if unknown:
        raise SystemExit(f"paired: unknown or Trainer modes {unknown}; modes: {', '.join(modes())}")
    result = run_paired(selected, args.warmup, args.steps, args.dtype)
    text = (
        f"Paired step benchmark ({result['device']}, {args.dtype}, batch {BATCH}x{SEQ}, one process, "
        f"{args.steps} steps per mode interleaved one by one, median)\n\n" + paired_table(result) + "\n"
    )
    return _write(f"{args.name}-paired-{result['device']}", text, result)


def _write(stem: str, text: str, data: Any) -> str:
    """Write a table and its raw data to ``benchmarks/results/<stem>.md`` / ``.json``, and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2))
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="table", choices=["table", "worker", "paired"])
    parser.add_argument("--mode", help="worker: the mode to measure")
    parser.add_argument("--modes", nargs="*", help="table: which modes (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--name", default="step", help="results file stem: benchmarks/results/<name>-<device>.md")
    args = parser.parse_args(argv)
    if args.command == "worker":
        result = json.dumps(run_worker(args.mode, args.warmup, args.steps, args.dtype))
        print(result)
        return result
    if args.command == "paired":
        return _paired(args)
    selected = args.modes or modes()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in selected}
    for round_ in range(args.rounds):
        for mode in selected:
            runs[mode].append(_spawn(mode, args))
            print(f"round {round_ + 1}/{args.rounds} {mode}: {runs[mode][-1]['step_s']:.4f} s/step", file=sys.stderr)
    rows = {
        m: rs[0]
        | {"step_s": statistics.median(r["step_s"] for r in rs), "peak_mb": statistics.median(r["peak_mb"] for r in rs)}
        for m, rs in runs.items()
    }
    device = rows[selected[0]]["device"]
    text = (
        f"Step benchmark ({device}, {args.dtype}, batch {BATCH}x{SEQ}, {args.rounds} interleaved rounds x "
        f"{args.steps} steps, median)\n\n" + table(rows) + "\n"
    )
    return _write(f"{args.name}-{device}", text, runs)


if __name__ == "__main__":
    main()
