"""``python -m lightning_peft {fit,validate,test,predict} --config ...``: LightningCLI with PEFT.

The PEFT method is a Trainer callback in the config, given by name or as a config object::

    trainer:
      callbacks:
        - class_path: lightning_peft.PEFTCallback
          init_args:
            method:
              class_path: lightning_peft.methods.lora.LoRAConfig
              init_args: {r: 8, alpha: 16}

and on the command line as ``--trainer.callbacks.method.r 16`` (the last callback in the list).
Beyond Lightning's own CLI this adds: method configs accepted as ``class_path`` objects, the
registered methods and their options in ``--help`` (plain text, cached: see
:mod:`~lightning_peft.lightning.cli_help`), a model summary with trainable vs frozen parameters,
and ``--print_config`` with every ``class_path`` first in its object.

What goes where (:mod:`~lightning_peft.lightning.cli_output`): ``predict`` writes one JSON line
per input on stdout (or ``--output FILE``) and nothing else does, the progress bar and log lines
go to stderr, third-party adverts and warnings not about the run are dropped, and ``--quiet``
leaves only results, warnings and errors.

``validate``, ``test`` and ``predict`` with ``--ckpt_path`` reuse what the checkpoint knows: the
labels (in the model's recorded hyperparameters), the run folder it was saved in (metrics go to
``<run>/<subcommand>/``, not a new ``lightning_logs/version_N``), and how the fit split its data
(each evaluation says which records it scores and whether the fit validated on them; ``test``
without a test split scores the validation split and says so). See
:mod:`~lightning_peft.lightning.cli_runs`.

Mistakes in the input fail early and as one message: ``--ckpt_path``, the data files and their
columns, and the folders to write in are checked before a model is built, and :func:`main` prints
what is wrong, the bad value, what would be valid and where it was set (a ``--config`` file or a
flag, with the key), then exits with 2. ``--debug`` (or ``LIGHTNING_PEFT_DEBUG=1``) shows the
Python traceback instead; exceptions that are bugs rather than bad input always keep theirs. See
:mod:`~lightning_peft.lightning.cli_errors`.

Serving several adapters from one base model: ``validate`` and ``predict`` take ``--adapters
'{"topic": "topic.ckpt", "spam": "spam_adapter/"}'`` (PEFTCallback checkpoints or adapter folders),
loaded as named adapters beside each other right after the model is built, ``--adapter NAME`` to
pick the active one (default: the first), and for ``predict`` ``--adapter_column COLUMN``: a column
of the predict data naming each row's adapter (or ``__base__``), every batch then served in one
forward with :func:`lightning_peft.mixed_batch` and each prediction headed by its ``"adapter"``.
See :class:`~lightning_peft.lightning.serving.AdapterLoader` for what happens to a PEFTCallback
in the config.

Nothing is written outside the run's log directory, and never over a file given on the command
line: the resolved ``config.yaml`` goes to the run's own folder (for W&B, beside its checkpoints),
and W&B's ``save_dir`` defaults to ``<default_root_dir>/lightning_logs`` rather than the working
directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_peft.api  # noqa: F401  (registers the built-in methods)
from lightning_peft import registry
from lightning_peft.api import io as api_io
from lightning_peft.api.inject import BASE, check_adapter_name
from lightning_peft.core import files
from lightning_peft.core.config import AdapterConfig
from lightning_peft.lightning import cli_help, help_record
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.cli_errors import (
    CLIError,
    check_checkpoint,
    check_writable,
    clean_parse_error,
    locate_key,
    user_error,
    value_source,
)
from lightning_peft.lightning.cli_help import METHOD_HELP, methods_help
from lightning_peft.lightning.cli_output import (
    JSONLinesWriter,
    StderrProgressBar,
    set_quiet,
    silence_third_party_noise,
)
from lightning_peft.lightning.cli_runs import (
    SAVED_HEADER,
    SPLIT_OPTIONS,
    DataSplitRecorder,
    LogConfigCallback,
    checkpoint_run,
    describe_split,
    evaluation_logger,
    recorded_split,
    run_log_dir,
    split_options,
)
from lightning_peft.lightning.serving import AdapterLoader, recorded_hyperparameters
from lightning_peft.lightning.summary import PEFTModelSummary

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The subcommands that take ``--adapters`` and ``--adapter`` (``predict`` also ``--adapter_column``).
SERVING = ("validate", "predict")
#: The subcommands that evaluate or use a trained model (``--ckpt_path``) rather than train one.
EVALUATION = ("validate", "test", "predict")
#: The flag and the environment variable that show the traceback of a mistake in the input.
DEBUG_FLAG, DEBUG_ENV = "--debug", "LIGHTNING_PEFT_DEBUG"
#: The flag that leaves only results, warnings and errors.
QUIET_FLAG = "--quiet"
#: What a missing column in a ``.txt`` file needs to be told.
TXT_HINT = (
    "a .txt file gives one record per line, in one column named 'text'; for other columns use .csv, .tsv, "
    ".jsonl or .json"
)


@contextlib.contextmanager
def _evaluation_warnings() -> Iterator[None]:
    """During validate / test / predict: ModelCheckpoint's "dirpath has changed" (it saves nothing then)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from", category=UserWarning)
        yield


