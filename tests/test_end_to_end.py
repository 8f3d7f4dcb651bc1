"""The whole system on real parts: nats-server, the four services and a sidecar as separate processes,
jobs as real subprocesses. Also `ensemble up` as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import yaml
from nats.aio.client import Client

from ensemble_cli.up import Stack, node_seconds
from ensemble_core import subjects
from ensemble_core.messages import Applied, Decision, MemberEvent, MemberSpec, Metrics
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import JobInfo
from tests.conftest import REPO, stream_messages, wait_for
from tests.test_report import page_json

CLI = [sys.executable, "-m", "ensemble_cli"]


def hello_world(marks: Path) -> dict[str, object]:
    """The example ensemble, with each job also appending a line to a file of its group (from its first task:
    a job is a task per node, as on Flux)."""
    document = yaml.safe_load((REPO / "examples/hello-world.yaml").read_text())
    for job in document["spec"]["members"][0]["jobs"]:
        job["command"] = f"sh -c 'test $FLUX_TASK_RANK != 0 || echo ran >> {marks}/{job['name']}; sleep 1'"
    return document


async def test_ensemble_runs_end_to_end_through_all_services(nc: Client, settings: Settings, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    document = hello_world(marks)
    document["metadata"]["name"] = "hello.world"  # a dotted name must work end to end
    spec_file = tmp_path / "ensemble.yaml"
    spec_file.write_text(yaml.safe_dump(document))
    member = document["spec"]["members"][0]  # type: ignore[index]
    stack = Stack(tmp_path)
    token = "e2e-token"
    try:
        sidecar = stack.start(
            "sidecar",
            [
                *CLI,
                "sidecar",
                "--backend",
                "local",
                "--port",
                "0",
                "--nodes",
                "1",
                "--max-nodes",
                "4",
                "--provision-delay",
                "1",
            ],
            env={"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(token, "default", "hello.world")},
        )
        await wait_for(lambda: "\n" in sidecar.log.read_text(), timeout=20)
        endpoint = f"127.0.0.1:{sidecar.log.read_text().splitlines()[0]}"
        env = {
            "ENSEMBLE_NATS_URL": settings.nats_url,
            "ENSEMBLE_SIDECAR_TOKEN": token,
            "ENSEMBLE_FILE": str(spec_file),
            "ENSEMBLE_ENDPOINTS": f"0={endpoint}",
        }
        for name in ("creator", "poller", "decider", "actuator"):
            # the poller without the operator secret: it reads with the status token the creator records
            stack.start(name, [*CLI, name], env=env if name != "poller" else {**env, "ENSEMBLE_SIDECAR_TOKEN": ""})
        address = MemberAddress("default", "hello.world", 0)
        members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)

        async def terminated() -> bool:
            assert stack.died() is None, f"{stack.died()} died"
            try:
                entry = await members.get(address.key)
            except Exception:
                return False
            return msgspec.json.decode(entry.value or b"", type=MemberSpec).phase == "terminated"

        await wait_for(terminated, timeout=90, interval=0.5)
        async with SidecarClient(endpoint, ensemble_token(token, "default", "hello.world")) as client:
            jobs = await client.action("jobinfo", {}, list[JobInfo])
    finally:
        await stack.stop()

    # every job ran exactly once, and succeeded
    for job in member["jobs"]:
        assert (marks / job["name"]).read_text().count("ran") == job["count"], job["name"]
    assert len(jobs) == sum(job["count"] for job in member["jobs"]) == len({job.id for job in jobs})
    assert all(job.success for job in jobs)

    # the streams hold what happened
    decisions = [
        msgspec.json.decode(raw, type=Decision)
        for raw in await stream_messages(nc, subjects.DECISIONS_STREAM, subjects.decisions(address))
    ]
    actions = [d.action for d in decisions]
    assert actions[0] == "submit" and actions.count("submit") == 1
    assert actions[-1] == "terminate" and actions.count("terminate") == 1
    applied = [
        msgspec.json.decode(raw, type=Applied)
        for raw in await stream_messages(nc, subjects.EVENTS_STREAM, subjects.applied(address))
    ]
    assert [a.decision for a in applied] == [d.id for d in decisions]
    assert all(a.ok for a in applied)
    scales = [(a.size_before, a.size_after) for a in applied if a.action == "scale"]
    assert any(after > before for before, after in scales), scales  # type: ignore[operator]
    assert any(after < before for before, after in scales), scales  # type: ignore[operator]
    assert all(1 <= after <= 4 for _, after in scales), scales  # type: ignore[operator]
    assert scales[-1][1] == 1
    metrics = [
        msgspec.json.decode(raw, type=Metrics)
        for raw in await stream_messages(nc, subjects.METRICS_STREAM, subjects.metrics(address))
    ]
    assert [m.seq for m in metrics] == list(range(len(metrics)))
    assert max(m.size for m in metrics) > 1 and all(1 <= m.size <= 4 for m in metrics)
    assert metrics[-1].finished >= 11 or metrics[-1].size == 0
    events = [
        msgspec.json.decode(raw, type=MemberEvent).event
        for raw in await stream_messages(nc, subjects.EVENTS_STREAM, subjects.events(address))
    ]
    assert events[0] == "ready" and "terminated" in events


def run_up(
    path: Path, *extra: str, timeout: float = 120, tmp: Path | None = None, results: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``ensemble up`` as a user runs it; with ``tmp``, its temporary run directory is made there (TMPDIR).
    Its results folder goes to ``results`` (default: ``results`` in ``tmp``, else beside ``path``: give one of
    them for a file of the repository, so that nothing is written into it)."""
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None
    results = results or (tmp or path.parent) / "results"
    return subprocess.run(
        [*CLI, "up", str(path), "--timeout", "90", "--results", str(results), *extra],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )  # fmt: skip


