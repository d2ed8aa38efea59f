"""The CLI's ``--help``: its text (methods list, plain-text option help, the program's name), a cache and a snapshot.

Building the parser means importing Lightning (and through it torch, torch._dynamo and, via
torchmetrics, transformers' top level): seconds on a small machine before a line is printed.
A help request (``--help``, ``fit --help``, ``validate --help``, ...) is therefore answered,
before anything heavy is imported, from the first of:

1. the per-user cache: the first help the parser printed in this environment, saved as a
   snapshot (:mod:`~lightning_peft.lightning.help_replay`: the formatter's calls, replayed at
   any terminal width) or, when a snapshot could not reproduce the text, as the text itself
   for that width. Its key holds the exact arguments, the Python executable and version, the
   versions of the packages whose signatures and docstrings make the help (lightning,
   jsonargparse, torch, ...), the program's name, the ``JSONARGPARSE_*`` / ``LIGHTNING_PEFT_*``
   variables and the size and modification time of every source file of lightning_peft.
   ``LIGHTNING_PEFT_CACHE`` names its folder (default ``$XDG_CACHE_HOME/lightning_peft``, else
   ``~/.cache/lightning_peft``);
2. the snapshot shipped in the package (``help_snapshot.json``, written by ``python -m
   lightning_peft.lightning.help_snapshot``), used only when its key matches: the Python
   major.minor version, the versions of :data:`HELP_PACKAGES` and of every distribution imported
   while it was recorded, the top-level modules and distributions that were looked for then and
   not found (still absent here), the ``JSONARGPARSE_*`` / ``LIGHTNING_PEFT_*`` variables (but
   the two naming files) and a hash of the bytes of lightning_peft's ``.py`` sources. It holds no
   path and no width, so a fresh install prints ``fit --help`` without importing Lightning;
3. the parser itself (which then fills the cache).

``LIGHTNING_PEFT_CACHE=0`` (or ``off``, ``false``, ``no``) skips both 1 and 2: the parser always
prints the help. ``LIGHTNING_PEFT_HELP_SNAPSHOT`` names another snapshot file than the shipped one.

This module imports only the standard library at module level: :func:`print_cached_help` runs
before anything heavy is imported. :func:`help_formatter` is built on first use (it subclasses
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

from lightning_peft.lightning import help_replay
from lightning_peft.lightning.help_replay import plain_text

#: The command that prints one method's options in full (type, default and description).
METHOD_HELP = "python -m lightning_peft fit --trainer.callbacks+=PEFTCallback --trainer.callbacks.method.help {cls}"
#: The environment variable naming the cache folder ("0", "off", "false" or "no" turns the cache off).
CACHE_ENV = "LIGHTNING_PEFT_CACHE"
#: The environment variable naming a help snapshot file to use instead of the shipped one.
SNAPSHOT_ENV = "LIGHTNING_PEFT_HELP_SNAPSHOT"
#: The snapshot shipped in the package, and the command that writes it.
SNAPSHOT_FILE = Path(__file__).with_name("help_snapshot.json")
SNAPSHOT_COMMAND = "python -m lightning_peft.lightning.help_snapshot"
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


# --------------------------------------------------------------------------- the cache and the snapshot


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
    """The help cache folder, or None when ``LIGHTNING_PEFT_CACHE`` turns the cache (and the snapshot) off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_peft"


def _help_env(exempt: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The ``JSONARGPARSE_*`` / ``LIGHTNING_PEFT_*`` variables (jsonargparse reads its own; ours may shape the CLI)."""
    prefixes = ("JSONARGPARSE_", "LIGHTNING_PEFT_")
    return sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes) and k not in exempt)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def help_key(argv: Sequence[str], *, width: bool = True) -> str:
    """The user cache's key of the help ``argv`` prints (see the module's doc); ``width=False`` for a snapshot."""
    digest = hashlib.sha256()
    columns = shutil.get_terminal_size().columns if width else None
    header = (sys.version, sys.executable, tuple(argv), program_name(), columns, _help_env())
    digest.update(repr(header).encode())
    for name in HELP_PACKAGES:
        digest.update(f"{name}={_version(name) or '-'};".encode())
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:32]


def _cache_file(argv: Sequence[str], suffix: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"help-{help_key(argv, width=suffix == '.txt')}{suffix}"


def _read(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _replayed(text: str | None) -> str | None:
    """The help a snapshot (JSON ``text``) prints at the current width, or None when it is not one."""
    if text is None:
        return None
    try:
        return help_replay.replay(json.loads(text))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # a damaged cache file: the parser answers (and writes it again)


def cached_help(argv: Sequence[str]) -> str | None:
    """The help text for ``argv`` from the user cache, else the shipped snapshot (None: ask the parser)."""
    if not is_help_request(argv) or cache_dir() is None:
        return None
    text = _replayed(_read(_cache_file(argv, ".json")))
    if text is None:
        text = _read(_cache_file(argv, ".txt"))
    return text if text is not None else shipped_help(argv)


def save_help(argv: Sequence[str], text: str, snapshot: dict[str, Any] | None = None) -> Path | None:
    """Save the help ``argv`` printed (atomically): its ``snapshot`` if given, else the text; None when not saved."""
    if not is_help_request(argv) or not text:
        return None
    path = _cache_file(argv, ".txt" if snapshot is None else ".json")
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text if snapshot is None else json.dumps(snapshot))
        os.replace(tmp.name, path)
    except OSError:
        return None  # a read-only home: the help is still printed, only not cached
    return path


def print_cached_help(argv: Sequence[str]) -> bool:
    """Print the cached (or shipped) help for ``argv`` and return True, or return False (nothing printed)."""
    text = cached_help(argv)
    if text is None:
        return False
    sys.stdout.write(text)
    sys.stdout.flush()
    return True


# --------------------------------------------------------------------------- the shipped snapshot


def source_hash() -> str:
    """sha256 of lightning_peft's ``.py`` sources: each relative path (sorted) and its bytes; no time, no location."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py"), key=lambda p: p.relative_to(_PACKAGE_DIR).as_posix()):
        relative = path.relative_to(_PACKAGE_DIR).as_posix()
        if "__pycache__" in relative:
            continue
        data = path.read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def snapshot_key(packages: Sequence[str] = HELP_PACKAGES) -> dict[str, Any]:
    """What a help snapshot depends on here: Python major.minor, ``packages``' versions, the variables, the sources.

    The program's name and the arguments key each snapshot inside the file. Left out: the terminal
    width (replayed), paths and ``sys.executable`` (never in the text), and the variables that only
    name the cache folder or the snapshot file.
    """
    names = sorted({_canonical(name) for name in packages})
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "packages": {name: _version(name) for name in names},
        "env": [list(item) for item in _help_env(exempt=(CACHE_ENV, SNAPSHOT_ENV))],
        "source": source_hash(),
    }


