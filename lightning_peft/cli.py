"""The command line's entry point, light to import: ``python -m lightning_peft`` and ``lightning-peft``.

A help request whose text is cached, or recorded in the snapshot shipped in the package for this
environment (:mod:`lightning_peft.lightning.cli_help`), is answered here with the standard library
only, before Lightning is imported; everything else goes to :func:`lightning_peft.lightning.cli.main`.
"""

from __future__ import annotations

import sys

from lightning_peft.lightning import cli_help


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``); see :func:`lightning_peft.lightning.cli.main`."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    if cli_help.print_cached_help([a for a in argv if a != "--debug"]):
        raise SystemExit(0)
    from lightning_peft.lightning.cli import main as run

    run(args)


__all__ = ["main"]
