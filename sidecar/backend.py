"""What the gRPC server needs from a queue backend: `local`, `sim` and `flux` implement it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from ensemble_core.wire import (
    JobInfo,
    ResizeResult,
    StatusPayload,
    SubmitPayload,
    SubmitResult,
)

Listener = Callable[[], None]

log = logging.getLogger(__name__)


class Listeners:
    """The listeners of a backend: added, removed, and called after every change of its status.

    The ``local``, ``sim`` and ``flux`` backends inherit it, so ``add_listener``, ``remove_listener``
    and ``_notify`` behave the same in all three.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` (no arguments) after every change of the status."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                # A broken watcher must not break the queue.
                log.exception("status listener failed")


class Backend(Protocol):
    """A job queue behind the sidecar.

    Methods raise :class:`sidecar.queue.QueueError` (message naming the field) for requests they
    refuse, and :class:`sidecar.queue.QueueTerminated` for requests refused because the queue was
    terminated. Listeners are called, without arguments, on every change of the status.
    """

    def status(self) -> StatusPayload:
        """A snapshot of the queue and nodes now."""
        ...

    def submit(self, payload: SubmitPayload) -> SubmitResult:
        """Queue jobs (idempotent on ``payload.key``)."""
        ...

    def job_info(self, job_id: int) -> JobInfo:
        """One job by id; :class:`QueueError` if there is none."""
        ...

    def recent_jobs(self, limit: int) -> list[JobInfo]:
        """The ``limit`` most recently submitted jobs, oldest first."""
        ...

    def grow(self, size: int) -> ResizeResult:
        """Request ``size`` nodes, at least the current size."""
        ...

    def shrink(self, size: int) -> ResizeResult:
        """Request ``size`` nodes, at most the current size; running work is never killed."""
        ...

    def cancel(self, group: str) -> int:
        """Cancel the waiting jobs of a group; return how many."""
        ...

    def terminate(self) -> ResizeResult:
        """Stop placing work; the size goes to 0 as running jobs end."""
        ...

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` on every change."""
        ...

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        ...

    async def aclose(self) -> None:
        """Stop everything the backend runs (no job process outlives it)."""
        ...
