"""Recording the CLI's help as it renders: the formatter's calls as a width-free snapshot (see :mod:`.help_replay`).

:func:`recording_formatter` is the CLI's help formatter
(:func:`~lightning_peft.lightning.cli_help.help_formatter`) with two layers that only write down
what passes through, so the text is the formatter's own:

- a tap between jsonargparse's ``DefaultHelpFormatter`` and ``argparse.HelpFormatter`` in the
  method order, which sees the calls at argparse's level, after jsonargparse's filtering:
  ``add_usage`` (without ``ActionLink``; at format time ``_format_usage`` without the
  non-parsing actions), ``add_text``, ``start_section``, ``end_section``, ``add_argument``, and
  each ``_format_action`` with the help argparse sees there (jsonargparse fills a ``None`` help
  with its expansion first);
- the outer class, which keeps what the real formatter computes: each action's invocation
  (``_format_action_invocation``), default metavars, ``format_usage()``, the result of
  ``_expand_help`` inside argparse's ``_format_action`` (the text argparse then wraps), and how
  jsonargparse's ``_format_usage`` changed argparse's usage (nothing, or required keys
  unbracketed, as jsonargparse 4.46 does and 4.53 no longer; anything else makes the render unrecordable).

Each ``format_help`` then replays the record at the width it rendered at; only when that equals
the real text byte for byte is the snapshot kept (:func:`snapshot_for` hands it out).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lightning_peft.lightning import cli_help, help_replay

#: The renders of this process, newest last: (text, snapshot or None, why not), at most a few kept.
RENDERS: list[tuple[str, dict[str, Any] | None, str | None]] = []
_KEEP = 8
_CLASS: type | None = None


class _Unrecordable(Exception):
    """The render did something the snapshot cannot replay (the help is still printed, only not snapshotted)."""


class _Tap(argparse.HelpFormatter):
    """Between jsonargparse's formatter and argparse's: records the calls as argparse receives them."""

    _rows: list[dict[str, Any]]
    _index: dict[int, int]
    _keep: list[Any]
    _calls: list[list[Any]]
    _usage_call: list[Any] | None
    _usage_base: str | None
    _formatting: list[Any]
    _failure: str | None

    def _freeze(self, action: argparse.Action) -> int:
        """The index of ``action``'s row in the snapshot's action table (frozen once; subactions too)."""
        index = self._index.get(id(action))
        if index is not None:
            return index
        index = len(self._rows)
        self._index[id(action)] = index
        self._keep.append(action)  # ids stay unique while the formatter lives
        metavar = action.metavar
        row: dict[str, Any] = {
            "option_strings": list(action.option_strings),
            "dest": action.dest,
            "nargs": action.nargs,
            "metavar": list(metavar) if isinstance(metavar, tuple) else metavar,
            "required": bool(action.required),
            "choices": None if action.choices is None else [str(choice) for choice in action.choices],
            "help": action.help,
            "expanded": None,
            "invocation": "",
            "usage": action.format_usage() if action.option_strings else "",
            "metavar_optional": self._get_default_metavar_for_optional(action),
            "metavar_positional": self._get_default_metavar_for_positional(action),
            "subactions": None,
        }
        self._rows.append(row)
        get_subactions = getattr(action, "_get_subactions", None)
        if get_subactions is not None:
            row["subactions"] = [self._freeze(sub) for sub in get_subactions()]
        return index

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any = None) -> None:
        actions, groups = list(actions), list(groups)
        call: list[Any] = ["usage", usage, [self._freeze(a) for a in actions], self._groups(groups), prefix, []]
        self._calls.append(call)
        if usage is not argparse.SUPPRESS:
            if self._usage_call is not None:
                self._fail("two usages")
            self._usage_call = call
        super().add_usage(usage, actions, groups, prefix)

    def _groups(self, groups: list[Any]) -> list[list[Any]]:
        return [[[self._freeze(a) for a in group._group_actions], bool(group.required)] for group in groups]

    def _format_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any) -> str:
        actions, groups = list(actions), list(groups)
        if self._usage_call is not None:  # the actions jsonargparse's _format_usage left
            self._usage_call[2] = [self._freeze(a) for a in actions]
            self._usage_call[3] = self._groups(groups)
        text = super()._format_usage(usage, actions, groups, prefix)
        self._usage_base = text
        return text

    def add_text(self, text: Any) -> None:
        self._calls.append(["text", text])
        super().add_text(text)

    def start_section(self, heading: Any) -> None:
        self._calls.append(["start", heading])
        super().start_section(heading)

    def end_section(self) -> None:
        self._calls.append(["end"])
        super().end_section()

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is not argparse.SUPPRESS:
            index = self._freeze(action)
            self._rows[index]["invocation"] = self._format_action_invocation(action)
            for sub in getattr(action, "_get_subactions", list)():
                self._rows[self._freeze(sub)]["invocation"] = self._format_action_invocation(sub)
            self._calls.append(["argument", index])
        super().add_argument(action)

    def _format_action(self, action: argparse.Action) -> str:
        row = self._rows[self._freeze(action)]
        row["help"] = action.help  # as argparse reads it here (after jsonargparse's pre-expansion)
        if not row["invocation"]:
            row["invocation"] = self._format_action_invocation(action)
        self._formatting.append(action)
        try:
            return super()._format_action(action)
        finally:
            self._formatting.pop()


def _default_is_none(parser: Any, key: str) -> bool:
    try:
        return parser.get_default(key) is None
    except Exception:
        return True


def recording_formatter() -> type:
    """The CLI's help formatter (:func:`.cli_help.help_formatter`) that also records what it renders."""
    global _CLASS
    if _CLASS is None:
        base = cli_help.help_formatter()

        class RecordingHelpFormatter(base, _Tap):  # type: ignore[misc, valid-type]
            """The help formatter, writing down its calls; the text it returns is unchanged (see the module's doc)."""

            def __init__(
                self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
            ) -> None:
                super().__init__(prog, indent_increment, max_help_position, width)
                self._settings = {
                    "prog": prog,
                    "indent_increment": indent_increment,
                    "max_help_position": max_help_position,
                    "width": width,
                }
                self._rows, self._index, self._keep, self._calls = [], {}, [], []
                self._usage_call, self._usage_base, self._formatting, self._failure = None, None, [], None

            def _expand_help(self, action: argparse.Action) -> str:
                text = super()._expand_help(action)
                if self._formatting and self._formatting[-1] is action:  # argparse's _format_action asking
                    self._rows[self._freeze(action)]["expanded"] = text
                return text

            def _format_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any) -> str:
                text = super()._format_usage(usage, actions, groups, prefix)
                base_text = self._usage_base
                if self._usage_call is None or base_text is None:
                    self._fail("usage formatted without add_usage")
                elif text != base_text:
                    self._usage_call[5] = keys = self._unbracketed(base_text, text)
                    if help_replay.unbracket(base_text, keys) != text:
                        self._fail("jsonargparse changed the usage line in a way the replay does not repeat")
                return text

            def _unbracketed(self, base_text: str, text: str) -> list[str]:
                from jsonargparse._common import parent_parser

                parser = parent_parser.get()
                keys = sorted(getattr(parser, "required_args", ()) or ())
                return [k for k in keys if f"[--{k} " in base_text and _default_is_none(parser, k)]

            def format_help(self) -> str:
                text = super().format_help()
                snapshot = None
                try:
                    if self._failure is None:
                        snapshot = json.loads(json.dumps(self.snapshot()))
                        if help_replay.replay(snapshot, self._width) != text:
                            self._fail("the replay differs from the text")
                            snapshot = None
                except Exception as error:  # (the help itself is printed either way)
                    self._fail(f"{type(error).__name__}: {error}")
                    snapshot = None
                RENDERS.append((text, snapshot, self._failure))
                del RENDERS[:-_KEEP]
                return text

            def snapshot(self) -> dict[str, Any]:
                """What this formatter was told, as :func:`~lightning_peft.lightning.help_replay.replay` reads it."""
                return {"format": help_replay.FORMAT, **self._settings, "actions": self._rows, "calls": self._calls}

        _CLASS = RecordingHelpFormatter
    return _CLASS


def help_kwargs() -> dict[str, Any]:
    """The parser options that shape every (sub)command's help: the methods as epilog, the recording formatter."""
    return {"epilog": cli_help.methods_help(), "formatter_class": recording_formatter()}


def snapshot_for(text: str) -> dict[str, Any] | None:
    """The snapshot of the newest render whose text is ``text`` (what was printed), or None if it has none."""
    for rendered, snapshot, _ in reversed(RENDERS):
        if rendered == text:
            return snapshot
    return None


def why_not(text: str) -> str | None:
    """Why the newest render of ``text`` has no snapshot (None: it has one, or no such render)."""
    for rendered, snapshot, reason in reversed(RENDERS):
        if rendered == text:
            return None if snapshot is not None else reason or "not recorded"
    return "no render of this text in this process"


__all__ = ["RENDERS", "help_kwargs", "recording_formatter", "snapshot_for", "why_not"]
