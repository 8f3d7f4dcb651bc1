"""The ``flux`` backend's translation of Flux's records, checked on recorded Flux payloads.

These run everywhere, Flux installed or not: the journal sample is real output of
``flux.job.JournalConsumer`` (shared/reference/flux-journal-sample.jsonl), the resource sets are
Rv1 and ``resource.status`` payloads as flux-core 0.88 answers them. The same code against a live
broker is tested in tests/test_flux_real.py, where ``flux`` is found.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ensemble_core import minicluster
from ensemble_core.messages import JobSpec
from ensemble_core.spec import SidecarSpec, validate
from ensemble_core.wire import decode_status
from sidecar.flux import FluxBackend, FluxOptions, FluxUnavailable
from sidecar.flux_link import HELPER, FluxLinkClosed, helper_command
from sidecar.flux_records import (
    JobTemplate,
    JournalState,
    Partition,
    RecordError,
    build_jobspec,
    busy_ranks,
    drain_reason,
    drain_times,
    drains,
    encode_idset,
    expand_idset,
    jobspec_group,
    jobspec_nodes,
    known_ranks,
    node_counts,
    parse_version,
    ranks_of,
    returncode,
    version_problem,
)
from sidecar.queue import QueueError, job_environment
from tests.conftest import REPO

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SAMPLE = [json.loads(line) for line in (SHARED / "reference" / "flux-journal-sample.jsonl").read_text().splitlines()]


def rset(*entries: tuple[str, str]) -> dict[str, Any]:
    """An Rv1 resource set with R_lite entries of (ranks, cores)."""
    return {
        "version": 1,
        "execution": {"R_lite": [{"rank": ranks, "children": {"core": cores}} for ranks, cores in entries]},
    }


def submit_event(job_id: int, t: float, nodes: int = 1, group: str = "g", **user: Any) -> dict[str, Any]:
    jobspec = {
        "resources": [{"type": "node", "count": nodes, "with": [{"type": "slot", "count": 1}]}],
        "tasks": [{"command": ["app", "-x"], "slot": "task", "count": {"per_slot": 1}}],
        "attributes": {"user": {"group": group, **user}},
        "version": 1,
    }
    return {
        "id": job_id,
        "events": [{"timestamp": t, "name": "submit", "context": {"urgency": 16}}],
        "jobspec": jobspec,
    }


def events(job_id: int, *named: tuple[str, float, dict[str, Any]]) -> dict[str, Any]:
    return {"id": job_id, "events": [{"name": n, "timestamp": t, "context": c} for n, t, c in named]}


def to_sched(job_id: int, t: float, priority: int = 16) -> dict[str, Any]:
    return events(job_id, ("validate", t, {}), ("depend", t, {}), ("priority", t, {"priority": priority}))


def test_the_recorded_journal_replays_past_jobs_then_follows_new_ones() -> None:
    state = JournalState()
    sentinel = next(i for i, record in enumerate(SAMPLE) if record["id"] == -1)
    state.apply_records(SAMPLE[:sentinel])
    assert not state.replayed
    # The replay: four jobs allocated and started, one still waiting for its node.
    queue = state.queue_counts()
    assert (queue.run, queue.sched, queue.inactive) == (4, 1, 0)
    assert (state.waiting(), state.next_jobs()) == ({1: 1}, [1])
    state.apply_record(SAMPLE[sentinel])
    assert state.replayed
    state.apply_records(SAMPLE[sentinel + 1 :])
    # Then every job of the sample ran to completion: five `sleep 10` and five `echo hello world`.
    queue = state.queue_counts()
    assert (queue.active(), queue.inactive, state.finished, state.failed) == (0, 10, 10, 0)
    status = state.status(node_counts({"all": rset(("0-2", "0-7"))}), 1729181761.0)
    assert status.groups["sleep"].succeeded == 5 and status.groups["echo"].submitted == 5
    assert status.groups["sleep"].run_mean == pytest.approx(10.0, abs=0.05)  # alloc → clean of `sleep 10`
    assert status.groups["echo"].run_max < 0.1
    # The payload is one the poller's client decodes.
    assert decode_status(msgspec.json.encode(status)).groups["sleep"].finished == 5


def test_held_jobs_count_as_sched_but_do_not_wait_for_nodes() -> None:
    state = JournalState()
    state.apply_records([submit_event(1, 1.0, nodes=2), to_sched(1, 1.1), submit_event(2, 2.0, nodes=4)])
    state.apply_record(to_sched(2, 2.1, priority=0))  # submitted held (urgency 0)
    assert state.queue_counts().sched == 2
    assert (state.waiting(), state.next_jobs()) == ({2: 1}, [2])
    assert state.pending_ids() == [1, 2]
    state.apply_record(events(2, ("urgency", 3.0, {"urgency": 16}), ("priority", 3.0, {"priority": 16})))
    assert (state.waiting(), state.next_jobs()) == ({2: 1, 4: 1}, [2, 4])
    state.apply_record(events(1, ("urgency", 3.5, {"urgency": 0}), ("priority", 3.5, {"priority": 0})))
    assert (state.waiting(), state.next_jobs()) == ({4: 1}, [4])


def test_failures_cancellations_and_rejections_end_as_failed() -> None:
    state = JournalState()
    for job_id in (1, 2, 3):
        state.apply_record(submit_event(job_id, 1.0, group=f"g{job_id}"))
    state.apply_records([to_sched(1, 1.0), to_sched(2, 1.0)])
    # job 1 runs and exits 1; job 2 is cancelled while waiting; job 3 fails validation.
    state.apply_record(events(1, ("alloc", 2.0, {}), ("start", 2.0, {}), ("finish", 5.0, {"status": 256})))
    assert state.queue_counts().cleanup == 1
    state.apply_record(events(1, ("release", 5.0, {}), ("free", 5.0, {}), ("clean", 5.0, {})))
    state.apply_record(events(2, ("exception", 3.0, {"type": "cancel", "severity": 0}), ("clean", 3.0, {})))
    state.apply_record(events(3, ("invalidate", 1.5, {"errstr": "bad jobspec"})))
    queue = state.queue_counts()
    assert (queue.active(), queue.inactive, state.finished, state.failed) == (0, 3, 3, 3)
    status = state.status(node_counts({}), 6.0)
    assert status.groups["g1"].run_mean == 3.0 and status.groups["g1"].wait_mean == 1.0
    assert status.groups["g2"].failed == 1 and status.counts == {"waiting": 0, "running": 0}
    # A non-fatal exception changes nothing; events of jobs never submitted are ignored.
    state.apply_record(events(99, ("alloc", 7.0, {})))
    assert state.queue_counts().inactive == 3


def test_submit_keys_come_back_from_the_journal_so_a_restarted_sidecar_does_not_resubmit() -> None:
    state = JournalState()
    state.apply_records([submit_event(i, 1.0, ensemble_key="decision-7", ensemble_index=i) for i in (0, 1, 3)])
    assert state.key_indices("decision-7") == {0, 1, 3}
    assert state.key_indices("other") == set()
    state.note_submitted("decision-7", 2)
    assert state.key_indices("decision-7") == {0, 1, 2, 3}


def test_resource_sets_translate_to_whole_free_nodes() -> None:
    resources = {
        "all": rset(("0-3", "0-7")),
        "down": rset(("3", "0-7")),  # one node down
        "allocated": rset(("1", "6-7")),  # two cores of node 1 busy
    }
    nodes = node_counts(resources)
    assert (nodes.node_up_count, nodes.node_cores_up) == (3, 24)
    assert (nodes.node_free_count, nodes.node_cores_free) == (2, 22)  # node 1 is not free for a whole-node job
    assert known_ranks(resources) == [0, 1, 2, 3]
    assert node_counts({"all": rset(("0", "0-3")), "down": None, "allocated": {}}).node_free_count == 1
    assert expand_idset("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    for bad, message in [("1-x", "not a list of ids"), ("5-2", "ends before it starts")]:
        with pytest.raises(RecordError, match=message):
            expand_idset(bad)
    with pytest.raises(RecordError, match=r"all: execution\.R_lite: missing"):
        node_counts({"all": {"version": 1}})


def test_jobspecs_give_width_and_group() -> None:
    replayed = SAMPLE[0]["jobspec"]
    assert (jobspec_nodes(replayed), jobspec_group(replayed)) == (1, "sleep")
    bare = {"resources": [{"type": "slot", "count": 1}], "tasks": [{"command": ["/usr/bin/lmp", "-in", "x"]}]}
    assert (jobspec_nodes(bare), jobspec_group(bare)) == (1, "lmp")
    assert jobspec_nodes({"resources": [{"type": "node", "count": {"min": 3, "max": 5}}]}) == 3
    assert (jobspec_nodes(None), jobspec_group(None)) == (1, "")


def test_malformed_journal_records_are_errors_naming_the_field() -> None:
    state = JournalState()
    for record, message in [
        ({"events": []}, "id: must be a job id"),
        ({"id": 1}, "events: job 1 has no list of events"),
        ({"id": 1, "events": [{"timestamp": 1.0}]}, "events: job 1 has an event without a name"),
    ]:
        with pytest.raises(RecordError, match=message):
            state.apply_record(record)


def status_payload(online: str, drain: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``resource.status`` answer (flux-core 0.88's shape) with ``online`` ranks and ``drain`` reasons."""
    return {
        "online": online,
        "offline": "",
        "exclude": "",
        "torpid": "",
        "drain": {ranks: {"timestamp": 1.0, "reason": reason} for ranks, reason in (drain or {}).items()},
    }


