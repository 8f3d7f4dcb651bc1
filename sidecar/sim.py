"""The ``sim`` backend: the queue model of :mod:`sidecar.queue` on a virtual clock.

Nothing runs: a job's run time is known when it is submitted, and time moves only when the caller
moves it. Two ways to drive it:

* :class:`SimQueue` — synchronous, for a simulator in the same process. ``advance(to)`` processes
  every event (job ends, nodes coming up) up to virtual time ``to`` in time order; the other
  methods (submit, grow, shrink, cancel, terminate, status, ...) act at the current virtual time.
* :class:`SimBackend` — the same queue behind the gRPC server, its virtual clock following wall
  time times ``speed`` (``ensemble sidecar --backend sim --speed X``).

Run times
---------
Without a trace, a job runs for its ``duration`` seconds and succeeds; a job without a duration
runs for ``default_duration`` when one is set and is refused otherwise (``jobs[i].duration``).

With a :class:`Trace` (recorded Flux job records), each job's run time and success come from the
trace, chosen when the job is submitted:

1. the k-th job submitted of group *g* and width *n* gets the k-th record named *g* of width *n*,
   in trace order (so submitting a trace's own jobs, e.g. :meth:`Trace.job_specs`, replays it);
2. if the trace has no record named *g*, the k-th job of width *n* gets the k-th record of width *n*
   whatever its name (the recorded name is often the executable, e.g. ``lmp``);
3. if the trace has no record of width *n*, the k-th such job gets the k-th record of any width;
4. once a pool's records are used up, further jobs draw from it at random with the queue's seed.

A job's non-zero ``duration`` stays what it is in Flux, a time limit: a trace run time above it is
cut to it, and the job fails as if Flux had killed it.

Nodes
-----
A grow requests nodes at once; each new node comes up after its own provisioning delay, a
constant or drawn (with the seed) from a list of delays, e.g. the 30 to 150 s seen on GKE.
Terminating drops the nodes still being provisioned. Everything is deterministic for a seed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ensemble_core.messages import JobSpec
from ensemble_core.wire import EndedResult, JobInfo, ResizeResult, StatusPayload, SubmitPayload, SubmitResult
from sidecar.backend import Listeners
from sidecar.queue import Queue, QueueError

log = logging.getLogger(__name__)

#: Return code of a job cut at its time limit (a process killed by SIGKILL, as the local backend reports it).
KILLED = -9
#: Return code of a running job that was cancelled (SIGTERM, as the local backend's).
CANCELLED = -15

_T = TypeVar("_T")

_FINISH = 0
_NODE_UP = 1


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the line and field."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One recorded job: its name, width, run time (``t_inactive - t_run``) and success."""

    name: str
    nodes: int
    run_time: float
    success: bool


def parse_trace(text: str, source: str = "trace") -> list[TraceJob]:
    """Read Flux job records: JSON Lines (one record a line) or a ``{"jobs": [...]}`` dump.

    Each record needs ``nnodes``, ``t_run`` and ``t_inactive``; ``success`` (default true) and
    ``name`` (default ``""``) are optional, other fields are ignored. Records of jobs that never
    ran (no ``t_run``, or 0) are skipped. Raises :class:`TraceError` naming ``source``, the record
    and the field for anything else, or when no record is left.
    """
    records: list[tuple[str, Any]]
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # not one JSON document: JSON Lines
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TraceError(f"{source}: line {number}: not valid JSON: {exc}") from None
    if isinstance(document, dict) and "jobs" in document:
        if not isinstance(document["jobs"], list):
            raise TraceError(f"{source}: jobs: must be a list of job records")
        records = [(f"jobs[{i}]", record) for i, record in enumerate(document["jobs"])]
    elif document is not None:
        records = [("line 1", document)]
    jobs = [job for where, record in records if (job := _trace_job(record, f"{source}: {where}")) is not None]
    if not jobs:
        raise TraceError(f"{source}: no job that ran (records need nnodes, t_run and t_inactive)")
    return jobs


def _trace_job(record: Any, where: str) -> TraceJob | None:
    if not isinstance(record, dict):
        raise TraceError(f"{where}: must be a JSON object (a Flux job record)")

    def number(field: str) -> float | None:
        value = record.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TraceError(f"{where}: {field}: must be a number, got {value!r}")
        return float(value)

    nnodes, t_run, t_inactive = number("nnodes"), number("t_run"), number("t_inactive")
    if not t_run:
        return None
    if nnodes is None or nnodes < 1 or nnodes != int(nnodes):
        raise TraceError(f"{where}: nnodes: must be a whole number >= 1, got {record.get('nnodes')!r}")
    if t_inactive is None or t_inactive < t_run:
        raise TraceError(f"{where}: t_inactive: must be a time at or after t_run ({t_run}), got {t_inactive!r}")
    success = record.get("success", True)
    if not isinstance(success, bool):
        raise TraceError(f"{where}: success: must be true or false, got {success!r}")
    name = record.get("name", "")
    return TraceJob(
        name=name if isinstance(name, str) else str(name),
        nodes=int(nnodes),
        run_time=t_inactive - t_run,
        success=success,
    )


