"""Regenerate every benchmark table and put them in the README.

    python -m benchmarks            # step table (speed, memory, checkpoint) + quality table
    python -m benchmarks --quick    # fewer rounds and one seed (minutes, for a first look)
    python -m benchmarks --resume   # after a killed run: keep the quality runs it finished

The tables are written to benchmarks/results/ and between the benchmark markers in README.md.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks import quality, step

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse the quality runs already in its log")
    args = parser.parse_args()
    step_text = step.main(["--rounds", "1", "--steps", "10"] if args.quick else ["--rounds", "5", "--steps", "20"])
    quality_text = quality.main((["--seeds", "0"] if args.quick else []) + ([] if args.resume else ["--fresh"]))
    readme = README.read_text()
    block = f"{START}\n{step_text}\n{quality_text}{END}"
    if START in readme:
        readme = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
        README.write_text(readme)


if __name__ == "__main__":
    main()
