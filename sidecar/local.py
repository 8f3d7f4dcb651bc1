"""The ``local`` backend: the queue model of :mod:`sidecar.queue` running each job as a real subprocess.

Every job runs ``shlex.split(command)`` (no shell) in ``workdir`` when set, in its own session, so
the whole process group is killed when the job times out, when it exits leaving children behind, or
when the backend closes: no job process outlives the backend. stdout and stderr are merged and the
last ``output_limit`` bytes are kept per job. ``tasks`` is recorded but not used: a job is one
process whatever its width. Nodes are virtual; the job sees ``FLUX_JOB_ID`` and ``FLUX_JOB_NNODES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable

from ensemble_core.wire import (
    JobInfo,
    ResizeResult,
    StatusPayload,
    SubmitPayload,
    SubmitResult,
)
from sidecar.backend import Listener
from sidecar.queue import Job, Queue, QueueError

log = logging.getLogger(__name__)

#: Return codes of a job whose command could not be started, as a shell reports them.
NOT_FOUND = 127
NOT_EXECUTABLE = 126

#: Environment variables a job must not inherit from the sidecar.
_PRIVATE_ENV = ("ENSEMBLE_SIDECAR_TOKEN",)

#: How long to keep reading a job's output after its process group was killed: a process that
#: escaped the group may hold the pipe open forever.
_DRAIN_SECONDS = 1.0


class LocalBackend:
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
    ) -> None:
        """``provision_delay`` seconds pass between a grow and its nodes coming up.

        Raises :class:`QueueError` for impossible sizes (e.g. ``max_nodes < nodes``).
        """
        if provision_delay < 0:
            raise QueueError(f"provision_delay: must be >= 0, got {provision_delay}")
        self.queue = Queue(nodes=nodes, cores=cores, max_nodes=max_nodes)
        self.provision_delay = provision_delay
        self.output_limit = output_limit
        self._clock = clock
        self._listeners: list[Listener] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    # -- Backend ---------------------------------------------------------------------------------

    def status(self) -> StatusPayload:
        """A snapshot of the queue and nodes now."""
        return self.queue.status(self._clock())

    def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Queue the jobs and start what fits; idempotent on ``payload.key``.

        Raises :class:`QueueError` naming the field (e.g. a command ``shlex`` cannot split).
        """
        for i, spec in enumerate(payload.jobs):
            try:
                shlex.split(spec.command)
            except ValueError as exc:
                raise QueueError(f"jobs[{i}].command: cannot be split into arguments: {exc}") from None
        result = self.queue.submit(payload.jobs, self._clock(), order=payload.order, seed=payload.seed, key=payload.key)
        if result.duplicate:
            log.info("submit duplicate key=%r submitted=%d", payload.key, result.submitted)
        else:
            log.info("submit jobs=%d order=%r", result.submitted, payload.order)
            self._pump()
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

    def grow(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (>= the current size); they come up after the provisioning delay."""
        self._provision(self.queue.grow(size))
        return self._resized("grow")

    def shrink(self, size: int) -> ResizeResult:
        """Request ``size`` nodes (<= the current size): free nodes go now, busy ones drain."""
        self._provision(self.queue.shrink(size))
        return self._resized("shrink")

    def cancel(self, group: str) -> int:
        """Cancel the waiting jobs of ``group``; return how many."""
        cancelled = self.queue.cancel(group, self._clock())
        log.info("cancel group=%r jobs=%d", group, cancelled)
        if cancelled:
            self._pump()
        return cancelled

    def terminate(self) -> ResizeResult:
        """Stop placing work and drop pending provisioning; nodes go as running jobs end."""
        self.queue.terminate()
        self._cancel_timers()
        log.info("terminate running=%d", self.queue.running)
        self._notify()
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` (no arguments) after every change of the status."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop placing work, SIGTERM every job's process group, SIGKILL it after ``grace`` seconds.

        Returns once every job process has exited and been reaped.
        """
        self._closed = True
        self._cancel_timers()
        tasks = list(self._tasks.values())
        for proc in self._procs.values():
            _signal_group(proc, signal.SIGTERM)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for proc in self._procs.values():
            _signal_group(proc, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending)

    # -- internals -------------------------------------------------------------------------------

    def _resized(self, action: str) -> ResizeResult:
        log.info("%s size=%d nodes_up=%d", action, self.queue.size, self.queue.nodes_up)
        self._pump()
        return ResizeResult(size=self.queue.size, nodes_up=self.queue.nodes_up)

    def _provision(self, count: int) -> None:
        if count <= 0:
            return
        if self.provision_delay <= 0:
            self.queue.nodes_ready(count)
            return
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def ready() -> None:
            self._timers.discard(timer)
            added = self.queue.nodes_ready(count)
            log.info("nodes up added=%d nodes_up=%d", added, self.queue.nodes_up)
            self._pump()

        timer = loop.call_later(self.provision_delay, ready)
        self._timers.add(timer)

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _pump(self) -> None:
        """Start what fits, then tell the listeners something changed."""
        if not self._closed:
            for job in self.queue.schedule(self._clock()):
                task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
                self._tasks[job.id] = task
        self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                # A broken watcher must not break the queue.
                log.exception("status listener failed")

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
        self.queue.finish(job.id, self._clock(), returncode, output)
        log.info("job done id=%d group=%r returncode=%d", job.id, job.group, returncode)
        self._pump()

    async def _execute(self, job: Job) -> tuple[int, str]:
        """Run the job's command; return its return code and the tail of its output."""
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env["FLUX_JOB_ID"] = str(job.id)
        env["FLUX_JOB_NNODES"] = str(job.nodes)
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(job.command),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=job.workdir or None,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            return NOT_FOUND, f"sidecar: cannot start job: {exc}\n"
        except OSError as exc:
            return NOT_EXECUTABLE, f"sidecar: cannot start job: {exc}\n"
        self._procs[job.id] = proc
        log.info("job start id=%d group=%r pid=%d", job.id, job.group, proc.pid)
        if self._closed:
            _signal_group(proc, signal.SIGKILL)
        tail = bytearray()
        assert proc.stdout is not None  # stdout=PIPE above
        reader = asyncio.get_running_loop().create_task(self._read(proc.stdout, tail))
        note = ""
        try:
            await asyncio.wait_for(proc.wait(), timeout=job.duration or None)
        except TimeoutError:
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()
            note = f"sidecar: killed after its duration of {job.duration} s\n"
        # Children the command left behind belong to the job: they end with it.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, timeout=_DRAIN_SECONDS)
        output = bytes(tail).decode("utf-8", errors="replace") + note
        assert proc.returncode is not None  # proc.wait() returned
        return proc.returncode, output

    async def _read(self, stream: asyncio.StreamReader, tail: bytearray) -> None:
        """Append ``stream`` to ``tail`` until EOF, keeping only the last ``output_limit`` bytes."""
        while chunk := await stream.read(65536):
            tail += chunk
            if len(tail) > self.output_limit:
                del tail[: len(tail) - self.output_limit]


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Signal the job's process group (its session leader's pid); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