def test_a_partition_counts_only_its_ranks_and_drained_ranks_leave_when_idle() -> None:
    sched = {
        "all": rset(("0-7", "0-1")),
        "down": rset(("5-7", "0-1")),  # 5 offline; 6 and 7 drained (sched-status lists drained ranks as down)
        "allocated": rset(("2", "0-1"), ("7", "0")),
    }
    status = status_payload("0-4,6-7", {"6-7": drain_reason("m0", "size 2")})
    member = Partition.of([4, 5, 6, 7])
    nodes = node_counts(sched, status, member)
    # 4 up and free; 5 offline; 6 drained and idle: gone; 7 drained but running a job: up, not free
    assert (nodes.node_up_count, nodes.node_free_count) == (2, 1)
    assert (nodes.node_cores_up, nodes.node_cores_free) == (4, 2)
    everything = node_counts(sched, status)
    assert (everything.node_up_count, everything.node_free_count) == (6, 4)  # 0, 1, 3, 4 free; 2 busy; 7 draining
    assert drains(status, "m0") == drains(status, "m0").__class__(frozenset({6, 7}), frozenset({6, 7}))
    assert drains(status, "other").mine == frozenset()
    assert drains(status_payload("0", {"0": "admin: bad disk"}), "").mine == frozenset()


