"""Flux's records translated into the sidecar's counts: pure functions, no Flux needed.

The ``flux`` backend (:mod:`sidecar.flux`) only moves records between Flux and these functions:

* :class:`JournalState` keeps the queue counts from the job manager's event journal
  (``job-manager.events-journal``, read with ``flux.job.JournalConsumer``): one record per job and
  event batch, ``{"id": jobid, "events": [...], "jobspec"?: {...}, "R"?: {...}}``; the record with
  id -1 is the sentinel ending the replay of past jobs. Each status is then O(groups), whatever the
  number of jobs, and Flux is never asked to list every job.
* :func:`node_counts` turns the scheduler's resource sets (``all`` / ``down`` / ``allocated``, Rv1)
  into node and core counts.
* :func:`job_info` turns a job-list entry (``flux.job.job_list``) into a ``jobinfo`` answer.

Job states follow RFC 21: ``submit`` → new, ``validate`` → depend, ``depend`` → priority, the first
``priority`` → sched, ``alloc`` → run, ``finish`` or a fatal ``exception`` → cleanup, ``clean`` →
inactive; ``invalidate`` ends a job that failed validation. A job in sched whose priority is 0 is
held (urgency 0): Flux counts it in ``sched``, but it is not waiting for nodes, so it is left out of
``waiting`` and ``nextJobs``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ensemble_core.messages import NodeCounts, QueueCounts
from ensemble_core.wire import JobInfo, StatusPayload
from sidecar.queue import NEXT_JOBS, GroupTally, JobState

#: The journal's sentinel record id: the replay of past jobs ends here.
SENTINEL_ID = -1

#: Flux's numeric job states (``flux_job_state_t``), as job-list entries carry them.
STATE_NAMES = {1: "new", 2: "depend", 4: "priority", 8: "sched", 16: "run", 32: "cleanup", 64: "inactive"}

#: Jobspec user attributes the sidecar sets on every job it submits.
GROUP_ATTRIBUTE = "group"
KEY_ATTRIBUTE = "ensemble_key"
INDEX_ATTRIBUTE = "ensemble_index"

_NEXT_STATE = {
    "validate": JobState.DEPEND,
    "depend": JobState.PRIORITY,
    "alloc": JobState.RUN,
    "finish": JobState.CLEANUP,
    "clean": JobState.INACTIVE,
    "invalidate": JobState.INACTIVE,
}
_ORDER = list(JobState)


class RecordError(ValueError):
    """A Flux record without a field the translation needs; the message names it."""


@dataclass(slots=True)
class _Job:
    """What the journal tells about one job that is not inactive yet."""

    nodes: int
    group: str
    t_submit: float
    state: JobState = JobState.NEW
    held: bool = False
    t_run: float | None = None
    success: bool = True


def expand_idset(text: str) -> list[int]:
    """The ids of an RFC 22 idset string (``"0-3,7"`` → ``[0, 1, 2, 3, 7]``); :class:`RecordError` if malformed."""
    ids: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise RecordError(f"idset: {text!r} is not a list of ids and ranges") from None
        if last < first:
            raise RecordError(f"idset: range {part!r} ends before it starts")
        ids.extend(range(first, last + 1))
    return ids


def _cores_by_rank(rset: Mapping[str, Any] | None, where: str) -> dict[int, set[int]]:
    """The cores of each rank in an Rv1 resource set (``execution.R_lite``); empty for ``None``."""
    if not rset:
        return {}
    try:
        entries = rset["execution"]["R_lite"]
    except (KeyError, TypeError):
        raise RecordError(f"{where}: execution.R_lite: missing from the resource set") from None
    cores: dict[int, set[int]] = {}
    for entry in entries:
        try:
            ranks, core_ids = expand_idset(entry["rank"]), expand_idset(entry.get("children", {}).get("core", ""))
        except (KeyError, TypeError, AttributeError):
            raise RecordError(f"{where}: execution.R_lite: each entry needs rank and children.core") from None
        for rank in ranks:
            cores.setdefault(rank, set()).update(core_ids)
    return cores


def node_counts(resources: Mapping[str, Any]) -> NodeCounts:
    """Node and core counts from the scheduler's ``{"all", "down", "allocated"}`` Rv1 resource sets.

    Up = all minus down. A node is free when none of its up cores is allocated: jobs take whole
    nodes, so a node with one busy core cannot take a job (``flux resource list`` counts such a node
    as free; the sidecar does not).
    """
    every = _cores_by_rank(resources.get("all"), "all")
    down = _cores_by_rank(resources.get("down"), "down")
    allocated = _cores_by_rank(resources.get("allocated"), "allocated")
    up = {rank: cores - down.get(rank, set()) for rank, cores in every.items()}
    up = {rank: cores for rank, cores in up.items() if cores}
    free_cores = sum(len(cores - allocated.get(rank, set())) for rank, cores in up.items())
    free_nodes = sum(1 for rank, cores in up.items() if not cores & allocated.get(rank, set()))
    return NodeCounts(
        node_cores_free=free_cores,
        node_cores_up=sum(len(cores) for cores in up.values()),
        node_up_count=len(up),
        node_free_count=free_nodes,
    )


def known_nodes(resources: Mapping[str, Any]) -> int:
    """Nodes the scheduler knows (the ``all`` set, down nodes included): the widest job that can ever run."""
    return len(_cores_by_rank(resources.get("all"), "all"))


def jobspec_nodes(jobspec: Mapping[str, Any] | None) -> int:
    """Nodes a jobspec asks for: the count of its top-level ``node`` resource, else 1."""
    if not jobspec:
        return 1
    for resource in jobspec.get("resources") or ():
        if isinstance(resource, Mapping) and resource.get("type") == "node":
            count = resource.get("count", 1)
            if isinstance(count, Mapping):
                count = count.get("min", 1)
            return count if isinstance(count, int) and count >= 1 else 1
    return 1


def jobspec_user(jobspec: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The jobspec's ``attributes.user`` table (empty when absent)."""
    attributes = (jobspec or {}).get("attributes") or {}
    user = attributes.get("user") if isinstance(attributes, Mapping) else None
    return user if isinstance(user, Mapping) else {}


