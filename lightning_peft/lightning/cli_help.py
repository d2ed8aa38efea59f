"""The CLI's ``--help``: its text (methods list, plain-text option help, the program's name) and a cache.

Building the parser means importing Lightning (and through it torch, torch._dynamo and, via
torchmetrics, transformers' top level): seconds on a small machine before a line is printed.
``--help`` texts are therefore cached: the first ``python -m lightning_peft fit --help`` builds the
parser and saves what it printed; later ones print the saved text without importing Lightning.
The cache key holds everything the text depends on: the exact arguments, the terminal width, the
Python executable and version, the versions of the packages whose signatures and docstrings make
the help (lightning, jsonargparse, torch, ...), and the size and modification time of every
source file of lightning_peft. ``LIGHTNING_PEFT_CACHE`` names the cache folder (default
``$XDG_CACHE_HOME/lightning_peft``, else ``~/.cache/lightning_peft``); ``LIGHTNING_PEFT_CACHE=0``
turns the cache off.

This module imports only the standard library at module level: :func:`cached_help` runs before
anything heavy is imported. :class:`HelpFormatter` is built on first use (it subclasses
jsonargparse's formatter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

#: The command that prints one method's options in full (type, default and description).
METHOD_HELP = "python -m lightning_peft fit --trainer.callbacks+=PEFTCallback --trainer.callbacks.method.help {cls}"
#: The environment variable naming the cache folder ("0", "off", "false" or "no" turns the cache off).
CACHE_ENV = "LIGHTNING_PEFT_CACHE"
#: The distributions whose code or docstrings make the help text.
HELP_PACKAGES = (
    "lightning",
    "lightning-utilities",
    "jsonargparse",
    "docstring-parser",
    "typeshed-client",
    "torch",
    "torchmetrics",
    "transformers",
    "rich",
    "PyYAML",
)
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_HELP_FLAGS = ("-h", "--help")
_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# --------------------------------------------------------------------------- the program's name


def program_name(argv0: str | None = None) -> str:
    """What the usage line calls the program: ``python -m lightning_peft`` (not ``__main__.py``), or the script."""
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "python -m lightning_peft" if name in ("__main__.py", "-m", "-c", "") else name


# --------------------------------------------------------------------------- plain-text option help

#: A Sphinx role: ``:class:`~pkg.Name```, ``:func:`name```, ``:ref:`text <target>```.
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """Docstring markup as plain text: ``:class:`~a.b.C``` -> ``C``, ``:func:`a.f``` -> ``a.f``, ````x```` -> ``x``."""

    def role(match: re.Match[str]) -> str:
        target = match[2].strip()
        return target.rsplit(".", 1)[-1] if match[1] else target

    return _LITERAL.sub(r"\1", _ROLE.sub(role, text))


_FORMATTER: type | None = None


def help_formatter() -> type:
    """jsonargparse's help formatter that keeps the description's line breaks and prints option help as plain text."""
    global _FORMATTER
    if _FORMATTER is None:
        import jsonargparse

        class HelpFormatter(jsonargparse.DefaultHelpFormatter):
            """Plain-text option help (no Sphinx roles or double backticks); descriptions keep their lines."""

            def _fill_text(self, text: str, width: int, indent: str) -> str:
                return "".join(indent + line for line in plain_text(text).splitlines(keepends=True))

            def _split_lines(self, text: str, width: int) -> list[str]:
                return super()._split_lines(plain_text(text), width)

        _FORMATTER = HelpFormatter
    return _FORMATTER


def _format_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return json.dumps(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return json.dumps(field.default_factory())
    return "required"


def methods_help() -> str:
    """Every registered method with its options (name: type = default), for ``--help``."""
    import lightning_peft.api  # noqa: F401  (registers the built-in methods)
    from lightning_peft import registry

    lines = ["PEFT methods (set in trainer.callbacks as PEFTCallback's method: a name or a class_path config):"]
    for method in registry.all_methods():
        cls = method.config_cls
        lines.append(f"  {method.name}: {method.summary}")
        lines.append(f"    class_path: {cls.__module__}.{cls.__qualname__}")
        for field in dataclasses.fields(cls):
            lines.append(f"    {field.name}: {field.type} = {_format_default(field)}")
        lines.append(f"    all about each option: {METHOD_HELP.format(cls=cls.__name__)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the cache


def is_help_request(argv: Sequence[str]) -> bool:
    """Whether ``argv`` only asks for help: ``--help``, or a subcommand then ``--help`` (nothing else given).

    Anything more (a ``--config`` whose values would show as defaults, a method's ``.help``) is
    answered by the parser itself, uncached.
    """
    args = list(argv)
    if args and args[0] in _SUBCOMMANDS:
        args = args[1:]
    return len(args) == 1 and args[0] in _HELP_FLAGS


def cache_dir() -> Path | None:
    """The help cache folder, or None when ``LIGHTNING_PEFT_CACHE`` turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_peft"


def help_key(argv: Sequence[str]) -> str:
    """The cache key of the help that ``argv`` prints: everything that text depends on (see the module's doc)."""
    digest = hashlib.sha256()
    size = shutil.get_terminal_size()
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JSONARGPARSE_", "LIGHTNING_PEFT_")))
    header = (sys.version, sys.executable, tuple(argv), program_name(), size.columns, env)
    digest.update(repr(header).encode())
    for name in HELP_PACKAGES:
        try:
            digest.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=-;".encode())
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:32]


def _cache_file(argv: Sequence[str]) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"help-{help_key(argv)}.txt"


def cached_help(argv: Sequence[str]) -> str | None:
    """The saved help text for ``argv``, if it is a help request whose text is cached."""
    if not is_help_request(argv):
        return None
    path = _cache_file(argv)
    if path is None or not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def save_help(argv: Sequence[str], text: str) -> Path | None:
    """Save the help text ``argv`` printed (atomically); None when the cache is off or cannot be written."""
    if not is_help_request(argv) or not text:
        return None
    path = _cache_file(argv)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
    except OSError:
        return None  # a read-only home: the help is still printed, only not cached
    return path


def print_cached_help(argv: Sequence[str]) -> bool:
    """Print the cached help for ``argv`` and return True, or return False (nothing printed)."""
    text = cached_help(argv)
    if text is None:
        return False
    sys.stdout.write(text)
    sys.stdout.flush()
    return True


def help_kwargs() -> dict[str, Any]:
    """The parser options that shape every (sub)command's help."""
    return {"epilog": methods_help(), "formatter_class": help_formatter()}


__all__ = [
    "CACHE_ENV",
    "METHOD_HELP",
    "cache_dir",
    "cached_help",
    "help_formatter",
    "help_key",
    "is_help_request",
    "methods_help",
    "plain_text",
    "print_cached_help",
    "program_name",
    "save_help",
]