def load_trace(path: str | Path) -> list[TraceJob]:
    """:func:`parse_trace` of a file; :class:`TraceError` (naming the file) if it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    return parse_trace(text, str(path))


class Trace:
    """Run times for submitted jobs, taken from recorded jobs (see the module docstring for the rules)."""

    def __init__(self, jobs: Sequence[TraceJob], seed: int = 0) -> None:
        """``seed`` drives the draws once a pool's records are used up."""
        if not jobs:
            raise TraceError("trace: has no jobs")
        self.jobs = list(jobs)
        self._rng = random.Random(f"trace:{seed}")
        self._names = {job.name for job in self.jobs}
        self._pools: dict[tuple[str | None, int | None], list[TraceJob]] = {}
        self._used: dict[tuple[str | None, int | None], int] = {}
        for job in self.jobs:
            for key in ((job.name, job.nodes), (None, job.nodes), (None, None)):
                self._pools.setdefault(key, []).append(job)

    def draw(self, group: str, nodes: int) -> TraceJob:
        """The record for the next submitted job of ``group`` and width ``nodes``."""
        key: tuple[str | None, int | None] = (group, nodes) if group in self._names else (None, nodes)
        if key not in self._pools:
            key = (None, None) if (None, nodes) not in self._pools else (None, nodes)
        pool = self._pools[key]
        used = self._used.get(key, 0)
        self._used[key] = used + 1
        return pool[used] if used < len(pool) else self._rng.choice(pool)

    def job_specs(self, command: str = "true") -> list[JobSpec]:
        """The trace's own jobs as job groups in trace order (consecutive equal jobs share a ``count``)."""
        specs: list[JobSpec] = []
        for job in self.jobs:
            name = job.name or f"nodes-{job.nodes}"
            if specs and (specs[-1].name, specs[-1].nodes) == (name, job.nodes):
                specs[-1].count += 1
            else:
                specs.append(JobSpec(name=name, command=command, nodes=job.nodes))
        return specs


@dataclass(frozen=True, slots=True)
class _Plan:
    run_time: float
    returncode: int
    output: str


