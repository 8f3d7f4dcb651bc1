"""The rough edges a new user hit in the command line (issue 15, item 5), one test each: the live view's
last decision action first, plurals, whole tables in a pipe, the exit codes in ``up --help``,
``--version``, suggestions for misspellings, ``--timeout`` > 0, YAML errors, ``ENSEMBLE_LOG_LEVEL``, what
``make up`` installs, the fault suite's committed figures, and the kubectl tests' skip reason."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from ensemble_cli import terminal, up
from ensemble_cli.main import _parser
from ensemble_cli.main import main as ensemble
from ensemble_cli.simulation import SimulationConfig, simulate
from ensemble_core import algorithms
from ensemble_core.messages import Decision
from ensemble_core.settings import SettingsError
from ensemble_core.settings import load as load_settings
from ensemble_core.spec import load
from ensemble_core.version import VERSION
from ensemble_core.words import every, plural
from tests import chaos, kubectl_support
from tests.conftest import REPO

CLI = [sys.executable, "-m", "ensemble_cli"]
GROW = "11 jobs waiting for 2 checks; next job needs 3 nodes, 1 free, 0 coming: grow 1 → 3"


def _decision(reason: str, action: str = "scale", size: int | None = 3) -> Decision:
    return Decision(
        namespace="default", ensemble="hello-world", member=0, id="x", time=time.time(), based_on=1,
        action=action, size=size, reason=reason,
    )  # fmt: skip


def test_the_live_view_shows_each_decision_action_first_and_wraps_events_between_words() -> None:
    monitor = up.Monitor(load(REPO / "examples/hello-world.yaml"))
    monitor.on_decision(_decision(GROW))
    monitor.on_decision(_decision("first check: submit all 11 jobs of 3 groups in descending order", "submit", None))
    monitor.on_decision(_decision(GROW))
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=True, color_system=None).print(monitor.render())
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    [row] = [line for line in lines if line.lstrip().startswith("0 ")]  # the member's row: one line
    assert "grow 1 → 3" in row  # the action survives the cut; the reason is what is cut
    events = "\n".join(lines[lines.index(row) + 1 :])
    assert "member 0: grow 1 → 3 — 11 jobs waiting for 2 checks" in events.replace("\n", " ")
    # wrapped between words, the continuation indented under the text: every word of the event is whole
    words = set(events.split())
    assert {"waiting", "checks;", "needs", "nodes,", "coming"} <= words
    assert any(line.startswith(" " * 6) and line.strip() for line in lines[lines.index(row) + 1 :])


def test_decision_words_put_the_action_first() -> None:
    assert terminal.decision_words("scale", 3, GROW) == (
        "grow 1 → 3",
        "11 jobs waiting for 2 checks; next job needs 3 nodes, 1 free, 0 coming",
    )
    why = "4 nodes free for 4 checks and no job waiting; 0 coming: shrink 4 → 1 (held at minSize 1)"
    assert terminal.decision_words("scale", 1, why)[0] == "shrink 4 → 1 (held at minSize 1)"
    assert terminal.decision_words("scale", 5, "an operator's reason", before=2) == (
        "grow 2 → 5",
        "an operator's reason",
    )
    assert terminal.decision_words("terminate", None, "") == ("terminate", "")


def test_no_reason_says_1_jobs_1_checks_or_all_1() -> None:
    assert (plural(1, "job"), plural(2, "job"), plural(0, "check")) == ("1 job", "2 jobs", "0 checks")
    assert (every(1, "job"), every(3, "job")) == ("the 1 job", "all 3 jobs")
    # one job, one check: every algorithm's reasons for the singular cases
    document = yaml.safe_load((REPO / "examples/hello-world.yaml").read_text())
    document["spec"]["members"][0]["jobs"] = [{"name": "one", "command": "true", "nodes": 2, "duration": 30}]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"one-job-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        ensemble_one = load(path)
    finally:
        path.unlink()
    reasons: list[str] = []
    for name in algorithms.names():
        if name == "rules":
            continue  # it says what the user's rules say
        wanted = {"scaleChecks": 1, "terminateChecks": 1, "shrinkChecks": 1, "successes": 1}
        options = {key: value for key, value in wanted.items() if key in algorithms.option_names(name)}
        result = simulate(
            SimulationConfig(ensemble=ensemble_one, algorithm=name, options=options, delay=5, record=True)
        )
        reasons += [record.reason for record in result.records if isinstance(record, Decision)]
    bad = [r for r in reasons if re.search(r"\b1 (jobs|checks|nodes|groups|successes)\b|\ball 1\b", r)]
    assert bad == []
    assert any(re.search(r"\b1 (job|check|node)\b", reason) for reason in reasons)  # the singulars were said


def test_output_that_is_not_a_terminal_is_never_wrapped_or_cut() -> None:
    console = terminal.console(io.StringIO())
    assert not console.is_terminal and console.width == terminal.PIPE_WIDTH
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    done = subprocess.run(
        [*CLI, "simulate", str(REPO / "examples/compose.yaml")], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    header = next(line for line in done.stdout.splitlines() if "member" in line and "algorithm" in line)
    for column in ("member", "algorithm", "jobs", "makespan s", "node-seconds", "ups/downs", "peak", "ended"):
        assert f" {column} " in header, header
    assert max(map(len, done.stdout.splitlines())) > 80  # wider than rich's default for a pipe


def test_up_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["up", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for code, meaning in up.EXIT_CODES.items():
        assert re.search(rf"^  {code} +{re.escape(meaning[:30])}", text, re.M), (code, text)
    assert set(up.EXIT_CODES) == {up.EXIT_OK, up.EXIT_JOBS_FAILED, up.EXIT_INVALID, up.EXIT_INCOMPLETE, 130}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        ensemble(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ensemble {VERSION}"


@pytest.mark.parametrize(
    ("argv", "usage", "said"),
    [
        (["simlate", "x.yaml"], "usage: ensemble [", "invalid choice: 'simlate'"),
        (["up", "x.yaml", "--timout", "5"], "usage: ensemble up ", "(--timout: did you mean --timeout?)"),
        (["simulate", "x.yaml", "--algoritm=static"], "usage: ensemble simulate ", "did you mean --algorithm?"),
        (["up", "x.yaml", "--backend", "flx"], "usage: ensemble up ", "did you mean flux?"),
        (["validate", "x.yaml", "--quiet"], "usage: ensemble validate ", "unrecognized arguments: --quiet"),
    ],
)
def test_a_misspelling_gets_the_close_match_and_the_subcommands_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, said: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert said in err
    if argv[0] == "simlate":
        assert err.rstrip().endswith("did you mean simulate?")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_timeout_must_be_a_positive_number(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["up", "x.yaml", f"--timeout={value}"])
    assert f"argument --timeout: must be a number of seconds > 0, got {value}" in capsys.readouterr().err
    assert _parser().parse_args(["up", "x.yaml"]).timeout is None  # no timeout unless given


def test_a_yaml_error_names_the_file_once_with_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: x\nkind: Ensemble\n members: []\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert ensemble(["validate", str(bad), str(binary), str(tmp_path / "none.yaml")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}: line 3, column 9: not valid YAML: ")
    assert out[1] == f"{binary}: cannot read: not UTF-8 text (byte 0)"
    assert out[2] == f"{tmp_path / 'none.yaml'}: cannot read: No such file or directory"
    assert all(line.count(str(tmp_path)) == 1 and "<unicode string>" not in line for line in out)


def test_a_bad_log_level_names_the_valid_ones() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"ENSEMBLE_LOG_LEVEL": "LOUD"})
    assert "ENSEMBLE_LOG_LEVEL='LOUD'" in str(error.value)
    assert str(error.value).endswith("use one of DEBUG, INFO, WARNING, ERROR")


def test_make_up_installs_the_project_and_make_test_the_test_extras() -> None:
    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    installs = [line for line in planned("up").splitlines() if "pip install" in line and "--upgrade" not in line]
    assert installs == [".venv/bin/python -m pip install --quiet -e ."]
    assert "ensemble up examples/hello-world.yaml" in planned("up")
    assert ".venv/bin/python -m pip install --quiet -e '.[test]'" in planned("test").splitlines()


def test_the_fault_suites_committed_section_is_made_from_its_committed_figures(tmp_path: Path) -> None:
    """The test of the suite writes under its tmp_path; only ``python -m tests.chaos`` writes the committed
    files, and ``--doc`` remakes the section of docs/benchmarks.md from bench/results/chaos.json."""
    page = tmp_path / "benchmarks.md"
    page.write_text((REPO / "docs/benchmarks.md").read_text())
    report = REPO / "bench/results/chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--doc", str(report), str(page)], cwd=REPO, timeout=60, check=False
    )
    assert done.returncode == 0
    assert page.read_text() == (REPO / "docs/benchmarks.md").read_text()
    assert chaos.markdown(json.loads(report.read_text())) in page.read_text()
    assert "ENSEMBLE_CHAOS_REPORT" not in (REPO / "tests/test_chaos.py").read_text()


def test_the_kubectl_tests_skip_with_one_reason_saying_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "kubectl"
    old.write_text("#!/bin/sh\necho 'Client Version: v1.20.15'\necho 'Kustomize Version: v2.0.3'\n")
    old.chmod(0o755)
    try:
        monkeypatch.setenv("PATH", str(tmp_path))
        kubectl_support.found.cache_clear()
        assert kubectl_support.kubectl() is None
        assert "has no kustomize v5 (Kustomize Version: v2.0.3)" in kubectl_support.missing()
        assert "make test" in kubectl_support.missing()
        old.unlink()
        kubectl_support.found.cache_clear()
        assert kubectl_support.missing().startswith("no kubectl on PATH")
    finally:
        monkeypatch.undo()
        kubectl_support.found.cache_clear()


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_the_sidecars_shrink_grace_is_checked_like_every_numeric_flag(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    from sidecar.cli import _parser as sidecar_parser

    with pytest.raises(SystemExit) as exit_:
        sidecar_parser().parse_args(["--port", "0", f"--shrink-grace={value}"])
    assert exit_.value.code == 2
    assert f"argument --shrink-grace: must be a number of seconds >= 0, got {value}" in capsys.readouterr().err
    assert sidecar_parser().parse_args(["--port", "0", "--shrink-grace", "0"]).shrink_grace == 0  # 0: never
