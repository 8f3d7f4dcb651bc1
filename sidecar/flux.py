"""The ``flux`` backend: the MiniCluster's real Flux instance, through Flux's Python bindings.

How the sidecar reaches Flux: the bindings (the ``flux`` Python module) must be importable and
``FLUX_URI`` must name the broker's socket. In a Flux Operator MiniCluster both come from the
operator's shared view: ``source /mnt/flux/flux-view.sh`` sets the paths, and the socket is
``FLUX_URI=local:///mnt/flux/config/run/flux/local``. The bindings are imported only here, when
this backend starts; without them ``ensemble sidecar --backend flux`` exits with a message saying so.

This module is deliberately thin: it moves records between Flux and the pure translation in
:mod:`sidecar.flux_records`, which is what the tests check (on recorded Flux payloads: no broker
can run where the tests run).

* Counts come from the job event journal (``flux.job.JournalConsumer``), read by a thread with its
  own handle; a status call asks Flux only for the resource sets (one RPC), never for the job list.
* ``submit`` sends each job with ``flux.job.submit`` (``JobspecV1.from_command``: nodes, tasks,
  cwd, duration), tagged with the group and, with a key, the key and the job's index, so a
  retried submit sends only the jobs Flux has not seen — also after a sidecar restart, since the
  journal replays past jobs with their jobspecs.
* ``terminate`` holds every pending job (urgency 0) and refuses further submits; ``cancel``
  cancels a group's pending jobs. ``grow`` / ``shrink`` are refused: a MiniCluster's size is
  changed through Kubernetes by the actuator.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
import shlex
import threading
import time
from typing import Any

from ensemble_core.wire import JobInfo, ResizeResult, StatusPayload, SubmitPayload, SubmitResult
from sidecar.backend import Listeners
from sidecar.flux_records import (
    GROUP_ATTRIBUTE,
    INDEX_ATTRIBUTE,
    KEY_ATTRIBUTE,
    JournalState,
    RecordError,
    job_info,
    known_nodes,
    node_counts,
)
from sidecar.queue import MAX_KEY_LENGTH, QueueError, QueueTerminated, order_jobs, validate_specs

log = logging.getLogger(__name__)

HOW_TO_REACH_FLUX = (
    "the sidecar needs Flux's Python bindings (the 'flux' module on PYTHONPATH) and the broker socket in "
    "FLUX_URI; in a Flux Operator MiniCluster run 'source /mnt/flux/flux-view.sh' first, which sets both "
    "(FLUX_URI=local:///mnt/flux/config/run/flux/local)"
)

#: Job-list attributes ``jobinfo`` asks Flux for.
JOB_ATTRIBUTES = ["state", "name", "nnodes", "t_submit", "t_run", "t_inactive", "success", "returncode"]

#: The scheduler's resource-status topic (newer Flux), then its older name.
_RESOURCE_TOPICS = ("resource.sched-status", "sched.resource-status")

_POLL_SECONDS = 0.5


class FluxUnavailable(Exception):
    """Flux cannot be used from here; the message says why and how the sidecar finds Flux."""


def import_flux() -> Any:
    """The ``flux`` package with ``flux.job`` loaded; :class:`FluxUnavailable` when the bindings are missing."""
    try:
        flux = importlib.import_module("flux")
        importlib.import_module("flux.job")
    except ImportError as exc:
        raise FluxUnavailable(f"the flux bindings are not importable ({exc}); {HOW_TO_REACH_FLUX}") from None
    return flux


class FluxBackend(Listeners):
    """The sidecar's view of one Flux instance (see the module docstring)."""

    def __init__(self, flux: Any, uri: str | None, *, max_nodes: int | None = None) -> None:
        """Connect to the broker at ``uri`` (None: ``FLUX_URI``) and start reading the journal.

        ``max_nodes`` caps job widths (default: every node Flux knows, down ones included).
        Raises :class:`FluxUnavailable` when the broker cannot be reached.
        """
        self._flux = flux
        self._uri = uri
        self._handle = self._open()
        self._max_nodes = max_nodes
        self._state = JournalState()
        self._lock = threading.Lock()
        super().__init__()
        self._terminated = False
        self._stopping = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_journal, name="flux-journal", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, *, max_nodes: int | None = None, uri: str | None = None) -> FluxBackend:
        """Import the bindings and connect; :class:`FluxUnavailable` with the reason and how to fix it."""
        return cls(import_flux(), uri, max_nodes=max_nodes)

    # -- Backend ---------------------------------------------------------------------------------

    def status(self) -> StatusPayload:
        """Nodes from the scheduler's resource sets, queue counts from the journal."""
        nodes = node_counts(self._resources())
        with self._lock:
            return self._state.status(nodes, time.time(), terminated=self._terminated)

    def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Submit the jobs Flux has not seen for ``payload.key`` (all of them without a key)."""
        if self._terminated:
            raise QueueTerminated("action: the queue is terminated and accepts no more jobs")
        if len(payload.key) > MAX_KEY_LENGTH:
            raise QueueError(f"key: {len(payload.key)} characters exceeds the limit of {MAX_KEY_LENGTH}")
        validate_specs(payload.jobs, self._max_nodes or known_nodes(self._resources()))
        for i, spec in enumerate(payload.jobs):
            try:
                shlex.split(spec.command)
            except ValueError as exc:
                raise QueueError(f"jobs[{i}].command: cannot be split into arguments: {exc}") from None
        with self._lock:
            if payload.key and not self._state.replayed:
                raise QueueError("action: the sidecar is still reading Flux's job journal; retry the submit shortly")
            done = self._state.key_indices(payload.key) if payload.key else set()
        ordered = order_jobs(payload.jobs, payload.order, payload.seed)
        sent = 0
        for index, spec in enumerate(ordered):
            if index in done:
                continue
            jobspec = self._flux.job.JobspecV1.from_command(
                shlex.split(spec.command), num_tasks=max(spec.tasks, spec.nodes), num_nodes=spec.nodes
            )
            if spec.workdir:
                jobspec.cwd = spec.workdir
            if spec.duration:
                jobspec.duration = spec.duration
            jobspec.setattr(f"user.{GROUP_ATTRIBUTE}", spec.name)
            if payload.key:
                jobspec.setattr(f"user.{KEY_ATTRIBUTE}", payload.key)
                jobspec.setattr(f"user.{INDEX_ATTRIBUTE}", index)
            try:
                self._flux.job.submit(self._handle, jobspec)
            except OSError as exc:
                raise QueueError(
                    f"jobs: Flux refused job {index} of group {spec.name!r} ({exc.strerror or exc}); "
                    f"{sent} of {len(ordered)} were queued, retry with the same key to queue the rest"
                ) from None
            sent += 1
            if payload.key:
                with self._lock:
                    self._state.note_submitted(payload.key, index)
        log.info("submit jobs=%d sent=%d key=%r", len(ordered), sent, payload.key)
        return SubmitResult(submitted=len(ordered), duplicate=bool(payload.key) and sent == 0)

    def job_info(self, job_id: int) -> JobInfo:
        """One job from Flux's job list; :class:`QueueError` naming ``id`` if Flux has none."""
        try:
            entry = self._flux.job.job_list_id(self._handle, job_id, attrs=JOB_ATTRIBUTES).get()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise QueueError(f"id: no job with id {job_id}") from None
            raise
        return job_info(entry.get("job", entry))

    def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs from Flux's job list, oldest first."""
        listing = self._flux.job.job_list(self._handle, max_entries=limit, attrs=JOB_ATTRIBUTES).get()
        return [job_info(entry) for entry in reversed(listing.get("jobs", []))]

    def grow(self, size: int) -> ResizeResult:
        """Refused: the MiniCluster's size is changed through Kubernetes."""
        raise QueueError(_NO_RESIZE)

    def shrink(self, size: int) -> ResizeResult:
        """Refused: the MiniCluster's size is changed through Kubernetes."""
        raise QueueError(_NO_RESIZE)

    def cancel(self, group: str) -> int:
        """Cancel the pending jobs of ``group``; return how many cancel requests Flux accepted."""
        with self._lock:
            pending = self._state.pending_ids(group)
        cancelled = 0
        for job_id in pending:
            with contextlib.suppress(OSError):  # the job started or ended meanwhile
                self._flux.job.cancel(self._handle, job_id, "cancelled by the ensemble sidecar")
                cancelled += 1
        return cancelled

    def terminate(self) -> ResizeResult:
        """Refuse further submits and hold every pending job (urgency 0); running jobs go on."""
        self._terminated = True
        with self._lock:
            pending = self._state.pending_ids()
        for job_id in pending:
            with contextlib.suppress(OSError):
                self._handle.rpc("job-manager.urgency", {"id": job_id, "urgency": 0}).get()
        self._notify()
        return ResizeResult(size=0, nodes_up=node_counts(self._resources()).node_up_count)

    async def aclose(self) -> None:
        """Stop reading the journal (Flux and its jobs are left alone)."""
        self._stopping.set()
        await asyncio.to_thread(self._reader.join, 2 * _POLL_SECONDS + 1)

    # -- internals -------------------------------------------------------------------------------

    def _open(self) -> Any:
        try:
            return self._flux.Flux(self._uri) if self._uri else self._flux.Flux()
        except OSError as exc:
            where = self._uri or os.environ.get("FLUX_URI", "(FLUX_URI is not set)")
            raise FluxUnavailable(f"cannot connect to Flux at {where}: {exc}; {HOW_TO_REACH_FLUX}") from None

    def _resources(self) -> dict[str, Any]:
        for topic in _RESOURCE_TOPICS:
            try:
                response: dict[str, Any] = self._handle.rpc(topic, nodeid=0).get()
                return response
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
        raise QueueError("nodes: this Flux answers neither resource status topic " + " nor ".join(_RESOURCE_TOPICS))

    def _read_journal(self) -> None:
        """Thread: apply journal events until :meth:`aclose`; its own handle (handles are per thread)."""
        handle = self._open()
        consumer = self._flux.job.JournalConsumer(handle, include_sentinel=True).start()
        while not self._stopping.is_set():
            try:
                event = consumer.poll(timeout=_POLL_SECONDS)
            except TimeoutError:
                continue
            if event is None:
                log.error("the Flux job journal ended; counts are no longer updated")
                return
            try:
                with self._lock:
                    if event.is_empty():
                        self._state.apply_event(-1, "", 0.0, {})
                    else:
                        self._state.apply_event(
                            int(event.jobid), event.name, event.timestamp, event.context or {}, jobspec=event.jobspec
                        )
            except RecordError:
                log.exception("unreadable journal event for job %s", event.jobid)
            self._loop.call_soon_threadsafe(self._notify)
        consumer.stop()


_NO_RESIZE = (
    "action: the flux backend does not resize; the MiniCluster's size is changed through Kubernetes (its /scale)"
)
