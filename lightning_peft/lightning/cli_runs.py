"""Where a CLI run writes (its log folder, the resolved config) and what a checkpoint tells later runs.

``fit`` writes ``<save_dir>/<name>/<version>/`` (Lightning's loggers) with ``checkpoints/`` and the
resolved ``config.yaml``. ``validate``, ``test`` and ``predict`` with ``--ckpt_path`` inside such a
folder write into that run (``<run>/<subcommand>/`` for metrics, ``<run>/config-<subcommand>.yaml``)
rather than a fresh ``version_N``: :func:`checkpoint_run`. A fit also records in each checkpoint
how its data was split (:class:`DataSplitRecorder`), so that a later ``validate`` or ``test`` can say
whether it evaluates the records the run was validated on.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

#: The first line of every config this CLI saves in a log folder: only such a file is ever rewritten.
SAVED_HEADER = "lightning_peft: resolved config (a rerun into the same folder rewrites it: copy it before editing)"
#: The checkpoint key under which :class:`DataSplitRecorder` writes how the data was split.
DATA_KEY = "lightning_peft_data"
#: The datamodule options that decide which records land in which split.
SPLIT_OPTIONS = ("dataset", "train_file", "validation_file", "test_file", "val_split", "test_split", "seed")


def run_log_dir(trainer: Trainer) -> str:
    """The run's own folder: the one ModelCheckpoint's ``checkpoints/`` lives in (call it on every rank).

    Lightning's ``trainer.log_dir`` is that folder for TensorBoard and CSV loggers and without a
    logger (``default_root_dir``); for other loggers (W&B, MLflow, ...) it is their ``save_dir``,
    shared by every run, so the run's folder is ``save_dir/name/version`` as for checkpoints.
    """
    loggers = trainer.loggers
    if not loggers or isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        path = trainer.log_dir
        assert path is not None
        return path
    logger = loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return trainer.strategy.broadcast(os.path.join(save_dir, str(logger.name), version))


class LogConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's own folder and also logs the whole run config to every logger.

    So a W&B run (or ``hparams.yaml``) records exactly what was run, under the key ``cli``: model,
    data, trainer and the PEFT method with its options, as plain JSON.

    The folder is :func:`run_log_dir` (for W&B the run's folder beside its checkpoints, not the
    ``save_dir`` every run shares). A file already there is rewritten only when this CLI wrote it
    (its first line is :data:`SAVED_HEADER`), ``overwrite`` is on and it is not one of ``keep``;
    otherwise the config goes to the first free ``config-<n>.yaml``.

    Args:
        keep: files never to write over (the CLI passes every file named on its command line).
        log_dir: the folder to save in instead of :func:`run_log_dir` (the CLI's evaluation
            subcommands pass the run their checkpoint came from).
        *args, **kwargs: :class:`~lightning.pytorch.cli.SaveConfigCallback`'s.
    """

    def __init__(
        self,
        *args: Any,
        keep: Sequence[str | os.PathLike[str]] = (),
        log_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.keep = {os.path.realpath(path) for path in keep}
        self.log_dir = None if log_dir is None else str(log_dir)
        self.saved_path: str | None = None

    def _may_write(self, fs: Any, path: str) -> bool:
        if not fs.exists(path):
            return True
        if not self.overwrite or ("://" not in path and os.path.realpath(path) in self.keep):
            return False
        with fs.open(path, "r") as file:
            return file.readline().strip() == f"# {SAVED_HEADER}"

    def target(self, fs: Any, log_dir: str) -> str:
        """Where to save in ``log_dir``: ``config.yaml``, else the first ``config-<n>.yaml`` that may be written."""
        stem, ext = os.path.splitext(self.config_filename)
        names = itertools.chain([self.config_filename], (f"{stem}-{n}{ext}" for n in itertools.count(2)))
        return next(path for path in (os.path.join(log_dir, name) for name in names) if self._may_write(fs, path))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            log_dir = self.log_dir or run_log_dir(trainer)
            fs = get_filesystem(log_dir)
            path = trainer.strategy.broadcast(self.target(fs, log_dir) if trainer.is_global_zero else None)
            if trainer.is_global_zero:
                fs.makedirs(log_dir, exist_ok=True)
                if self.multifile:
                    self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=True)
                else:  # marked as saved by this CLI, which lets a rerun rewrite it
                    with fs.open(path, "w") as file:
                        file.write(f"# {SAVED_HEADER}\n{self.parser.dump(self.config, skip_none=False)}")
                self.saved_path = path
                if os.path.basename(path) != self.config_filename:
                    rank_zero_info(
                        f"{os.path.join(log_dir, self.config_filename)} is not a config this CLI saved (or was given "
                        f"on the command line): the resolved config is in {path}"
                    )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        config.pop("config", None)  # the paths of the config files given
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


