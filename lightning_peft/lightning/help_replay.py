"""The CLI's ``--help`` text rebuilt from a recorded snapshot, at any terminal width, with the standard library only.

Why: the parser that prints ``fit --help`` is LightningCLI's, and building it imports Lightning
(seconds). What its help formatter is told, though, is plain data: a usage line made of actions,
some texts, sections with headings, and one entry per argument (its invocation such as
``--trainer.max_epochs MAX_EPOCHS``, its help as it is finally printed, its nargs, metavar,
choices). :mod:`~lightning_peft.lightning.help_record` writes those calls down while the real
formatter renders the help; :func:`replay` feeds them, in the same order, to a plain
:class:`argparse.HelpFormatter` that wraps at the current width. What depends on the width
(the usage's line breaks, the help column ``min(longest invocation + 2, max_help_position)``,
the wrapping of each help) is therefore computed by argparse's own code, as the live parser
would; what does not (the texts jsonargparse expands, with types and defaults) is replayed as
recorded. The recording checks itself: a snapshot is only kept when its replay at the width it was
recorded at equals the live text byte for byte.

A snapshot is JSON::

    {"prog": ..., "indent_increment": 2, "max_help_position": 24, "width": null,
     "actions": [{"option_strings": [...], "dest": ..., "nargs": ..., "metavar": ..., "required": ...,
                  "choices": [...] | null, "help": str | null | SUPPRESS, "expanded": str | null,
                  "invocation": str, "usage": str, "metavar_optional": str, "metavar_positional": str,
                  "subactions": [index, ...] | null}, ...],
     "calls": [["usage", usage, [index, ...], [[[index, ...], required], ...], prefix, unbracket],
               ["text", text], ["start", heading], ["end"], ["argument", index], ...]}

``SUPPRESS`` is argparse's ``"==SUPPRESS=="``, restored to argparse's own object where argparse
tests it by identity. ``unbracket`` lists the required keys whose ``[--key ...]`` jsonargparse
(4.46, not 4.53) unbrackets in the usage after argparse wrapped it; :func:`replay` does the same.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Iterable
from typing import Any

#: Bumped whenever the snapshot's layout changes (a snapshot of another format is never replayed).
FORMAT = 1

#: A Sphinx role: ``:class:`~pkg.Name```, ``:func:`name```, ``:ref:`text <target>```.
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """Docstring markup as plain text: ``:class:`~a.b.C``` -> ``C``, ``:func:`a.f``` -> ``a.f``, ````x```` -> ``x``."""

    def role(match: re.Match[str]) -> str:
        target = match[2].strip()
        return target.rsplit(".", 1)[-1] if match[1] else target

    return _LITERAL.sub(r"\1", _ROLE.sub(role, text))


def suppressed(value: Any) -> Any:
    """``value``, or argparse's own ``SUPPRESS`` object when it spells SUPPRESS (argparse compares it by identity)."""
    return argparse.SUPPRESS if value == argparse.SUPPRESS else value


