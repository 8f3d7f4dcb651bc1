"""Leader election with a ``coordination.k8s.io/v1`` Lease, the way client-go's leaderelection does it.

Candidates share one Lease. Its ``spec`` says who holds it (``holderIdentity``), for how long
(``leaseDurationSeconds``), and when it was last renewed (``renewTime``). A candidate:

- creates the Lease when there is none (409 AlreadyExists: someone else was first);
- takes it when it has *expired*: its record (holder, renew time, transitions) was not seen to change for
  ``leaseDurationSeconds`` on the candidate's own monotonic clock — the candidate never compares its wall
  clock with the holder's, as client-go does not;
- as the holder, renews it every ``retry`` seconds, and stops leading when it could not renew for
  ``renew_deadline`` seconds (less than the duration, so it has stopped before anyone may take over);
- writes with optimistic concurrency: every change is a PATCH carrying the ``resourceVersion`` read, so of
  two candidates writing after the same read the API server accepts one and answers the other 409
  Conflict (that one reads again). The RBAC this needs: get, create and patch on ``leases`` in one
  namespace;
- releases the Lease when it stops (``holderIdentity`` emptied, duration 1 s), so a standby takes over at
  its next retry instead of after a whole duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from kubernetes import client as k8s

from ensemble_core.kube import Backoff, Kube, KubeError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "coordination.k8s.io", "v1", "leases"
Obj = dict[str, Any]


def identity() -> str:
    """This candidate's name: its pod (``POD_NAME``) or host name, its process id and a random part."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}_{os.urandom(3).hex()}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Elects one leader among the candidates that share ``namespace/name`` (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        *,
        identity: str,
        duration: float = 15.0,
        renew_deadline: float | None = None,
        retry: float | None = None,
    ) -> None:
        self.kube = kube
        # one attempt per call: a refused write is this elector's to handle (read again), not retried blindly
        self._kube = Kube(kube.api, Backoff(attempts=1))
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline if renew_deadline is not None else duration * 2 / 3
        self.retry = retry if retry is not None else duration / 7.5
        #: the Lease's spec as last read, and when (monotonic) it was seen to change
        self._observed: Obj | None = None
        self._observed_at = 0.0
        self._last_renewed = 0.0
        self.leading = asyncio.Event()

    async def _get(self) -> Obj | None:
        try:
            found = await self._kube.call(
                f"get lease {self.namespace}/{self.name}",
                self._kube.custom.get_namespaced_custom_object,
                GROUP, VERSION, self.namespace, PLURAL, self.name,
            )  # fmt: skip
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return cast(Obj, found)

    def _spec(self, transitions: int) -> Obj:
        now = _now()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this candidate holds the Lease afterwards (see the module docstring)."""
        lease = await self._get()
        if lease is None:
            spec = self._spec(0)
            body: Obj = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                await self._kube.call(
                    f"create lease {self.namespace}/{self.name}",
                    self._kube.custom.create_namespaced_custom_object,
                    GROUP, VERSION, self.namespace, PLURAL, body,
                )  # fmt: skip
            except KubeError as exc:
                if exc.status == 409:
                    return False  # another candidate created it first
                raise
            self._saw(spec)
            return True
        spec = dict(lease.get("spec") or {})
        self._saw(spec)
        holder = spec.get("holderIdentity") or ""
        held_by_us = holder == self.identity
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        if holder and not held_by_us and time.monotonic() - self._observed_at < duration:
            return False  # held by another, and renewed within its duration as far as we have seen
        transitions = int(spec.get("leaseTransitions") or 0)
        wanted = self._spec(transitions if held_by_us else transitions + 1)
        if held_by_us:
            wanted["acquireTime"] = spec.get("acquireTime") or wanted["acquireTime"]
        patch = {"metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")}, "spec": wanted}
        try:
            await self._patch(patch)
        except KubeError as exc:
            if exc.status == 409:
                return False  # someone wrote since we read: read again next time
            raise
        self._saw(wanted)
        if not held_by_us:
            log.info("acquired the lease", extra={"lease": f"{self.namespace}/{self.name}", "from": holder})
        return True

    async def _patch(self, patch: Obj) -> None:
        await self._kube.call(
            f"patch lease {self.namespace}/{self.name}",
            self._kube.custom.patch_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, self.name, patch,
        )  # fmt: skip

    def _saw(self, spec: Obj) -> None:
        record = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseTransitions", "leaseDurationSeconds")}
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()

    async def release(self) -> None:
        """Give the Lease up if this candidate holds it (a standby then takes it at its next retry)."""
        with contextlib.suppress(Exception):
            lease = await self._get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            await self._patch(
                {
                    "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
                    "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _now()},
                }
            )
            log.info("released the lease", extra={"lease": f"{self.namespace}/{self.name}"})

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except (KubeError, k8s.ApiException, OSError) as exc:
            log.warning("lease not acquired or renewed: %s", exc)
            return False

    async def run(self, lead: Callable[[asyncio.Event], Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
        """Until ``stop``: wait to acquire the Lease, then run ``lead(stopped)`` while it is renewed.

        ``lead`` gets an event that is set when leadership ends (not renewed within ``renew_deadline``, or
        ``stop``); it must return soon after. After losing the Lease the candidate stands by again.
        """
        try:
            while not stop.is_set():
                if not await self._attempt():
                    await _sleep_unless(stop, self.retry)
                    continue
                self._last_renewed = time.monotonic()
                self.leading.set()
                log.info("leading", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity})
                ended = asyncio.Event()
                leader = asyncio.create_task(lead(ended))
                try:
                    while not stop.is_set() and not leader.done():
                        await _sleep_unless(stop, self.retry)
                        if stop.is_set():
                            break
                        if await self._attempt():
                            self._last_renewed = time.monotonic()
                        elif time.monotonic() - self._last_renewed >= self.renew_deadline:
                            log.error("lease not renewed for %.1f s; stopped leading", self.renew_deadline)
                            break
                finally:
                    ended.set()
                    self.leading.clear()
                    await asyncio.wait({leader})
                if not leader.cancelled() and leader.exception() is not None:
                    raise leader.exception()  # type: ignore[misc]
        finally:
            await self.release()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):  # not wait_for (3.11 cancellation)
            await stop.wait()
