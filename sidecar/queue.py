"""A pure model of one job queue on a set of identical nodes: the sidecar's functional core.

No I/O and no clock: every operation that needs the time takes ``now`` (seconds) from the caller,
and every operation returns what the caller has to act on (e.g. the jobs to start). The local
backend drives it with real subprocesses; a simulated backend can drive it with simulated time.

Model
-----
* ``nodes_up`` virtual nodes of ``cores`` cores each. A job takes ``nodes`` whole nodes while it runs.
* Jobs follow Flux's states: ``new → depend → priority → sched → run → cleanup → inactive``. Nothing
  here holds a job in ``new``/``depend``/``priority`` or ``cleanup``, so a job passes through them
  within the operation that reaches them; a job waiting for nodes sits in ``sched``.
* Scheduling is first-come, first-served like Flux's default policy (``sched-simple``, ``fcfs``):
  jobs start in queue order, and when the job at the head of the queue does not fit in the free
  nodes it blocks every job behind it, even jobs that would fit (no backfill). A job wider than the
  size currently requested therefore waits until the queue grows.
* Resizing: ``size`` is the number of nodes requested, ``nodes_up`` the number actually up. Growing
  raises ``size`` at once; the caller brings nodes up with :meth:`Queue.nodes_ready` (immediately
  or after a provisioning delay). Shrinking removes free nodes at once; busy nodes beyond the target
  are drained: no new work is placed on them (there are no free nodes while ``nodes_up > size``)
  and they are removed as their jobs end. Running work is never killed.
* :meth:`Queue.terminate` stops placing work and sets the size to 0; the nodes go away as the
  running jobs end. Jobs still waiting stay in ``sched``, like a stopped Flux queue.
* :meth:`Queue.lose` ends a running job whose outcome is unknown (its supervisor restarted while it
  ran): it fails with a reason and no return code, and is counted in ``counts["lost"]``.

Memory: a job costs a few hundred bytes (its command and workdir strings are shared by the jobs of one
group) plus its output, which is kept for the ``keep_outputs`` most recently finished jobs only.
Idempotency keys are kept for the ``keep_keys`` most recent keyed submits, for the life of the process.

Cost: submit is O(jobs submitted); start, finish and resize are O(jobs started or finished);
:meth:`Queue.status` is O(groups) (counters are kept, never recomputed by scanning the queue).
Cancelling a group rebuilds the waiting deque, O(waiting jobs).
"""

from __future__ import annotations

import itertools
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ensemble_core import matrix
from ensemble_core.messages import GroupStats, JobSpec, NodeCounts, QueueCounts
from ensemble_core.subjects import escape
from ensemble_core.wire import (
    MAX_SUBMIT_JOBS,
    JobInfo,
    Order,
    StatusPayload,
    SubmitResult,
)
from sidecar.streaming import Spread

#: How many waiting jobs ``next_jobs`` lists.
NEXT_JOBS = 20

#: Longest idempotency key a submit may carry.
MAX_KEY_LENGTH = 256

#: Idempotency keys remembered by default; the oldest is forgotten beyond this.
KEEP_KEYS = 10_000

#: Finished jobs whose output is kept by default; older outputs are dropped (set to ``""``).
KEEP_OUTPUTS = 1_000

#: Environment variables of the sidecar that its jobs never see: its own settings and secrets.
PRIVATE_ENVIRONMENT = re.compile(r"^(ENSEMBLE_|GRPC_)")


class JobState(StrEnum):
    """Flux's job states, in order."""

    NEW = "new"
    DEPEND = "depend"
    PRIORITY = "priority"
    SCHED = "sched"
    RUN = "run"
    CLEANUP = "cleanup"
    INACTIVE = "inactive"


class QueueError(ValueError):
    """A request the queue refuses; the message names the offending field."""


class QueueTerminated(QueueError):
    """A request refused because the queue was terminated."""


class QueueUnavailable(QueueError):
    """The queue cannot answer now (e.g. the sidecar lost Flux and is reconnecting): retry later."""


