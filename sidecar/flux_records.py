"""Flux's records translated into the sidecar's counts, and jobs into jobspecs: pure functions, no Flux needed.

The ``flux`` backend (:mod:`sidecar.flux`) only moves records between Flux and these functions:

* :class:`JournalState` keeps the queue counts and every job's record from the job manager's events
  journal (``job-manager.events-journal``): one record per job and event batch,
  ``{"id": jobid, "events": [...], "jobspec"?: {...}, "R"?: {...}}``; the record with id -1 is the
  sentinel ending the replay of past jobs. Each status is then O(groups), whatever the number of
  jobs, and Flux is never asked to list every job; ``jobinfo`` is answered from the same records.
* :func:`node_counts` turns the scheduler's resource sets (``resource.sched-status``: ``all`` /
  ``down`` / ``allocated``, Rv1) and the resource module's status (``resource.status``: ``online``,
  ``drain``) into the node and core counts of the ranks a member may use (its :class:`Partition`).
* :func:`build_jobspec` turns a job of a submit into a Flux jobspec (RFC 25, version 1): whole nodes
  (``exclusive``), the group as the job's name, an explicit environment.

Job states follow RFC 21: ``submit`` → new, ``validate`` → depend, ``depend`` → priority, the first
``priority`` → sched, ``alloc`` → run, ``finish`` or a fatal ``exception`` → cleanup, ``clean`` →
inactive; ``invalidate`` ends a job that failed validation. A job in sched whose priority is 0 is
held (urgency 0): Flux counts it in ``sched``, but it is not waiting for nodes, so it is left out of
``waiting`` and ``nextJobs``. A fatal exception of type :data:`~sidecar.backend.SHRINK_EXCEPTION` (raised by
the sidecar on a job still running on a rank it gave up, at the end of the shrink grace) makes the job
*lost*, with the exception's note as its reason.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ensemble_core.commands import command_argv, command_text
from ensemble_core.messages import JobSpec, NodeCounts, QueueCounts
from ensemble_core.wire import JobInfo, StatusPayload
from sidecar.backend import SHRINK_EXCEPTION
from sidecar.queue import (
    NEXT_JOBS,
    GroupTally,
    JobState,
    QueueError,
    job_command,
    job_environment_params,
    job_identity_environment,
    output_paths,
)

#: The journal's sentinel record id: the replay of past jobs ends here.
SENTINEL_ID = -1

#: Jobspec user attributes the sidecar sets on every job it submits.
GROUP_ATTRIBUTE = "group"
MEMBER_ATTRIBUTE = "ensemble_member"
KEY_ATTRIBUTE = "ensemble_key"
INDEX_ATTRIBUTE = "ensemble_index"
#: The job's index in its group and its attempt number (``JobSpec.start`` / ``attempt``).
JOB_INDEX_ATTRIBUTE = "ensemble_job"
ATTEMPT_ATTRIBUTE = "ensemble_attempt"
PARAMS_ATTRIBUTE = "ensemble_params"
#: Exception types that mean the job's node or shell went away (flux-core's job-exec raises
#: ``node-failure`` for a lost shell), and the type the sidecar raises on a job a shrink's grace ran out
#: on: the job is lost, not failed.
LOST_EXCEPTIONS = frozenset({"node-failure", "lost-shell", "ensemble-shrink"})

#: Every drain reason the sidecar writes starts with this, then the member's tag.
DRAIN_PREFIX = "ensemble-sidecar"

#: The oldest flux-core the backend works with: its events journal has the sentinel and
#: ``flux.job.JournalConsumer`` (NEWS.md, 0.68.0).
MINIMUM_FLUX = (0, 68, 0)

_NEXT_STATE = {
    "validate": JobState.DEPEND,
    "depend": JobState.PRIORITY,
    "alloc": JobState.RUN,
    "finish": JobState.CLEANUP,
    "clean": JobState.INACTIVE,
    "invalidate": JobState.INACTIVE,
}
_ORDER = list(JobState)
_BEFORE_RUN = (JobState.NEW, JobState.DEPEND, JobState.PRIORITY, JobState.SCHED)


class RecordError(ValueError):
    """A Flux record without a field the translation needs; the message names it."""


@dataclass(slots=True)
class _Job:
    """What the journal tells about one job of the member."""

    id: int
    nodes: int
    group: str
    t_submit: float
    command: str
    state: JobState = JobState.NEW
    held: bool = False
    t_run: float | None = None
    t_inactive: float | None = None
    success: bool = True
    returncode: int | None = None
    cancelled: bool = False
    index: int = 0
    attempt: int = 1
    lost: bool = False
    reason: str = ""
    end_seq: int = 0
    params: dict[str, str] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""

    def result(self) -> str:
        """How it ended (``succeeded``, ``failed``, ``lost``, ``cancelled``); empty while it has not."""
        if self.state is not JobState.INACTIVE:
            return ""
        if self.lost:
            return "lost"
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.success else "failed"

    def info(self) -> JobInfo:
        """This job as ``jobinfo`` reports it (``success`` and ``returncode`` once it is inactive)."""
        inactive = self.state is JobState.INACTIVE
        return JobInfo(
            id=self.id,
            group=self.group,
            command=self.command,
            nodes=self.nodes,
            state=self.state.value,
            t_submit=self.t_submit,
            t_run=self.t_run,
            t_inactive=self.t_inactive,
            returncode=self.returncode if inactive else None,
            success=self.success if inactive else None,
            index=self.index,
            attempt=self.attempt,
            result=self.result(),
            lost=self.lost,
            reason=self.reason,
            end_seq=self.end_seq,
            params=self.params,
            stdout=self.stdout,
            stderr=self.stderr,
        )


def expand_idset(text: str) -> list[int]:
    """The ids of an RFC 22 idset string (``"0-3,7"`` → ``[0, 1, 2, 3, 7]``); :class:`RecordError` if malformed."""
    ids: list[int] = []
    for part in text.strip().strip("[]").split(","):
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


def encode_idset(ids: Iterable[int]) -> str:
    """The RFC 22 string of ``ids`` with ranges (``[0, 1, 2, 5]`` → ``"0-2,5"``)."""
    ordered = sorted(set(ids))
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.88.0"``, ``"0.88.0-59-g4a5e79f56"`` → ``(0, 88, 0)``; :class:`RecordError` when it is not one."""
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if found is None:
        raise RecordError(f"version: {text!r} is not a flux-core version")
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


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


