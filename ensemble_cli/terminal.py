"""What the ``ensemble`` commands print: a console that never cuts a table in a pipe, and decisions worded
action first.

On a terminal, rich fits tables and lines to its width. In a pipe or a file there is no width to fit, and
rich's default of 80 columns would wrap a summary table and cut its headers (``node-sec…``): there the
console is as wide as the output needs (:data:`PIPE_WIDTH`), and lines are never wrapped or cropped.
"""

from __future__ import annotations

import re
from typing import IO

from rich.console import Console

#: The width of a console that is not a terminal: wider than any table or line the commands print.
PIPE_WIDTH = 10_000

#: The first word of the part of a decision's reason that says what is done (``...: grow 1 → 3``).
_ACTION_WORDS = ("grow", "shrink", "terminate", "complete", "submit", "release", "keep", "hold")
_ACTION = re.compile(r":\s+((?:" + "|".join(_ACTION_WORDS) + r")\b.*)$")


def console(file: IO[str] | None = None, *, stderr: bool = False) -> Console:
    """A rich console for ``file`` (default stdout, or stderr): a terminal's width on a terminal, else
    :data:`PIPE_WIDTH` with no wrapping or cropping of lines."""
    found = Console(file=file, stderr=stderr)
    if found.is_terminal:
        return found
    return Console(file=file, stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def decision_words(action: str, size: int | None, reason: str, before: int | None = None) -> tuple[str, str]:
    """A decision as (what is done, why), so the action can be shown first and never be cut off.

    The algorithms end a reason with what they do (``11 jobs waiting for 2 checks; next job needs 3 nodes,
    1 free, 0 coming: grow 1 → 3``): that last part is the action, the rest the why. A reason without such
    an ending keeps it whole, and the action is said from the decision's fields (``grow 1 → 3`` when the
    size before, ``before``, is known, else ``scale to 3``).
    """
    found = _ACTION.search(reason)
    if found is not None:
        return found.group(1), reason[: found.start()]
    if action == "scale" and size is not None:
        if before is not None and size != before:
            return f"{'grow' if size > before else 'shrink'} {before} → {size}", reason
        return f"scale to {size}", reason
    return action, reason