def test_a_shrink_exception_makes_a_job_lost_with_its_note_and_drain_times_are_the_members() -> None:
    state = JournalState("m0")
    alloc = {"timestamp": 2.0, "name": "alloc", "context": {}}
    for job_id, rank in ((1, "0"), (2, "1"), (3, "2")):
        state.apply_record(submit_event(job_id, 1.0, ensemble_member="m0"))
        state.apply_record(to_sched(job_id, 1.1))
        state.apply_record({"id": job_id, "events": [alloc], "R": rset((rank, "0-1"))})
    assert sorted(state.running_on({1, 2})) == [2, 3] and state.running_on({5}) == []
    note = "lost: killed after the shrink grace of 600 s (its node was given up)"
    state.apply_record(events(2, ("exception", 3.0, {"type": "ensemble-shrink", "severity": 0, "note": note})))
    state.apply_record(events(3, ("exception", 3.0, {"type": "cancel", "severity": 0, "note": "no"})))
    assert state.running_on({1, 2}) == []  # ended (cleanup): never killed twice
    state.apply_records(events(i, ("finish", 3.1, {"status": 36608}), ("clean", 3.2, {})) for i in (2, 3))
    lost, cancelled = state.job(2), state.job(3)
    assert lost is not None and cancelled is not None
    assert (lost.lost, lost.reason, lost.success, lost.state) == (True, note, False, "inactive")
    assert (cancelled.lost, cancelled.reason, cancelled.result) == (False, "cancel: no", "cancelled")
    status = state.status(node_counts({"all": rset(("0-2", "0-1"))}), 4.0, size=1, draining=0)
    assert (status.counts["lost"], status.failed, status.draining) == (1, 2, 0)

    status_now = status_payload("0-1", {"1-2": drain_reason("m0", "size 1"), "3": "admin: bad disk"})
    status_now["drain"]["1-2"]["timestamp"] = 1700000000.0
    assert drain_times(status_now, "m0") == {1: 1700000000.0, 2: 1700000000.0}  # not the admin's rank 3
    assert busy_ranks({1, 2}, {1: {0}, 2: {0}}, status_now) == {1}  # rank 2 is offline
    assert busy_ranks({1, 2}, {2: set()}) == frozenset()
    status_now["drain"]["1-2"]["timestamp"] = "soon"
    with pytest.raises(RecordError, match=r"drain\.1-2\.timestamp: must be a number, got 'soon'"):
        drain_times(status_now, "m0")


