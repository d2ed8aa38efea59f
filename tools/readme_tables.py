"""Write the README's registry tables: ``python -m tools.readme_tables`` (``--check``: only compare).

Each table lives between its own pair of markers, ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``,
and is generated from the registry alone. Writing one table replaces only the text between its own
markers, and a README whose markers are missing, repeated, out of order or nested is refused, so one
table's rows cannot land in another's (benchmarks/__main__.py writes its tables the same way,
between ``benchmarks`` markers). tests/test_readme.py checks every table against the registry.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning_peft.methods  # noqa: F401  (registers the built-ins)
from lightning_peft import registry

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- ([a-z_]+):(start|end) -->")

#: The sharded strategies the README names, each with the registry's Sharding it lays weights out by.
SHARDING_COLUMNS: dict[str, registry.Sharding] = {
    "peft_fsdp": "fsdp",
    "peft_fsdp2": "fsdp2",
    "peft_deepspeed_stage_2": "zero2",
    "peft_deepspeed_stage_3": "zero3",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_table() -> str:
    """Every registered method: its name, ``Method.summary`` and ``Method.paper``."""
    rows = ["| method | what trains | reference |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {_cell(m.summary)} | {_cell(m.paper)} |" for m in registry.all_methods()]
    return "\n".join(rows) + "\n"


def sharding_table() -> str:
    """Every registered method against each sharded strategy: whether ``Method.sharding`` lists its layout."""
    rows = ["| method | " + " | ".join(f"`{name}`" for name in SHARDING_COLUMNS) + " |"]
    rows.append("|---|" + ":-:|" * len(SHARDING_COLUMNS))
    for m in registry.all_methods():
        rows.append(
            f"| `{m.name}` | " + " | ".join("yes" if s in m.sharding else "-" for s in SHARDING_COLUMNS.values()) + " |"
        )
    return "\n".join(rows) + "\n"


#: Each generated table by the name its markers carry.
TABLES: dict[str, Callable[[], str]] = {"methods": methods_table, "sharding": sharding_table}


def span(text: str, name: str) -> tuple[int, int]:
    """(start, end) offsets of what lies between ``name``'s markers in ``text``.

    Raises:
        ValueError: when either marker is missing or repeated, the end comes first, or another
            marker lies between them.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    for marker in (start, end):
        if text.count(marker) != 1:
            raise ValueError(
                f"README.md must hold the marker {marker!r} exactly once; found it {text.count(marker)} times"
            )
    begin, stop = text.index(start) + len(start), text.index(end)
    if stop < begin:
        raise ValueError(f"README.md has {end!r} before {start!r}")
    inner = MARKER.search(text, begin, stop)
    if inner is not None:
        raise ValueError(f"README.md has the marker {inner.group(0)!r} between the {name!r} table's markers")
    return begin, stop


def update(text: str, names: Sequence[str] = tuple(TABLES)) -> str:
    """``text`` with each named table regenerated between its own markers; the rest is kept as it is."""
    for name in names:
        begin, stop = span(text, name)
        text = text[:begin] + "\n" + TABLES[name]() + text[stop:]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs, writing nothing")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = update(text)
    if args.check:
        if new != text:
            print("README.md's registry tables are out of date: run python -m tools.readme_tables", file=sys.stderr)
        return int(new != text)
    if new != text:
        README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