def absent(distribution: str) -> bool:
    """Whether no distribution of that name is installed."""
    return _version(distribution) is None


def _canonical(name: str) -> str:
    """A distribution's name as packaging normalizes it (``docstring_parser`` -> ``docstring-parser``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def snapshot_file() -> Path:
    """The help snapshot file in use: ``LIGHTNING_PEFT_HELP_SNAPSHOT``, else the one shipped in the package."""
    value = os.environ.get(SNAPSHOT_ENV)
    return Path(value).expanduser() if value else SNAPSHOT_FILE


def load_snapshots(path: Path | None = None) -> dict[str, Any] | None:
    """The snapshot file's content (``{"format", "key", "helps": {prog: {argv: snapshot}}}``), or None if unreadable."""
    text = _read(snapshot_file() if path is None else path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def snapshot_mismatch(data: dict[str, Any]) -> str | None:
    """Why the snapshot file ``data`` does not fit this environment (the first difference), or None if it does."""
    if data.get("format") != help_replay.FORMAT:
        return f"format {data.get('format')!r}, this code replays format {help_replay.FORMAT}"
    key = data.get("key")
    fields = {"packages": dict, "absent_modules": list, "absent_distributions": list}
    if not isinstance(key, dict) or not all(isinstance(key.get(f), kind) for f, kind in fields.items()):
        return "no key"
    here = snapshot_key(list(key["packages"]))
    for field in ("python", "env"):
        if key.get(field) != here[field]:
            return f"{field}: {key.get(field)!r} recorded, {here[field]!r} here"
    for name, version in key["packages"].items():
        if here["packages"][name] != version:
            return f"{name} {version} recorded, {here['packages'][name]} here"
    for name in key["absent_distributions"]:
        if not absent(name):
            return f"{name} is installed here, not where the snapshot was recorded"
    import importlib.util  # (here: a hit on the user cache never needs it)

    for name in key["absent_modules"]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = True  # cannot tell: not the environment it was recorded in
        if found:
            return f"the module {name} is found here, not where the snapshot was recorded"
    missing = {_canonical(name) for name in HELP_PACKAGES} - set(key["packages"])
    if missing:
        return f"the versions of {sorted(missing)} are not recorded"
    if key.get("source") != here["source"]:
        return f"lightning_peft's sources differ (hash {key.get('source')!r} recorded, {here['source']!r} here)"
    return None


def shipped_help(argv: Sequence[str]) -> str | None:
    """The help ``argv`` prints, replayed from the snapshot file (:func:`snapshot_file`) if its key matches here."""
    data = load_snapshots()
    if data is None:
        return None
    request = " ".join("--help" if arg == "-h" else arg for arg in argv)  # one help action, one text
    snapshot = (data.get("helps") or {}).get(program_name(), {}).get(request)
    if not isinstance(snapshot, dict) or snapshot_mismatch(data) is not None:
        return None
    try:
        return help_replay.replay(snapshot)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


__all__ = [
    "CACHE_ENV",
    "HELP_PACKAGES",
    "METHOD_HELP",
    "SNAPSHOT_COMMAND",
    "SNAPSHOT_ENV",
    "SNAPSHOT_FILE",
    "absent",
    "cache_dir",
    "cached_help",
    "help_formatter",
    "help_key",
    "is_help_request",
    "load_snapshots",
    "methods_help",
    "plain_text",
    "print_cached_help",
    "program_name",
    "save_help",
    "shipped_help",
    "snapshot_file",
    "snapshot_key",
    "snapshot_mismatch",
    "source_hash",
]
