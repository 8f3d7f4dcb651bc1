"""How the actuator changes a member: the driver interface and the local driver.

A driver applies one decision's effect and reports the size before and after. Drivers must be
idempotent, since a decision may be applied again after a crash before its record was saved: scale
targets are absolute, submits carry the decision id as idempotency key, terminate twice is harmless.
The Kubernetes driver (``services/actuator/kubernetes.py``: scale through the MiniCluster's ``/scale``
subresource) implements the same interface. Before a shrink, :meth:`Driver.drain` says whether the shrink
must wait for the nodes that leave to be idle: only where those nodes are fixed (a MiniCluster loses its
highest pods) does it; a local sidecar's own shrink drains whichever nodes end up idle.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, TypeVar, cast, get_args

from ensemble_core import health
from ensemble_core.messages import Applied, Decision, MemberSpec
from ensemble_core.sidecar_client import ClientTls, SidecarClient, SidecarError, SidecarUnavailable
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import Order, ResizePayload, ResizeResult, StatusPayload, SubmitPayload, SubmitResult

T = TypeVar("T")


class DriverError(Exception):
    """The effect could not be applied. ``transient`` errors are retried later; others are final."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Driver(Protocol):
    """Applies decisions to members of one kind (local sidecars, Kubernetes MiniClusters)."""

    async def size(self, member: MemberSpec) -> int:
        """The member's currently requested size."""
        ...

    async def scale(self, member: MemberSpec, target: int) -> int:
        """Request ``target`` nodes (already clamped to the member's bounds); return the size now requested."""
        ...

    async def drain(self, member: MemberSpec, target: int) -> int | None:
        """Before a shrink to ``target``: have the member give up the nodes that leave, and return how many of
        them still run work (the shrink waits while it is not 0), or None when there is nothing to wait for."""
        ...

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        """Queue the decision's jobs (idempotent on ``decision.id``); the sidecar's answer (its queue's name)."""
        ...

    async def terminate(self, member: MemberSpec) -> None:
        """End the member (its work is done): release every node."""
        ...

    async def complete(self, member: MemberSpec) -> int:
        """The member's work is done but it stays up; return the size it keeps."""
        ...

    async def report(self, decision: Decision, applied: Applied) -> None:
        """Show what became of a decision where people look (idempotent: called again on redelivery)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class LocalDriver:
    """Drives sidecars on the ``local`` queue: the sidecar itself grows and shrinks its virtual nodes."""

    def __init__(self, secret: str, timeout: float, tls: ClientTls | None = None) -> None:
        self.secret = secret
        self.timeout = timeout
        self.tls = tls
        self._clients: dict[tuple[str, str], SidecarClient] = {}

    def client(self, member: MemberSpec) -> SidecarClient:
        """One cached gRPC client per sidecar endpoint and ensemble token.

        Keyed by both: a pod IP is reused, and the sidecar that has an address now may be another
        ensemble's, which must never be handed this ensemble's token.
        """
        token = ensemble_token(self.secret, member.namespace, member.ensemble)
        key = (member.endpoint, token)
        client = self._clients.get(key)
        if client is None:
            client = SidecarClient(member.endpoint, token, self.timeout, tls=self.tls)
            self._clients[key] = client
        return client

    async def status(self, member: MemberSpec) -> StatusPayload:
        """The sidecar's status now."""
        return await _call(member, self.client(member).status())

    async def size(self, member: MemberSpec) -> int:
        status = await self.status(member)
        return status.size if status.size is not None else status.nodes.node_up_count

    async def scale(self, member: MemberSpec, target: int) -> int:
        current = await self.size(member)
        if target == current:
            return current
        action = "grow" if target > current else "shrink"
        result = await _call(member, self.client(member).action(action, ResizePayload(size=target), ResizeResult))
        return result.size

    async def drain(self, member: MemberSpec, target: int) -> int | None:
        """Nothing to wait for: the sidecar's shrink itself removes idle nodes and drains busy ones."""
        return None

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        payload = SubmitPayload(jobs=decision.jobs, order=_order(decision.order), seed=decision.seed, key=decision.id)
        return await _call(member, self.client(member).action("submit", payload, SubmitResult))

    async def terminate(self, member: MemberSpec) -> None:
        await _call(member, self.client(member).action("terminate", {}, dict))

    async def complete(self, member: MemberSpec) -> int:
        return await self.size(member)

    async def report(self, decision: Decision, applied: Applied) -> None:
        """Nothing to do: locally, the NATS ``Applied`` and member events are the whole report."""

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _order(order: str) -> Order:
    if order not in get_args(Order):
        raise DriverError(f"order: {order!r} is not random, ascending, descending or empty", transient=False)
    return cast(Order, order)


async def _call(member: MemberSpec, call: Awaitable[T]) -> T:
    """Await a call to ``member``'s sidecar, translating its failures into :class:`DriverError` (and counting them)."""
    try:
        return await call
    except SidecarUnavailable as exc:
        health.SIDECAR_ERRORS.labels(member.namespace, member.ensemble, "unavailable").inc()
        raise DriverError(str(exc), transient=True) from exc
    except SidecarError as exc:
        health.SIDECAR_ERRORS.labels(member.namespace, member.ensemble, "refused").inc()
        raise DriverError(str(exc), transient=False) from exc
