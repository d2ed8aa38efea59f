"""How long ``python -m lightning_peft fit --help`` takes (issue 19, point 4: under 3 s).

Four commands, each a fresh Python process, interleaved round by round so that drift of the
machine hits each alike::

    floor    python -c "import lightning"            what any LightningCLI help costs at least
    shipped  fit --help, empty help cache            a first call after an install: replays the help
                                                     snapshot shipped in the package, imports no Lightning
    cold     fit --help, empty cache, no snapshot    builds the parser (imports Lightning), caches the help
    cached   fit --help again                        replays what "cold" cached, imports no Lightning

The help cache (:mod:`lightning_peft.lightning.cli_help`) lives in a temporary folder per round
(``LIGHTNING_PEFT_CACHE``), so "cold" is a first call on a machine whose page cache already holds
the packages (the OS's cold disk is not measured), and the user's own cache is not touched. "cold"
is pointed at a snapshot file that does not exist (``LIGHTNING_PEFT_HELP_SNAPSHOT``): what a
first call costs where the shipped snapshot's key does not match (another stack, edited sources).
The shipped snapshot must match here (else the command stops and says how to write it), and
all four texts must be equal.

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

#: The issue's target for ``fit --help`` (seconds), for a first call and a cached one.
TARGET_S = 3.0
ROOT = Path(__file__).resolve().parents[1]
MODES = ("floor", "shipped", "cold", "cached")


def _timed(command: list[str], cache: Path, snapshot: Path | None = None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_PEFT_")}
    env["LIGHTNING_PEFT_CACHE"] = str(cache)
    if snapshot is not None:
        env["LIGHTNING_PEFT_HELP_SNAPSHOT"] = str(snapshot)
    env["COLUMNS"] = "100"
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def _check_shipped() -> None:
    """Stop unless the shipped snapshot's key matches here (the "shipped" row would time a parser build)."""
    code = (
        "from lightning_peft.lightning import cli_help as h; d = h.load_snapshots(h.SNAPSHOT_FILE); "
        "print('missing' if d is None else h.snapshot_mismatch(d) or 'ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_PEFT_")}
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    if found.stdout.strip() != "ok":
        raise SystemExit(
            f"the shipped help snapshot does not match here ({found.stdout.strip()}); write it first: "
            "python -m lightning_peft.lightning.help_snapshot"
        )


def measure(rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each command (see the module docstring)."""
    _check_shipped()
    help_command = [sys.executable, "-m", "lightning_peft", "fit", "--help"]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            shipped_cache, cache = Path(folder) / "shipped", Path(folder) / "cache"
            seconds, _ = _timed([sys.executable, "-c", "import lightning"], cache)
            times["floor"].append(seconds)
            seconds, shipped_text = _timed(help_command, shipped_cache)
            times["shipped"].append(seconds)
            if shipped_cache.exists():  # the parser built and cached: the snapshot stopped matching
                raise SystemExit("the shipped snapshot stopped matching mid-run (a source edited?); rerun")
            seconds, cold_text = _timed(help_command, cache, snapshot=Path(folder) / "none.json")
            times["cold"].append(seconds)
            seconds, cached_text = _timed(help_command, cache, snapshot=Path(folder) / "none.json")
            times["cached"].append(seconds)
            if not shipped_text == cold_text == cached_text:
                raise AssertionError("the shipped, built and cached help texts differ")
    return times


def table(times: dict[str, list[float]], load_before: float | None = None) -> str:
    median = {mode: statistics.median(values) for mode, values in times.items()}
    load = os.getloadavg()[0]
    before = "" if load_before is None else f"before: {load_before:.1f}, "
    lines = [
        f"`fit --help` ({sys.platform}, Python {sys.version_info.major}.{sys.version_info.minor}, "
        f"{len(times['floor'])} interleaved rounds, median; load average (1 min) {before}after: {load:.1f}; "
        "the machine is shared: compare the ratios to the floor)",
        "",
        "| command | seconds | x floor |",
        "|---|---:|---:|",
    ]
    for mode in times:
        lines.append(f"| {mode} | {median[mode]:.2f} | {median[mode] / median['floor']:.2f} |")

    def verdict(mode: str) -> str:
        return f"{mode}: {median[mode]:.2f} s ({'met' if median[mode] < TARGET_S else 'NOT met'})"

    summary = f"target < {TARGET_S:g} s: " + "; ".join(verdict(mode) for mode in ("shipped", "cached"))
    summary += f"; cold (no matching snapshot: builds the parser, imports Lightning): {median['cold']:.2f} s"
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    times = measure(args.rounds)
    text = table(times, load_before)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cli_help.md").write_text(text)
    (RESULTS / "cli_help.json").write_text(json.dumps(times, indent=1) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