@dataclass(frozen=True, slots=True)
class Drains:
    """The drained ranks of an instance (``resource.status``'s ``drain``), and which of them a member drained."""

    ranks: frozenset[int] = frozenset()
    mine: frozenset[int] = frozenset()


def drains(status: Mapping[str, Any] | None, tag: str) -> Drains:
    """The drained ranks in ``resource.status`` and those whose reason is this member's (``drain_reason(tag)``)."""
    table = (status or {}).get("drain") or {}
    if not isinstance(table, Mapping):
        raise RecordError("drain: resource.status must map idsets to drain records")
    every: set[int] = set()
    mine: set[int] = set()
    prefix = drain_reason(tag, "")
    for idset, record in table.items():
        ranks = expand_idset(str(idset))
        every.update(ranks)
        reason = record.get("reason") if isinstance(record, Mapping) else None
        if isinstance(reason, str) and reason.startswith(prefix):
            mine.update(ranks)
    return Drains(frozenset(every), frozenset(mine))


def drain_times(status: Mapping[str, Any] | None, tag: str) -> dict[int, float]:
    """When each rank this member drained (``drain_reason(tag)``) was drained: ``resource.status``'s drain
    timestamps (unix seconds, which Flux rounds to whole seconds). A rank drained again keeps its first time."""
    table = (status or {}).get("drain") or {}
    if not isinstance(table, Mapping):
        raise RecordError("drain: resource.status must map idsets to drain records")
    prefix = drain_reason(tag, "")
    times: dict[int, float] = {}
    for idset, record in table.items():
        if not isinstance(record, Mapping) or not str(record.get("reason") or "").startswith(prefix):
            continue
        when = record.get("timestamp")
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise RecordError(f"drain.{idset}.timestamp: must be a number, got {when!r}")
        for rank in expand_idset(str(idset)):
            times[rank] = float(when)
    return times


