"""How a job's ``command`` becomes the argument vector that runs it: one rule for every backend.

A command that uses shell syntax runs through ``/bin/sh -c COMMAND``, so ``make && ./run > out.txt``,
``lmp -in in.$SIZE``, ``cat *.log | wc -l`` or ``cd /data; ./run`` do what they say. Any other command is
split into words as ``sh`` splits them (:func:`shlex.split`, POSIX quoting) and run directly, without a
shell in between: for those, both ways give the same words, so the shell would only add a process.

Shell syntax is, outside single quotes: any of ``| & ; < > ( ) $ * ? [``, a backquote or a newline;
``#`` or ``~`` at the start of a word; and, inside double quotes, ``$``, a backquote or a backslash. A
first word that is an assignment (``OMP_NUM_THREADS=4 ./run``) or a shell keyword or builtin (``cd``,
``export``, ``if``, ``for``, ``exec`` …) also needs the shell. A quote left open, or a backslash at the
end, is an error (:class:`ValueError`), whichever way the command would run.
"""

from __future__ import annotations

import re
import shlex

#: The shell that runs commands with shell syntax (POSIX ``sh``: every image with Flux has it).
SHELL = "/bin/sh"
#: Characters that mean something to ``sh`` anywhere outside quotes.
_OPERATORS = frozenset("|&;<>()$`*?[\n")
#: Characters that mean something to ``sh`` at the start of a word outside quotes.
_WORD_START = frozenset("#~")
#: Characters that mean something to ``sh`` inside double quotes.
_IN_DOUBLE_QUOTES = frozenset("$`\\")
#: First words that only a shell can run: its keywords and the builtins that have no program of their own.
_SHELL_WORDS = frozenset(
    {
        "!", "{", "if", "for", "while", "until", "case", "function", "select",
        ".", "source", "cd", "export", "unset", "set", "exec", "eval", "exit", "ulimit", "umask",
        "alias", "trap", "shift", "read", "wait", "readonly", "local",
    }
)  # fmt: skip
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def uses_shell(command: str) -> bool:
    """Whether ``command`` uses shell syntax (see the module docstring); :class:`ValueError` for an open quote."""
    quote = ""
    word_start = True
    escaped = False
    for char in command:
        if escaped:
            if char == "\n":  # a line continuation, which sh removes and shlex keeps
                return True
            escaped, word_start = False, False
            continue
        if quote == "'":
            quote = "" if char == "'" else quote
            continue
        if quote == '"':
            if char in _IN_DOUBLE_QUOTES:
                return True
            quote = "" if char == '"' else quote
            continue
        if char == "\\":
            escaped = True
        elif char in "'\"":
            quote = char
        elif char in _OPERATORS or (word_start and char in _WORD_START):
            return True
        word_start = char in " \t"
    if quote:
        raise ValueError(f"a {quote} quote is never closed; close it, or escape it as \\{quote}")
    if escaped:
        raise ValueError("a backslash at the end escapes nothing; remove it, or write \\\\ for a backslash")
    words = shlex.split(command)
    return bool(words) and (words[0] in _SHELL_WORDS or _ASSIGNMENT.match(words[0]) is not None)


def command_argv(command: str) -> list[str]:
    """The argument vector that runs ``command``: ``[SHELL, "-c", command]`` when it uses shell syntax, else
    its words. Empty for a blank command; :class:`ValueError` (naming the problem) for an open quote."""
    if uses_shell(command):
        return [SHELL, "-c", command]
    return shlex.split(command)


def command_text(argv: list[str]) -> str:
    """The command an argument vector of :func:`command_argv` came from (what ``jobinfo`` shows)."""
    if len(argv) == 3 and argv[:2] == [SHELL, "-c"]:
        try:
            if uses_shell(argv[2]):
                return argv[2]
        except ValueError:
            pass  # not one of ours: a shell command with an open quote is never made
    return shlex.join(argv)
