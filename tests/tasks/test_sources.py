"""Model sources: local folders, .gguf files, package:<module>/<path>, Hub ids; the offline package list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_peft.tasks.sources import PACKAGES, ModelSource, resolve_model

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_folder_and_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path))
    source = resolve_model(str(tmp_path / "m.gguf"))
    assert source == ModelSource(str(tmp_path), "m.gguf") and source.kwargs == {"gguf_file": "m.gguf"}


def test_a_package_path() -> None:
    source = resolve_model("package:lightning_peft/tasks")  # any installed package works the same way
    assert Path(source.path) == ROOT / "lightning_peft" / "tasks" and source.gguf_file is None


def test_a_hub_id_is_passed_through() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == ModelSource("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("./nope", r"model_name_or_path='\./nope' does not exist; give a folder with a model's config.json"),
        ("~/nope/x.gguf", r"model_name_or_path='~/nope/x.gguf' does not exist"),
        ("", r"model_name_or_path must be a local folder, a Hub id or package:<module>/<path>; got ''"),
        ("package:lightning_peft/no-such-dir", r"the package 'lightning_peft' has no 'no-such-dir'"),
        ("package:surely_not_installed_pkg/x", r"needs the Python package 'surely_not_installed_pkg'"),
    ],
)
def test_bad_model_sources(value: str, message: str) -> None:
    with pytest.raises((ValueError, ModuleNotFoundError), match=message):
        resolve_model(value)


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a file; give the folder that holds config.json"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_requirements_offline_pins_the_known_packages() -> None:
    """requirements-offline.txt (what the README and CI install) and PACKAGES (what errors suggest) agree."""
    lines = (ROOT / "requirements-offline.txt").read_text().splitlines()
    pinned = {re.split(r"\s+#", line)[0].strip() for line in lines if line.strip() and not line.startswith("#")}
    assert pinned == {p.requirement for p in PACKAGES.values()}
