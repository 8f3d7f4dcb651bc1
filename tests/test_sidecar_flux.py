"""The ``flux`` backend's translation of Flux's records, checked on recorded Flux payloads.

No Flux broker can run here: the journal sample is real output of ``flux.job.JournalConsumer``
(shared/reference/flux-journal-sample.jsonl), the job-list entries are the recorded GKE runs'
``flux job list`` records, and the resource sets are Rv1 as the scheduler answers. What only a
live Flux can show (the RPCs themselves) is listed in docs/sidecar.md.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ensemble_core.wire import decode_status
from sidecar.flux import HOW_TO_REACH_FLUX, FluxUnavailable, import_flux
from sidecar.flux_records import (
    JournalState,
    RecordError,
    expand_idset,
    job_info,
    jobspec_group,
    jobspec_nodes,
    known_nodes,
    node_counts,
)

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
    assert known_nodes(resources) == 4
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


def test_job_list_entries_from_the_recorded_runs_translate_to_jobinfo() -> None:
    lines = (SHARED / "data" / "seed-gke" / "run5-random" / "jobs.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    info = job_info({**first, "state": 64})
    assert (info.id, info.group, info.nodes, info.state, info.success) == (first["id"], "lmp", 4, "inactive", True)
    assert info.t_inactive is not None and info.t_run is not None
    assert info.t_inactive - info.t_run == pytest.approx(first["t_inactive"] - first["t_run"])
    waiting = job_info({"id": 5, "state": "SCHED", "nnodes": 2, "t_submit": 1.0, "t_run": 0.0})
    assert (waiting.state, waiting.t_run, waiting.success) == ("sched", None, None)
    with pytest.raises(RecordError, match="id: a job-list entry needs a job id"):
        job_info({"state": 8})


def test_malformed_journal_records_are_errors_naming_the_field() -> None:
    state = JournalState()
    for record, message in [
        ({"events": []}, "id: must be a job id"),
        ({"id": 1}, "events: job 1 has no list of events"),
        ({"id": 1, "events": [{"timestamp": 1.0}]}, "events: job 1 has an event without a name"),
    ]:
        with pytest.raises(RecordError, match=message):
            state.apply_record(record)


@pytest.mark.skipif(importlib.util.find_spec("flux") is not None, reason="the flux bindings are installed here")
def test_without_the_bindings_the_error_says_how_the_sidecar_finds_flux() -> None:
    with pytest.raises(FluxUnavailable) as raised:
        import_flux()
    assert "flux bindings are not importable" in str(raised.value)
    assert "FLUX_URI=local:///mnt/flux/config/run/flux/local" in HOW_TO_REACH_FLUX
    assert "source /mnt/flux/flux-view.sh" in str(raised.value)
