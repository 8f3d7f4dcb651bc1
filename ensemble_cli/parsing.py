"""The ``ensemble`` command's argument parser: argparse, with a suggestion for each misspelling.

A misspelt subcommand or choice (``ensemble simlate``, ``--backend flx``) names the close match; a
misspelt flag (``ensemble up FILE --timout 5``) is reported with the usage of the subcommand it was given
to, not the top-level one, and with the flag it most likely meant (``did you mean --timeout?``).
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from typing import Any, NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors suggest the close match of what was misspelt (exit 2, as argparse)."""

    def error(self, message: str) -> NoReturn:
        found = _INVALID_CHOICE.search(message)
        if found is not None:
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = _closest(found.group(1), choices)
            if close is not None:
                message += f"; did you mean {close}?"
        super().error(message)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._subcommand(parsed).unrecognized(extras)
        return parsed

    def _subcommand(self, parsed: argparse.Namespace) -> Parser:
        """The parser of the subcommand ``parsed`` came from (this one when there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen: Any = action.choices.get(getattr(parsed, action.dest or "", None) or "")
                if isinstance(chosen, Parser):
                    return chosen._subcommand(parsed)
        return self

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Exit 2 with this parser's usage, naming the arguments it does not take and the flags meant."""
        flags = [option for option in self._option_string_actions if option.startswith("--")]
        hints = []
        for extra in extras:
            if extra.startswith("-"):
                close = _closest(extra.split("=", 1)[0], flags)
                if close is not None:
                    hints.append(f"{extra.split('=', 1)[0]}: did you mean {close}?")
        text = f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")
        self.error(text)
