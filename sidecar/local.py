"""The ``local`` backend: the queue model of :mod:`sidecar.queue` running each job as a real subprocess.

Every job runs :func:`~ensemble_core.commands.command_argv` of its command (through ``/bin/sh -c``
when it uses shell syntax, else its words without a shell, the rule the flux backend follows too) in
``workdir`` when set. Like ``flux run -N nodes -n tasks``, a job is ``max(tasks, nodes)`` processes of
its command (its tasks), spread over its nodes as Flux's job shell spreads them (as evenly as they go,
the first nodes taking one more, task ranks numbered node after node), each seeing the variables
Flux's job shell sets: ``FLUX_JOB_ID``, ``FLUX_JOB_NNODES``, ``FLUX_JOB_SIZE`` (its number of tasks),
``FLUX_TASK_RANK`` (0 … size - 1) and ``FLUX_TASK_LOCAL_ID`` (the task's index on its node). The job
succeeds when every task does; its return code is the worst of theirs (a non-zero one over zero, the
largest, a signal counting as 128 + its number, as a shell reports it); its output is theirs
concatenated in task order (stdout and stderr merged, the last ``output_limit`` bytes kept). A job has
at most :data:`MAX_TASKS` tasks here: more is refused at submit. Each task runs in its own session, so
its whole process group is killed when the job times out, when the job ends leaving children behind,
or when the backend closes: no job process outlives the backend. Nodes are virtual.

With a state directory the backend survives its own restart, ``kill -9`` included: every change of
the queue is appended to ``<state-dir>/journal.jsonl`` (:class:`Journal`) before it is answered or
acted on, and replayed by the next backend on the same directory. A job's start is on disk before its
process is spawned, so a job is never run twice: a job that was running when the backend died is
reported ``lost`` (failed, with :data:`LOST` as its output) and its leftover process group is killed.

The shrink grace: a shrink never kills a job, but a job may not keep a node that a shrink gave up for
ever. Nodes are counted, not named, so the rule is on the count: once the queue has had busy nodes
beyond its requested size (it drains) for ``shrink_grace`` seconds, counted from the last shrink that
gave up a busy node, the youngest running jobs (:meth:`~sidecar.queue.Queue.jobs_beyond_size`) are
killed, as few as it takes for the busy nodes to fit the size. Each is journaled lost with its reason
(:func:`~sidecar.backend.shrink_lost_reason`) before its process group is killed, so a restart reports
it lost the same way. Jobs ending, or a grow, shorten or end the drain and keep its clock; after
``terminate`` nothing is killed (its nodes go as their jobs end).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeAlias

import msgspec

from ensemble_core.commands import command_argv
from ensemble_core.messages import JobSpec
from ensemble_core.wire import (
    EndedResult,
    JobInfo,
    Order,
    ResizeResult,
    StatusPayload,
    SubmitPayload,
    SubmitResult,
)
from sidecar.backend import SHRINK_GRACE, Listeners, shrink_lost_reason
from sidecar.queue import (
    Job,
    JobState,
    Queue,
    QueueError,
    job_environment,
    job_environment_params,
    job_identity_environment,
    output_paths,
)
from sidecar.reaper import Reaper

log = logging.getLogger(__name__)

#: Return codes of a job whose command could not be started, as a shell reports them.
NOT_FOUND = 127
NOT_EXECUTABLE = 126

#: Most tasks (processes) of one job on this machine: a job asking for more is refused at submit.
MAX_TASKS = 1024

#: Seconds a cancelled job's processes get after SIGTERM before SIGKILL.
CANCEL_GRACE = 5.0

#: How long to keep reading a job's output after its process group was killed: a process that
#: escaped the group may hold the pipe open forever.
_DRAIN_SECONDS = 1.0

#: The journal's file name inside the state directory.
JOURNAL_FILE = "journal.jsonl"

#: Characters of a finished job's output kept in the journal (the tail): what ``jobinfo`` shows after a restart.
JOURNAL_OUTPUT = 4096

#: The output of a job that was running when the backend died: it is not run again, and its outcome is unknown.
LOST = "lost: the sidecar restarted while it ran"

#: Exit status of a backend that cannot write its journal (``EX_SOFTWARE``): it stops rather than
#: run what it could not record.
JOURNAL_FAILED = 70


class JournalError(QueueError):
    """The journal cannot be replayed; the message names the file and line."""


class JournalBusy(Exception):
    """Another live backend holds the journal of this state directory."""


class _Record(msgspec.Struct, tag_field="e", kw_only=True, omit_defaults=True):
    """One line of the journal."""


class Opened(_Record, tag="open"):
    """The first line: the queue's shape, which a restart keeps whatever its command line says."""

    nodes: int
    cores: int
    max_nodes: int
    #: The queue's name (``StatusPayload.instance``), the same for every backend that replays this journal.
    instance: str = ""


