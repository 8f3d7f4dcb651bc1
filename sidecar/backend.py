"""What the gRPC server needs from a queue backend: `local`, `sim` and `flux` implement it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from ensemble_core.wire import (
    EndedResult,
    JobInfo,
    ResizeResult,
    StatusPayload,
    SubmitPayload,
    SubmitResult,
)

#: Seconds a job may go on running on a node a shrink gave up before it is killed and reported lost (the
#: sidecar's ``--shrink-grace``); 0: never.
SHRINK_GRACE = 600.0
#: The type of the Flux job exception the ``flux`` backend raises on such a job: its journal reader knows it.
SHRINK_EXCEPTION = "ensemble-shrink"

Listener = Callable[[], None]
#: Called with the reason the backend cannot answer now, or None when it can again.
HealthListener = Callable[[str | None], None]

log = logging.getLogger(__name__)


def shrink_lost_reason(grace: float) -> str:
    """Why a job killed at the end of the shrink grace is lost (its ``reason`` and output)."""
    return f"lost: killed after the shrink grace of {grace:g} s (its node was given up)"


class Listeners:
    """The listeners of a backend: added, removed, and called after every change of its status.

    The ``local``, ``sim`` and ``flux`` backends inherit it, so ``add_listener``, ``remove_listener``
    and ``_notify`` behave the same in all three.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._health_listeners: list[HealthListener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` (no arguments) after every change of the status."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(problem)`` when the backend becomes unable to answer, and ``listener(None)``
        when it can again (only the ``flux`` backend, which can lose Flux, ever does)."""
        self._health_listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                # A broken watcher must not break the queue.
                log.exception("status listener failed")

    def _set_health(self, problem: str | None) -> None:
        for listener in list(self._health_listeners):
            try:
                listener(problem)
            except Exception:
                log.exception("health listener failed")


class Backend(Protocol):
    """A job queue behind the sidecar.

    ``status`` answers from memory; the actions are coroutines (the ``flux`` backend waits for Flux
    without blocking the loop). Methods raise :class:`sidecar.queue.QueueError` (message naming the
    field) for requests they refuse, :class:`sidecar.queue.QueueTerminated` for requests refused
    because the queue was terminated, and :class:`sidecar.queue.QueueUnavailable` when the queue
    cannot answer now (retry later). Listeners are called, without arguments, on every change of
    the status; health listeners when the backend stops or starts being able to answer.
    """

    def status(self) -> StatusPayload:
        """A snapshot of the queue and nodes now."""
        ...

    async def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Queue jobs (idempotent on ``payload.key``)."""
        ...

    async def job_info(self, job_id: int) -> JobInfo:
        """One job by id; :class:`QueueError` if there is none."""
        ...

    async def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs, oldest first."""
        ...

    async def job_page(self, offset: int, limit: int) -> list[JobInfo]:
        """At most ``limit`` jobs in submit order, from the ``offset``-th (0: the first)."""
        ...

    async def ended(self, after: int, limit: int) -> EndedResult:
        """At most ``limit`` jobs in the order they ended, after the ``after``-th (0: from the first)."""
        ...

    async def grow(self, size: int) -> ResizeResult:
        """Request ``size`` nodes, at least the current size."""
        ...

    async def shrink(self, size: int) -> ResizeResult:
        """Request ``size`` nodes, at most the current size: idle nodes go, busy ones drain; a job still on a
        given-up node after the shrink grace is killed and reported lost (``local`` and ``flux``)."""
        ...

    async def cancel(self, group: str) -> int:
        """Cancel the jobs of a group that have not finished, waiting and running; return how many."""
        ...

    async def terminate(self) -> ResizeResult:
        """Stop placing work; the size goes to 0 as running jobs end."""
        ...

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` on every change."""
        ...

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(problem)`` when the backend stops being able to answer, ``listener(None)`` when it can."""
        ...

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        ...

    async def aclose(self) -> None:
        """Stop everything the backend runs (no job process outlives it)."""
        ...
