"""Parameter sweeps: a job group's ``matrix`` and the parameters of each of its jobs (pure functions, no I/O).

A matrix maps parameter names to their values, either listed (``[1, 2, 4]``) or as an integer range
(:class:`MatrixRange`, written ``{range: [start, stop]}`` or ``{range: [start, stop, step]}`` in an
Ensemble file). The group runs one job per combination, in the row-major order of
``itertools.product`` over the names as written: the **last** name varies fastest. For
``{x: [1, 2], seed: {range: [0, 3]}}`` the jobs are, by index::

    0: x=1 seed=0   1: x=1 seed=1   2: x=1 seed=2   3: x=2 seed=0   4: x=2 seed=1   5: x=2 seed=2

Ranges follow Python's ``range``: ``stop`` is excluded (``{range: [0, 10]}`` is 0 to 9) and a range is
stored as its three numbers, never as the list of its values, so a sweep over 100,000 seeds stays a few
bytes in the member record. Nothing here materialises the product: :func:`params` finds job ``index``'s
values in O(number of parameters).

A job's values become text (:func:`value_text`): strings as written, integers in decimal, floats as
Python's ``repr`` (``0.5``, ``1e-05``, ``100.0``), booleans as ``true`` / ``false``. They reach the job
twice: :func:`render` replaces each ``{name}`` of a parameter in the command with its value, shell-quoted
where needed, and :func:`environment` names them ``ENSEMBLE_PARAM_<NAME>``.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import msgspec

#: One value of a parameter.
Scalar: TypeAlias = str | int | float | bool

#: A parameter name: what may appear as ``{name}`` in a command and, upper-cased, in an environment name.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The prefix of each parameter's environment variable.
ENVIRONMENT_PREFIX = "ENSEMBLE_PARAM_"

# `{name}` not preceded by `$`: `${name}` is the shell's own syntax and is left to the shell.
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")


class MatrixRange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The integers ``range(start, stop, step)``: ``stop`` is excluded, ``step`` may be negative, never 0.

    On the wire: ``{"start": 0, "stop": 10}`` (``step`` omitted when 1). A ``step`` of 0 is refused when
    the struct is made or decoded (a ``msgspec.ValidationError`` on decode).
    """

    start: int
    stop: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.step == 0:
            raise ValueError("step: must not be 0 (a range of step 0 never reaches stop)")


#: The matrix of a job group, as :class:`~ensemble_core.messages.JobSpec` stores it: names in the order
#: written, each with its listed values or a range.
Matrix: TypeAlias = dict[str, list[Scalar] | MatrixRange]


def value_text(value: Scalar) -> str:
    """A value as a job sees it: strings as they are, ints in decimal, floats by ``repr``, ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def count(values: Sequence[Scalar] | MatrixRange) -> int:
    """The number of values of one parameter (exact for any range, even beyond ``sys.maxsize``)."""
    if not isinstance(values, MatrixRange):
        return len(values)
    # Arithmetic rather than len(range(...)), which cannot count beyond sys.maxsize values.
    start, stop, step = values.start, values.stop, values.step
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


def size(matrix: Mapping[str, Sequence[Scalar] | MatrixRange]) -> int:
    """The number of combinations: the product of each parameter's number of values (1 for no parameters)."""
    return math.prod(count(values) for values in matrix.values())


def params(matrix: Mapping[str, Sequence[Scalar] | MatrixRange], index: int) -> dict[str, str]:
    """The parameters of the group's job ``index`` (0-based), by name in the matrix's order, as text.

    Job ``index`` is the ``index``-th combination of ``itertools.product`` over the names as written
    (the last name varies fastest). Raises ``ValueError`` naming ``index`` when it is not below
    :func:`size`. O(number of parameters).
    """
    total = size(matrix)
    if isinstance(index, bool) or not 0 <= index < total:
        raise ValueError(f"index: {index!r} is outside the matrix's {total} combinations (0 to {total - 1})")
    chosen: dict[str, str] = {}
    rest = index
    for name in reversed(list(matrix)):
        values = matrix[name]
        rest, position = divmod(rest, count(values))
        value = values.start + position * values.step if isinstance(values, MatrixRange) else values[position]
        chosen[name] = value_text(value)
    return {name: chosen[name] for name in matrix}


def placeholders(command: str) -> list[str]:
    """The names written as ``{name}`` in ``command`` (not ``${name}``), each once, in order of appearance."""
    return list(dict.fromkeys(found[1] for found in _PLACEHOLDER.finditer(command)))


def placeholders_in_quotes(command: str) -> set[str]:
    """The names of :func:`placeholders` that occur inside single or double quotes (as a POSIX shell and
    ``shlex.split`` read ``command``): there a value that :func:`render` has to quote would end the quotes.
    """
    inside = _quoted(command)
    return {found[1] for found in _PLACEHOLDER.finditer(command) if inside[found.start()]}


def _quoted(command: str) -> list[bool]:
    """For each character of ``command``, whether it lies within quotes (the quote characters included)."""
    inside: list[bool] = []
    quote = ""
    escaped = False
    for char in command:
        if quote == "'":
            inside.append(True)
            quote = "" if char == "'" else quote
        elif quote == '"':
            inside.append(True)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quote = ""
        else:
            inside.append(char in "'\"" and not escaped)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char in "'\"":
                quote = char
    return inside


def render(command: str, params: Mapping[str, str]) -> str:
    """``command`` with each ``{name}`` of a parameter in ``params`` replaced by its value.

    Only the parameters' own names are touched: every other brace stays as written (``${HOME}``, awk's
    ``'{print $1}'``, ``{other}``), and ``${name}`` is left to the shell even for a parameter. Each value
    goes through ``shlex.quote``, which leaves a shell-safe value such as ``1``, ``0.5`` or ``run-3.txt``
    alone and quotes any other (``a b`` becomes ``'a b'``), so a value stays one argument whether the
    command is split by ``shlex.split`` or run by a shell. A placeholder belongs outside quotes: within
    them a quoted value would end the quotes early (the spec refuses that case; see
    :func:`placeholders_in_quotes`).
    """
    return _PLACEHOLDER.sub(lambda found: shlex.quote(params[found[1]]) if found[1] in params else found[0], command)


def environment(params: Mapping[str, str]) -> dict[str, str]:
    """The job's environment variables of its parameters: ``ENSEMBLE_PARAM_<NAME upper-cased>`` = value."""
    return {f"{ENVIRONMENT_PREFIX}{name.upper()}": value for name, value in params.items()}