def _class_path_first(node: Any) -> Any:
    """``node`` with ``class_path`` as the first key of every object that has one (then ``init_args``)."""
    if isinstance(node, dict):
        order = sorted(node, key=lambda k: {"class_path": 0, "init_args": 1}.get(k, 2))
        return {k: _class_path_first(node[k]) for k in order}
    if isinstance(node, list):
        return [_class_path_first(v) for v in node]
    return node


class PEFTArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose YAML dumps (``--print_config``, the saved ``config.yaml``) put ``class_path`` first.

    jsonargparse writes an object's ``init_args`` before its ``class_path`` once an option in it
    was set on the command line (``--trainer.callbacks.method.r 16``), so the class a reader looks
    for comes last; the content is unchanged.
    """

    @override
    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
        text = super().dump(cfg, *args, **kwargs)
        if args or kwargs.get("format", "parser_mode") not in ("parser_mode", "yaml"):
            return text
        if getattr(self, "parser_mode", "yaml") != "yaml":
            return text
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            return text
        return yaml.safe_dump(_class_path_first(data), default_flow_style=False, allow_unicode=True, sort_keys=False)


class PEFTLightningCLI(LightningCLI):
    """LightningCLI that knows the PEFT method configs and prints what PEFT needs to see.

    Args and behaviour are LightningCLI's; subclass mode is on for models and datamodules, the
    saved ``config.yaml`` (see :class:`LogConfigCallback`) is rewritten on reruns, and every
    registered method's config class can be given wherever an
    :class:`~lightning_peft.core.config.AdapterConfig` is expected.

    Mistakes in the input are raised as :class:`CLIError` from the failed check, with the
    config key and where it was set; ``--ckpt_path``, the data (files, columns) and the folders
    the run writes in are checked before a model is built, and so are ``--adapters`` (names,
    files, recorded head widths and labels) and ``--adapter_column``'s values.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        silence_third_party_noise()
        # Method configs are dataclasses, which jsonargparse would otherwise only take as plain
        # nested options of the declared (base) class; this lets `class_path: ...LoRAConfig` through.
        jsonargparse.set_parsing_settings(subclasses_enabled=[AdapterConfig])
        # Imported classes are known subclasses, which short class_paths resolve to
        # (`LoRAConfig`, `PEFTCallback`, `SequenceClassification`) and --help lists.
        registry.all_methods()
        import lightning_peft.tasks as tasks

        for name in tasks.__all__:
            getattr(tasks, name)
        given = kwargs.get("args")
        #: The command line as given (empty for a dict of args), to say where a bad value was set.
        self.argv: list[str] = (
            [] if isinstance(given, dict) else [str(a) for a in (sys.argv[1:] if given is None else given)]
        )
        help_kwargs = help_record.help_kwargs()
        extra = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs: dict[str, Any] = {
            "prog": cli_help.program_name(),
            "description": (
                "lightning_peft: parameter-efficient fine-tuning with PyTorch Lightning.\n"
                f"A mistake in the input prints one message; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback."
            ),
            **help_kwargs,
            **{k: v for k, v in extra.items() if k not in SUBCOMMANDS},
        }
        for cmd in SUBCOMMANDS:
            parser_kwargs[cmd] = {**help_kwargs, **extra.get(cmd, {})}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LogConfigCallback)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", PEFTArgumentParser)
        #: What ``validate`` / ``test`` / ``predict`` learn from ``--ckpt_path`` (set before the classes are built).
        self.run_folder: Path | None = None
        self.recorded_split: dict[str, Any] | None = None
        try:
            super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)
        except Exception as error:
            shown = user_error(error)
            if shown is None or isinstance(error, CLIError):
                raise
            # From the check itself, which jsonargparse's own error may not name as its cause (a union's branch).
            raise self._explain(shown) from shown

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        # LightningCLI builds one parser per subcommand here; the serving options exist only for those that serve.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.add_argument(
            QUIET_FLAG,
            action="store_true",
            help="Only results, warnings and errors: no progress bar, model summary or info lines (for scripts).",
        )
        if subcommand == "predict":
            parser.add_argument(
                "--output",
                type=str | None,
                default=None,
                help="Write the predictions (one JSON line per input) to this file instead of stdout.",
            )
        if subcommand in SERVING:
            parser.add_argument(
                "--adapters",
                type=dict[str, str] | None,
                default=None,
                help='Named adapters to load beside each other into the model, as JSON: \'{"topic": "topic.ckpt", '
                '"spam": "spam_adapter/"}\' (PEFTCallback checkpoints or adapter folders); a PEFTCallback in the '
                "config is then dropped.",
            )
            parser.add_argument(
                "--adapter", type=str | None, default=None, help="The active one of --adapters (default: the first)."
            )
        if subcommand == "predict":
            parser.add_argument(
                "--adapter_column",
                type=str | None,
                default=None,
                help="A column of the predict data naming each row's adapter (one of --adapters, or __base__ for the "
                "base model alone): each batch runs in one forward, each row through its own adapter.",
            )
        return parser

    # ------------------------------------------------------------------ mistakes in the input

    def _explain(self, error: BaseException) -> CLIError:
        """``error`` as one message, with the config key it is about and where that was set."""
        subcommand = next((a for a in self.argv if a in SUBCOMMANDS), None)
        hint = None
        if isinstance(error, argparse.ArgumentError):
            message = clean_parse_error(str(error))
            named = re.match(r'Parser key "([^"]+)"', message)
            key = named[1] if named else None
            hint = f"python -m lightning_peft {subcommand or ''} --help lists the options".replace("  ", " ")
        else:
            message = str(error)
            config = getattr(self, "config", None)
            if config is not None and subcommand is not None:
                config = config.get(subcommand, config)
            key = locate_key(message, config)
        where = None if key is None else f"{key}, {value_source(self.argv, key, subcommand)}"
        return CLIError(message, where, hint)

    @override
    def before_instantiate_classes(self) -> None:
        """Check ``--ckpt_path`` and keep W&B's files out of the working directory, before anything is built."""
        config = self._get(self.config, "trainer", default=jsonargparse.Namespace())
        self._place_logger_files(config)
        ckpt_path = self._get(self.config, "ckpt_path")
        if (
            isinstance(ckpt_path, str)
            and ckpt_path not in ("best", "last", "hpc")
            and not ckpt_path.startswith("registry")
        ):
            check_checkpoint(ckpt_path)
            if self.subcommand in EVALUATION and "://" not in ckpt_path:
                self._read_checkpoint(ckpt_path)

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        set_quiet(self.quiet)  # before LightningCLI's first line ("Seed set to ...")

    @property
    def quiet(self) -> bool:
        """``--quiet`` was given (read from the parsed config, whichever subcommand runs)."""
        config = getattr(self, "config", None)
        if config is None:
            return False
        subcommand = config.get("subcommand")
        node = config.get(subcommand, config) if subcommand else config
        return bool(node.get("quiet"))

    def _note(self, message: str) -> None:
        """An info line on stderr (global rank 0, not under ``--quiet``)."""
        trainer = getattr(self, "trainer", None)
        if not self.quiet and (trainer is None or trainer.is_global_zero):
            print(message, file=sys.stderr, flush=True)

    def _read_checkpoint(self, ckpt_path: str) -> None:
        """What an evaluation reuses from its checkpoint: the run it came from and how its data was split.

        (Its labels come with the model's recorded hyperparameters, which LightningCLI reads into
        the model's options; :meth:`_check_ready` hands them to the datamodule.)
        """
        self.run_folder = checkpoint_run(ckpt_path)
        checkpoint = files.load_torch(Path(ckpt_path).expanduser())
        self.recorded_split = recorded_split(checkpoint) if isinstance(checkpoint, dict) else None

    @staticmethod
    def _place_logger_files(trainer: jsonargparse.Namespace) -> None:
        """A WandbLogger left at ``save_dir: .`` writes under ``<default_root_dir>/lightning_logs`` (or its ``dir``).

        Its ``save_dir`` holds the offline ``wandb/`` folder and, through ModelCheckpoint, the run's
        ``<project>/<run id>/checkpoints``: at ``.`` both would land in the working directory.
        """
        from lightning.pytorch.loggers import WandbLogger

        loggers = trainer.get("logger")
        for spec in loggers if isinstance(loggers, list) else [loggers]:
            if not isinstance(spec, jsonargparse.Namespace) or not isinstance(spec.get("class_path"), str):
                continue
            module, _, name = spec.class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            init = spec.get("init_args")
            if not (isinstance(cls, type) and issubclass(cls, WandbLogger)) or init is None:
                continue
            if init.get("save_dir") in (None, "."):
                root = trainer.get("default_root_dir")
                init["save_dir"] = init.get("dir") or os.path.join(root or "", "lightning_logs")

    def _check_ready(self) -> None:
        """What can be checked before a model is built: the folders the run writes in, then the data.

        Then W&B's ``save_dir`` is created, so that the run's files land there.
        """
        trainer = self.trainer
        check_writable("trainer.default_root_dir", trainer.default_root_dir)
        for logger in trainer.loggers:
            if logger.save_dir is not None:
                check_writable(f"{type(logger).__name__}.save_dir", logger.save_dir)
        if self.subcommand == "fit":
            for callback in trainer.callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                    check_writable(f"{type(callback).__name__}.dirpath", callback.dirpath)
        from lightning_peft.tasks.data import TextDataModule, load_records

        data = self.datamodule
        if isinstance(data, TextDataModule):
            model_labels = getattr(self.model, "labels", None)
            if model_labels and hasattr(data, "labels") and data.labels is None:
                # From the checkpoint (LightningCLI reads its hyperparameters into the model's options) or
                # the config: the label order the head was trained with, which the data must encode with.
                data.labels = [str(label) for label in model_labels]
            try:
                load_records(data)  # files, columns and the task's checks; setup reuses them
            except ValueError as error:
                texts = [p for p in (getattr(data, "files", None) or {}).values() if p and str(p).endswith(".txt")]
                if not texts or "has no column" not in str(error):
                    raise
                explained = self._explain(error)
                explained.hint = TXT_HINT
                raise explained from error
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.save_dir and "://" not in logger.save_dir:
                # wandb 0.19 (the minimum) puts a run whose folder does not exist yet in the temp folder.
                os.makedirs(logger.save_dir, exist_ok=True)

    # ------------------------------------------------------------------ serving several adapters

    def _where(self, key: str) -> str:
        return f"{key}, {value_source(self.argv, key, self.subcommand)}"

    def _adapter_loader(self) -> AdapterLoader | None:
        """Check ``--adapters``, ``--adapter`` and ``--adapter_column`` (not the data yet); the loader to add."""
        adapters = self._get(self.config, "adapters")
        active = self._get(self.config, "adapter")
        column = self._get(self.config, "adapter_column")
        if adapters is None:
            for key, value in (("adapter", active), ("adapter_column", column)):
                if value is not None:
                    raise CLIError(f"--{key} {value} picks among --adapters, which is not given.", self._where(key))
            return None
        if not adapters:
            raise CLIError("--adapters names no adapter; give {name: path, ...}.", self._where("adapters"))
        for name, path in adapters.items():
            try:
                check_adapter_name(name, field=f"--adapters {name!r}: the name")
            except ValueError as error:
                raise CLIError(str(error), self._where("adapters")) from error
            try:
                api_io.read_adapter(path)  # the record and the tensors: a lightning_peft adapter that loads
            except (OSError, ValueError) as error:
                raise CLIError(f"--adapters {name}={path!r}: {error}", self._where("adapters")) from error
        if active is not None and active not in adapters:
            listed = ", ".join(map(repr, adapters))
            raise CLIError(f"--adapter {active!r} is not one of the --adapters ({listed}).", self._where("adapter"))
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path is not None:
            raise CLIError(
                f"--ckpt_path {ckpt_path} and --adapters both say what to load; list the checkpoint in --adapters "
                f'instead (\'{{"name": "{ckpt_path}", ...}}\').',
                self._where("ckpt_path"),
            )
        if column is not None:
            from lightning_peft.tasks.base import TaskModule
            from lightning_peft.tasks.data import TextDataModule

            if not isinstance(self.datamodule, TextDataModule) or not isinstance(self.model, TaskModule):
                raise CLIError(
                    f"--adapter_column needs a datamodule and a model from lightning_peft.tasks (got "
                    f"{type(self.datamodule).__name__} and {type(self.model).__name__}): they carry the column into "
                    "predict_step. In a module of your own, run the forward inside "
                    "lightning_peft.mixed_batch(self, names).",
                    self._where("adapter_column"),
                )
        return AdapterLoader(adapters, active)

    def _check_served(self, loader: AdapterLoader) -> None:
        """Once the data is read: the column names known adapters, and every classification head fits the model's."""
        from lightning_peft.tasks.classification import SequenceClassification
        from lightning_peft.tasks.data import TextDataModule

        data = self.datamodule
        column = self._get(self.config, "adapter_column")
        if isinstance(data, TextDataModule) and column is not None:
            data.adapter_column = column  # set once the data is read: the column is checked here, with where it was set
            rows = (data.records or {}).get("predict", [])
            try:
                data._check_columns({"predict": rows})
            except ValueError as error:
                raise CLIError(str(error), self._where("adapter_column")) from error
            known = [*loader.adapters, BASE]
            for number, record in enumerate(rows):
                if str(record[column]) not in known:
                    raise CLIError(
                        f"{data._describe('predict')} names the adapter {str(record[column])!r} in column {column!r} "
                        f"(record {number + 1}), which is not one of --adapters nor {BASE!r} (the base model alone): "
                        f"{', '.join(map(repr, known))}.",
                        self._where("adapter_column"),
                    )
        model = self.model
        if not isinstance(model, SequenceClassification):
            return
        labels = model.labels or getattr(data, "labels", None)
        if not labels:
            return
        width = model.num_labels or len(labels)
        for name, path in loader.adapters.items():
            recorded = recorded_hyperparameters(path)
            theirs = recorded.get("labels")
            if not isinstance(theirs, list) or not theirs:
                continue  # an adapter folder: the model's labels apply
            theirs = [str(label) for label in theirs]
            their_width = recorded.get("num_labels") or len(theirs)
            if their_width != width:
                raise CLIError(
                    f"adapter {name!r} ({path}) was trained with a head of {their_width} outputs (labels {theirs}), "
                    f"and this model's head has {width} (labels {list(labels)}): adapters on one base keep one head "
                    "width. Train them with one --model.num_labels (the largest label count; see examples/serving.py), "
                    "or serve them in separate runs.",
                    self._where("adapters"),
                )
            if theirs != list(labels):
                if self.subcommand == "validate" and name == loader.active:
                    raise CLIError(
                        f"validate scores adapter {name!r} on this config's data, whose labels are {list(labels)}, but "
                        f"it was trained on {theirs}; validate it with the data it was trained on.",
                        self._where("adapter" if self._get(self.config, "adapter") else "adapters"),
                    )
                model.adapter_labels[name] = theirs

    def _serve(self) -> None:
        """``--adapters``: check them and the data, then load them in place of the config's PEFTCallback.

        The PEFTCallback is dropped with a note on stderr, not refused: the config an adapter was
        trained with is the natural one to serve it with, and its PEFTCallback would only add a
        fresh, untrained adapter, active over the ones loaded.
        """
        loader = self._adapter_loader()
        self._check_ready()
        if loader is None:
            return
        self._check_served(loader)
        dropped = [c for c in self.trainer.callbacks if isinstance(c, PEFTCallback)]
        if dropped and self.trainer.is_global_zero:
            methods = ", ".join(c.method.name for c in dropped)
            print(
                f"note: --adapters: the config's PEFTCallback ({methods}) is not used; the model serves the adapters "
                "given.",
                file=sys.stderr,
            )
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, PEFTCallback)] + [loader]

    def before_validate(self) -> None:
        self._serve()
        self._say_what_is_evaluated("validation")

    def before_test(self) -> None:
        self._check_ready()
        data = self.datamodule
        records = getattr(data, "records", None)
        fallback = (
            isinstance(records, dict)
            and "test" not in records
            and "validation" in records
            and self._get(self.config, "ckpt_path") is not None
        )
        if fallback:
            assert isinstance(records, dict)
            records["test"] = records["validation"]
        self._say_what_is_evaluated("test", fallback=fallback)

    def _say_what_is_evaluated(self, split: str, fallback: bool = False) -> None:
        """A line on stderr: the records ``validate`` / ``test`` score, and whether the fit validated on them."""
        data = self.datamodule
        records = getattr(data, "records", None)
        if not isinstance(records, dict) or split not in records or not hasattr(data, "files"):
            return
        source = "validation" if fallback else split
        try:
            count = f"{len(records[split]):,} records"
        except TypeError:  # a stream
            count = "the records"
        what = f"{self.subcommand}: {count}, the {source} split ({describe_split(data, source)})"
        if fallback:
            what = (
                f"{self.subcommand}: the data has no test split (no test_file, test_split=0), so this tests the "
                f"checkpoint on the validation split: {count}, {describe_split(data, 'validation')}"
            )
        recorded = self.recorded_split
        if recorded is not None and source == "validation":
            current = split_options(data)
            changed = [f"{k}={recorded.get(k)!r}" for k in SPLIT_OPTIONS if recorded.get(k) != current.get(k)]
            if changed:
                what += (
                    f"; not the split the checkpoint's fit validated on (it had {', '.join(changed)}): some of these "
                    "records may have trained it"
                )
            else:
                what += "; the records the checkpoint's fit validated on, none of which trained it"
        if fallback:
            what += ". For a test set of its own, fit with --data.test_split or give --data.test_file."
        self._note(what)

    def before_predict(self) -> None:
        self._serve()
        output = self._get(self.config, "output")
        if output is not None:
            self._check_output(output)

    def _check_output(self, output: str) -> None:
        """``--output`` names a file that may be written: not a folder, not one of the run's inputs."""
        where = self._where("output")
        path = Path(output).expanduser()
        if path.is_dir():
            raise CLIError(f"--output {output!r} is a folder; give the path of a .jsonl file to write.", where)
        inputs = [a.partition("=")[2] or a for a in self.argv]
        inputs += [str(p) for p in (getattr(self.datamodule, "files", None) or {}).values() if p]
        if any(os.path.isfile(i) and os.path.samefile(i, path) for i in inputs if path.exists()):
            raise CLIError(f"--output {output!r} is one of this run's inputs; give a new file to write.", where)
        try:
            check_writable("--output's folder", path.absolute().parent)
        except OSError as error:
            raise CLIError(str(error), where) from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with what this CLI adds unless configured otherwise.

        A progress bar on stderr (:class:`StderrProgressBar`) and :class:`PEFTModelSummary`, both
        off under ``--quiet``; for ``fit`` a :class:`DataSplitRecorder`; for ``predict`` the
        :class:`JSONLinesWriter`. ``validate`` / ``test`` from a checkpoint inside a run folder
        log into ``<run>/<subcommand>/`` and ``predict`` into no logger, unless a logger is
        configured.
        """
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        added: list[Any] = []
        for flag, kind, default in (
            ("enable_progress_bar", ProgressBar, StderrProgressBar),
            ("enable_model_summary", ModelSummary, PEFTModelSummary),
        ):
            configured = any(isinstance(c, kind) for c in callbacks)
            wanted = config.get(flag) is not False and not config.get("barebones")
            if self.quiet and not configured and config.get(flag) is None:
                kwargs.setdefault(flag, False)
            elif wanted and not configured:
                added.append(default())
        if self.subcommand == "fit":
            added.append(DataSplitRecorder())
        if self.subcommand == "predict":
            self.writer = JSONLinesWriter(self._get(self.config, "output"))
            added.append(self.writer)
        if self.subcommand in EVALUATION:
            self._evaluation_trainer(config, kwargs)
        if added and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, *added]
        if isinstance(self.save_config_callback, type) and issubclass(self.save_config_callback, LogConfigCallback):
            named = [a.partition("=")[2] or a for a in self.argv]
            files = [a for a in named if a and not a.startswith("-") and os.path.isfile(a)]
            self.save_config_kwargs = {"keep": files, **self.save_config_kwargs}
            if self.subcommand in EVALUATION:  # beside the fit's config.yaml, never over it
                where = {"log_dir": str(self.run_folder)} if self.run_folder is not None else {"save_to_log_dir": False}
                self.save_config_kwargs.update(config_filename=f"config-{self.subcommand}.yaml", **where)
        return super().instantiate_trainer(**kwargs)

    def _evaluation_trainer(self, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """``validate`` / ``test`` / ``predict``: the logger (see :meth:`instantiate_trainer`)."""
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            logger = evaluation_logger(self.run_folder, str(self.subcommand)) if self.subcommand != "predict" else None
            kwargs["logger"] = logger if logger is not None else False
            if logger is not None:
                self._note(f"{self.subcommand}: logging into {logger.log_dir}, in the run the checkpoint came from")

    def validate(self, **kwargs: Any) -> Any:
        """``Trainer.validate``; a ModelCheckpoint restored from the checkpoint may not warn that its folder changed."""
        with _evaluation_warnings():
            return self.trainer.validate(**kwargs)

    def test(self, **kwargs: Any) -> Any:
        """``Trainer.test``, as :meth:`validate`."""
        with _evaluation_warnings():
            return self.trainer.test(**kwargs)

    def before_fit(self) -> None:
        self._check_ready()
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        """One line with the final validation metrics and one with the checkpoint to use next."""
        if not self.trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._fit_start
        metrics = {k: float(v) for k, v in sorted(self.trainer.callback_metrics.items()) if k.startswith("val_")}
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no validation run"
        print(f"fit finished in {elapsed:.0f} s: {shown}")
        checkpoint = self.trainer.checkpoint_callback
        path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        if path and os.path.isfile(path):
            peft = any(isinstance(c, PEFTCallback) for c in self.trainer.callbacks)
            print(f"checkpoint ({'adapter only, ' if peft else ''}{os.path.getsize(path) / 1e3:,.0f} kB): {path}")

    def predict(self, **kwargs: Any) -> Any:
        """``Trainer.predict``; :class:`JSONLinesWriter` writes each prediction as one JSON line as batches end."""
        with _evaluation_warnings():
            predictions = self.trainer.predict(**kwargs)
        output = self._get(self.config, "output")
        if output is not None:
            self._note(f"predict: {self.writer.count:,} predictions written to {output}")
        return predictions


def main(args: list[str] | None = None, *, run: bool = True) -> PEFTLightningCLI:
    """The console entry point (``lightning-peft`` / ``python -m lightning_peft``).

    A mistake in the input (see :func:`user_error`) prints ``error: <what, the bad value, what is
    valid>`` and ``where: <key>, <the --config file or flag that set it>`` on stderr and exits with
    2. With ``--debug`` anywhere in ``args``, or ``LIGHTNING_PEFT_DEBUG=1``, it raises instead, with
    the traceback; other exceptions always do. A help request (``--help``, ``fit --help``) prints
    its cached text when there is one (:mod:`~lightning_peft.lightning.cli_help`) and caches the
    text it prints otherwise.
    """
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != DEBUG_FLAG]
    entry_point = args is None
    if entry_point and len(argv) < len(sys.argv) - 1:  # --debug: LightningCLI reads sys.argv
        sys.argv = [sys.argv[0], *argv]
        os.environ[DEBUG_ENV] = "1"  # for the processes DDP starts: they rerun sys.argv, now without --debug
    silence_third_party_noise()
    set_quiet(QUIET_FLAG in argv)  # before LightningCLI's first line ("Seed set to ...")
    if cli_help.is_help_request(argv) and run:
        if cli_help.print_cached_help(argv):
            raise SystemExit(0)
        return _help_and_cache(argv, entry_point)
    return _run(argv, entry_point, run, debug)


def _run(argv: list[str], entry_point: bool, run: bool, debug: bool) -> PEFTLightningCLI:
    # Parse errors raise (to be printed below) rather than print the whole usage and exit.
    strict = {"exit_on_error": False}
    parser_kwargs = {**strict, **{cmd: dict(strict) for cmd in SUBCOMMANDS}}
    try:
        return PEFTLightningCLI(args=None if entry_point else argv, run=run, parser_kwargs=parser_kwargs)
    except CLIError as error:
        if debug:
            raise
        hints = [*([error.hint] if error.hint else []), f"{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback"]
        print(f"error: {error}\n  ({'; '.join(hints)})", file=sys.stderr)
        raise SystemExit(2) from None


def _help_and_cache(argv: list[str], entry_point: bool) -> PEFTLightningCLI:
    """Print the help ``argv`` asks for, as the parser writes it, and cache it.

    The cache keeps the render's snapshot (:mod:`~lightning_peft.lightning.help_record`: replayed at
    any width) when the formatter recorded one for exactly the printed text, else the text itself.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            cli = _run(argv, entry_point, True, False)
    except SystemExit as exit_:
        text = buffer.getvalue()
        if exit_.code in (0, None):  # first: `--help | head` closes stdout before the text is all written
            cli_help.save_help(argv, text, help_record.snapshot_for(text))
        sys.stdout.write(text)
        sys.stdout.flush()
        raise
    sys.stdout.write(buffer.getvalue())
    return cli


__all__ = [
    "EVALUATION",
    "METHOD_HELP",
    "SAVED_HEADER",
    "CLIError",
    "LogConfigCallback",
    "PEFTArgumentParser",
    "PEFTLightningCLI",
    "check_checkpoint",
    "check_writable",
    "clean_parse_error",
    "locate_key",
    "main",
    "methods_help",
    "run_log_dir",
    "user_error",
    "value_source",
]
