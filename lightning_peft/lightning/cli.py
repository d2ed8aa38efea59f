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
registered methods and their options in ``--help``, a model summary with trainable vs frozen
parameters, and ``predict`` printing its predictions as JSON lines.

Mistakes in the input fail early and as one message: ``--ckpt_path``, the data files and their
columns, and the folders to write in are checked before a model is built, and :func:`main` prints
what is wrong, the bad value, what would be valid and where it was set (a ``--config`` file or a
flag, with the key), then exits with 2. ``--debug`` (or ``LIGHTNING_PEFT_DEBUG=1``) shows the
Python traceback instead; exceptions that are bugs rather than bad input always keep theirs.

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
import dataclasses
import importlib
import itertools
import json
import linecache
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

import lightning_peft.api  # noqa: F401  (registers the built-in methods)
from lightning_peft import registry
from lightning_peft.api import io
from lightning_peft.api.inject import BASE, check_adapter_name
from lightning_peft.core.config import AdapterConfig
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.serving import AdapterLoader, recorded_hyperparameters
from lightning_peft.lightning.summary import PEFTModelSummary

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The subcommands that take ``--adapters`` and ``--adapter`` (``predict`` also ``--adapter_column``).
SERVING = ("validate", "predict")
#: The flag and the environment variable that show the traceback of a mistake in the input.
DEBUG_FLAG, DEBUG_ENV = "--debug", "LIGHTNING_PEFT_DEBUG"
#: The first line of every config this CLI saves in a log folder: only such a file is ever rewritten.
SAVED_HEADER = "lightning_peft: resolved config (a rerun into the same folder rewrites it: copy it before editing)"
#: The command that prints one method's options in full (type, default and description).
METHOD_HELP = "python -m lightning_peft fit --trainer.callbacks+=PEFTCallback --trainer.callbacks.method.help {cls}"


def _format_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return json.dumps(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return json.dumps(field.default_factory())
    return "required"


def methods_help() -> str:
    """Every registered method with its options (name: type = default), for ``--help``."""
    lines = ["PEFT methods (set in trainer.callbacks as PEFTCallback's method: a name or a class_path config):"]
    for method in registry.all_methods():
        cls = method.config_cls
        lines.append(f"  {method.name}: {method.summary}")
        lines.append(f"    class_path: {cls.__module__}.{cls.__qualname__}")
        for field in dataclasses.fields(cls):
            lines.append(f"    {field.name}: {field.type} = {_format_default(field)}")
        lines.append(f"    all about each option: {METHOD_HELP.format(cls=cls.__name__)}")
    return "\n".join(lines)


class _HelpFormatter(jsonargparse.DefaultHelpFormatter):
    """Keeps the line breaks of the description and the methods list."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


# --------------------------------------------------------------------------- mistakes in the input


class CLIError(ValueError):
    """A mistake in the CLI's input (a config value, a flag, a file), raised from the failed check.

    :func:`main` prints it as one message without a traceback. ``message`` says what is wrong, with
    the bad value and what would be valid; ``where`` the config key and where it was set.
    """

    def __init__(self, message: str, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message if where is None else f"{message}\n  where: {where}")
        self.message, self.where, self.hint = message, where, hint


#: Exception types that lightning_peft raises on purpose when it validates input.
_VALIDATION_ERRORS = (ValueError, TypeError, OSError, ImportError)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Lines of jsonargparse's parse errors that name no problem (the union's other branches).
_NOISE = re.compile(
    r"((- )?Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|"
    r"- Expected a <class 'NoneType'>|Given value type: .*)$"
)


def _raised_by_lightning_peft(error: BaseException) -> bool:
    """Whether a ``raise`` statement in lightning_peft's own code raised ``error`` (a check, not a bug)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(_PACKAGE_DIR + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it, breadth first: ``__cause__`` and every branch of jsonargparse's unions.

    A union's error is raised from its first branch's only; the others (where a method config's
    own check failed, say) are the ``exceptions`` of the frame that raised it.
    """
    seen: set[int] = set()
    queue: list[BaseException] = [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__] if current.__cause__ is not None else []
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "raise_union_unexpected_value":
                branches = tb.tb_frame.f_locals.get("exceptions") or []
                queue += [b for b in branches if isinstance(b, BaseException)]
            tb = tb.tb_next


def user_error(error: BaseException) -> BaseException | None:
    """The exception to show when ``error`` comes from a mistake in the input; None for a bug.

    Mistakes are: lightning_peft's own validation errors (a ``raise`` of ValueError, TypeError,
    OSError or ImportError in its code), Lightning's MisconfigurationException, and jsonargparse's
    parse errors. jsonargparse wraps errors raised while it builds a class in its own, so the
    outermost such link among the causes (see :func:`_causes`) is the one shown.
    """
    for link in _causes(error):
        if isinstance(link, MisconfigurationException):
            return link
        if isinstance(link, _VALIDATION_ERRORS) and _raised_by_lightning_peft(link):
            return link
    return error if isinstance(error, argparse.ArgumentError) else None


def clean_parse_error(text: str) -> str:
    """jsonargparse's parse error without the lines that name no problem.

    A union's ``- Expected a <class 'NoneType'>`` and, when a class was recognised but its options
    were not, the ``- Not a valid subclass of ...`` block (the class is valid; its options are not).
    """
    drop_subclass = "Problem with given class_path" in text
    kept: list[str] = []
    skip_deeper: int | None = None
    for line in text.splitlines():
        indent, body = len(line) - len(line.lstrip()), line.strip()
        if skip_deeper is not None and indent > skip_deeper:
            continue
        skip_deeper = None
        if drop_subclass and body.startswith("- Not a valid subclass of "):
            skip_deeper = indent
        elif body and not _NOISE.match(body):
            kept.append(line)
    return re.sub(r"NestedArg\(key='([^']*)', val='([^']*)'\)", r"\1=\2", "\n".join(kept))


def _segments(key: str) -> tuple[str, ...]:
    """``trainer.callbacks[1].init_args.method`` -> ``("trainer", "callbacks", "method")``: what a flag names."""
    parts = (p.rstrip("+") for p in re.split(r"[.\[\]=]+", key.lstrip("-")))
    return tuple(p for p in parts if p and not p.isdigit() and p not in ("init_args", "dict_kwargs", "class_path"))


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The key paths a config file sets (list items share their list's path, as flags do)."""
    items = list(node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else [])
    if not items:
        yield prefix
        return
    for key, value in items:
        yield from _leaves(value, prefix + _segments(str(key)))