def busy_ranks(
    ranks: Iterable[int], allocated: Mapping[int, set[int]], status: Mapping[str, Any] | None = None
) -> frozenset[int]:
    """Those of ``ranks`` with work on them: online (per ``resource.status``, when given) with a core allocated."""
    online = set(expand_idset(str(status.get("online") or ""))) if status is not None else None
    return frozenset(rank for rank in ranks if allocated.get(rank) and (online is None or rank in online))


def drain_reason(tag: str, why: str) -> str:
    """The reason the sidecar of member ``tag`` writes on the ranks it drains (found again by its prefix)."""
    return f"{DRAIN_PREFIX}[{tag}]: {why}"


@dataclass(frozen=True, slots=True)
class Partition:
    """The ranks a member may use, in the order they are given up: the highest go first (as the Flux
    Operator removes the highest indices when a MiniCluster shrinks)."""

    ranks: tuple[int, ...]

    @classmethod
    def of(cls, ranks: Iterable[int]) -> Partition:
        """The partition of ``ranks`` (sorted, without repeats)."""
        return cls(tuple(sorted(set(ranks))))

    def kept(self, size: int) -> frozenset[int]:
        """The ranks a member of ``size`` keeps: the lowest ``size``."""
        return frozenset(self.ranks[:size])

    def given_up(self, size: int) -> frozenset[int]:
        """The ranks a member of ``size`` drains: all but the lowest ``size``."""
        return frozenset(self.ranks[size:])

    def idset(self) -> str:
        """The partition as an RFC 22 idset string."""
        return encode_idset(self.ranks)


def node_counts(
    sched: Mapping[str, Any],
    status: Mapping[str, Any] | None = None,
    partition: Partition | None = None,
    allocated: Mapping[int, set[int]] | None = None,
) -> NodeCounts:
    """Node and core counts of the ``partition`` (default: every rank) from ``resource.sched-status``
    (``{"all", "down", "allocated"}``) and, when given, ``resource.status`` (``online``, ``drain``);
    ``allocated`` (rank → cores, e.g. :meth:`JournalState.allocated`) replaces the scheduler's.

    A rank is *up* when it is online and either not drained or still running work (a drained rank
    with a job is draining: it leaves when the job ends). It is *free* when it is up, not drained and
    none of its cores is allocated: jobs take whole nodes, so a node with one busy core cannot take a
    job (``flux resource list`` counts such a node as free; the sidecar does not). Without ``status``,
    up is every rank of ``all`` that is not ``down``.
    """
    every = _cores_by_rank(sched.get("all"), "all")
    down = _cores_by_rank(sched.get("down"), "down")
    if allocated is None:
        allocated = _cores_by_rank(sched.get("allocated"), "allocated")
    wanted = set(partition.ranks) if partition is not None else set(every)
    online = set(expand_idset(str(status.get("online") or ""))) if status is not None else set(every)
    drained = drains(status, "").ranks if status is not None else frozenset()
    up: dict[int, set[int]] = {}
    free_nodes = free_cores = 0
    for rank in sorted(wanted & set(every)):
        busy = allocated.get(rank, set())
        is_drained = rank in drained
        whole_rank_down = every[rank] <= down.get(rank, set())
        if rank not in online or (whole_rank_down and not is_drained) or (is_drained and not busy):
            continue  # offline, excluded or unresponsive; or drained and idle: gone
        usable = every[rank] if is_drained else every[rank] - down.get(rank, set())
        up[rank] = usable
        if is_drained:
            continue  # draining: its job goes on, nothing new starts there
        free_cores += len(usable - busy)
        if not usable & busy:
            free_nodes += 1
    return NodeCounts(
        node_cores_free=free_cores,
        node_cores_up=sum(len(cores) for cores in up.values()),
        node_up_count=len(up),
        node_free_count=free_nodes,
    )


def known_ranks(sched: Mapping[str, Any]) -> list[int]:
    """Every rank the scheduler knows (the ``all`` set, down ranks included), in order."""
    return sorted(_cores_by_rank(sched.get("all"), "all"))


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


