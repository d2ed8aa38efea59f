"""A checkpoint payload that runs code when unpickled: what no lightning_peft loader may execute.

``Payload(marker)`` pickles as a call that writes ``marker``, as a malicious checkpoint would run
any command; a test then asserts the marker was never written. ``test_the_payload_runs_when_unpickled``
(tests/test_security.py) shows the payload does run under a plain ``torch.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _touch(path: str) -> None:
    Path(path).write_text("unpickled")


class Payload:
    """Unpickling this writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_touch, (self.marker,))


def poison(path: Path, marker: Path, content: Any = None) -> Path:
    """Write ``content`` (default: a small Lightning-like checkpoint) to ``path`` with a payload inside."""
    content = {"state_dict": {"w": torch.zeros(2)}, "epoch": 0} if content is None else content
    torch.save({**content, "payload": Payload(marker)}, path)
    return path