class SimQueue:
    """A member's queue and nodes on a virtual clock, driven synchronously (see the module docstring).

    Every method acts at :attr:`now`; only :meth:`advance` moves it. Methods raise
    :class:`~sidecar.queue.QueueError` (message naming the field) for requests they refuse and
    :class:`~sidecar.queue.QueueTerminated` once terminated, like the local backend.
    """

    def __init__(
        self,
        *,
        nodes: int = 1,
        cores: int = 1,
        max_nodes: int | None = None,
        provision_delay: float | Sequence[float] = 0.0,
        trace: Trace | Sequence[TraceJob] | None = None,
        default_duration: float | None = None,
        seed: int = 0,
        start: float = 0.0,
        provisioner: Callable[[float, int], list[float | None]] | None = None,
    ) -> None:
        """A queue of ``nodes`` nodes (``cores`` each, growable to ``max_nodes``) at virtual time ``start``.

        ``provision_delay``: seconds from a grow to each new node being up, a constant or a list to
        draw from. ``trace``: recorded jobs giving run times. ``default_duration``: run time of a job
        without a duration when there is no trace. ``seed``: every random choice. ``provisioner``:
        when given, it decides the delays instead (``provisioner(now, count)``: one delay per new
        node, ``None`` for a node that has no room yet and is brought up later with :meth:`node_up_at`),
        as a cluster of VMs shared by several queues does.
        """
        delays = [float(provision_delay)] if isinstance(provision_delay, int | float) else list(provision_delay)
        if not delays:
            raise QueueError("provision_delay: the list of delays is empty")
        if any(not math.isfinite(d) or d < 0 for d in delays):
            raise QueueError(f"provision_delay: every delay must be a finite number >= 0, got {delays}")
        if default_duration is not None and not (math.isfinite(default_duration) and default_duration >= 0):
            raise QueueError(f"default_duration: must be a finite number >= 0, got {default_duration}")
        self.queue = Queue(nodes=nodes, cores=cores, max_nodes=max_nodes)
        self.now = float(start)
        self.trace = trace if isinstance(trace, Trace) or trace is None else Trace(trace, seed)
        self.default_duration = default_duration
        self._delays = delays
        self._delay_rng = random.Random(f"provision:{seed}")
        self._provisioner = provisioner
        self._plans: dict[int, _Plan] = {}
        self._events: list[tuple[float, int, int, int]] = []
        self._seq = itertools.count()

    # -- the clock -------------------------------------------------------------------------------

    def next_event_time(self) -> float | None:
        """Virtual time of the next job end or node coming up, or ``None`` when nothing is pending."""
        return self._events[0][0] if self._events else None

    def advance(self, to: float) -> int:
        """Process every event up to virtual time ``to`` (inclusive) in time order; set :attr:`now` to ``to``.

        Each job end frees its nodes and each node that comes up takes work at once, so jobs that
        start and end before ``to`` are processed too. Returns how many events were processed.
        Raises :class:`QueueError` if ``to`` is before :attr:`now`.
        """
        if not to >= self.now:
            raise QueueError(f"to: {to} is before the virtual clock ({self.now}); time only moves forward")
        processed = 0
        while self._events and self._events[0][0] <= to:
            at, _, kind, value = heapq.heappop(self._events)
            self.now = at
            if kind == _FINISH:
                plan = self._plans.pop(value)
                self.queue.finish(value, at, plan.returncode, plan.output)
            else:
                self.queue.nodes_ready(value)
            self._start()
            processed += 1
        self.now = to
        return processed

    def node_up_at(self, at: float) -> None:
        """Bring one requested node up at virtual time ``at`` (now, if ``at`` has passed): a node a
        ``provisioner`` deferred, once the cluster has room for it."""
        heapq.heappush(self._events, (max(at, self.now), next(self._seq), _NODE_UP, 1))

    def run_until_idle(self, limit: float = math.inf) -> float:
        """Advance event by event until nothing is pending (or the next event is past ``limit``); return :attr:`now`."""
        while (at := self.next_event_time()) is not None and at <= limit:
            self.advance(at)
        return self.now

    # -- the backend's operations, at virtual time now --------------------------------------------

    def status(self) -> StatusPayload:
        """A snapshot of the queue and nodes at :attr:`now` (O(groups), whatever the number of jobs)."""
        return self.queue.status(self.now)

    def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Queue the jobs, fix their run times and start what fits; idempotent on ``payload.key``."""
        if self.trace is None and self.default_duration is None:
            for i, spec in enumerate(payload.jobs):
                if spec.duration <= 0 and spec.count > 0:
                    raise QueueError(
                        f"jobs[{i}].duration: the sim backend runs a job for its duration; set one, "
                        "attach a trace (--trace) or set a default duration (--default-duration)"
                    )
        result = self.queue.submit(payload.jobs, self.now, order=payload.order, seed=payload.seed, key=payload.key)
        if not result.duplicate:
            for job in self.queue.recent(result.submitted):
                self._plans[job.id] = self._plan(job.group, job.nodes, job.duration)
            self._start()
        return result

    def job_info(self, job_id: int) -> JobInfo:
        """One job by id; :class:`QueueError` naming ``id`` if there is none."""
        job = self.queue.job(job_id)
        if job is None:
            raise QueueError(f"id: no job with id {job_id}")
        return job.info()

    def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs, oldest first."""
        return [job.info() for job in self.queue.recent(limit)]

    def job_page(self, offset: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` jobs in submit order, from the ``offset``-th."""
        return [job.info() for job in self.queue.page(offset, limit)]

    def ended(self, after: int, limit: int) -> EndedResult:
        """At most ``limit`` jobs in the order they ended, after the ``after``-th."""
        jobs = [job.info() for job in self.queue.ended(after, limit)]
        return EndedResult(instance=self.queue.instance, jobs=jobs, ended=self.queue.ended_count)

    def grow(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (>= the current size); each new node comes up after its provisioning delay."""
        self._provision(self.queue.grow(size))
        return self._resized()

    def shrink(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (<= the current size): free nodes go now, busy ones when their jobs end."""
        self._provision(self.queue.shrink(size))
        return self._resized()

    def cancel(self, group: str) -> int:
        """Cancel the jobs of ``group`` that have not finished (running ones end now, failed); return how many."""
        cancelled = self.queue.cancel(group, self.now)
        running = {job.id for job in self.queue.running_jobs(group)}
        if running:
            self._events = [event for event in self._events if not (event[2] == _FINISH and event[3] in running)]
            heapq.heapify(self._events)
            for job_id in sorted(running):
                self._plans.pop(job_id, None)
                self.queue.finish(job_id, self.now, CANCELLED, "sim: cancelled\n")
        if cancelled or running:
            self._start()
        return cancelled + len(running)

    def terminate(self) -> ResizeResult:
        """Stop placing work and drop the nodes still being provisioned; nodes go as running jobs end."""
        self.queue.terminate()
        self._events = [event for event in self._events if event[2] != _NODE_UP]
        heapq.heapify(self._events)
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)

    # -- internals -------------------------------------------------------------------------------

    def _plan(self, group: str, nodes: int, limit: int) -> _Plan:
        if self.trace is None:
            return _Plan(float(limit) if limit > 0 else self.default_duration or 0.0, 0, "")
        record = self.trace.draw(group, nodes)
        if limit > 0 and record.run_time > limit:
            return _Plan(float(limit), KILLED, f"sim: killed after its duration of {limit} s\n")
        return _Plan(record.run_time, 0 if record.success else 1, "")

    def _start(self) -> None:
        for job in self.queue.schedule(self.now):
            plan = self._plans[job.id]
            heapq.heappush(self._events, (self.now + plan.run_time, next(self._seq), _FINISH, job.id))

    def _provision(self, count: int) -> None:
        if count <= 0:
            return
        if self._provisioner is not None:
            delays = self._provisioner(self.now, count)
        else:
            delays = [
                self._delays[0] if len(self._delays) == 1 else self._delay_rng.choice(self._delays)
                for _ in range(count)
            ]
        for delay in delays:
            if delay is None:
                continue
            if delay <= 0:
                self.queue.nodes_ready(1)
            else:
                heapq.heappush(self._events, (self.now + delay, next(self._seq), _NODE_UP, 1))
        self._start()

    def _resized(self) -> ResizeResult:
        self._start()
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)


class SimBackend(Listeners):
    """A :class:`SimQueue` behind the gRPC server: virtual time = ``start`` + wall seconds elapsed * ``speed``.

    Create it inside a running event loop. Every call first catches the queue up with the clock;
    a timer of the loop wakes at the next event, so watchers see job ends as they happen.
    """

    def __init__(self, sim: SimQueue, *, speed: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        """Drive ``sim`` from now on; its clock starts at its current :attr:`SimQueue.now`."""
        if not (math.isfinite(speed) and speed > 0):
            raise QueueError(f"speed: must be a finite number > 0, got {speed}")
        self.sim = sim
        self.speed = speed
        self._clock = clock
        self._origin = (clock(), sim.now)
        super().__init__()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def virtual_now(self) -> float:
        """The virtual time the wall clock corresponds to now."""
        wall, virtual = self._origin
        return max(self.sim.now, virtual + (self._clock() - wall) * self.speed)

    def status(self) -> StatusPayload:
        """A snapshot at the current virtual time."""
        self._catch_up()
        return self.sim.status()

    async def submit(self, payload: SubmitPayload) -> SubmitResult:
        """:meth:`SimQueue.submit` at the current virtual time."""
        return self._change(lambda: self.sim.submit(payload))

    async def job_info(self, job_id: int) -> JobInfo:
        """:meth:`SimQueue.job_info` at the current virtual time."""
        self._catch_up()
        return self.sim.job_info(job_id)

    async def recent_jobs(self, limit: int) -> list[JobInfo]:
        """:meth:`SimQueue.recent_jobs` at the current virtual time."""
        self._catch_up()
        return self.sim.recent_jobs(limit)

    async def job_page(self, offset: int, limit: int) -> list[JobInfo]:
        """:meth:`SimQueue.job_page` at the current virtual time."""
        self._catch_up()
        return self.sim.job_page(offset, limit)

    async def ended(self, after: int, limit: int) -> EndedResult:
        """:meth:`SimQueue.ended` at the current virtual time."""
        self._catch_up()
        return self.sim.ended(after, limit)

    async def grow(self, size: int) -> ResizeResult:
        """:meth:`SimQueue.grow` at the current virtual time."""
        return self._change(lambda: self.sim.grow(size))

    async def shrink(self, size: int) -> ResizeResult:
        """:meth:`SimQueue.shrink` at the current virtual time."""
        return self._change(lambda: self.sim.shrink(size))

    async def cancel(self, group: str) -> int:
        """:meth:`SimQueue.cancel` at the current virtual time."""
        return self._change(lambda: self.sim.cancel(group))

    async def terminate(self) -> ResizeResult:
        """:meth:`SimQueue.terminate` at the current virtual time."""
        return self._change(self.sim.terminate)

    async def aclose(self) -> None:
        """Stop the timer; the virtual clock stops with it."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _change(self, action: Callable[[], _T]) -> _T:
        self._catch_up()
        result = action()
        self._arm()
        self._notify()
        return result

    def _catch_up(self) -> None:
        if self.sim.advance(self.virtual_now()):
            self._arm()
            self._notify()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.sim.next_event_time()
        if at is None or self._closed:
            return
        delay = max(0.0, (at - self.virtual_now()) / self.speed)
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._catch_up()
        if self._timer is None:
            self._arm()