def _config_keys(value: str, subcommand: str | None) -> list[tuple[str, ...]]:
    """The key paths a ``--config`` value (a file, or YAML text) sets."""
    path = Path(value).expanduser()
    try:
        data = yaml.safe_load(path.read_text() if path.is_file() else value)
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    if subcommand is not None and isinstance(data.get(subcommand), dict):  # a config given before the subcommand
        data = data[subcommand]
    return list(_leaves(data))


def _setters(argv: Sequence[str], subcommand: str | None) -> Iterator[tuple[tuple[str, ...], str]]:
    """(key path, where) for every value the command line sets, in the order they apply."""
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("-") or token == "-":
            continue  # the subcommand
        flag, equals, value = token.partition("=")
        if not equals:
            value = next(tokens, "") if flag not in ("--print_config", "--help", "-h") else ""
        if flag in ("-c", "--config"):
            yield ("config",), f"set by {flag} {value} on the command line"
            shown = value if Path(value).expanduser().is_file() else "a --config string"
            yield from ((keys, f"set in {shown}") for keys in _config_keys(value, subcommand))
        elif _segments(flag):
            given = token if equals else f"{flag} {value}".rstrip()
            yield _segments(flag), f"set by {given} on the command line"


def value_source(argv: Sequence[str], key: str, subcommand: str | None = None) -> str:
    """Where the command line ``argv`` sets config ``key``: the last ``--config`` file or flag that does.

    A flag or file that sets the key (or a part of it) wins over one that only sets an enclosing
    object (``--model SequenceClassification`` for ``model.init_args.learning_rate``).
    """
    wanted = _segments(key)
    exact = enclosing = None
    for keys, where in _setters(argv, subcommand):
        if keys[: len(wanted)] == wanted:
            exact = where
        elif wanted[: len(keys)] == keys:
            enclosing = where
    return exact or enclosing or "not set by any --config file or flag: the default"


def _items(node: Any) -> Iterator[tuple[str | int, Any]]:
    if isinstance(node, jsonargparse.Namespace):
        node = vars(node)
    if isinstance(node, dict):
        yield from ((k, v) for k, v in node.items() if not str(k).startswith("__"))
    elif isinstance(node, list):
        yield from enumerate(node)


