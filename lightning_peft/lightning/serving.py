"""Serving several adapters from one base model in a Trainer: load them by name after the model is built.

:class:`AdapterLoader` is what ``python -m lightning_peft validate|predict --adapters ...`` adds to
the Trainer; the task modules' ``predict_step`` then serves each row of a batch that names its
adapter through that adapter (``lightning_peft.mixed_batch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_peft.api import adapters as api_adapters
from lightning_peft.api import io
from lightning_peft.core import files


class AdapterLoader(Callback):
    """Loads adapters as named adapters into the LightningModule right after its model is built.

    The CLI's ``--adapters`` adds it for ``validate`` and ``predict``; a Trainer of your own takes
    it too: ``Trainer(callbacks=[AdapterLoader({"topic": "topic.ckpt", "spam": "spam/"})])``.
    Loading happens where PEFTCallback would inject (right after ``configure_model``, before the
    strategy moves or wraps the model), each adapter with :func:`lightning_peft.load_adapter`
    (which checks that it fits the base model), and then ``active`` is made the active adapter.

    Use it instead of PEFTCallback, not beside it: PEFTCallback would add a fresh, untrained
    adapter (active over the ones loaded). The CLI drops a PEFTCallback from the config, with a
    note on stderr, rather than refuse the run: the config an adapter was trained with is the
    natural one to serve it with.

    Args:
        adapters: ``{name: adapter folder or PEFTCallback checkpoint}``, loaded in this order.
        active: the adapter to make active; default: the first.
    """

    def __init__(self, adapters: dict[str, str], active: str | None = None) -> None:
        if not adapters:
            raise ValueError("AdapterLoader.adapters must name at least one adapter; got {}.")
        self.adapters = dict(adapters)
        self.active = active if active is not None else next(iter(self.adapters))
        if self.active not in self.adapters:
            raise ValueError(f"AdapterLoader.active={self.active!r} is not one of {', '.join(map(repr, adapters))}.")
        self._original_configure_model: Any = None

    def load(self, pl_module: LightningModule) -> None:
        """Load every adapter into ``pl_module`` and activate ``active``."""
        for name, path in self.adapters.items():
            try:
                io.load_adapter(pl_module, path, adapter_name=name)
            except (ValueError, OSError) as error:
                raise ValueError(f"adapter {name!r} ({path}) does not load into this model: {error}") from error
        api_adapters.set_adapter(pl_module, self.active)
        listed = ", ".join(f"{n} ({info.method})" for n, info in api_adapters.adapters(pl_module).items())
        rank_zero_info(f"lightning_peft: adapters {listed} on one {type(pl_module).__name__}; active: {self.active}")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not is_overridden("configure_model", pl_module):
            self.load(pl_module)
            return
        original = pl_module.configure_model
        self._original_configure_model = original

        def configure_model() -> None:
            original()
            self.load(pl_module)

        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._original_configure_model is not None:
            pl_module.__dict__.pop("configure_model", None)
            self._original_configure_model = None


def recorded_hyperparameters(path: str) -> dict[str, Any]:
    """The task module options a PEFTCallback checkpoint records (``{}`` for an adapter folder)."""
    if Path(path).is_dir():
        return {}
    checkpoint = files.load_torch(Path(path))
    recorded = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return dict(recorded) if isinstance(recorded, dict) else {}


__all__ = ["AdapterLoader", "recorded_hyperparameters"]