def kept_directory(stdout: str) -> Path:
    """The run directory ``ensemble up`` says it kept; it must exist."""
    found = re.search(r"logs and state of this run kept in (\S+)", stdout)
    assert found is not None, stdout
    path = Path(found[1])
    assert path.is_dir(), f"{path} was named but is gone"
    return path


def test_ensemble_up_runs_the_example_to_completion(tmp_path: Path) -> None:
    started = time.monotonic()
    (tmp_path / "tmp").mkdir()
    result = run_up(REPO / "examples/hello-world.yaml", tmp=tmp_path / "tmp", results=tmp_path / "results")
    assert result.returncode == 0, result.stdout + result.stderr
    assert list((tmp_path / "tmp").iterdir()) == [], "a run that succeeded without --logs leaves nothing behind"
    # but its results
    assert (tmp_path / "results" / "summary.json").is_file() and f"results in {tmp_path / 'results'}" in result.stdout
    assert "kept in" not in result.stdout
    assert "summary" in result.stdout
    assert "scaled 1 → " in result.stdout and "→ 1" in result.stdout
    assert "terminated" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("│      0"))
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1:4] == ["11", "11", "0"], row  # jobs, succeeded, failed
    assert time.monotonic() - started < 60


def test_ensemble_up_exits_non_zero_and_names_a_failed_job(tmp_path: Path) -> None:
    document = hello_world(tmp_path)
    document["spec"]["members"][0]["jobs"] = [  # type: ignore[index]
        {"name": "ok", "command": "true", "count": 2},
        {"name": "broken", "command": "sh -c 'echo disk full >&2; exit 3'", "count": 1},
        {"name": "missing", "command": "no-such-command-here", "count": 1},
    ]
    document["spec"]["members"][0]["algorithm"]["options"]["terminateChecks"] = 2  # type: ignore[index]
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(document))
    (tmp_path / "tmp").mkdir()
    result = run_up(path, "--quiet", tmp=tmp_path / "tmp")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "job broken[0] failed after 1 attempt (exit 3): disk full" in result.stdout
    assert "job missing[0] failed after 1 attempt (exit 127)" in result.stdout
    # a run that did not succeed keeps its directory, for the logs of the job that failed
    kept = kept_directory(result.stdout)
    assert kept.parent == tmp_path / "tmp" and (kept / "sidecar-0" / "journal.jsonl").exists()
    # and its report: the run's sizes and decisions over time, its attempts, the failures with their output
    results = tmp_path / "tmp" / "results"
    data = page_json((results / "report.html").read_text())
    assert (results / "ensemble.yaml").read_text() == path.read_text()
    (member,) = data["members"]
    assert member["algorithm"] == "workload-demand" and member["options"]["terminateChecks"] == 2
    recorded = [json.loads(line)["kind"] for line in (results / "recording.jsonl").read_text().splitlines()]
    assert recorded.count("metrics") >= 2 and "decision" in recorded and "applied" in recorded
    assert member["series"]["size"][0] == 1 and member["series"]["up"][0] == 1
    assert [d[1] for d in member["decisions"]][-1] == "terminate" and all(d[3] for d in member["decisions"])
    assert len(member["jobs"]["n"]) == 4
    tails = {f["group"]: f["tail"] for f in data["failures"]}
    assert set(tails) == {"broken", "missing"} and "disk full" in tails["broken"]


