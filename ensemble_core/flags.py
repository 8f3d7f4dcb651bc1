"""Types of the numeric command-line flags: a value outside its range is refused while the arguments are
parsed, as argparse refuses any bad argument — exit status 2, the usage, and a message that names the
flag and the range (``ensemble up: error: argument --cores: must be an integer >= 1, got 0``).

Each function returns the ``type=`` of one ``add_argument``. ``nan`` is never a number of anything, and
``inf`` only where a flag says it means "forever".
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (no upper bound when ``high`` is None)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def seconds(*, positive: bool = False, forever: bool = False) -> Callable[[str], float]:
    """A number of seconds, ``>= 0`` (``> 0`` when ``positive``); ``inf`` is taken only when ``forever``."""
    wanted = f"a number of seconds {'> 0' if positive else '>= 0'}" + (" (inf: forever)" if forever else "")
    return _number(wanted, 0.0, strict=positive, infinite=forever)


def positive_number(what: str = "a number") -> Callable[[str], float]:
    """A finite number ``> 0`` (a speed, a factor), called ``what`` in the message."""
    return _number(f"{what} > 0", 0.0, strict=True, infinite=False)


def seconds_list(text: str) -> list[float]:
    """One number of seconds ``>= 0``, or a comma-separated list of them."""
    parse = seconds()
    try:
        return [parse(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0 or a comma-separated list of them, got {text!r}"
        ) from None


def _number(wanted: str, low: float, *, strict: bool, infinite: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if math.isnan(value) or (math.isinf(value) and not infinite) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text.strip()}")
        return value

    return parse
