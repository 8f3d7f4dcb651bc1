"""The poller: one poll loop per active member, one ``Metrics`` message per snapshot.

Members come and go while it runs: it watches the ``ensemble-members`` bucket and starts a loop for
each active member, stopping it when the member's record is deleted or leaves the ``active`` phase.

Each loop asks the member's sidecar for its status every ``check_seconds`` and publishes a ``Metrics``
with the next per-member ``seq``. The sequence resumes from the last message in the stream after a
restart, and every snapshot is published with ``Nats-Msg-Id: <member key>:<seq>``, so a snapshot is
never published twice or out of order. An unreachable sidecar is retried with exponential backoff
(capped at ``MAX_BACKOFF``) and announced once with an ``unreachable`` event, then ``reachable``
when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ensemble_core import natsio, subjects
from ensemble_core.messages import EventKind, MemberEvent, MemberSpec, Metrics, encode
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import SidecarClient, SidecarError, SidecarUnavailable
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import StatusPayload

log = logging.getLogger("poller")

#: Longest wait between two attempts to reach an unreachable sidecar (seconds).
MAX_BACKOFF = 30.0


def to_metrics(address: MemberAddress, seq: int, taken: float, status: StatusPayload) -> Metrics:
    """The ``Metrics`` message of one status snapshot (works for an original sidecar's payload too)."""
    return Metrics(
        namespace=address.namespace,
        ensemble=address.ensemble,
        member=address.member,
        seq=seq,
        time=status.time if status.time is not None else taken,
        size=status.size if status.size is not None else status.nodes.node_up_count,
        nodes=status.nodes,
        queue=status.queue,
        waiting={nodes: count for nodes, count in status.waiting.items() if count > 0},
        next_jobs=status.next_jobs,
        finished=status.finished if status.finished is not None else status.queue.inactive,
        failed=status.failed or 0,
        groups=status.groups,
    )


async def next_seq(js: JetStreamContext, address: MemberAddress) -> int:
    """The sequence after the last snapshot of this member in the stream (0 for a new member)."""
    try:
        last = await js.get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
    except NotFoundError:
        return 0
    try:
        return msgspec.json.decode(last.data or b"", type=Metrics).seq + 1
    except (msgspec.DecodeError, msgspec.ValidationError):
        # an unreadable last message (dead-lettered by the decider) still used its sequence number
        return (last.seq or 0) + 1


class MemberLoop:
    """Polls one member until cancelled."""

    def __init__(self, js: JetStreamContext, settings: Settings, spec: MemberSpec) -> None:
        self.js = js
        self.settings = settings
        self.spec = spec
        self.address = MemberAddress(spec.namespace, spec.ensemble, spec.member)

    async def event(self, kind: EventKind, message: str) -> None:
        """Publish a lifecycle event about this member."""
        event = MemberEvent(
            namespace=self.address.namespace,
            ensemble=self.address.ensemble,
            member=self.address.member,
            event=kind,
            time=time.time(),
            message=message,
        )
        await self.js.publish(subjects.events(self.address), encode(event))

    async def run(self) -> None:
        """Poll, publish, sleep; back off while the sidecar is unreachable."""
        seq = await next_seq(self.js, self.address)
        backoff = self.spec.check_seconds
        reachable = True
        token = ensemble_token(self.settings.sidecar_token, self.spec.namespace, self.spec.ensemble)
        client = SidecarClient(self.spec.endpoint, token, self.settings.sidecar_timeout)
        async with client:
            while True:
                started = time.monotonic()
                taken = time.time()
                try:
                    status = await client.status()
                except (SidecarUnavailable, SidecarError) as exc:
                    if reachable:
                        reachable = False
                        log.warning("sidecar unreachable: %s", exc, extra={"member": str(self.address)})
                        await self.event("unreachable", str(exc))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                if not reachable:
                    reachable = True
                    backoff = self.spec.check_seconds
                    await self.event("reachable", f"sidecar at {self.spec.endpoint} answers again")
                metrics = to_metrics(self.address, seq, taken, status)
                try:
                    await self.js.publish(
                        subjects.metrics(self.address),
                        encode(metrics),
                        headers={"Nats-Msg-Id": f"{self.address.key}:{seq}"},
                    )
                except Exception as exc:  # NATS away: keep this seq, the next snapshot takes it
                    log.warning("publish failed: %s", exc, extra={"member": str(self.address)})
                else:
                    seq += 1
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.spec.check_seconds - elapsed))


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Poll every active member of the ``ensemble-members`` bucket until ``stop`` (or SIGTERM)."""
    stop = stop or asyncio.Event()
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "poller")
    loops: dict[str, tuple[MemberSpec, asyncio.Task[None]]] = {}
    try:
        js = nc.jetstream()
        await natsio.declare(js)
        members = await natsio.bucket(js, subjects.MEMBERS_BUCKET)
        watcher = await members.watchall()
        stopping = asyncio.create_task(stop.wait())
        while not stop.is_set():
            update = asyncio.create_task(watcher.updates(timeout=3600))  # type: ignore[no-untyped-call]
            done, _ = await asyncio.wait({update, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if update not in done:
                update.cancel()
                break
            try:
                entry = update.result()
            except Exception:  # the watcher timed out or the connection is being re-established
                continue
            if entry is None:  # marks the end of the initial values
                continue
            spec = None
            if entry.operation is None and entry.value:
                try:
                    spec = msgspec.json.decode(entry.value, type=MemberSpec)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.error("unreadable member record %s: %s", entry.key, exc)
            current = loops.get(entry.key)
            if current is not None and (spec is None or spec.phase != "active" or spec != current[0]):
                current[1].cancel()
                del loops[entry.key]
                log.info("stopped polling", extra={"member": entry.key})
            if spec is not None and spec.phase == "active" and entry.key not in loops:
                loops[entry.key] = (spec, asyncio.create_task(MemberLoop(js, settings, spec).run()))
                log.info("polling", extra={"member": entry.key, "endpoint": spec.endpoint})
        await watcher.stop()  # type: ignore[no-untyped-call]
    finally:
        for _, task in loops.values():
            task.cancel()
        for _, task in loops.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await nc.drain()
