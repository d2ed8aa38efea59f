from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch

import lightning_peft.methods  # noqa: F401  (registers the built-in methods the test grids read)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

#: The stack whose versions head the test log (CI runs on the newest releases and on the minimums).
STACK = ("torch", "lightning", "transformers", "peft", "torchmetrics", "jsonargparse", "wandb")


def stack_versions() -> str:
    """``torch 2.13.0+cpu | lightning 2.6.6 | ...``, read from package metadata (nothing imported)."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return " | ".join(f"{name} {version(name)}" for name in STACK)


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session: pytest.Session) -> Iterator[None]:
    # After pytest's own header (hidden under -q, where this line still shows).
    result = yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"versions: {stack_versions()}")
    return result


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_rendezvous_port() -> Iterator[None]:
    """Each test's distributed run finds its own free port.

    Lightning's launchers write ``MASTER_PORT`` into this process's environment, and the next
    Trainer's ``LightningEnvironment`` would reuse it while the last run's store may still hold it.
    """
    os.environ.pop("MASTER_PORT", None)
    yield
    os.environ.pop("MASTER_PORT", None)


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the session for tiny model folders (see tests/tasks/hub.py)."""
    return tmp_path_factory.mktemp("hub")
