"""Mistakes in the CLI's input: what counts as one, where its value was set, and the checks run before a model is built.

:func:`user_error` tells a mistake (a check in lightning_peft, Lightning's
MisconfigurationException, a jsonargparse parse error) from a bug; :func:`value_source` names the
``--config`` file or flag that set a key, and :func:`locate_key` the key a message is about, so
that :func:`lightning_peft.lightning.cli.main` can print ``error: ...`` and ``where: ...`` as one
message. Nothing here imports Lightning or transformers at module level (``--help`` stays light).
"""

from __future__ import annotations

import argparse
import itertools
import linecache
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml


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
    from lightning.fabric.utilities.exceptions import MisconfigurationException

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
    import jsonargparse

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


__all__ = [
    "CLIError",
    "check_checkpoint",
    "check_writable",
    "clean_parse_error",
    "locate_key",
    "user_error",
    "value_source",
]