def _walk(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    for key, value in _items(node):
        yield path + (key,), value
        yield from _walk(value, path + (key,))


def _format_key(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


#: The subject of a validation message: ``Owner.field``, ``Owner``, ``field`` or ```field```.
_SUBJECT = re.compile(r"`?(?:(?P<owner>[A-Z]\w*)(?:\.(?P<ofield>[a-z_][\w.]*))?|(?P<field>[a-z_][\w.]*))`?(?=[=:` ]|$)")


def locate_key(message: str, config: Any) -> str | None:
    """The config key a validation message is about, found in the parsed ``config``; None if unclear.

    ``SequenceClassification.learning_rate must be ...`` is the ``learning_rate`` of the object whose
    class is SequenceClassification (``model.init_args.learning_rate``); ```max_epochs` must be ...``
    and ``method must be ...`` are the one key of that name.
    """
    subject = _SUBJECT.match(message)
    if subject is None or config is None:
        return None
    owner, field = subject["owner"], subject["ofield"] or subject["field"]
    nodes = dict(_walk(config))
    found = []
    for path, value in nodes.items():
        if field is None:  # the object of class `owner`
            if path[-1] == "class_path" and str(value).rsplit(".", 1)[-1] == owner:
                found.append(path[:-1])
            continue
        dotted = tuple(field.split("."))
        if tuple(str(p) for p in path[-len(dotted) :]) != dotted:
            continue
        if owner is not None:
            parent = path[: -len(dotted)]
            if not parent or parent[-1] != "init_args":
                continue
            if str(nodes.get(parent[:-1] + ("class_path",), "")).rsplit(".", 1)[-1] != owner:
                continue
        found.append(path)
    return _format_key(found[0]) if len(found) == 1 else None


# --------------------------------------------------------------------------- where the run writes


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


def check_writable(field: str, path: str | os.PathLike[str]) -> None:
    """Raise if a run could not create or write folder ``path`` (given as option ``field``); creates nothing."""
    if "://" in str(path):
        return  # a remote filesystem: it answers for itself
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"is inside {str(existing)!r}, which is a file"
        raise NotADirectoryError(f"{field}={str(path)!r} {what}, not a folder; give a folder to write in.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{field}={str(path)!r} is not writable: no permission to write in {str(existing)!r}; "
            "give a folder you can write to."
        )


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
        *args, **kwargs: :class:`~lightning.pytorch.cli.SaveConfigCallback`'s.
    """

    def __init__(self, *args: Any, keep: Sequence[str | os.PathLike[str]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep = {os.path.realpath(path) for path in keep}
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
            log_dir = run_log_dir(trainer)
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
        help_kwargs = {"epilog": methods_help(), "formatter_class": _HelpFormatter}
        extra = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs: dict[str, Any] = {
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

        if isinstance(self.datamodule, TextDataModule):
            load_records(self.datamodule)  # files, columns and the task's checks; setup reuses them
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
                io.read_adapter(path)  # the record and the tensors: a lightning_peft adapter that loads
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

    def before_test(self) -> None:
        self._check_ready()

    def before_predict(self) -> None:
        self._serve()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with a rich progress bar and :class:`PEFTModelSummary` unless configured otherwise."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        added: list[Any] = []
        for flag, kind, default in (
            ("enable_progress_bar", ProgressBar, RichProgressBar),
            ("enable_model_summary", ModelSummary, PEFTModelSummary),
        ):
            wanted = config.get(flag) is not False and not config.get("barebones")
            if wanted and not any(isinstance(c, kind) for c in callbacks):
                added.append(default())
        if added and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, *added]
        if isinstance(self.save_config_callback, type) and issubclass(self.save_config_callback, LogConfigCallback):
            named = [a.partition("=")[2] or a for a in self.argv]
            files = [a for a in named if a and not a.startswith("-") and os.path.isfile(a)]
            self.save_config_kwargs = {"keep": files, **self.save_config_kwargs}
        return super().instantiate_trainer(**kwargs)

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
        """Run ``Trainer.predict`` and print each prediction as one JSON line on stdout."""
        predictions = self.trainer.predict(**kwargs)
        for batch in predictions or []:
            for item in batch if isinstance(batch, list) else [batch]:
                print(json.dumps(item, default=str), file=sys.stdout)
        return predictions


def check_checkpoint(ckpt_path: str) -> None:
    """Raise unless ``ckpt_path`` (a local path or a URL) can be a checkpoint file to load."""
    if "://" in ckpt_path:
        return
    path = Path(ckpt_path).expanduser()
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    if path.is_dir():
        found = sorted(str(p) for p in itertools.islice(path.rglob("*.ckpt"), 3))
        inside = f"; the checkpoints in it include {', '.join(found)}" if found else " and holds no .ckpt file"
        raise IsADirectoryError(f"ckpt_path={ckpt_path!r}{where} is a folder, not a checkpoint file{inside}.")
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist{where}; give the path of a .ckpt file (fit prints the one it "
            "saved: 'checkpoint (...): <path>')."
        )


def main(args: list[str] | None = None, *, run: bool = True) -> PEFTLightningCLI:
    """The console entry point (``lightning-peft`` / ``python -m lightning_peft``).

    A mistake in the input (see :func:`user_error`) prints ``error: <what, the bad value, what is
    valid>`` and ``where: <key>, <the --config file or flag that set it>`` on stderr and exits with
    2. With ``--debug`` anywhere in ``args``, or ``LIGHTNING_PEFT_DEBUG=1``, it raises instead, with
    the traceback; other exceptions always do.
    """
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != DEBUG_FLAG]
    entry_point = args is None
    if entry_point and len(argv) < len(sys.argv) - 1:  # --debug: LightningCLI reads sys.argv
        sys.argv = [sys.argv[0], *argv]
        os.environ[DEBUG_ENV] = "1"  # for the processes DDP starts: they rerun sys.argv, now without --debug
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


__all__ = [
    "CLIError",
    "LogConfigCallback",
    "PEFTLightningCLI",
    "main",
    "methods_help",
    "run_log_dir",
    "user_error",
]