class FrozenAction:
    """What argparse's help formatter reads of an action, as recorded (see the module's doc).

    ``help`` is the help argparse's ``_format_action`` saw (jsonargparse may have put its expanded
    text there), ``expanded`` what ``_expand_help`` returned for it; the invocation, the usage part
    (``format_usage()``) and the default metavars are the real formatter's results.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.option_strings: list[str] = list(data["option_strings"])
        self.dest: str = data["dest"]
        self.nargs: int | str | None = data["nargs"]
        metavar = data["metavar"]
        self.metavar: str | tuple[str, ...] | None = tuple(metavar) if isinstance(metavar, list) else metavar
        self.required: bool = bool(data["required"])
        self.choices: list[str] | None = data["choices"]
        self.help: str | None = suppressed(data["help"])
        self.expanded: str | None = data["expanded"]
        self.invocation: str = data["invocation"]
        self.usage: str = data["usage"]
        self.metavar_optional: str = data["metavar_optional"]
        self.metavar_positional: str = data["metavar_positional"]
        self.subactions: list[FrozenAction] | None = None

    def format_usage(self) -> str:
        """The action's part of the usage line when it takes no value (argparse's ``Action.format_usage``)."""
        return self.usage


class FrozenParentAction(FrozenAction):
    """A frozen action with subactions (the subcommands' list), which argparse finds by ``_get_subactions``."""

    def _get_subactions(self) -> list[FrozenAction]:
        return list(self.subactions or [])


class FrozenGroup:
    """A mutually exclusive group as the usage line reads it: its actions and whether one is required."""

    def __init__(self, actions: list[FrozenAction], required: bool) -> None:
        self._group_actions = actions
        self.required = required


def thaw_actions(rows: list[dict[str, Any]]) -> list[FrozenAction]:
    """The snapshot's action table as objects, subactions linked by index."""
    actions = [(FrozenParentAction if row["subactions"] is not None else FrozenAction)(row) for row in rows]
    for action, row in zip(actions, rows, strict=True):
        if row["subactions"] is not None:
            action.subactions = [actions[i] for i in row["subactions"]]
    return actions


class ReplayFormatter(argparse.HelpFormatter):
    """argparse's formatter fed recorded actions: their invocation, expanded help and default metavars as recorded.

    Text is handled like :func:`~lightning_peft.lightning.cli_help.help_formatter`'s: a
    description keeps its lines, option help is :func:`plain_text` wrapped at the help column.
    """

    def _format_action_invocation(self, action: Any) -> str:
        return action.invocation

    def _expand_help(self, action: Any) -> str:
        return action.expanded or ""

    def _get_default_metavar_for_optional(self, action: Any) -> str:
        return action.metavar_optional

    def _get_default_metavar_for_positional(self, action: Any) -> str:
        return action.metavar_positional

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in plain_text(text).splitlines(keepends=True))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain_text(text), width)


def unbracket(usage: str, keys: Iterable[str]) -> str:
    """``[--key VALUE]`` -> ``--key VALUE`` for each required key, in the wrapped usage (as jsonargparse 4.46)."""
    for key in keys:
        if f"[--{key} " in usage:
            usage = re.sub(f"\\[(--{key} [^\\]]+)]", r"\1", usage, count=1)  # jsonargparse's own pattern
    return usage


def replay(snapshot: dict[str, Any], width: int | None = None) -> str:
    """The help text ``snapshot`` records, wrapped for ``width`` columns (default: argparse's, the terminal's - 2).

    Raises:
        ValueError: ``snapshot`` is of another format than :data:`FORMAT`.
    """
    if snapshot.get("format") != FORMAT:
        raise ValueError(f"help snapshot format {snapshot.get('format')!r}: this code replays format {FORMAT}")
    if width is None:
        width = snapshot["width"]
    if width is None:
        width = shutil.get_terminal_size().columns - 2  # argparse's rule
    formatter = ReplayFormatter(
        snapshot["prog"],
        indent_increment=snapshot["indent_increment"],
        max_help_position=snapshot["max_help_position"],
        width=width,
    )
    actions = thaw_actions(snapshot["actions"])
    for call in snapshot["calls"]:
        kind, args = call[0], call[1:]
        if kind == "usage":
            usage, used, groups, prefix, keys = args
            usage = suppressed(usage)
            if usage is argparse.SUPPRESS:
                continue
            frozen_groups = [FrozenGroup([actions[i] for i in members], required) for members, required in groups]

            def usage_item(
                usage: str | None = usage,
                used: list[FrozenAction] = [actions[i] for i in used],  # noqa: B006  (bound per call)
                groups: list[FrozenGroup] = frozen_groups,
                prefix: str | None = prefix,
                keys: list[str] = keys,  # noqa: B006
            ) -> str:
                return unbracket(argparse.HelpFormatter._format_usage(formatter, usage, used, groups, prefix), keys)

            formatter._add_item(usage_item, [])
        elif kind == "text":
            formatter.add_text(suppressed(args[0]))
        elif kind == "start":
            formatter.start_section(suppressed(args[0]))
        elif kind == "end":
            formatter.end_section()
        elif kind == "argument":
            formatter.add_argument(actions[args[0]])
        else:
            raise ValueError(f"help snapshot: unknown call {kind!r} (valid: usage, text, start, end, argument)")
    return formatter.format_help()


__all__ = [
    "FORMAT",
    "FrozenAction",
    "FrozenGroup",
    "ReplayFormatter",
    "plain_text",
    "replay",
    "suppressed",
    "unbracket",
]
