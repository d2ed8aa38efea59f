"""Writing the help snapshot shipped in the package: ``python -m lightning_peft.lightning.help_snapshot``.

Renders every help request (:data:`REQUESTS`) for both program names (:data:`PROGRAMS`) in this
one process, each through :func:`lightning_peft.lightning.cli.main` exactly as a user's call, and
writes their snapshots (:mod:`~lightning_peft.lightning.help_record`) with the key of this
environment (:func:`~lightning_peft.lightning.cli_help.snapshot_key`, plus every distribution
imported while rendering) to ``lightning_peft/lightning/help_snapshot.json``. A render whose
snapshot does not replay to its text byte for byte stops the command (nothing is written).

Rerun it after editing any ``.py`` file of lightning_peft or changing the environment; the
shipped file is only used where its key matches, so a stale one costs time, never wrong help.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_peft.lightning import cli_help, help_record
from lightning_peft.lightning.help_replay import FORMAT

#: The help requests a snapshot is written for.
REQUESTS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("fit", "--help"),
    ("validate", "--help"),
    ("test", "--help"),
    ("predict", "--help"),
)
#: ``sys.argv[0]`` of each way to start the CLI: ``python -m lightning_peft`` and the ``lightning-peft`` script.
PROGRAMS = ("__main__.py", "lightning-peft")


@contextlib.contextmanager
def _environment(argv0: str, columns: int | None) -> Iterator[None]:
    """The program name and terminal width of a render, and no cache or snapshot (the parser itself answers)."""
    saved = sys.argv, {k: os.environ.get(k) for k in ("COLUMNS", cli_help.CACHE_ENV)}
    sys.argv = [argv0]
    os.environ[cli_help.CACHE_ENV] = "0"
    if columns is not None:
        os.environ["COLUMNS"] = str(columns)
    try:
        yield
    finally:
        sys.argv = saved[0]
        for name, value in saved[1].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def render(argv: Sequence[str], *, argv0: str = "__main__.py", columns: int | None = None) -> tuple[str, Any]:
    """``argv``'s help as the CLI prints it (at ``columns``, default the terminal's) and its snapshot (None if none)."""
    from lightning_peft.lightning.cli import main as cli_main

    buffer = io.StringIO()
    with _environment(argv0, columns), contextlib.redirect_stdout(buffer):
        try:
            cli_main(list(argv))
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(f"{' '.join(argv)} exited with {exit_.code}") from None
    text = buffer.getvalue()
    return text, help_record.snapshot_for(text)


def imported_distributions() -> list[str]:
    """The distributions whose modules are imported now (their versions join the key: they shape the help)."""
    owners = metadata.packages_distributions()
    names = {dist for module in list(sys.modules) for dist in owners.get(module.partition(".")[0], ())}
    return sorted(names - {"lightning-peft", "lightning_peft"})


class _AbsentProbe:
    """The last finder on ``sys.meta_path``: notes the top-level modules and the distributions looked for in vain.

    What is absent shapes the help too (a package that is installed gets imported and its classes
    listed as subclasses), so the key records it: a snapshot is not used where one of them exists.
    """

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.distributions: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if "." not in name:  # every other finder missed it
            self.modules.add(name)
        return None

    def find_distributions(self, context: Any = None) -> Iterator[Any]:
        name = getattr(context, "name", None)
        if name:
            self.distributions.add(name)
        return iter(())


def _unfound(module: str) -> bool:
    """Still not found now (a finder added after the probe may have found it then)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return False


def snapshots(programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
    """Every request's snapshot for every program name, with this environment's key (the file's content).

    Run in a fresh process: what the CLI imports, and what it looks for and does not find, is
    noted while it is first imported.

    Raises:
        RuntimeError: the CLI was imported already, or a render could not be recorded (the reason is said).
    """
    if "lightning_peft.lightning.cli" in sys.modules:
        raise RuntimeError("record the help snapshot in a fresh process (the CLI was imported already)")
    probe = _AbsentProbe()
    sys.meta_path.append(probe)
    helps: dict[str, dict[str, Any]] = {}
    try:
        for argv0 in programs:
            prog = cli_help.program_name(argv0)
            for argv in REQUESTS:
                text, snapshot = render(argv, argv0=argv0)
                if snapshot is None:
                    reason = help_record.why_not(text)
                    raise RuntimeError(f"{prog} {' '.join(argv)}: the help could not be recorded ({reason})")
                helps.setdefault(prog, {})[" ".join(argv)] = snapshot
    finally:
        sys.meta_path.remove(probe)
    key = cli_help.snapshot_key([*cli_help.HELP_PACKAGES, *imported_distributions()])
    key["absent_modules"] = sorted(name for name in probe.modules if name not in sys.modules and _unfound(name))
    key["absent_distributions"] = sorted(name for name in probe.distributions if cli_help.absent(name))
    return {"format": FORMAT, "command": cli_help.SNAPSHOT_COMMAND, "key": key, "helps": helps}


def write(path: Path, programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
    """Write :func:`snapshots` to ``path`` (compact JSON, atomically); returns what was written."""
    data = snapshots(programs)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=cli_help.SNAPSHOT_FILE, help="default: the shipped file")
    options = parser.parse_args(args)
    data = write(options.output)
    count = sum(len(v) for v in data["helps"].values())
    print(f"{options.output}: {count} help snapshots, key {json.dumps(data['key'])[:200]}...")


if __name__ == "__main__":
    main()
