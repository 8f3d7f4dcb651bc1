"""The one rule by which a job's command is run on every backend: shell syntax through /bin/sh -c, words
otherwise. Checked against a real sh: whichever way a command runs, it does what sh -c would."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ensemble_core.commands import SHELL, command_argv, command_text

SHELL_SYNTAX = [
    "make && ./run > out.txt",
    "a; b",
    "a || b",
    "ls | wc -l",
    "cat < in",
    "echo $HOME",
    'echo "$HOME"',
    "echo `date`",
    'echo "`date`"',
    "ls *.log",
    "ls file?",
    "ls [ab]",
    "(cd /tmp)",
    "sleep 1 &",
    "# a comment",
    "~/bin/run",
    "OMP_NUM_THREADS=4 ./run",
    "cd /data",
    "export A=1",
    "if true; then echo y; fi",
    "exec ./run",
    "a\nb",
    "a \\\nb",
    'echo "a\\"b"',
]
PLAIN = [
    "sleep 3",
    "lmp -v x 2 -in in.reaxc.hns -nocite",
    "sh -c 'echo hello; sleep 2'",
    "echo '$HOME *.log && >'",
    'python -c "print(1 + 2)"',
    'echo "a;b|c>d"',
    "echo a\\;b",
    "echo a#b a~b",
    "./run --x=1",
]


@pytest.mark.parametrize("command", SHELL_SYNTAX)
def test_a_command_with_shell_syntax_runs_through_sh(command: str) -> None:
    assert command_argv(command) == [SHELL, "-c", command]
    assert command_text(command_argv(command)) == command


@pytest.mark.parametrize("command", PLAIN)
def test_a_plain_command_runs_as_the_words_sh_would_give_it(command: str, tmp_path: Path) -> None:
    argv = command_argv(command)
    assert argv[0] != SHELL
    # the words sh itself makes of the command (printed one per line by a function that gets them as "$@")
    words = subprocess.run(
        [SHELL, "-c", f'show() {{ for w in "$@"; do printf "%s\\0" "$w"; done; }}; show {command}'],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split("\0")[:-1]  # fmt: skip
    assert argv == words
    assert command_text(argv) != "" and command_argv(command_text(argv)) == argv


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("echo 'unclosed", "a ' quote is never closed; close it, or escape it as \\'"),
        ('echo "unclosed && ls', 'a " quote is never closed'),
        ("echo trailing\\", "a backslash at the end escapes nothing"),
    ],
)
def test_a_command_no_shell_could_parse_is_refused_naming_the_fix(command: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        command_argv(command)
    assert problem in str(info.value)


def test_redirections_and_operators_do_what_they_say_when_run(tmp_path: Path) -> None:
    argv = command_argv("echo first > out.txt && echo second >> out.txt; ls *.txt | wc -l > count")
    subprocess.run(argv, cwd=tmp_path, check=True)
    assert (tmp_path / "out.txt").read_text() == "first\nsecond\n"
    assert (tmp_path / "count").read_text().strip() == "1"