class Submitted(_Record, tag="submit"):
    """A submit that queued jobs (duplicates and refusals queue nothing and are not recorded).

    The jobs are the groups as sent; ``order`` and ``seed`` make their expansion deterministic, and
    ``first`` / ``count`` are the ids it gave, checked on replay.
    """

    t: float
    jobs: list[JobSpec]
    first: int
    count: int
    order: Order = ""
    seed: int = 0
    key: str = ""


class Started(_Record, tag="start"):
    """Jobs placed on nodes, written before their processes are spawned."""

    t: float
    ids: list[int]


class Spawned(_Record, tag="pid"):
    """A process of a job (one per task): its pid (also its process group) and its start time in clock
    ticks after boot."""

    id: int
    pid: int
    since: int | None = None


class Finished(_Record, tag="finish"):
    """A job's process ended (the tail of its output is kept)."""

    t: float
    id: int
    rc: int
    output: str = ""


class Lost(_Record, tag="lost"):
    """A job ended without a known outcome, not run again: found running in the journal by a restarted
    backend (``reason`` empty: :data:`LOST`), or killed after the shrink grace (``reason`` says so)."""

    t: float
    id: int
    reason: str = ""


class Resized(_Record, tag="resize"):
    """The requested size changed (grow or shrink)."""

    size: int


class NodesUp(_Record, tag="ready"):
    """Provisioned nodes came up."""

    count: int


class Cancelled(_Record, tag="cancel"):
    """A group's waiting jobs were cancelled."""

    t: float
    group: str


class Terminated(_Record, tag="terminate"):
    """The queue was terminated."""