@dataclass(slots=True)
class Job:
    """One job. Owned and mutated by :class:`Queue`; callers read it."""

    id: int
    group: str
    command: str
    nodes: int
    tasks: int
    workdir: str
    duration: int
    t_submit: float
    state: JobState = JobState.NEW
    t_run: float | None = None
    t_inactive: float | None = None
    returncode: int | None = None
    success: bool | None = None
    output: str = ""
    #: Identity: the job's index in its group and the attempt this is.
    index: int = 0
    attempt: int = 1
    params: dict[str, str] = field(default_factory=dict)
    #: How it ended (``succeeded``, ``failed``, ``lost``, ``cancelled``), why, and its place in the end order.
    result: str = ""
    lost: bool = False
    reason: str = ""
    end_seq: int = 0
    #: Files holding its whole stdout / stderr (the local backend with an output directory).
    stdout: str = ""
    stderr: str = ""

    def info(self) -> JobInfo:
        """This job as ``jobinfo`` reports it."""
        return JobInfo(
            id=self.id,
            group=self.group,
            command=self.command,
            nodes=self.nodes,
            state=self.state.value,
            t_submit=self.t_submit,
            t_run=self.t_run,
            t_inactive=self.t_inactive,
            returncode=self.returncode,
            success=self.success,
            output=self.output,
            index=self.index,
            attempt=self.attempt,
            result=self.result,
            lost=self.lost,
            reason=self.reason,
            end_seq=self.end_seq,
            stdout=self.stdout,
            stderr=self.stderr,
            params=self.params,
        )


@dataclass(slots=True)
class GroupTally:
    """Incrementally maintained statistics of one job group (O(1) amortised per job event and per status)."""

    submitted: int = 0
    finished: int = 0
    succeeded: int = 0
    failed: int = 0
    started: int = 0
    cancelled: int = 0
    run: Spread = field(default_factory=Spread)
    wait: Spread = field(default_factory=Spread)
    #: Waits of the jobs that started (recorded at the start, not at the end).
    started_wait: Spread = field(default_factory=Spread)
    #: The jobs waiting now, by id: their submit time; ``_queue`` holds the ids in submit order, including
    #: ids that left since (dropped lazily from either end), so the oldest and newest are found in O(1).
    _in_queue: dict[int, float] = field(default_factory=dict)
    _queue: deque[int] = field(default_factory=deque)
    _submit_sum: float = 0.0

    def queued(self, job_id: int, t_submit: float) -> None:
        """A job of the group entered the queue at ``t_submit``."""
        if job_id in self._in_queue:
            return
        self._in_queue[job_id] = t_submit
        self._queue.append(job_id)
        self._submit_sum += t_submit

    def left_queue(self, job_id: int, wait: float | None) -> None:
        """A job left the queue: started after ``wait`` seconds, or (``wait`` None) ended without running."""
        t_submit = self._in_queue.pop(job_id, None)
        if t_submit is not None:
            self._submit_sum -= t_submit
            if not self._in_queue:
                self._submit_sum = 0.0  # no rounding residue survives an empty queue
        if wait is not None:
            self.started += 1
            self.started_wait.add(wait)

    def ended(self, *, success: bool, run: float | None, wait: float | None, cancelled: bool = False) -> None:
        """Count a job that became inactive; ``run`` / ``wait`` seconds are added when it ran."""
        self.finished += 1
        if success:
            self.succeeded += 1
        else:
            self.failed += 1
        if cancelled:
            self.cancelled += 1
        if run is not None:
            self.run.add(run)
        if wait is not None:
            self.wait.add(wait)

    def _end_of_queue(self, oldest: bool) -> float:
        queue = self._queue
        while queue and (queue[0] if oldest else queue[-1]) not in self._in_queue:
            if oldest:
                queue.popleft()
            else:
                queue.pop()
        return self._in_queue[queue[0] if oldest else queue[-1]]

    def stats(self, now: float = 0.0) -> GroupStats:
        """The group's counts and run / wait statistics as the status payload reports them at ``now``."""
        waiting = len(self._in_queue)
        started = self.started_wait
        queued_count = started.n + waiting
        queued_mean = queued_min = queued_max = 0.0
        if queued_count:
            queued_mean = (started.total + waiting * now - self._submit_sum) / queued_count
            lows = [started.low] if started.n else []
            highs = [started.high] if started.n else []
            if waiting:
                lows.append(now - self._end_of_queue(oldest=False))
                highs.append(now - self._end_of_queue(oldest=True))
            queued_min, queued_max = max(0.0, min(lows)), max(0.0, max(highs))
            queued_mean = max(queued_min, min(queued_max, queued_mean))
        return GroupStats(
            submitted=self.submitted,
            finished=self.finished,
            succeeded=self.succeeded,
            failed=self.failed,
            run_mean=self.run.mean(),
            run_min=self.run.low,
            run_max=self.run.high,
            wait_mean=self.wait.mean(),
            wait_min=self.wait.low,
            wait_max=self.wait.high,
            run_var=self.run.variance(),
            run_iqr=self.run.iqr(),
            run_mad=self.run.mad(),
            wait_var=self.wait.variance(),
            wait_iqr=self.wait.iqr(),
            wait_mad=self.wait.mad(),
            started=self.started,
            cancelled=self.cancelled,
            waiting=waiting,
            queued_count=queued_count,
            queued_mean=queued_mean,
            queued_min=queued_min,
            queued_max=queued_max,
        )