def test_a_partition_gives_up_its_highest_ranks_first() -> None:
    partition = Partition.of([7, 4, 5, 6, 5])
    assert partition.ranks == (4, 5, 6, 7) and partition.idset() == "4-7"
    assert partition.kept(1) == {4} and partition.given_up(1) == {5, 6, 7}
    assert partition.given_up(4) == frozenset() and partition.given_up(0) == {4, 5, 6, 7}
    assert encode_idset([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and encode_idset([]) == ""
    assert ranks_of("2-3", [0, 1, 2, 3]).ranks == (2, 3)
    with pytest.raises(QueueError, match=r"ranks: 4-5 not in this Flux instance \(its ranks are 0-3\)"):
        ranks_of("3-5", [0, 1, 2, 3])
    with pytest.raises(QueueError, match="ranks: '' names no rank"):
        ranks_of("", [0])


def test_jobspecs_ask_for_whole_nodes_name_the_group_and_carry_no_secret() -> None:
    environment = job_environment({"PATH": "/usr/bin", "ENSEMBLE_SIDECAR_TOKEN": "s3cret", "GRPC_X": "1", "HOME": "/h"})
    assert environment == {"PATH": "/usr/bin", "HOME": "/h"}
    template = JobTemplate(environment=environment, workdir="/work", member="ns/e/0", ranks="4-7")
    jobspec = build_jobspec(
        JobSpec(name="lmp", command="lmp -in 'in file'", nodes=2, tasks=3), template, key="d-1", index=5
    )
    node = jobspec["resources"][0]
    assert (node["type"], node["count"], node["exclusive"]) == ("node", 2, True)
    assert node["with"][0]["count"] == 2 and jobspec["tasks"][0]["count"] == {"total": 3}
    assert jobspec["tasks"][0]["command"] == ["lmp", "-in", "in file"]
    system = jobspec["attributes"]["system"]
    assert system["job"]["name"] == "lmp" and system["cwd"] == "/work" and system["constraints"] == {"ranks": ["4-7"]}
    assert "s3cret" not in json.dumps(jobspec)
    assert jobspec["attributes"]["user"] == {
        "group": "lmp", "ensemble_member": "ns/e/0", "ensemble_key": "d-1", "ensemble_index": 5,
        "ensemble_job": 0, "ensemble_attempt": 1,
    }  # fmt: skip
    # what the journal reads back from it
    assert (jobspec_nodes(jobspec), jobspec_group(jobspec)) == (2, "lmp")
    one_per_node = build_jobspec(JobSpec(name="g", command="true", nodes=3), JobTemplate(environment={}))
    assert one_per_node["tasks"][0]["count"] == {"per_slot": 1} and "cwd" not in one_per_node["attributes"]["system"]
    assert "constraints" not in one_per_node["attributes"]["system"]
    with pytest.raises(QueueError, match="command: cannot be split"):
        build_jobspec(JobSpec(name="g", command="echo 'unclosed"), template)


def test_a_jobspec_runs_a_command_with_shell_syntax_through_sh_like_the_local_backend() -> None:
    template = JobTemplate(environment={})
    shell = build_jobspec(JobSpec(name="g", command="lmp -in in.$N > log && gzip log"), template)
    assert shell["tasks"][0]["command"] == ["/bin/sh", "-c", "lmp -in in.$N > log && gzip log"]
    plain = build_jobspec(JobSpec(name="g", command="sh -c 'a; b'"), template)
    assert plain["tasks"][0]["command"] == ["sh", "-c", "a; b"]
    # and the journal gives jobinfo the command as it was given
    state = JournalState()
    state.apply_event(7, "submit", 1.0, {}, jobspec=shell)
    state.apply_event(8, "submit", 1.0, {}, jobspec=plain)
    assert [info.command for info in map(state.job, (7, 8)) if info is not None] == [
        "lmp -in in.$N > log && gzip log",
        "sh -c 'a; b'",
    ]


def test_the_journal_keeps_each_jobs_record_with_flux_return_codes() -> None:
    state = JournalState(member="m")
    state.apply_records(
        [
            submit_event(1, 1.0, group="a", ensemble_member="m"),
            submit_event(2, 1.5, group="b", ensemble_member="m"),
            submit_event(3, 1.6, group="c", ensemble_member="m"),
            submit_event(9, 1.7, group="theirs", ensemble_member="other"),  # another member's job: not counted
            to_sched(1, 1.1), to_sched(2, 1.6), to_sched(3, 1.7),
            events(1, ("alloc", 2.0, {}), ("finish", 4.0, {"status": 2 << 8}), ("clean", 4.1, {})),
            events(2, ("alloc", 2.0, {}), ("finish", 3.0, {"status": signal.SIGKILL}), ("clean", 3.1, {})),
            events(3, ("exception", 2.5, {"type": "cancel", "severity": 0}), ("clean", 2.6, {})),
        ]
    )  # fmt: skip
    assert [job.id for job in state.recent(10)] == [1, 2, 3] and state.job(9) is None
    first = state.job(1)
    assert first is not None and (first.state, first.returncode, first.success, first.t_run) == (
        "inactive",
        2,
        False,
        2.0,
    )
    assert [job.returncode for job in state.recent(10)] == [2, -signal.SIGKILL, -128]
    assert state.finished == 3 and state.failed == 3
    assert returncode(0) == 0 and returncode(3 << 8) == 3 and os.WIFSIGNALED(signal.SIGTERM)
    running = JournalState()
    running.apply_records([submit_event(4, 1.0, group="a"), to_sched(4, 1.0), events(4, ("alloc", 2.0, {}))])
    job = running.job(4)
    assert job is not None and (job.state, job.success, job.returncode) == ("run", None, None)
    assert running.active_ids("a") == [4] and running.pending_ids("a") == []


def test_versions_older_than_the_journal_consumer_are_refused_with_the_version_found() -> None:
    assert parse_version("0.88.0-59-g4a5e79f56") == (0, 88, 0) and parse_version("v0.9") == (0, 9, 0)
    assert version_problem("0.68.0") is None and version_problem("0.88.0") is None
    problem = version_problem("0.67.1")
    assert problem is not None and "flux-core 0.67.1 is too old" in problem and "0.68.0 or newer" in problem
    with pytest.raises(RecordError, match="version: 'unknown' is not a flux-core version"):
        parse_version("unknown")


def test_the_helper_is_python_3_6_and_imports_nothing_of_ours() -> None:
    tree = ast.parse(HELPER.read_text(), feature_version=(3, 6))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"errno", "json", "os", "signal", "sys", "typing", "flux"}, imported


async def test_without_a_flux_command_the_sidecar_says_how_it_finds_flux() -> None:
    with pytest.raises(FluxLinkClosed, match="no flux command 'no-such-flux' found"):
        helper_command("no-such-flux")
    with pytest.raises(FluxUnavailable) as raised:
        await FluxBackend.connect(FluxOptions(flux="no-such-flux"))
    assert "--flux" in str(raised.value) and "/mnt/flux/view/bin/flux" in str(raised.value)


async def test_only_the_lead_brokers_pod_serves_the_others_idle_until_stopped(tmp_path: Path) -> None:
    def start(index: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--backend", "flux", "--flux", "no-such-flux", "--port", "0",
             "--serve-on-index", "0"],
            env={**os.environ, "JOB_COMPLETION_INDEX": index}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO,
        )  # fmt: skip

    worker = start("2")
    await asyncio.sleep(1.5)
    assert worker.poll() is None  # no Flux looked for, nothing served: idle
    worker.send_signal(signal.SIGTERM)
    _, said = await asyncio.to_thread(worker.communicate, None, 15)
    assert worker.returncode == 0 and "JOB_COMPLETION_INDEX=2: not the pod of index 0" in said
    lead = start("0")  # the lead broker's pod: it serves, so it looks for Flux (missing here: it says so)
    _, said = await asyncio.to_thread(lead.communicate, None, 30)
    assert lead.returncode == 1 and "no flux command 'no-such-flux' found" in said


