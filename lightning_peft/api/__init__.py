"""The API floor: what users and the Lightning layer call on a model.

It sits above the methods (importing it registers the built-ins) and below the Lightning layer,
the tasks and the CLI: inject, merge and unload (:mod:`~lightning_peft.api.inject`), adapter files
(:mod:`~lightning_peft.api.io`), the methods' training hooks (:mod:`~lightning_peft.api.training`).
"""

from __future__ import annotations

import lightning_peft.methods  # noqa: F401  (registers the built-in methods)
from lightning_peft.registry import get as get_method

__all__ = ["get_method"]
