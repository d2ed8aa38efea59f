"""Where a LoRA training step spends its time, against the frozen floor (issue 18).

The step benchmark's model and batch (benchmarks/step.py), a few optimizer steps under
``torch.profiler`` for each mode, and the self time of each operator kind, as a share of the step::

    python -m benchmarks.profile                 # floor, lp_lora, peft_lora -> benchmarks/results/profile-<device>.md
    python -m benchmarks.profile --steps 2       # a first look

Shares are robust to a busy machine in a way absolute times are not; the absolute step times of
the table come from benchmarks.step.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections import defaultdict
from typing import Any

from benchmarks.step import _LORA, _PEFT_LORA, BATCH, MODEL, RESULTS, SEQ, _build_model, _device

MODES = ["floor", "lp_lora", "lp_lora_separate", "peft_lora"]


def _model(mode: str, base: Any) -> tuple[Any, Any]:
    import torch

    model = copy.deepcopy(base)
    if mode == "floor":
        return model.requires_grad_(False), None
    if mode == "peft_lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**_PEFT_LORA))
    else:
        import lightning_peft as lp
        from lightning_peft.core import shared_input

        lp.inject(model, "lora", **_LORA)
        if mode == "lp_lora_separate":
            shared_input.detach(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def profile(mode: str, base: Any, ids: Any, steps: int) -> dict[str, float]:
    """Self CPU time (ms per step) by operator name, for ``steps`` steps after one warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, optimizer = _model(mode, base)
    embed = model.get_input_embeddings()

    def step() -> None:
        if optimizer is None:
            inputs = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=inputs, labels=ids).loss.backward()
            return
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1000 / steps
    return dict(totals)


def table(results: dict[str, dict[str, float]], top: int) -> str:
    floor = sum(results["floor"].values()) if "floor" in results else None
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: -max(r.get(k, 0.0) for r in results.values()))
    head = " | ".join(results)
    lines = [f"| operator | {head} |", "|---|" + "---:|" * len(results)]
    for key in keys[:top]:
        lines.append(f"| `{key}` | " + " | ".join(f"{r.get(key, 0.0):.1f}" for r in results.values()) + " |")
    lines.append("| **total (ms/step)** | " + " | ".join(f"**{sum(r.values()):.1f}**" for r in results.values()) + " |")
    if floor:
        lines.append("| x floor | " + " | ".join(f"{sum(r.values()) / floor:.3f}" for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="*", choices=MODES, default=MODES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = _build_model(torch.float32).train()
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1)).to(_device())
    results = {mode: profile(mode, base, ids, args.steps) for mode in args.modes}
    text = (
        f"Profile ({_device()}, float32, batch {BATCH}x{SEQ}, self time per operator in ms per step, "
        f"{args.steps} steps)\n\n" + table(results, args.top) + "\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile-{_device()}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