def test_the_sidecar_runs_as_the_application_containers_user_unless_told_otherwise() -> None:
    document = {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "metadata": {"name": "demo"},
        "spec": {"members": [{
            "minicluster": {"spec": {"size": 1, "containers": [
                {"name": "logger", "image": "busybox"},
                {"image": "app", "runFlux": True, "securityContext": {"runAsUser": 1000}},
            ]}},
            "jobs": [{"name": "a", "command": "true"}],
        }]},
    }  # fmt: skip
    ensemble, errors = validate(document)
    assert ensemble is not None, errors
    spec = ensemble.members[0].minicluster["spec"]
    assert minicluster.sidecar_uid(ensemble.members[0].sidecar, spec) == 1000  # the broker's user
    document["spec"]["members"][0]["sidecar"] = {"runAsUser": 0}
    ensemble, errors = validate(document)
    assert ensemble is not None, errors
    assert minicluster.sidecar_uid(ensemble.members[0].sidecar, spec) == 0
    del spec["containers"][1]["securityContext"]
    assert minicluster.sidecar_uid(SidecarSpec(), spec) == 0  # most application images run as root


def test_a_sidecar_that_cannot_start_leaves_its_reason_as_its_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar import cli

    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setattr(cli, "TERMINATION_LOG", log)
    assert cli.main(["--backend", "flux", "--flux", "no-such-flux", "--port", "0"]) == 1
    # Kubernetes puts this into the container's terminated.message, which the creator quotes
    assert "no flux command 'no-such-flux' found" in log.read_text()
