"""What the CLI prints where: results on stdout, progress and logs on stderr, third-party noise dropped.

* ``predict`` writes one JSON line per input, flushed as each batch ends (:class:`JSONLinesWriter`),
  to stdout or to ``--output FILE``; nothing else goes to stdout, so ``predict ... > out.jsonl``
  is a JSON-lines file.
* The progress bar draws on stderr (:class:`StderrProgressBar`); in a log file (stderr not a
  terminal) it is one wide line instead of a table wrapped at 80 columns.
* Messages from Lightning that are not about the user's run are dropped, each matched precisely
  by its logger or warning category and its text (:data:`NOISE_LOGS`, :data:`NOISE_WARNINGS`):
  the litlogger / litmodels "Tip" adverts, the note that tensorboardX is no longer a dependency,
  the note that our own model summary replaces Lightning's, torch's ``LeafSpec`` deprecation
  raised inside Lightning and ``set_vital``'s raised inside torchdata. Every other warning and
  log line is kept.
* ``--quiet`` (:func:`set_quiet`) keeps only warnings, errors and results: Lightning's and
  lightning_peft's info lines, the model summary and the progress bars (Lightning's and those of
  Hugging Face ``datasets`` while it reads and tokenizes) are off.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar
from typing_extensions import override

#: Lightning's loggers: its info lines (``rank_zero_info``) go through these.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_peft")
#: (logger name prefix, start of the message) of the log lines that are not about the user's run.
NOISE_LOGS = (
    ("lightning.pytorch", "💡 Tip: For seamless cloud logging and experiment tracking"),
    ("lightning.pytorch", "💡 Tip: For seamless cloud uploads and versioning"),
    ("lightning.pytorch", "Trainer already configured with model summary callbacks"),
)
#: (category, start of the message) of the warnings that are not about the user's run.
NOISE_WARNINGS = (
    (UserWarning, "Starting from v1.9.0, `tensorboardX` has been removed as a dependency"),
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated"),
    (UserWarning, "'set_vital' is deprecated"),  # torchdata's loader calls it; not about the user's run
)
#: Printed in a log file, the progress bar is one line of this many columns at most.
LOG_FILE_WIDTH = 400


class _DropNoise(logging.Filter):
    """Drops the log records of :data:`NOISE_LOGS`; every other record passes."""

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(name) and message.startswith(text) for name, text in NOISE_LOGS)


_FILTER = _DropNoise()


def silence_third_party_noise() -> None:
    """Drop :data:`NOISE_LOGS` and :data:`NOISE_WARNINGS` (idempotent); nothing else is filtered."""
    for name in LIGHTNING_LOGGERS[:2]:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
        # rank_zero_info logs through these module loggers, whose records reach the handlers above
        for child in ("utilities.rank_zero",):
            logger = logging.getLogger(f"{name}.{child}")
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
    for category, text in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=category)


_LEVELS: dict[str, int] = {}  # the levels --quiet replaced, put back by set_quiet(False)


def set_quiet(quiet: bool) -> None:
    """``--quiet``: only warnings and errors from Lightning's and lightning_peft's loggers, and no progress bars
    of Hugging Face ``datasets`` (reading, tokenizing); False undoes it."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if quiet:
            _LEVELS.setdefault(name, logger.level)
            logger.setLevel(logging.WARNING)
        elif name in _LEVELS:
            logger.setLevel(_LEVELS.pop(name))
    if importlib.util.find_spec("datasets") is None or (not quiet and "datasets" not in _LEVELS):
        return
    import datasets

    if quiet and datasets.is_progress_bar_enabled():
        _LEVELS["datasets"] = 1
        datasets.disable_progress_bars()
    elif not quiet:
        _LEVELS.pop("datasets")
        datasets.enable_progress_bars()


class StderrProgressBar(RichProgressBar):
    """Lightning's rich progress bar, drawn on stderr so that stdout holds only results.

    Lightning's bar reconfigures rich's shared console, which also prints the model summary and
    the validate/test results table; that console is put back on stdout once an evaluation run
    ends (before Lightning prints its table) and at teardown. With stderr not a terminal (a log
    file), the bar is drawn :data:`LOG_FILE_WIDTH` columns wide, so its final state is one line.
    """

    def __init__(self, **kwargs: Any) -> None:
        console = {"stderr": True, **({} if _is_terminal(sys.stderr) else {"width": LOG_FILE_WIDTH})}
        super().__init__(console_kwargs={**console, **kwargs.pop("console_kwargs", {})}, **kwargs)

    def _finish(self) -> None:
        """Stop the bar, then put rich's shared console back on stdout (in this order: a live bar owns the console)."""
        self._stop_progress()
        import rich

        rich.reconfigure()  # rich's default console: stdout

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != "fit":
            self._finish()

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._finish()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._finish()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class JSONLinesWriter(Callback):
    """Writes each prediction as one JSON line, flushed as each predict batch ends.

    A ``predict_step`` returning a list writes one line per item (the task modules return one
    dict per input); anything else is one line. Values JSON cannot hold are written as strings.
    Under several processes each writes the rows it predicted: to stdout, or (a file) global rank
    0 to ``path`` and rank ``k`` to ``<stem>.rank<k><suffix>`` beside it.

    Args:
        path: the file to write (created or replaced); None: stdout.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.count = 0
        self._target = self.path
        self._file: IO[str] | None = None

    def _stream(self) -> IO[str]:
        if self._target is None:
            return sys.stdout
        if self._file is None:
            self._file = open(self._target, "w", encoding="utf-8")  # noqa: SIM115  (closed at predict end)
        return self._file

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.count = 0
        if self.path is not None:
            stem, suffix = os.path.splitext(self.path)
            rank = trainer.global_rank
            self._target = self.path if rank == 0 else f"{stem}.rank{rank}{suffix}"
            self._stream()  # an empty file even when there is nothing to predict

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        items = outputs if isinstance(outputs, list) else [outputs]
        if not items:
            return
        stream = self._stream()
        stream.write("".join(json.dumps(item, default=str) + "\n" for item in items))
        stream.flush()
        self.count += len(items)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = [
    "JSONLinesWriter",
    "NOISE_LOGS",
    "NOISE_WARNINGS",
    "StderrProgressBar",
    "set_quiet",
    "silence_third_party_noise",
]