Record: TypeAlias = (
    Opened | Submitted | Started | Spawned | Finished | Lost | Resized | NodesUp | Cancelled | Terminated
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


class Journal:
    """The append-only JSON Lines journal of one backend's queue in ``directory``.

    Opening it takes an exclusive ``flock`` (released by the kernel when the process dies, ``kill -9``
    included), so two live backends never share one. Every record is one ``write`` of one line;
    :meth:`append` ``fsync``s it unless told otherwise. A write that fails stops the process
    (:data:`JOURNAL_FAILED`): a backend that can no longer record what it runs must not run it.
    """

    def __init__(self, directory: Path) -> None:
        """Open (creating) ``directory/journal.jsonl``; :class:`JournalBusy` if another backend holds it."""
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / JOURNAL_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(f"{self.path} is held by another running sidecar") from None

    def read(self) -> list[Record]:
        """Every record, in order. A last line without its newline (the process died while writing it)
        is dropped from the file; any other unreadable line raises :class:`JournalError`."""
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("journal: dropping an incomplete last line of %d bytes", len(data) - complete)
            assert self._fd is not None
            os.ftruncate(self._fd, complete)
        records: list[Record] = []
        for number, line in enumerate(data[:complete].splitlines(), 1):
            try:
                records.append(_decoder.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise JournalError(f"{self.path} line {number}: {exc}") from None
        return records

    def append(self, record: Record, *, sync: bool = True) -> None:
        """Write one record (and ``fsync`` it when ``sync``); nothing once closed."""
        if self._fd is None:
            return
        line = memoryview(_encoder.encode(record) + b"\n")
        try:
            while line:
                line = line[os.write(self._fd, line) :]
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            log.critical("cannot write the journal %s: %s; stopping", self.path, exc)
            os._exit(JOURNAL_FAILED)

    def close(self) -> None:
        """Stop recording and release the lock (what happens afterwards is not recorded)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalBackend(Listeners):
    """A queue of ``nodes`` virtual nodes (``cores`` each) running jobs as local subprocesses.

    Create and use it inside a running event loop. All methods but :meth:`aclose` are synchronous
    and cheap; job processes are supervised by tasks of the loop.
    """

    def __init__(
        self,
        *,
        nodes: int = 1,
        cores: int = 1,
        max_nodes: int | None = None,
        provision_delay: float = 0.0,
        output_limit: int = 64 * 1024,
        clock: Callable[[], float] = time.time,
        state_dir: Path | None = None,
        output_dir: Path | None = None,
        shrink_grace: float = SHRINK_GRACE,
    ) -> None:
        """``provision_delay`` seconds pass between a grow and its nodes coming up; jobs on nodes a shrink
        gave up are killed after ``shrink_grace`` seconds (0: never; see the module docstring).

        With ``state_dir`` the queue is journaled there, and a journal already there is replayed
        (see :meth:`_restore`): its ``nodes`` / ``cores`` / ``max_nodes`` win over the arguments.
        Raises :class:`QueueError` for impossible sizes (e.g. ``max_nodes < nodes``),
        :class:`JournalError` for a journal that cannot be replayed and :class:`JournalBusy` when
        another backend holds it.
        """
        if provision_delay < 0:
            raise QueueError(f"provision_delay: must be >= 0, got {provision_delay}")
        if not 0 <= shrink_grace < float("inf"):
            raise QueueError(f"shrink_grace: must be a number of seconds >= 0, got {shrink_grace}")
        self.queue = Queue(nodes=nodes, cores=cores, max_nodes=max_nodes)
        self.provision_delay = provision_delay
        self.shrink_grace = shrink_grace
        self.output_limit = output_limit
        #: with a directory, each attempt's stdout and stderr go to files there (``output_paths``), whole
        self.output_dir = output_dir
        self._clock = clock
        super().__init__()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: the processes of each running job, one per task, in task order
        self._procs: dict[int, list[asyncio.subprocess.Process]] = {}
        self._cancelled: set[int] = set()
        self._kill_timers: list[asyncio.TimerHandle] = []
        self._timers: set[asyncio.TimerHandle] = set()
        # the drain's clock: since when busy nodes beyond the size have been draining, and how many then
        self._drain_since: float | None = None
        self._drain_count = 0
        self._grace_timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: kills the jobs' process groups should this process die without doing it (sidecar/reaper.py)
        self._reaper = Reaper()
        if self._reaper.problem:
            log.warning("%s; jobs may outlive a killed sidecar", self._reaper.problem)
        self._journal: Journal | None = None
        if state_dir is not None:
            self._journal = Journal(state_dir)
            try:
                self._restore(self._journal.read())
            except BaseException:
                self._journal.close()
                self._reaper.close()
                raise

    # -- Backend ---------------------------------------------------------------------------------

    def status(self) -> StatusPayload:
        """A snapshot of the queue and nodes now."""
        return self.queue.status(self._clock())

    async def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Queue the jobs and start what fits; idempotent on ``payload.key``.

        Raises :class:`QueueError` naming the field (e.g. a command with a quote left open, or more
        than :data:`MAX_TASKS` tasks).
        """
        for i, spec in enumerate(payload.jobs):
            try:
                command_argv(spec.command)
            except ValueError as exc:
                raise QueueError(f"jobs[{i}].command: cannot be split into arguments: {exc}") from None
            if spec.tasks > MAX_TASKS:
                raise QueueError(
                    f"jobs[{i}].tasks: {spec.tasks} exceeds the local backend's limit of {MAX_TASKS} processes "
                    "per job; lower tasks, or run the ensemble on Flux"
                )
        now = self._clock()
        result = self.queue.submit(payload.jobs, now, order=payload.order, seed=payload.seed, key=payload.key)
        if result.duplicate:
            log.info("submit duplicate key=%r submitted=%d", payload.key, result.submitted)
        else:
            log.info("submit jobs=%d order=%r", result.submitted, payload.order)
            first = _last_id(self.queue) - result.submitted + 1
            self._record(
                Submitted(
                    t=now,
                    jobs=payload.jobs,
                    order=payload.order,
                    seed=payload.seed,
                    key=payload.key,
                    first=first,
                    count=result.submitted,
                )
            )
            self._pump()
        return result

    async def job_info(self, job_id: int) -> JobInfo:
        """One job by id; :class:`QueueError` naming ``id`` if there is none."""
        job = self.queue.job(job_id)
        if job is None:
            raise QueueError(f"id: no job with id {job_id}")
        return job.info()

    async def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs, oldest first."""
        return [job.info() for job in self.queue.recent(limit)]

    async def job_page(self, offset: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` jobs in submit order, from the ``offset``-th."""
        return [job.info() for job in self.queue.page(offset, limit)]

    async def ended(self, after: int, limit: int) -> EndedResult:
        """At most ``limit`` jobs in the order they ended, after the ``after``-th."""
        queue = self.queue
        jobs = [job.info() for job in queue.ended(after, limit)]
        return EndedResult(instance=queue.instance, jobs=jobs, ended=queue.ended_count)

    async def grow(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (>= the current size); they come up after the provisioning delay."""
        to_provision = self.queue.grow(size)
        self._record(Resized(size=size))
        self._provision(to_provision)
        return self._resized("grow")

    async def shrink(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (<= the current size): free nodes go now, busy ones drain, and jobs
        still on them after the shrink grace are killed and reported lost."""
        to_provision = self.queue.shrink(size)
        self._record(Resized(size=size))
        self._provision(to_provision)
        return self._resized("shrink")

    async def cancel(self, group: str) -> int:
        """Cancel the jobs of ``group`` that have not finished; return how many.

        Waiting jobs end at once; running ones get SIGTERM (SIGKILL after :data:`CANCEL_GRACE`
        seconds) and end failed, their output saying they were cancelled.
        """
        now = self._clock()
        cancelled = self.queue.cancel(group, now)
        running = [job for job in self.queue.running_jobs(group) if job.id in self._procs]
        log.info("cancel group=%r waiting=%d running=%d", group, cancelled, len(running))
        if cancelled:
            self._record(Cancelled(t=now, group=group))
            self._pump()
        for job in running:
            self._cancelled.add(job.id)
            for proc in self._procs[job.id]:
                _signal_group(proc, signal.SIGTERM)
                self._kill_timers.append(
                    asyncio.get_running_loop().call_later(CANCEL_GRACE, _signal_group, proc, signal.SIGKILL)
                )
        return cancelled + len(running)

    async def terminate(self) -> ResizeResult:
        """Stop placing work and drop pending provisioning; nodes go as running jobs end."""
        self.queue.terminate()
        self._record(Terminated())
        self._cancel_timers()
        self._watch_drain()
        log.info("terminate running=%d", self.queue.running)
        self._notify()
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop placing work, SIGTERM every job's process group, SIGKILL it after ``grace`` seconds.

        Returns once every job process has exited and been reaped. The journal is closed first: jobs
        killed here are not recorded as ended, so a backend started again on the same state directory
        reports them lost rather than failed with a signal.
        """
        self._closed = True
        if self._journal is not None:
            self._journal.close()
        self._cancel_timers()
        self._watch_drain()
        for timer in self._kill_timers:
            timer.cancel()
        tasks = list(self._tasks.values())
        for procs in self._procs.values():
            for proc in procs:
                _signal_group(proc, signal.SIGTERM)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for procs in self._procs.values():
                for proc in procs:
                    _signal_group(proc, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending)
        await asyncio.to_thread(self._reaper.close)

    # -- internals -------------------------------------------------------------------------------

    def _resized(self, action: str) -> ResizeResult:
        log.info("%s size=%d nodes_up=%d", action, self.queue.size, self.queue.nodes_up)
        self._pump()
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)

    def _record(self, record: Record, *, sync: bool = True) -> None:
        if self._journal is not None:
            self._journal.append(record, sync=sync)

    def _restore(self, records: list[Record]) -> None:
        """Rebuild the queue from a journal, then settle what the previous backend left running.

        Every record is applied to the queue model in order (no process is started), which gives
        back the jobs with their ids and results, the waiting jobs in their order, the idempotency
        keys and the requested size. Jobs still running in the replayed queue were running when the
        previous backend died: each is recorded and reported :data:`LOST`, and its process group, if
        still alive and still the one recorded, is killed. Nodes requested but not up are provisioned
        again, and waiting jobs start on the free nodes.
        """
        assert self._journal is not None
        path = self._journal.path
        if not records:
            queue = self.queue
            self._record(
                Opened(nodes=queue.size, cores=queue.cores, max_nodes=queue.max_nodes, instance=queue.instance)
            )
            return
        opened = records[0]
        if not isinstance(opened, Opened):
            raise JournalError(f"{path} line 1: expected the queue's shape (an 'open' record)")
        shape = (opened.nodes, opened.cores, opened.max_nodes)
        if shape != (self.queue.size, self.queue.cores, self.queue.max_nodes):
            log.warning("journal: keeping the queue's recorded nodes, cores, max_nodes %s", shape)
        # a journal written before queues had names: one derived from where it lies, stable across restarts
        instance = opened.instance or f"0/journal/{path.resolve()}"
        self.queue = queue = Queue(
            nodes=opened.nodes, cores=opened.cores, max_nodes=opened.max_nodes, instance=instance
        )
        pids: dict[int, list[Spawned]] = {}
        for number, record in enumerate(records[1:], 2):
            try:
                self._replay(queue, record, pids)
            except QueueError as exc:
                raise JournalError(f"{path} line {number}: {exc}") from None
        if self.output_dir is not None:
            # the files are where they were written: the same directory, the same names
            for job in queue.page(0, _last_id(queue)):
                if job.t_run is not None:
                    job.stdout, job.stderr = output_paths(str(self.output_dir), job.group, job.index, job.attempt)
        for job_id, processes in pids.items():
            ended = queue.job(job_id)
            if ended is not None and ended.lost and ended.reason != LOST:
                # killed after the shrink grace: its record came first, so its processes may have outlived us
                for process in processes:
                    _kill_leftover(process)
        now = self._clock()
        lost = queue.running_jobs()
        for job in lost:
            for spawned in pids.get(job.id, []):
                _kill_leftover(spawned)
            self._record(Lost(t=now, id=job.id))
            queue.lose(job.id, now, LOST)
        log.info(
            "journal replayed records=%d jobs=%d waiting=%d lost=%d size=%d",
            len(records),
            _last_id(queue),
            queue.waiting,
            len(lost),
            queue.size,
        )
        if not queue.terminated:
            self._provision(queue.size - queue.nodes_up)
        self._pump()

    @staticmethod
    def _replay(queue: Queue, record: Record, pids: dict[int, list[Spawned]]) -> None:
        """Apply one journal record to the queue model (no process is started or signalled)."""
        if isinstance(record, Submitted):
            result = queue.submit(record.jobs, record.t, order=record.order, seed=record.seed, key=record.key)
            if (
                result.duplicate
                or result.submitted != record.count
                or _last_id(queue) - record.count + 1 != record.first
            ):
                raise QueueError(
                    f"submit: replay queued {result.submitted} jobs, not {record.count} from id {record.first}"
                )
        elif isinstance(record, Started):
            ids = [job.id for job in queue.schedule(record.t)]
            if ids != record.ids:
                raise QueueError(f"start: replay started jobs {ids}, the journal says {record.ids}")
        elif isinstance(record, Spawned):
            pids.setdefault(record.id, []).append(record)
        elif isinstance(record, Finished):
            queue.finish(record.id, record.t, record.rc, record.output)
        elif isinstance(record, Lost):
            queue.lose(record.id, record.t, record.reason or LOST)
        elif isinstance(record, Resized):
            queue.resize(record.size)
        elif isinstance(record, NodesUp):
            queue.nodes_ready(record.count)
        elif isinstance(record, Cancelled):
            queue.cancel(record.group, record.t)
        elif isinstance(record, Terminated):
            queue.terminate()
        else:
            raise QueueError(f"e: a {type(record).__name__} record belongs on the first line only")

    def _provision(self, count: int) -> None:
        if count <= 0:
            return
        if self.provision_delay <= 0:
            self.queue.nodes_ready(count)
            self._record(NodesUp(count=count))
            return
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def ready() -> None:
            self._timers.discard(timer)
            added = self.queue.nodes_ready(count)
            self._record(NodesUp(count=count))
            log.info("nodes up added=%d nodes_up=%d", added, self.queue.nodes_up)
            self._pump()

        timer = loop.call_later(self.provision_delay, ready)
        self._timers.add(timer)

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _pump(self) -> None:
        """Start what fits, keep the shrink grace's clock, then tell the listeners something changed."""
        if not self._closed:
            now = self._clock()
            started = self.queue.schedule(now)
            if started:
                # on disk before any process exists: a restart reports these lost, never runs them again
                self._record(Started(t=now, ids=[job.id for job in started]))
            for job in started:
                task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
                self._tasks[job.id] = task
        self._watch_drain()
        self._notify()

    def _watch_drain(self) -> None:
        """Start, keep or stop the drain's clock after a change (see the module docstring).

        It starts when busy nodes begin to drain and starts again when a shrink gives up more of them;
        jobs ending (fewer draining) keep it; nothing draining, a terminated queue or a closed backend
        stop it.
        """
        draining = 0 if self._closed or self.queue.terminated or not self.shrink_grace else self.queue.draining
        if not draining:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
            self._drain_since, self._drain_count = None, 0
            return
        if self._drain_since is None or draining > self._drain_count:
            self._drain_since = self._clock()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            self._grace_timer = asyncio.get_running_loop().call_later(self.shrink_grace, self._grace_expired)
            log.info("draining nodes=%d: jobs still on them in %g s are killed", draining, self.shrink_grace)
        self._drain_count = draining

    def _grace_expired(self) -> None:
        """Kill the youngest running jobs until the busy nodes fit the size; each is journaled lost first."""
        self._grace_timer = None
        self._drain_since = None
        now = self._clock()
        reason = shrink_lost_reason(self.shrink_grace)
        for job in self.queue.jobs_beyond_size():
            self._record(Lost(t=now, id=job.id, reason=reason))
            self.queue.lose(job.id, now, reason)
            for proc in self._procs.get(job.id, []):
                _signal_group(proc, signal.SIGKILL)
            log.warning("job id=%d group=%r: %s", job.id, job.group, reason)
        self._pump()

    async def _run(self, job: Job) -> None:
        try:
            returncode, output = await self._execute(job)
        except Exception as exc:
            # Whatever went wrong belongs to this job, never to the sidecar.
            log.exception("job id=%d supervision failed", job.id)
            returncode, output = NOT_EXECUTABLE, f"sidecar: {exc}"
        finally:
            self._tasks.pop(job.id, None)
            self._procs.pop(job.id, None)
        if job.state is not JobState.RUN:
            # killed after the shrink grace: already ended, lost, and journaled so
            self._pump()
            return
        now = self._clock()
        self.queue.finish(job.id, now, returncode, output)
        self._record(Finished(t=now, id=job.id, rc=returncode, output=output[-JOURNAL_OUTPUT:]))
        log.info("job done id=%d group=%r returncode=%d", job.id, job.group, returncode)
        self._pump()

    async def _execute(self, job: Job) -> tuple[int, str]:
        """Run the job's tasks (see the module docstring); return their worst return code and their output."""
        argv = command_argv(job.command)
        layout = task_layout(job.nodes, job.tasks)
        env = job_environment(os.environ)
        env.update(FLUX_JOB_ID=str(job.id), FLUX_JOB_NNODES=str(job.nodes), FLUX_JOB_SIZE=str(len(layout)))
        env.update(job_identity_environment(job.group, job.index, job.attempt))
        env.update(job_environment_params(job.params))
        procs: list[asyncio.subprocess.Process] = []
        self._procs[job.id] = procs
        tails: list[bytearray] = []
        readers: list[asyncio.Task[None]] = []
        failed: tuple[int, str] | None = None
        files: tuple[IO[bytes], IO[bytes]] | None = None
        try:
            # every task writes to the attempt's two files (one open file each: their writes interleave, as
            # Flux's shell writes a job's tasks into one file)
            files = _open_outputs(self.output_dir, job) if self.output_dir is not None else None
        except OSError as exc:
            failed = NOT_EXECUTABLE, f"sidecar: cannot open the job's output files: {exc}\n"
        for rank, local_id in layout if failed is None else []:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if files is None else files[0],
                    stderr=asyncio.subprocess.STDOUT if files is None else files[1],
                    cwd=job.workdir or None,
                    env={**env, "FLUX_TASK_RANK": str(rank), "FLUX_TASK_LOCAL_ID": str(local_id)},
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                failed = NOT_FOUND, f"sidecar: cannot start job: {exc}\n"
                break
            except OSError as exc:
                failed = NOT_EXECUTABLE, f"sidecar: cannot start job: {exc}\n"
                break
            procs.append(proc)
            self._reaper.add(proc.pid)
            # not fsync'd: it only helps a restart kill what this process leaves behind, and the page cache
            # outlives a killed sidecar
            self._record(Spawned(id=job.id, pid=proc.pid, since=_start_time(proc.pid)), sync=False)
            log.info("job start id=%d group=%r task=%d pid=%d", job.id, job.group, rank, proc.pid)
            if self._closed or job.state is not JobState.RUN:  # closed, or lost to the shrink grace meanwhile
                _signal_group(proc, signal.SIGKILL)
            elif job.id in self._cancelled:  # cancelled while its first tasks were starting
                _signal_group(proc, signal.SIGTERM)
            tails.append(bytearray())
            if proc.stdout is not None:  # stdout=PIPE: no output files
                readers.append(asyncio.get_running_loop().create_task(self._read(proc.stdout, tails[-1])))
        _close(files)  # the tasks hold them now
        if failed is not None:
            # a task that could not start fails the job: the tasks already started end with it
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
        note = ""
        try:
            async with asyncio.timeout(job.duration or None):  # not wait_for: it can swallow a cancel (3.11)
                await asyncio.gather(*(proc.wait() for proc in procs))
        except TimeoutError:
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
            await asyncio.gather(*(proc.wait() for proc in procs))
            note = f"sidecar: killed after its duration of {job.duration} s\n"
        # Children the tasks left behind belong to the job: they end with it.
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            self._reaper.remove(proc.pid)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_SECONDS):
                await asyncio.gather(*readers)
        if job.id in self._cancelled:
            self._cancelled.discard(job.id)
            note += "sidecar: cancelled\n"
        if files is not None:
            tails = [bytearray(_tail(job.stdout, self.output_limit // 2) + _tail(job.stderr, self.output_limit // 2))]
        output = b"".join(tails)[-self.output_limit :].decode("utf-8", errors="replace") + note
        if failed is not None:
            return failed[0], output + failed[1]
        codes = [proc.returncode for proc in procs if proc.returncode is not None]  # every one: proc.wait() returned
        return max(codes, key=_badness), output

    async def _read(self, stream: asyncio.StreamReader, tail: bytearray) -> None:
        """Append ``stream`` to ``tail`` until EOF, keeping only the last ``output_limit`` bytes."""
        while chunk := await stream.read(65536):
            tail += chunk
            if len(tail) > self.output_limit:
                del tail[: len(tail) - self.output_limit]


def _open_outputs(directory: Path, job: Job) -> tuple[IO[bytes], IO[bytes]]:
    """Open (truncate) the files of an attempt's stdout and stderr, and note their paths on the job."""
    out, err = output_paths(str(directory), job.group, job.index, job.attempt)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    job.stdout, job.stderr = out, err
    stdout = open(out, "wb")  # noqa: SIM115  # the caller closes both once the process holds them
    try:
        return stdout, open(err, "wb")
    except OSError:
        stdout.close()
        raise


def _close(files: tuple[IO[bytes], IO[bytes]] | None) -> None:
    for file in files or ():
        file.close()


def _tail(path: str, limit: int) -> bytes:
    """The last ``limit`` bytes of a file (empty when it cannot be read)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            return file.read()
    except OSError:
        return b""


def task_layout(nodes: int, tasks: int) -> list[tuple[int, int]]:
    """``(FLUX_TASK_RANK, FLUX_TASK_LOCAL_ID)`` of each task of a job of ``nodes`` nodes and ``tasks`` tasks
    (0: one per node), in rank order: as Flux's job shell places them on nodes of equal size, the tasks
    spread as evenly as they go, the first nodes taking one more, ranks numbered node after node."""
    total = max(tasks, nodes)
    layout: list[tuple[int, int]] = []
    for node in range(nodes):
        here = total // nodes + (1 if node < total % nodes else 0)
        layout += [(len(layout) + local_id, local_id) for local_id in range(here)]
    return layout


def _badness(returncode: int) -> tuple[bool, int]:
    """How bad a task's return code is: failure over success, then as a shell numbers it (a signal: 128 + it)."""
    return returncode != 0, returncode if returncode >= 0 else 128 - returncode


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Signal the job's process group (its session leader's pid); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _last_id(queue: Queue) -> int:
    """The id of the newest job (0 before the first)."""
    newest = queue.recent(1)
    return newest[0].id if newest else 0


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (``/proc/<pid>/stat`` field 22); None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _kill_leftover(spawned: Spawned) -> None:
    """SIGKILL the process group a job of a previous backend left running, if it is still that job's.

    The group's id is the job's pid. A live process with that pid but another start time means the pid
    was reused: it is left alone. With the leader gone, a group of that id can only be the job's own
    (Linux does not reuse a pid while a group of that id has members). Without a recorded start time
    (no ``/proc``) nothing is killed.
    """
    if spawned.since is None:
        log.warning("job id=%d: cannot tell whether pid %d is still the job's; not killed", spawned.id, spawned.pid)
        return
    now = _start_time(spawned.pid)
    if now is not None and now != spawned.since:
        return
    try:
        os.killpg(spawned.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    log.warning("job id=%d: killed the process group %d it left running", spawned.id, spawned.pid)