def checkpoint_run(ckpt_path: str | os.PathLike[str]) -> Path | None:
    """The run folder a checkpoint was written in (``<run>/checkpoints/<file>.ckpt``), or None.

    A run folder is what Lightning's loggers make (``<save_dir>/<name>/<version>``) and what
    ModelCheckpoint's default ``dirpath`` lives in.
    """
    path = Path(ckpt_path).expanduser().absolute()
    if path.parent.name != "checkpoints":
        return None
    return path.parent.parent


def split_options(data: Any) -> dict[str, Any]:
    """The options of a lightning_peft datamodule that decide its splits (:data:`SPLIT_OPTIONS`)."""
    files = getattr(data, "files", {}) or {}
    options = {
        "dataset": getattr(data, "dataset", None),
        "train_file": files.get("train"),
        "validation_file": files.get("validation"),
        "test_file": files.get("test"),
        "val_split": getattr(data, "val_split", None),
        "test_split": getattr(data, "test_split", None),
        "seed": getattr(data, "seed", None),
    }
    for key in ("train_file", "validation_file", "test_file"):
        if options[key] is not None and "://" not in str(options[key]):
            options[key] = os.path.abspath(os.path.expanduser(str(options[key])))
    return options


def describe_split(data: Any, split: str) -> str:
    """Which records ``split`` holds, in the datamodule's own options: a file, or a held-out fraction."""
    files = getattr(data, "files", {}) or {}
    if files.get(split) is not None:
        return f"{split}_file={files[split]!r}"
    fraction = {"validation": getattr(data, "val_split", None), "test": getattr(data, "test_split", None)}.get(split)
    source = f"dataset {data.dataset!r}" if getattr(data, "dataset", None) else f"train_file={files.get('train')!r}"
    if fraction:
        return f"{fraction:g} of {source}, held out with seed {getattr(data, 'seed', None)}"
    return source


class DataSplitRecorder(Callback):
    """Records in every checkpoint how the datamodule split its records (:data:`DATA_KEY`).

    ``validate`` / ``test`` with that checkpoint then compare it with their own data options and
    say whether they evaluate the records the run was validated on (held out of training) or
    others. Only plain values are stored (strings, numbers), so ``torch.load(weights_only=True)``
    reads them.
    """

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        data = getattr(trainer, "datamodule", None)
        if data is not None and hasattr(data, "files"):
            checkpoint[DATA_KEY] = {"splits": split_options(data)}


def recorded_split(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The split options a fit recorded in ``checkpoint`` (see :class:`DataSplitRecorder`), or None."""
    recorded = checkpoint.get(DATA_KEY)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("splits"), dict):
        return None
    return dict(recorded["splits"])


def evaluation_logger(run: Path | None, subcommand: str) -> TensorBoardLogger | CSVLogger | None:
    """The logger of ``validate`` / ``test`` from a checkpoint of ``run``: ``<run>/<subcommand>/``; None without a run.

    TensorBoard when it is installed, else CSV, as Lightning's default logger; the metrics of a
    rerun replace the last ones, and the fit's own files are left alone.
    """
    if run is None:
        return None
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    kind = TensorBoardLogger if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE else CSVLogger
    return kind(save_dir=str(run), name="", version=subcommand)


__all__ = [
    "DATA_KEY",
    "SAVED_HEADER",
    "DataSplitRecorder",
    "LogConfigCallback",
    "checkpoint_run",
    "describe_split",
    "evaluation_logger",
    "recorded_split",
    "run_log_dir",
    "split_options",
]
