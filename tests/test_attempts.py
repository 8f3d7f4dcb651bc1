"""No job left behind, on real parts: failed attempts retried, lost ones queued again when a sidecar's
queue is gone, the results folder and the summary at any number of jobs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml
from nats.aio.client import Client

from ensemble_cli.up import Stack
from ensemble_core import ledger, subjects
from ensemble_core.messages import InstanceChanged, JobEnded, MemberSpec
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from tests.conftest import stream_messages, wait_for

CLI = [sys.executable, "-m", "ensemble_cli"]


def ensemble(name: str, jobs: list[dict[str, Any]], *, size: int = 1, max_size: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1",
        "kind": "Ensemble",
        "metadata": {"name": name},
        "spec": {
            "checkSeconds": 1,
            "members": [{"minicluster": {"spec": {"size": size, "maxSize": max_size}}, "jobs": jobs}],
        },
    }


def up(tmp_path: Path, document: dict[str, Any], *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(document))
    argv = [*CLI, "up", str(path), "--quiet", "--timeout", str(timeout - 30), "--results", str(tmp_path / "results")]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=timeout, check=False, cwd=tmp_path)


def rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "results" / "jobs.csv").open() as table:
        return list(csv.DictReader(table))


def test_failed_attempts_are_retried_up_to_retries_and_every_attempt_has_a_row_and_its_output(tmp_path: Path) -> None:
    flaky = (
        "sh -c 'if [ -e mark-$ENSEMBLE_JOB_INDEX ]; then echo second try; "
        "else touch mark-$ENSEMBLE_JOB_INDEX; echo first try >&2; exit 3; fi'"
    )
    document = ensemble(
        "retry",
        [
            {"name": "flaky", "command": flaky, "count": 3, "retries": 1},
            {"name": "bad", "command": "sh -c 'echo nope >&2; exit 4'", "count": 2, "retries": 2},
            {"name": "ok", "command": "echo fine", "count": 2},
        ],
    )
    result = up(tmp_path, document)
    assert result.returncode == 1, result.stdout + result.stderr
    # each job that did not succeed is named once, with its exit code and output
    assert result.stdout.count("job bad[") == 2 and "after 3 attempts (exit 4): nope" in result.stdout
    assert "job flaky[" not in result.stdout and "job ok[" not in result.stdout
    found = rows(tmp_path)
    by_job: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in found:
        by_job.setdefault((row["group"], row["index"]), []).append(row)
    assert len(by_job) == 7 and len(found) == 3 * 2 + 2 * 3 + 2
    for index in "012":
        attempts = by_job[("flaky", index)]
        assert [(a["attempt"], a["result"], a["exit_code"]) for a in attempts] == [
            ("1", "failed", "3"),
            ("2", "succeeded", "0"),
        ]
        assert Path(attempts[0]["stderr"]).read_text() == "first try\n"
        assert Path(attempts[1]["stdout"]).read_text() == "second try\n"
    assert [a["result"] for a in by_job[("bad", "1")]] == ["failed"] * 3
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["total"] == {
        "jobs": 7, "succeeded": 5, "failed": 2, "lost": 0, "cancelled": 0, "unfinished": 0,
        "attempts": 14, "retried": 5,
    }  # fmt: skip
    assert [(f["group"], f["index"], f["attempt"]) for f in summary["not_succeeded"]] == [("bad", 0, 3), ("bad", 1, 3)]
    lines = [json.loads(line) for line in (tmp_path / "results" / "jobs.jsonl").read_text().splitlines()]
    # the same rows as jobs.csv, with the parameters as a mapping and numbers as numbers
    assert [(r["group"], r["index"], r["attempt"], r["result"]) for r in lines] == [
        (row["group"], int(row["index"]), int(row["attempt"]), row["result"]) for row in found
    ]
    assert all(isinstance(r["params"], dict) and r["exit_code"] is not None for r in lines)
    assert f"results in {tmp_path / 'results'}" in result.stdout


def test_five_thousand_jobs_with_one_failure_among_the_first_hundred_exit_1_and_name_it(tmp_path: Path) -> None:
    document = ensemble(
        "many",
        [
            {"name": "first", "command": "true", "count": 42},
            {"name": "broken", "command": "sh -c 'echo no space left >&2; exit 28'", "count": 1},
            {"name": "rest", "command": "true", "count": 4957},
        ],
        size=8,
        max_size=8,
    )
    result = up(tmp_path, document, "--cores", "4")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job broken[0] failed after 1 attempt (exit 28): no space left" in result.stdout
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert (summary["total"]["jobs"], summary["total"]["succeeded"], summary["total"]["failed"]) == (5000, 4999, 1)
    assert summary["total"]["attempts"] == 5000
    assert len(rows(tmp_path)) == 5000


def test_the_failures_printed_are_capped_and_the_rest_point_to_jobs_csv(tmp_path: Path) -> None:
    document = ensemble("capped", [{"name": "bad", "command": "false", "count": 14}], size=2)
    result = up(tmp_path, document)
    assert result.returncode == 1
    assert result.stdout.count("failed after 1 attempt") == 10
    assert f"and 4 more: see {tmp_path / 'results'}/jobs.csv" in result.stdout


async def test_jobs_of_a_sidecar_replaced_by_an_empty_one_are_queued_again_and_succeed_once(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # each job marks its start and its end: a job killed with its sidecar has a start without an end
    mark = f"{marks}/$ENSEMBLE_JOB_INDEX.$ENSEMBLE_JOB_ATTEMPT"
    command = f"sh -c 'touch {mark}.start; sleep 4; touch {mark}.end'"
    document = ensemble("replaced", [{"name": "slow", "command": command, "count": 4}], size=2, max_size=2)
    spec_file = tmp_path / "ensemble.yaml"
    spec_file.write_text(yaml.safe_dump(document))
    stack = Stack(tmp_path)
    token = "replaced-token"
    sidecar_env = {"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(token, "default", "replaced")}
    sidecar_argv = [*CLI, "sidecar", "--backend", "local", "--nodes", "2", "--max-nodes", "2"]
    address = MemberAddress("default", "replaced", 0)
    try:
        first = stack.start("sidecar", [*sidecar_argv, "--port", "0"], env=sidecar_env)
        await wait_for(lambda: "\n" in first.log.read_text(), timeout=20)
        port = first.log.read_text().splitlines()[0]
        env = {
            "ENSEMBLE_NATS_URL": settings.nats_url,
            "ENSEMBLE_SIDECAR_TOKEN": token,
            "ENSEMBLE_FILE": str(spec_file),
            "ENSEMBLE_ENDPOINTS": f"0=127.0.0.1:{port}",
        }
        for name in ("creator", "poller", "decider", "actuator"):
            stack.start(name, [*CLI, name], env=env)
        # two jobs running: kill the sidecar with them (no state directory: its queue is gone for good)
        await wait_for(lambda: len(list(marks.glob("*.1.start"))) == 2, timeout=30)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        stack.parts.remove(first)
        second = stack.start("sidecar-2", [*sidecar_argv, "--port", port], env=sidecar_env)
        members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)

        async def terminated() -> bool:
            assert stack.died() is None, f"{stack.died()} died"
            entry = await members.get(address.key)
            return msgspec.json.decode(entry.value or b"", type=MemberSpec).phase == "terminated"

        await wait_for(terminated, timeout=90, interval=0.5)
        assert second.process.poll() is None
    finally:
        await stack.stop()
    # every job ended with exactly one attempt that ran to its end; the two killed ran again as attempt 2
    ends = sorted(path.name for path in marks.glob("*.end"))
    assert sorted({name.split(".")[0] for name in ends}) == ["0", "1", "2", "3"] and len(ends) == 4, ends
    killed = {path.name.split(".")[0] for path in marks.glob("*.1.start")} - {
        name.split(".")[0] for name in ends if ".1." in name
    }
    assert len(killed) == 2 and all((marks / f"{index}.2.end").exists() for index in killed)
    record = ledger.decode_record(
        (await (await nc.jetstream().key_value(subjects.JOBS_BUCKET)).get(address.key)).value or b""
    )
    assert ledger.counts(record)["succeeded"] == 4 and record.outstanding == 0 and record.extra_successes == 0
    # the two running and the two still waiting in the queue that is gone: all four attempts lost
    assert record.ended == {"lost": 4, "succeeded": 4}
    reports = [
        msgspec.json.decode(raw, type=JobEnded | InstanceChanged)  # type: ignore[arg-type]
        for raw in await stream_messages(nc, subjects.JOBS_STREAM, subjects.jobs(address))
    ]
    changes = [r for r in reports if isinstance(r, InstanceChanged)]
    assert len(changes) == 2 and changes[0].previous == "" and changes[1].previous == changes[0].instance


def test_a_second_run_into_the_same_results_folder_replaces_the_first(tmp_path: Path) -> None:
    first = up(tmp_path, ensemble("again", [{"name": "a", "command": "echo one", "count": 3}]))
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "results" / "outputs" / "member-0" / "a" / "2.1.out").exists()
    second = up(tmp_path, ensemble("again", [{"name": "b", "command": "echo two", "count": 1}]))
    assert second.returncode == 0, second.stdout + second.stderr
    assert [(row["group"], row["index"]) for row in rows(tmp_path)] == [("b", "0")]
    assert not (tmp_path / "results" / "outputs" / "member-0" / "a").exists()