def jobspec_group(jobspec: Mapping[str, Any] | None) -> str:
    """The job group: ``attributes.user.group`` (set by the sidecar), else the command's first word."""
    group = jobspec_user(jobspec).get(GROUP_ATTRIBUTE)
    if isinstance(group, str) and group:
        return group
    for task in (jobspec or {}).get("tasks") or ():
        command = task.get("command") if isinstance(task, Mapping) else None
        if isinstance(command, list) and command:
            return str(command[0]).rsplit("/", 1)[-1]
    return ""


class JournalState:
    """The queue counts of one Flux instance, kept up to date from its job event journal.

    Feed it every journal record (:meth:`apply_record`) or event (:meth:`apply_event`) in order.
    Memory: one small entry per job not yet inactive, plus one set of indices per submit key.
    """

    def __init__(self) -> None:
        """Empty: no job seen, the replay of past jobs not finished."""
        self.replayed = False
        self.finished = 0
        self.failed = 0
        self.last_timestamp = 0.0
        self._jobs: dict[int, _Job] = {}
        self._states: Counter[JobState] = Counter()
        # Jobs waiting for nodes (sched, not held), in the order they became schedulable.
        self._waiting: dict[int, _Job] = {}
        self._waiting_by_nodes: Counter[int] = Counter()
        self._groups: dict[str, GroupTally] = {}
        self._keys: dict[str, set[int]] = {}

    # -- reading ---------------------------------------------------------------------------------

    def queue_counts(self) -> QueueCounts:
        """Jobs in each state."""
        return QueueCounts(**{state.value: self._states[state] for state in JobState})

    def waiting(self) -> dict[int, int]:
        """Jobs waiting for nodes by width (held jobs excluded)."""
        return {width: n for width, n in sorted(self._waiting_by_nodes.items()) if n}

    def next_jobs(self, limit: int = NEXT_JOBS) -> list[int]:
        """Widths of the first ``limit`` jobs waiting for nodes, in the order they became schedulable."""
        return [job.nodes for job in itertools.islice(self._waiting.values(), limit)]

    def pending_ids(self, group: str | None = None) -> list[int]:
        """Ids of the jobs not yet running (held ones included), of ``group`` or of every group; O(active jobs)."""
        before_run = (JobState.NEW, JobState.DEPEND, JobState.PRIORITY, JobState.SCHED)
        return [
            job_id
            for job_id, job in self._jobs.items()
            if job.state in before_run and (group is None or job.group == group)
        ]

    def status(self, nodes: NodeCounts, now: float, *, terminated: bool = False) -> StatusPayload:
        """The status payload: these counts with the instance's ``nodes`` at ``now`` (O(groups))."""
        return StatusPayload(
            nodes=nodes,
            queue=self.queue_counts(),
            waiting=self.waiting(),
            next_jobs=self.next_jobs(),
            counts={"waiting": len(self._waiting), "running": self._states[JobState.RUN]},
            metrics={},
            finished=self.finished,
            failed=self.failed,
            groups={name: group.stats() for name, group in self._groups.items()},
            time=now,
            terminated=terminated,
        )

    def key_indices(self, key: str) -> set[int]:
        """Indices (``attributes.user.ensemble_index``) of the jobs submitted with ``key`` seen so far."""
        return set(self._keys.get(key, ()))

    def note_submitted(self, key: str, index: int) -> None:
        """Remember that job ``index`` of ``key`` was submitted (before its journal record arrives)."""
        self._keys.setdefault(key, set()).add(index)

    # -- feeding ---------------------------------------------------------------------------------

    def apply_record(self, record: Mapping[str, Any]) -> None:
        """Apply one raw journal record (``{"id", "events", "jobspec"?, "R"?}``)."""
        job_id = record.get("id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise RecordError(f"id: must be a job id, got {job_id!r}")
        if job_id == SENTINEL_ID:
            self.replayed = True
            return
        events = record.get("events")
        if not isinstance(events, list):
            raise RecordError(f"events: job {job_id} has no list of events")
        for event in events:
            if not isinstance(event, Mapping) or not isinstance(event.get("name"), str):
                raise RecordError(f"events: job {job_id} has an event without a name")
            self.apply_event(
                job_id,
                event["name"],
                float(event.get("timestamp") or 0.0),
                event.get("context") or {},
                jobspec=record.get("jobspec"),
            )

    def apply_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """:meth:`apply_record` for each record, in order."""
        for record in records:
            self.apply_record(record)

    def apply_event(
        self,
        job_id: int,
        name: str,
        timestamp: float,
        context: Mapping[str, Any],
        *,
        jobspec: Mapping[str, Any] | None = None,
    ) -> None:
        """Apply one job event (as ``flux.job.JournalEvent`` carries it); events of unknown jobs are ignored.

        ``jobspec`` (given with ``submit``) provides the job's width, group and submit key.
        """
        if job_id == SENTINEL_ID:
            self.replayed = True
            return
        self.last_timestamp = max(self.last_timestamp, timestamp)
        if name == "submit":
            self._submit(job_id, timestamp, jobspec)
            return
        job = self._jobs.get(job_id)
        if job is None:
            return
        if name == "priority":
            job.held = context.get("priority") == 0
            target = JobState.SCHED if job.state is JobState.PRIORITY else job.state
            self._move(job_id, job, target)
        elif name == "exception" and context.get("severity") == 0:
            job.success = False
            if job.state is not JobState.INACTIVE and _ORDER.index(job.state) < _ORDER.index(JobState.CLEANUP):
                self._move(job_id, job, JobState.CLEANUP)
        elif name in _NEXT_STATE:
            if name == "finish" and context.get("status", 0) != 0:
                job.success = False
            if name == "invalidate":
                job.success = False
            if name == "alloc":
                job.t_run = timestamp
            self._move(job_id, job, _NEXT_STATE[name], timestamp)

    # -- internals -------------------------------------------------------------------------------

    def _submit(self, job_id: int, timestamp: float, jobspec: Mapping[str, Any] | None) -> None:
        if job_id in self._jobs:
            return
        job = _Job(nodes=jobspec_nodes(jobspec), group=jobspec_group(jobspec), t_submit=timestamp)
        self._jobs[job_id] = job
        self._states[JobState.NEW] += 1
        self._group(job.group).submitted += 1
        user = jobspec_user(jobspec)
        key, index = user.get(KEY_ATTRIBUTE), user.get(INDEX_ATTRIBUTE)
        if isinstance(key, str) and key and isinstance(index, int):
            self.note_submitted(key, index)

    def _move(self, job_id: int, job: _Job, state: JobState, timestamp: float = 0.0) -> None:
        was_waiting = job_id in self._waiting
        self._states[job.state] -= 1
        self._states[state] += 1
        job.state = state
        waits = state is JobState.SCHED and not job.held
        if was_waiting and not waits:
            del self._waiting[job_id]
            self._waiting_by_nodes[job.nodes] -= 1
        elif waits and not was_waiting:
            self._waiting[job_id] = job
            self._waiting_by_nodes[job.nodes] += 1
        if state is JobState.INACTIVE:
            del self._jobs[job_id]
            self.finished += 1
            if not job.success:
                self.failed += 1
            self._group(job.group).ended(
                success=job.success,
                run=timestamp - job.t_run if job.t_run is not None else None,
                wait=job.t_run - job.t_submit if job.t_run is not None else None,
            )

    def _group(self, name: str) -> GroupTally:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = GroupTally()
        return group


def job_info(entry: Mapping[str, Any]) -> JobInfo:
    """A job-list entry (``flux.job.job_list`` attributes) as ``jobinfo`` reports a job.

    ``state`` may be Flux's number or name; ``success`` is kept as Flux reports it (absent until
    the job is inactive). Raises :class:`RecordError` when ``id`` is missing.
    """
    job_id = entry.get("id")
    if not isinstance(job_id, int):
        raise RecordError(f"id: a job-list entry needs a job id, got {job_id!r}")
    state = entry.get("state")
    state_name = STATE_NAMES.get(state, "") if isinstance(state, int) else str(state or "").lower()
    if not state_name:
        state_name = "inactive" if entry.get("t_inactive") else ""
    returncode = entry.get("returncode")
    success = entry.get("success")

    def timestamp(field: str) -> float | None:
        value = entry.get(field)
        return float(value) if isinstance(value, int | float) and value > 0 else None

    return JobInfo(
        id=job_id,
        group=str(entry.get("name") or ""),
        command="",
        nodes=int(entry.get("nnodes") or 0),
        state=state_name,
        t_submit=timestamp("t_submit") or 0.0,
        t_run=timestamp("t_run"),
        t_inactive=timestamp("t_inactive"),
        returncode=returncode if isinstance(returncode, int) else None,
        success=success if isinstance(success, bool) else None,
    )