def test_ensemble_up_that_cannot_start_says_why_and_leaves_no_empty_directory(tmp_path: Path) -> None:
    unusable = run_up(REPO / "examples/hello-world.yaml", "--logs", "/proc/no-such-dir", timeout=30, tmp=tmp_path)
    assert unusable.returncode == 2 and "--logs /proc/no-such-dir: cannot use it" in unusable.stdout
    env = {key: value for key, value in os.environ.items() if key != "FLUX_URI"}
    no_flux = subprocess.run(
        [*CLI, "up", str(REPO / "examples/hello-world.yaml"), "--backend", "flux"],
        capture_output=True, text=True, timeout=30, check=False, env={**env, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert no_flux.returncode == 3 and "FLUX_URI is not set" in no_flux.stdout
    assert "Traceback" not in unusable.stderr + no_flux.stderr and "kept in" not in no_flux.stdout
    assert list(tmp_path.iterdir()) == []


def test_ensemble_up_warns_of_a_member_with_nothing_to_run(tmp_path: Path) -> None:
    document = hello_world(tmp_path)
    document["spec"]["members"][0]["jobs"] = [{"name": "none", "command": "true", "count": 0}]  # type: ignore[index]
    document["spec"]["members"][0]["algorithm"]["options"]["terminateChecks"] = 2  # type: ignore[index]
    path = tmp_path / "idle.yaml"
    path.write_text(yaml.safe_dump(document))
    result = run_up(path, "--quiet", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr  # nothing failed: a warning, not an error
    assert result.stdout.startswith(
        "warning: spec.members[0].jobs: every job group has count 0, so this member runs nothing"
    )
    assert "summary" in result.stdout


def test_ensemble_up_that_times_out_keeps_its_directory_and_prints_what_it_has(tmp_path: Path) -> None:
    result = run_up(REPO / "examples/hello-world.yaml", "--quiet", "--timeout", "5", tmp=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "gave up after 5s" in result.stdout
    assert "summary" in result.stdout and "before the ensemble completed" in result.stdout
    kept = kept_directory(result.stdout)
    assert kept.parent == tmp_path
    assert "Traceback" not in result.stdout + result.stderr
    for name in ("nats-server", "sidecar-0", "creator", "poller", "decider", "actuator"):
        assert (kept / f"{name}.log").exists(), name


def test_node_seconds_of_a_member_never_ready_are_zero() -> None:
    # a --timeout that passes before the member was ready left it no size sample: the summary crashed
    assert node_seconds([], 10.0) == 0.0
    assert node_seconds([(0.0, 2), (4.0, 1)], 10.0) == 2 * 4 + 1 * 6


def test_ensemble_up_names_a_part_that_did_not_start_with_its_message_and_keeps_the_logs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "sidecar-0").write_text("a file where the sidecar's state directory goes\n")
    result = run_up(REPO / "examples/hello-world.yaml", "--quiet", "--logs", str(logs), timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "sidecar-0 did not start" in result.stdout
    assert "--state-dir" in result.stdout  # the sidecar's own reason, from its stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert kept_directory(result.stdout) == logs
    assert (logs / "sidecar-0.err").exists()


def test_ensemble_up_refuses_a_bad_spec_with_the_field_path(tmp_path: Path) -> None:
    document = hello_world(tmp_path)
    document["spec"]["members"][0]["jobs"][0]["nodes"] = 12  # type: ignore[index]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = run_up(path, timeout=30)
    assert result.returncode == 2
    assert "spec.members[0].jobs[0].nodes: 12 exceeds maxSize 4" in result.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--cores", "0", "argument --cores: must be an integer >= 1, got 0"),
        ("--cores", "many", "argument --cores: must be an integer >= 1, got 'many'"),
        ("--provision-delay", "-1", "argument --provision-delay: must be a number of seconds >= 0, got -1"),
        ("--provision-delay", "nan", "argument --provision-delay: must be a number of seconds >= 0, got nan"),
        ("--timeout", "-5", "argument --timeout: must be a number of seconds > 0, got -5"),
        ("--timeout", "0", "argument --timeout: must be a number of seconds > 0, got 0"),
        ("--timeout", "inf", "argument --timeout: must be a number of seconds > 0, got inf"),
    ],
)
def test_ensemble_up_refuses_a_bad_flag_before_starting_anything(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    started = time.monotonic()
    result = run_up(REPO / "examples/hello-world.yaml", f"{flag}={value}", timeout=30, tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr  # 1 would say a job failed
    assert f"ensemble up: error: {message}" in result.stderr
    assert result.stderr.startswith("usage: ensemble up")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # refused before any part or directory was made
    assert time.monotonic() - started < 10


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _children(pid: int) -> set[int]:
    """Every live process whose parent is ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_ctrl_c_stops_everything_and_leaves_no_process(tmp_path: Path) -> None:
    process = subprocess.Popen(  # noqa: ASYNC220  (a real child to interrupt, as a user would)
        [*CLI, "up", str(REPO / "examples/hello-world.yaml"), "--logs", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # mid-run: every service has said it is up (a part still importing when the signal comes has no handler
        # for it yet, which is not what this test is about) and a job has started
        services = [tmp_path / f"{name}.log" for name in ("creator", "poller", "decider", "actuator")]
        await wait_for(
            lambda: (
                all(log.exists() and log.stat().st_size > 0 for log in services)
                and "job start" in _read(tmp_path / "sidecar-0.err")
                and len(_children(process.pid)) >= 6
            ),
            timeout=60,
        )
        children = _children(process.pid)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out + err
    assert "interrupted" in err
    assert not [pid for pid in children if _alive(pid)]
    for name in ("creator", "poller", "decider", "actuator"):
        assert '"stopped"' in (tmp_path / f"{name}.log").read_text(), name


def test_ensemble_up_without_results_keeps_every_file_of_the_run_in_one_timestamped_folder(tmp_path: Path) -> None:
    # the default folder is named after the time: the outputs, written from the first job on, and the rows,
    # written at the end, must land in the same one (they were split across two when the run took a second)
    document = yaml.safe_load((REPO / "examples/hello-world.yaml").read_text())
    document["spec"]["members"][0]["jobs"] = [{"name": "say", "command": "sh -c 'echo hi; sleep 1.5'", "count": 2}]
    document["spec"]["members"][0]["minicluster"]["spec"]["maxSize"] = 1
    (tmp_path / "say.yaml").write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [*CLI, "up", "say.yaml", "--quiet", "--timeout", "90"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    folders = list((tmp_path / "ensemble-results").iterdir())
    assert len(folders) == 1, folders
    rows = list(csv.DictReader((folders[0] / "jobs.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert Path(row["stdout"]).parent.parent.parent == (folders[0] / "outputs").resolve()
        assert Path(row["stdout"]).read_text() == "hi\n"