def jobspec_command(jobspec: Mapping[str, Any] | None) -> list[str]:
    """The first task's command (empty when absent)."""
    for task in (jobspec or {}).get("tasks") or ():
        command = task.get("command") if isinstance(task, Mapping) else None
        if isinstance(command, list) and command:
            return [str(word) for word in command]
    return []


def jobspec_group(jobspec: Mapping[str, Any] | None) -> str:
    """The job group: ``attributes.user.group`` (set by the sidecar), else the command's first word."""
    group = jobspec_user(jobspec).get(GROUP_ATTRIBUTE)
    if isinstance(group, str) and group:
        return group
    command = jobspec_command(jobspec)
    return command[0].rsplit("/", 1)[-1] if command else ""


def returncode(waitstatus: int) -> int:
    """A job's return code from its ``finish`` status (a wait status), as ``flux jobs`` computes it:
    the exit code, or the negative signal number when the job shell was killed by a signal."""
    if os.WIFSIGNALED(waitstatus):
        return -os.WTERMSIG(waitstatus)
    if os.WIFEXITED(waitstatus):
        return os.WEXITSTATUS(waitstatus)
    return waitstatus


class JournalState:
    """The queue counts and job records of one member, kept up to date from its instance's events journal.

    Feed it every journal record (:meth:`apply_record`) or event (:meth:`apply_event`) in order. With
    a ``member`` tag only the jobs submitted for that member count (``attributes.user.ensemble_member``);
    without one, every job of the instance. Memory: one small record per job of the member, plus one
    set of indices per submit key.
    """

    def __init__(self, member: str = "") -> None:
        """Empty: no job seen, the replay of past jobs not finished."""
        self.member = member
        self.replayed = False
        self.finished = 0
        self.failed = 0
        self.lost = 0
        self.last_timestamp = 0.0
        self._jobs: dict[int, _Job] = {}
        self._active: dict[int, _Job] = {}
        self._states: Counter[JobState] = Counter()
        # Jobs waiting for nodes (sched, not held), in the order they became schedulable.
        self._waiting: dict[int, _Job] = {}
        self._waiting_by_nodes: Counter[int] = Counter()
        self._groups: dict[str, GroupTally] = {}
        self._keys: dict[str, set[int]] = {}
        #: Every (group, index, attempt) seen submitted: an attempt is sent to Flux once.
        self._attempts: set[tuple[str, int, int]] = set()
        #: Per group, the next index a job submitted without ``start`` gets.
        self.next_index: dict[str, int] = {}
        #: The member's jobs in the order they became inactive.
        self._ended: list[_Job] = []
        # Cores held by every job of the instance (any member's), from alloc until free: rank → core → jobs.
        self._holding: dict[int, dict[int, set[int]]] = {}
        self._held: dict[int, dict[int, Counter[int]]] = {}

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
        return [
            job_id
            for job_id, job in self._active.items()
            if job.state in _BEFORE_RUN and (group is None or job.group == group)
        ]

    def active_ids(self, group: str) -> list[int]:
        """Ids of the jobs of ``group`` not yet finished (waiting or running); O(active jobs)."""
        return [
            job_id
            for job_id, job in self._active.items()
            if job.group == group and job.state not in (JobState.CLEANUP, JobState.INACTIVE)
        ]

    def running_on(self, ranks: Iterable[int]) -> list[int]:
        """Ids of the member's running jobs not yet lost that hold a core of one of ``ranks`` (O(active jobs))."""
        wanted = set(ranks)
        return [
            job_id
            for job_id, job in self._active.items()
            if job.state is JobState.RUN and not job.lost and wanted & set(self._holding.get(job_id, ()))
        ]

    def job(self, job_id: int) -> JobInfo | None:
        """The record of one job of the member, or None."""
        job = self._jobs.get(job_id)
        return job.info() if job is not None else None

    def recent(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs of the member, oldest first (journal order)."""
        newest = list(itertools.islice(reversed(self._jobs.values()), limit)) if limit > 0 else []
        return [job.info() for job in reversed(newest)]

    def page(self, offset: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` jobs of the member in submit (journal) order, from the ``offset``-th."""
        return [job.info() for job in itertools.islice(self._jobs.values(), offset, offset + limit)]

    def status(
        self,
        nodes: NodeCounts,
        now: float,
        *,
        size: int | None = None,
        terminated: bool = False,
        draining: int | None = None,
        instance: str = "",
    ) -> StatusPayload:
        """The status payload: these counts with the instance's ``nodes`` at ``now`` (O(groups)); ``draining``:
        the given-up ranks still busy."""
        counts = {"waiting": len(self._waiting), "running": self._states[JobState.RUN]}
        if self.lost:
            counts["lost"] = self.lost
        return StatusPayload(
            nodes=nodes,
            queue=self.queue_counts(),
            waiting=self.waiting(),
            next_jobs=self.next_jobs(),
            counts=counts,
            metrics={},
            size=size,
            finished=self.finished,
            failed=self.failed,
            groups={name: group.stats(now) for name, group in self._groups.items()},
            time=now,
            terminated=terminated,
            draining=draining,
            instance=instance,
        )

    def allocated(self) -> dict[int, set[int]]:
        """The cores each rank has allocated to a job now (any job of the instance), from the journal:
        consistent with the job states at every instant, unlike a separate resource query."""
        return {rank: {core for core, jobs in cores.items() if jobs} for rank, cores in self._held.items()}

    @property
    def ended_count(self) -> int:
        """How many of the member's jobs have ended."""
        return len(self._ended)

    def ended(self, after: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` of the member's jobs in the order they ended, after the ``after``-th."""
        return [job.info() for job in self._ended[after : after + limit]]

    def has_attempt(self, group: str, index: int, attempt: int) -> bool:
        """Whether this attempt of the job was submitted already."""
        return (group, index, attempt) in self._attempts

    def note_attempt(self, group: str, index: int, attempt: int) -> None:
        """Remember an attempt as submitted (before its journal record arrives)."""
        self._attempts.add((group, index, attempt))
        if index >= self.next_index.get(group, 0):
            self.next_index[group] = index + 1

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
                resources=record.get("R"),
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
        resources: Mapping[str, Any] | None = None,
    ) -> None:
        """Apply one job event; events of jobs not seen submitted (or of other members) change no count.

        ``jobspec`` (given with ``submit``) provides the job's width, group, member and submit key;
        ``resources`` (the R given with ``alloc``) the cores it holds until ``free``, whoever's job it is.
        """
        if job_id == SENTINEL_ID:
            self.replayed = True
            return
        self.last_timestamp = max(self.last_timestamp, timestamp)
        if name == "alloc" and resources is not None:
            self._hold(job_id, resources)
        elif name in ("free", "clean"):
            self._release(job_id)
        if name == "submit":
            self._submit(job_id, timestamp, jobspec)
            return
        job = self._active.get(job_id)
        if job is None:
            return
        if name == "priority":
            job.held = context.get("priority") == 0
            target = JobState.SCHED if job.state is JobState.PRIORITY else job.state
            self._move(job, target)
        elif name == "exception" and context.get("severity") == 0:
            job.success = False
            kind = str(context.get("type") or "")
            job.cancelled = job.cancelled or kind == "cancel"
            if kind == SHRINK_EXCEPTION and not job.lost:
                job.lost, job.reason = True, str(context.get("note") or "")
                self.lost += 1
            elif kind in LOST_EXCEPTIONS and not job.lost:
                job.lost, job.reason = True, f"lost: {kind}: {context.get('note') or 'no note'}"
                self.lost += 1
            elif not job.reason:
                job.reason = f"{kind}: {context.get('note') or 'no note'}"
            if _ORDER.index(job.state) < _ORDER.index(JobState.CLEANUP):
                self._move(job, JobState.CLEANUP)
        elif name in _NEXT_STATE:
            if name == "finish":
                status = context.get("status", 0)
                code = returncode(status) if isinstance(status, int) else 1
                job.returncode = code
                if code != 0:
                    job.success = False
            if name == "invalidate":
                job.success = False
            if name == "alloc":
                job.t_run = timestamp
                self._group(job.group).left_queue(job.id, timestamp - job.t_submit)
            self._move(job, _NEXT_STATE[name], timestamp)

    # -- internals -------------------------------------------------------------------------------

    def _submit(self, job_id: int, timestamp: float, jobspec: Mapping[str, Any] | None) -> None:
        if job_id in self._jobs:
            return
        user = jobspec_user(jobspec)
        if self.member and user.get(MEMBER_ATTRIBUTE) != self.member:
            return
        job = _Job(
            id=job_id,
            nodes=jobspec_nodes(jobspec),
            group=jobspec_group(jobspec),
            t_submit=timestamp,
            command=command_text(jobspec_command(jobspec)),
        )
        self._jobs[job_id] = self._active[job_id] = job
        self._states[JobState.NEW] += 1
        tally = self._group(job.group)
        tally.submitted += 1
        tally.queued(job_id, timestamp)
        job_index, attempt = user.get(JOB_INDEX_ATTRIBUTE), user.get(ATTEMPT_ATTRIBUTE)
        if isinstance(job_index, int) and not isinstance(job_index, bool) and job_index >= 0:
            job.index = job_index
        if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1:
            job.attempt = attempt
        output = (((jobspec or {}).get("attributes") or {}).get("system") or {}).get("shell") or {}
        streams = (output.get("options") or {}).get("output") if isinstance(output, Mapping) else None
        if isinstance(streams, Mapping):
            for name in ("stdout", "stderr"):
                stream = streams.get(name)
                if isinstance(stream, Mapping) and isinstance(stream.get("path"), str):
                    setattr(job, name, stream["path"])
        params = user.get(PARAMS_ATTRIBUTE)
        if isinstance(params, Mapping):
            job.params = {str(name): str(value) for name, value in params.items()}
        self.note_attempt(job.group, job.index, job.attempt)
        key, index = user.get(KEY_ATTRIBUTE), user.get(INDEX_ATTRIBUTE)
        if isinstance(key, str) and key and isinstance(index, int):
            self.note_submitted(key, index)

    def _move(self, job: _Job, state: JobState, timestamp: float = 0.0) -> None:
        was_waiting = job.id in self._waiting
        self._states[job.state] -= 1
        self._states[state] += 1
        job.state = state
        waits = state is JobState.SCHED and not job.held
        if was_waiting and not waits:
            del self._waiting[job.id]
            self._waiting_by_nodes[job.nodes] -= 1
        elif waits and not was_waiting:
            self._waiting[job.id] = job
            self._waiting_by_nodes[job.nodes] += 1
        if state is JobState.INACTIVE:
            del self._active[job.id]
            job.t_inactive = timestamp
            if job.returncode is None and not job.success:
                # ended before it ran (or without a finish): Flux's convention, -128 for a cancel
                job.returncode = -128 if job.cancelled else 1
            self.finished += 1
            self._ended.append(job)
            job.end_seq = len(self._ended)
            if not job.success:
                self.failed += 1
            group = self._group(job.group)
            if job.t_run is None:
                group.left_queue(job.id, None)
            group.ended(
                success=job.success,
                run=timestamp - job.t_run if job.t_run is not None else None,
                wait=job.t_run - job.t_submit if job.t_run is not None else None,
                cancelled=job.cancelled,
            )

    def _hold(self, job_id: int, resources: Mapping[str, Any]) -> None:
        if job_id in self._holding:
            return
        cores = _cores_by_rank(resources, "R")
        self._holding[job_id] = cores
        for rank, ids in cores.items():
            held = self._held.setdefault(rank, {})
            for core in ids:
                held.setdefault(core, Counter())[job_id] += 1

    def _release(self, job_id: int) -> None:
        for rank, ids in self._holding.pop(job_id, {}).items():
            held = self._held.get(rank, {})
            for core in ids:
                jobs = held.get(core)
                if jobs is not None:
                    del jobs[job_id]
                    if not jobs:
                        del held[core]
            if not held:
                self._held.pop(rank, None)

    def _group(self, name: str) -> GroupTally:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = GroupTally()
        return group


@dataclass(frozen=True, slots=True)
class JobTemplate:
    """What every jobspec of one sidecar shares: its environment, default working directory, member tag
    and the ranks its jobs may run on (None: any rank of the instance)."""

    environment: Mapping[str, str]
    workdir: str = ""
    member: str = ""
    ranks: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: where each attempt's stdout and stderr go (``sidecar.queue.output_paths``); empty: Flux's KVS only
    output_dir: str = ""


def build_jobspec(
    spec: JobSpec,
    template: JobTemplate,
    *,
    key: str = "",
    index: int = 0,
    job_index: int = 0,
    params: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The RFC 25 (version 1) jobspec of one job of ``spec``: ``spec.nodes`` whole nodes (``exclusive``),
    ``spec.tasks`` tasks spread over them (one per node when 0), the group as the job's name, the
    template's environment, and the user attributes the journal reads back (group, member, key, index
    in the submit, the job's index in its group, its attempt and its parameters).

    The command is :func:`~ensemble_core.commands.command_argv`'s: through ``/bin/sh -c`` when it uses
    shell syntax, else its words (the local backend's rule). Raises :class:`QueueError` naming the field
    when the command cannot be split into arguments.
    """
    params = dict(params or {})
    try:
        command = command_argv(job_command(spec, params))
    except ValueError as exc:
        raise QueueError(f"command: cannot be split into arguments: {exc}") from None
    if not command:
        raise QueueError("command: must not be empty")
    nodes = spec.nodes
    tasks = max(spec.tasks, nodes)
    per_node = math.ceil(tasks / nodes)
    count: dict[str, int] = {"per_slot": 1} if per_node * nodes == tasks else {"total": tasks}
    system: dict[str, Any] = {
        "duration": spec.duration,
        "environment": {
            **template.environment,
            **job_identity_environment(spec.name, job_index, spec.attempt),
            **job_environment_params(params),
        },
        "job": {"name": spec.name},
    }
    workdir = spec.workdir or template.workdir
    if workdir:
        system["cwd"] = workdir
    if template.output_dir:
        stdout, stderr = output_paths(template.output_dir, spec.name, job_index, spec.attempt)
        system["shell"] = {
            "options": {
                "output": {"stdout": {"type": "file", "path": stdout}, "stderr": {"type": "file", "path": stderr}}
            }
        }
    if template.ranks is not None:
        system["constraints"] = {"ranks": [template.ranks]}
    user: dict[str, Any] = {
        GROUP_ATTRIBUTE: spec.name,
        **template.extra,
        JOB_INDEX_ATTRIBUTE: job_index,
        ATTEMPT_ATTRIBUTE: spec.attempt,
    }
    if params:
        user[PARAMS_ATTRIBUTE] = params
    if template.member:
        user[MEMBER_ATTRIBUTE] = template.member
    if key:
        user[KEY_ATTRIBUTE] = key
        user[INDEX_ATTRIBUTE] = index
    return {
        "version": 1,
        "resources": [
            {
                "type": "node",
                "count": nodes,
                "exclusive": True,
                "with": [{"type": "slot", "count": per_node, "label": "task", "with": [{"type": "core", "count": 1}]}],
            }
        ],
        "tasks": [{"command": command, "slot": "task", "count": count}],
        "attributes": {"system": system, "user": user},
    }


def version_problem(version: str) -> str | None:
    """Why this flux-core is too old for the sidecar, or None when it will do."""
    found = parse_version(version)
    if found < MINIMUM_FLUX:
        wanted = ".".join(map(str, MINIMUM_FLUX))
        return (
            f"flux-core {version} is too old: the sidecar needs {wanted} or newer (its job-manager events "
            "journal with the end-of-replay sentinel, as flux.job.JournalConsumer uses it, came in 0.68.0)"
        )
    return None


def ranks_of(text: str, known: Sequence[int]) -> Partition:
    """The partition an idset names, checked against the instance's ranks; :class:`QueueError` naming ``ranks``."""
    try:
        ranks = expand_idset(text)
    except RecordError as exc:
        raise QueueError(f"ranks: {exc}") from None
    if not ranks:
        raise QueueError(f"ranks: {text!r} names no rank")
    unknown = sorted(set(ranks) - set(known))
    if unknown:
        raise QueueError(
            f"ranks: {encode_idset(unknown)} not in this Flux instance (its ranks are {encode_idset(known)})"
        )
    return Partition.of(ranks)