def job_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the sidecar's jobs get: the sidecar's own minus its settings and secrets
    (``ENSEMBLE_*``, the sidecar token among them, and ``GRPC_*``) — what ``flux submit`` run in the
    same shell would pass, without what belongs to the sidecar."""
    return {name: value for name, value in environ.items() if not PRIVATE_ENVIRONMENT.match(name)}


def order_jobs(specs: Sequence[JobSpec], order: Order, seed: int) -> list[JobSpec]:
    """Unwrap ``count`` and order the jobs: one entry per job to queue.

    ``""`` keeps the groups as given, each group's jobs consecutive; ``ascending`` / ``descending``
    sort by ``nodes`` (stable: equal widths keep their given order); ``random`` shuffles with
    ``random.Random(seed)``, so the same seed gives the same order.
    """
    return [spec for spec, _ in expand_jobs(specs, order, seed, {})]


def expand_jobs(
    specs: Sequence[JobSpec], order: Order, seed: int, next_index: Mapping[str, int]
) -> list[tuple[JobSpec, int]]:
    """:func:`order_jobs` with each job's index in its group: ``spec.start`` onwards, or when the spec
    names no start, onwards from ``next_index[group]`` (the group's next unused index; 0 for a new
    group), counting on across the specs of one group in this submit."""
    following = dict(next_index)
    jobs: list[tuple[JobSpec, int]] = []
    for spec in specs:
        first = following.get(spec.name, 0) if spec.start is None else spec.start
        jobs.extend((spec, first + k) for k in range(spec.count))
        following[spec.name] = max(following.get(spec.name, 0), first + spec.count)
    if order == "ascending":
        jobs.sort(key=lambda job: job[0].nodes)
    elif order == "descending":
        jobs.sort(key=lambda job: -job[0].nodes)
    elif order == "random":
        random.Random(seed).shuffle(jobs)
    return jobs


def job_params(spec: JobSpec, index: int) -> dict[str, str]:
    """The parameters of job ``index`` of a group (its ``matrix`` combination); none without a matrix.

    Raises :class:`QueueError` for an index beyond the matrix's combinations."""
    if not spec.matrix:
        return {}
    try:
        return matrix.params(spec.matrix, index)
    except ValueError as exc:
        raise QueueError(f"jobs: group {spec.name!r}: {exc}") from None


def job_command(spec: JobSpec, params: Mapping[str, str]) -> str:
    """The command job with these parameters runs (placeholders filled in); the group's own without any."""
    return matrix.render(spec.command, params) if params else spec.command


