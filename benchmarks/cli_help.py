"""How long ``python -m lightning_peft fit --help`` takes (issue 19, point 4: under 3 s).

Three commands, each a fresh Python process, interleaved round by round so that drift of the
machine hits each alike::

    floor    python -c "import lightning"          what any LightningCLI help costs at least
    cold     fit --help with an empty help cache   builds the parser (imports Lightning), saves the text
    cached   fit --help again                      prints the saved text, imports no Lightning

The help cache (:mod:`lightning_peft.lightning.cli_help`) lives in a temporary folder per round
(``LIGHTNING_PEFT_CACHE``), so "cold" is a first call on a machine whose page cache already holds
the packages (the OS's cold disk is not measured), and the user's own cache is not touched.

    python -m benchmarks.cli_help --rounds 5    # the table -> benchmarks/results/cli_help.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.step import RESULTS

#: The issue's target for ``fit --help`` (seconds), held by the cached call.
TARGET_S = 3.0
ROOT = Path(__file__).resolve().parents[1]


def _timed(command: list[str], cache: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_PEFT_")}
    env["LIGHTNING_PEFT_CACHE"] = str(cache)
    env["COLUMNS"] = "100"
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def measure(rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each command (see the module docstring)."""
    help_command = [sys.executable, "-m", "lightning_peft", "fit", "--help"]
    times: dict[str, list[float]] = {"floor": [], "cold": [], "cached": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            seconds, _ = _timed([sys.executable, "-c", "import lightning"], Path(cache))
            times["floor"].append(seconds)
            seconds, cold_text = _timed(help_command, Path(cache))
            times["cold"].append(seconds)
            seconds, cached_text = _timed(help_command, Path(cache))
            times["cached"].append(seconds)
            if cached_text != cold_text:
                raise AssertionError("the cached help differs from the help it saved")
    return times


def table(times: dict[str, list[float]]) -> str:
    median = {mode: statistics.median(values) for mode, values in times.items()}
    load = os.getloadavg()[0]
    lines = [
        f"`fit --help` ({sys.platform}, Python {sys.version_info.major}.{sys.version_info.minor}, "
        f"{len(times['floor'])} interleaved rounds, median; load average (1 min) after: {load:.1f})",
        "",
        "| command | seconds | x floor |",
        "|---|---:|---:|",
    ]
    for mode in times:
        lines.append(f"| {mode} | {median[mode]:.2f} | {median[mode] / median['floor']:.2f} |")
    met = "met" if median["cached"] < TARGET_S else "NOT met"
    cold = "met" if median["cold"] < TARGET_S else "NOT met: the first call imports Lightning, the floor above"
    summary = f"cached: {median['cached']:.2f} s (target < {TARGET_S:g} s: {met}); "
    summary += f"cold: {median['cold']:.2f} s ({cold})"
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    times = measure(args.rounds)
    text = table(times)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_help.md").write_text(text)
    (RESULTS / "cli_help.json").write_text(json.dumps(times, indent=1) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