def job_environment_params(params: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that carry a job's parameters (``ENSEMBLE_PARAM_<NAME>``)."""
    return matrix.environment(params)


def output_paths(directory: str, group: str, index: int, attempt: int) -> tuple[str, str]:
    """Where an attempt's stdout and stderr go under an output directory:
    ``<directory>/<group>/<index>.<attempt>.out`` and ``.err`` (the group escaped into a file name)."""
    folder = f"{directory.rstrip('/')}/{escape(group)}"
    return f"{folder}/{index}.{attempt}.out", f"{folder}/{index}.{attempt}.err"


def job_identity_environment(group: str, index: int, attempt: int) -> dict[str, str]:
    """What tells a job which job it is: ``ENSEMBLE_JOB_GROUP``, ``ENSEMBLE_JOB_INDEX`` (0, 1, ... in its
    group) and ``ENSEMBLE_JOB_ATTEMPT`` (1 for the first run, 2 for its first retry or resubmission)."""
    return {"ENSEMBLE_JOB_GROUP": group, "ENSEMBLE_JOB_INDEX": str(index), "ENSEMBLE_JOB_ATTEMPT": str(attempt)}


def validate_specs(specs: Sequence[JobSpec], max_nodes: int) -> None:
    """Raise :class:`QueueError` naming the field if these job groups cannot be queued on ``max_nodes`` nodes.

    Refused: an empty name or command, a job wider than ``max_nodes``, and more than
    :data:`~ensemble_core.wire.MAX_SUBMIT_JOBS` jobs (groups, or jobs after ``count``) in one submit.
    """
    if len(specs) > MAX_SUBMIT_JOBS:
        raise QueueError(f"jobs: {len(specs)} job groups exceeds the limit of {MAX_SUBMIT_JOBS} per submit")
    total = 0
    for i, spec in enumerate(specs):
        if not spec.name:
            raise QueueError(f"jobs[{i}].name: must not be empty (it names the job group)")
        if not spec.command.strip():
            raise QueueError(f"jobs[{i}].command: must not be empty")
        if spec.nodes > max_nodes:
            raise QueueError(
                f"jobs[{i}].nodes: {spec.nodes} exceeds the queue's maximum of {max_nodes} "
                "nodes, so the job could never run"
            )
        total += spec.count
    if total > MAX_SUBMIT_JOBS:
        raise QueueError(f"jobs: {total} jobs (after count) exceeds the limit of {MAX_SUBMIT_JOBS} per submit")


class Queue:
    """The queue and nodes of one ensemble member (see the module docstring for the model)."""

    def __init__(
        self,
        *,
        nodes: int,
        cores: int = 1,
        max_nodes: int | None = None,
        keep_keys: int = KEEP_KEYS,
        keep_outputs: int = KEEP_OUTPUTS,
        instance: str = "",
    ) -> None:
        """Start with ``nodes`` nodes up and requested; ``max_nodes`` (default ``nodes``) caps growth.

        ``instance`` names this queue (:attr:`StatusPayload.instance`); empty: a new name,
        ``<unix time>/local/<random>`` (names start with the time the queue began: see ``ensemble_core.ledger``).
        Whoever keeps the queue across restarts (the local backend's journal) passes the same name again.

        The ``keep_keys`` most recent idempotency keys are remembered, and the outputs of the
        ``keep_outputs`` most recently finished jobs are kept (older ones are dropped).
        """
        max_nodes = nodes if max_nodes is None else max_nodes
        if nodes < 0:
            raise QueueError(f"nodes: must be >= 0, got {nodes}")
        if cores < 1:
            raise QueueError(f"cores: must be >= 1, got {cores}")
        if max_nodes < nodes:
            raise QueueError(f"max_nodes: must be >= nodes ({nodes}), got {max_nodes}")
        if keep_keys < 1 or keep_outputs < 0:
            raise QueueError(f"keep_keys / keep_outputs: must be >= 1 / >= 0, got {keep_keys} / {keep_outputs}")
        self.keep_keys = keep_keys
        self.keep_outputs = keep_outputs
        self._outputs: deque[Job] = deque()
        self.cores = cores
        self.max_nodes = max_nodes
        self.size = nodes
        self.nodes_up = nodes
        self.terminated = False
        self._busy = 0
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._waiting: deque[Job] = deque()
        self._waiting_by_nodes: Counter[int] = Counter()
        self._states: Counter[JobState] = Counter()
        self._groups: dict[str, GroupTally] = {}
        self._finished = 0
        self._failed = 0
        self._lost = 0
        self._keys: dict[str, SubmitResult] = {}
        self.instance = instance or f"{time.time():.6f}/local/{uuid.uuid4().hex}"
        #: Per group, the next index a job submitted without ``start`` gets.
        self._next_index: dict[str, int] = {}
        #: Every (group, index, attempt) queued: an attempt is queued once, whatever submits carry it.
        self._attempts: set[tuple[str, int, int]] = set()
        #: Jobs in the order they ended (``ended``).
        self._ended: list[Job] = []

    # -- reading ---------------------------------------------------------------------------------

    @property
    def nodes_free(self) -> int:
        """Nodes up and idle. Zero while nodes drain (``nodes_up > size``)."""
        return self.nodes_up - self._busy

    @property
    def draining(self) -> int:
        """Busy nodes beyond the requested size, removed as their jobs end."""
        return max(0, self.nodes_up - self.size)

    @property
    def waiting(self) -> int:
        """Jobs waiting for nodes (state ``sched``)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs running."""
        return self._states[JobState.RUN]

    def running_jobs(self, group: str | None = None) -> list[Job]:
        """The jobs running now (of ``group``, or all), in id order (O(jobs): not for a hot path)."""
        return [
            job for job in self._jobs.values() if job.state is JobState.RUN and (group is None or job.group == group)
        ]

    def job(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        return self._jobs.get(job_id)

    def page(self, offset: int, limit: int) -> list[Job]:
        """At most ``limit`` jobs in submit order, from the ``offset``-th (0: the first); O(offset + limit)."""
        return list(itertools.islice(self._jobs.values(), offset, offset + limit))

    def recent(self, limit: int) -> list[Job]:
        """The ``limit`` most recently submitted jobs, oldest first (O(limit))."""
        newest = list(itertools.islice(reversed(self._jobs.values()), limit))
        newest.reverse()
        return newest

    @property
    def ended_count(self) -> int:
        """How many jobs have ended (succeeded, failed, lost or cancelled)."""
        return len(self._ended)

    def ended(self, after: int, limit: int) -> list[Job]:
        """At most ``limit`` jobs in the order they ended, after the ``after``-th (0: from the first)."""
        return self._ended[after : after + limit]

    def status(self, now: float) -> StatusPayload:
        """A snapshot of nodes, queue and groups at ``now`` (O(groups + NEXT_JOBS))."""
        free = self.nodes_free
        counts = {"waiting": self.waiting, "running": self.running}
        if self._lost:
            counts["lost"] = self._lost
        return StatusPayload(
            nodes=NodeCounts(
                node_cores_free=free * self.cores,
                node_cores_up=self.nodes_up * self.cores,
                node_up_count=self.nodes_up,
                node_free_count=free,
            ),
            queue=QueueCounts(**{state.value: self._states[state] for state in JobState}),
            waiting={width: n for width, n in sorted(self._waiting_by_nodes.items()) if n},
            next_jobs=[job.nodes for job in itertools.islice(self._waiting, NEXT_JOBS)],
            counts=counts,
            metrics={},
            size=self.size,
            finished=self._finished,
            failed=self._failed,
            groups={name: group.stats(now) for name, group in self._groups.items()},
            time=now,
            terminated=self.terminated,
            instance=self.instance,
            draining=self.draining,
        )

    # -- jobs ------------------------------------------------------------------------------------

    def validate(self, specs: Sequence[JobSpec]) -> None:
        """Raise :class:`QueueError` naming the field if these job groups cannot be queued."""
        validate_specs(specs, self.max_nodes)

    def submit(
        self, specs: Sequence[JobSpec], now: float, *, order: Order = "", seed: int = 0, key: str = ""
    ) -> SubmitResult:
        """Queue the job groups in ``order`` (see :func:`order_jobs`); all or nothing.

        A non-empty ``key`` seen before returns the first submit's result with ``duplicate=True``
        and queues nothing, so a client may retry a submit whose answer it lost. An attempt (group,
        index, attempt) already queued is left out, whichever submit carries it again.
        Raises :class:`QueueError` (naming the field) for invalid jobs, :class:`QueueTerminated`
        after :meth:`terminate`. Call :meth:`schedule` afterwards to start what fits.
        """
        if len(key) > MAX_KEY_LENGTH:
            raise QueueError(f"key: {len(key)} characters exceeds the limit of {MAX_KEY_LENGTH}")
        if key and key in self._keys:
            first = self._keys[key]
            return SubmitResult(submitted=first.submitted, duplicate=True, instance=self.instance)
        if self.terminated:
            raise QueueTerminated("action: the queue is terminated and accepts no more jobs")
        self.validate(specs)
        queued = 0
        expanded = expand_jobs(specs, order, seed, self._next_index)
        # every job's parameters before any is queued: all or nothing
        params_of = [job_params(spec, index) for spec, index in expanded]
        for (spec, index), params in zip(expanded, params_of, strict=True):
            identity = (spec.name, index, spec.attempt)
            if identity in self._attempts:
                continue
            self._attempts.add(identity)
            if index >= self._next_index.get(spec.name, 0):
                self._next_index[spec.name] = index + 1
            job = Job(
                id=next(self._ids),
                group=spec.name,
                command=job_command(spec, params),
                nodes=spec.nodes,
                tasks=spec.tasks,
                workdir=spec.workdir,
                duration=spec.duration,
                t_submit=now,
                state=JobState.SCHED,
                index=index,
                attempt=spec.attempt,
                params=params,
            )
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._waiting_by_nodes[job.nodes] += 1
            tally = self._group(job.group)
            tally.submitted += 1
            tally.queued(job.id, now)
            queued += 1
        self._states[JobState.SCHED] += queued
        result = SubmitResult(submitted=queued, instance=self.instance)
        if key:
            self._keys[key] = result
            if len(self._keys) > self.keep_keys:
                del self._keys[next(iter(self._keys))]
        return result

    def schedule(self, now: float) -> list[Job]:
        """Start waiting jobs first-come, first-served; return the jobs now running, to launch.

        Stops at the first job that does not fit (head-of-line blocking, no backfill), and places
        nothing once terminated.
        """
        started: list[Job] = []
        while self._waiting and not self.terminated and self._waiting[0].nodes <= self.nodes_free:
            job = self._waiting.popleft()
            self._waiting_by_nodes[job.nodes] -= 1
            self._move(job, JobState.RUN)
            job.t_run = now
            self._busy += job.nodes
            self._group(job.group).left_queue(job.id, now - job.t_submit)
            started.append(job)
        return started

    def finish(self, job_id: int, now: float, returncode: int, output: str = "") -> Job:
        """Record that a running job ended (``returncode`` 0 is success) and release its nodes.

        Released nodes beyond the requested size are removed (drained), the rest become free.
        Call :meth:`schedule` afterwards to start what now fits.
        """
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.RUN:
            raise QueueError(f"id: job {job_id} is not running")
        self._busy -= job.nodes
        self.nodes_up -= min(job.nodes, self.draining)
        job.returncode = returncode
        job.success = returncode == 0
        job.result = "succeeded" if job.success else "failed"
        self._keep_output(job, output)
        job.t_inactive = now
        self._move(job, JobState.INACTIVE)
        self._end(job)
        group = self._group(job.group)
        self._finished += 1
        if not job.success:
            self._failed += 1
        assert job.t_run is not None  # set by schedule() when the job entered RUN
        group.ended(success=job.success, run=now - job.t_run, wait=job.t_run - job.t_submit)
        return job

    def lose(self, job_id: int, now: float, reason: str) -> Job:
        """End a running job whose outcome is unknown: it failed with ``reason`` as output and no return code.

        Its nodes are released as by :meth:`finish`; it counts as finished, failed and lost.
        """
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.RUN:
            raise QueueError(f"id: job {job_id} is not running")
        self._busy -= job.nodes
        self.nodes_up -= min(job.nodes, self.draining)
        job.success = False
        job.output = reason
        job.result = "lost"
        job.lost = True
        job.reason = reason
        job.t_inactive = now
        self._move(job, JobState.INACTIVE)
        self._end(job)
        self._finished += 1
        self._failed += 1
        self._lost += 1
        assert job.t_run is not None  # set by schedule() when the job entered RUN
        # how long it ran is unknown, so it adds nothing to the run-time statistics
        self._group(job.group).ended(success=False, run=None, wait=job.t_run - job.t_submit)
        return job

    def cancel(self, group: str, now: float) -> int:
        """Cancel the waiting jobs of ``group``; return how many (the backend ends its running ones).

        A cancelled job becomes inactive without running and counts as finished and failed.
        """
        cancelled = [job for job in self._waiting if job.group == group]
        if not cancelled:
            return 0
        self._waiting = deque(job for job in self._waiting if job.group != group)
        stats = self._group(group)
        for job in cancelled:
            self._waiting_by_nodes[job.nodes] -= 1
            self._move(job, JobState.INACTIVE)
            job.t_inactive = now
            job.success = False
            job.output = "cancelled"
            job.result = "cancelled"
            job.reason = "cancelled while waiting"
            self._end(job)
            stats.left_queue(job.id, None)
        stats.finished += len(cancelled)
        stats.failed += len(cancelled)
        stats.cancelled += len(cancelled)
        self._finished += len(cancelled)
        self._failed += len(cancelled)
        return len(cancelled)

    # -- nodes -----------------------------------------------------------------------------------

    def resize(self, target: int) -> int:
        """Request ``target`` nodes; return how many new nodes the caller must bring up.

        Growing only raises the request: bring the returned number of nodes up with
        :meth:`nodes_ready`. Shrinking removes free nodes at once and drains busy ones (see the
        module docstring). Raises :class:`QueueError` for a target outside ``0..max_nodes`` and
        :class:`QueueTerminated` after :meth:`terminate`.
        """
        if self.terminated:
            raise QueueTerminated("action: the queue is terminated and cannot be resized")
        if not 0 <= target <= self.max_nodes:
            raise QueueError(f"size: {target} is outside 0..{self.max_nodes} (the queue's maximum)")
        to_provision = max(0, target - max(self.size, self.nodes_up))
        self.size = target
        self.nodes_up -= min(self.nodes_free, self.draining)
        return to_provision

    def grow(self, target: int) -> int:
        """:meth:`resize` to ``target``, refusing a target below the requested size (equal: no-op)."""
        if target < self.size:
            raise QueueError(f"size: grow to {target} is below the current size {self.size}; use shrink")
        return self.resize(target)

    def shrink(self, target: int) -> int:
        """:meth:`resize` to ``target``, refusing a target above the requested size (equal: no-op)."""
        if target > self.size:
            raise QueueError(f"size: shrink to {target} is above the current size {self.size}; use grow")
        return self.resize(target)

    def nodes_ready(self, count: int) -> int:
        """Bring up to ``count`` provisioned nodes up, never beyond the requested size; return how many.

        Call :meth:`schedule` afterwards to place work on them.
        """
        added = max(0, min(count, self.size - self.nodes_up))
        self.nodes_up += added
        return added

    def terminate(self) -> None:
        """Stop placing work and request size 0: free nodes go now, busy ones as their jobs end."""
        if self.terminated:
            return
        self.resize(0)
        self.terminated = True

    # -- internals -------------------------------------------------------------------------------

    def _group(self, name: str) -> GroupTally:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = GroupTally()
        return group

    def _end(self, job: Job) -> None:
        self._ended.append(job)
        job.end_seq = len(self._ended)

    def _keep_output(self, job: Job, output: str) -> None:
        """Give ``job`` its output, dropping the output of the oldest finished job beyond ``keep_outputs``."""
        if not output or not self.keep_outputs:
            return
        job.output = output
        self._outputs.append(job)
        if len(self._outputs) > self.keep_outputs:
            self._outputs.popleft().output = ""

    def _move(self, job: Job, state: JobState) -> None:
        self._states[job.state] -= 1
        self._states[state] += 1
        job.state = state

    # -- the shrink grace ------------------------------------------------------------------------

    def jobs_beyond_size(self) -> list[Job]:
        """The running jobs to end so that the busy nodes fit the requested size again: the youngest
        first (latest start, then highest id), as few as it takes (O(jobs): for the rare grace expiry).

        Nodes are counted, not named, so which jobs run on the nodes a shrink gave up is a convention:
        the youngest, which lose the least work. Empty while nothing drains.
        """
        excess = self.draining
        chosen: list[Job] = []
        for job in sorted(self.running_jobs(), key=lambda job: (job.t_run or 0.0, job.id), reverse=True):
            if excess <= 0:
                break
            chosen.append(job)
            excess -= job.nodes
        return chosen
