"""The actuator: a durable pull consumer on ``ENSEMBLE_DECISIONS`` that applies each decision once.

For each decision, in order:
1. a decision already in the member's ``ensemble-actuator`` record was applied: its ``Applied`` is
   published again (deduplicated by ``Nats-Msg-Id``) and nothing else happens;
2. the effect is applied through the driver (``scale`` to the absolute target clamped to
   [minSize, maxSize], after the member's cooldown; ``submit`` with the decision id as idempotency key;
   ``terminate``; ``complete``);
3. the record (applied ids, last scale time) is saved with compare-and-set; a terminated or completed
   member's record in ``ensemble-members`` moves to that phase;
4. the driver reports it (Kubernetes: the Ensemble's status and an Event), ``Applied`` and a member event
   are published; then the message is acknowledged.
A transient failure (sidecar unreachable, cooldown) naks the decision for a later retry; a final one
(the sidecar refused) is reported as ``Applied(ok=false)`` and acknowledged.

Shrinks that wait (Kubernetes mode). Lowering a MiniCluster's size deletes its highest pods whatever runs
there, so a shrink first drains them (:meth:`~services.actuator.kubernetes.KubernetesDriver.drain`) and
is applied only once they are idle, or once ``ENSEMBLE_SHRINK_GRACE`` seconds have passed since its drain
began. The wait is neither a handler that blocks (it would hold up the member's later decisions — a grow
among them — and let them pass their ack wait) nor a chain of naks (every redelivery counts toward the
consumer's limit, ``natsio.MAX_DELIVER``, and a 600 s grace would need dozens): the shrink is stored as
the member's pending drain in its ``ensemble-actuator`` record — the decision and when its drain began —
and the message is acknowledged, its effect (the drain) being stored. :meth:`Actuator.watch_drains` then
applies that decision again every :data:`DRAIN_POLL` seconds until it goes through; only then are its
``Applied`` and ``scaled`` event published. So:

- restart-safe: a restarted actuator finds the pending drains in the bucket (:data:`DRAIN_SCAN`, also
  what lets one replica take over another's) and goes on with the same start, so the grace is not
  restarted; a redelivered shrink finds itself pending and goes on the same way;
- other members never wait: one member's drain is one status call per poll, and its lock
  (:meth:`Actuator._lock`) keeps the watcher and that member's decisions from interleaving in a process;
- a later decision of the member is applied meanwhile: a grow (or a scale to the current size) grows the
  sidecar, which undrains the ranks, and ends the drain; a terminate or complete ends it too; a shrink
  takes the drain over, keeping its start unless it gives up more nodes. The decision a drain was pending
  for is then reported not applied (superseded). A submit leaves the drain alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable
from typing import cast

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from ensemble_core import health, natsio, subjects
from ensemble_core.kube import Kube, api_client
from ensemble_core.messages import Applied, Decision, EventKind, JobReport, MemberEvent, MemberSpec, decode, encode
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import client_tls
from ensemble_core.subjects import MemberAddress
from services.actuator.budget import Budget, Limits, Reservation
from services.actuator.drivers import Driver, DriverError, LocalDriver
from services.actuator.effects import CooldownPending, Drain, DrainPending, InvalidDecision, apply, target_size
from services.actuator.kubernetes import KubernetesDriver
from services.actuator.ledger import Ledger, LedgerDriver

log = logging.getLogger("actuator")

#: The Grafana dashboard's apply latency and failed applies.
APPLY_SECONDS = Histogram(
    "ensemble_apply_seconds",
    "Seconds from a decision (its time: the check it was decided on) to the actuator's report of its effect",
    [*health.ENSEMBLE_LABELS, "action"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
APPLIED = Counter(
    "ensemble_applied_total",
    "Decisions the actuator applied (result ok) or could not (result failed), by action",
    [*health.ENSEMBLE_LABELS, "action", "result"],
)

#: What the ledger's consumer decodes: either kind of job report (a union of tagged structs).
REPORTS = cast(type[JobReport], JobReport)

#: Applied decisions remembered per member (older ones have long left the redelivery window).
REMEMBER = 256
#: Seconds between two tries of a member's pending drain (one sidecar status call each).
DRAIN_POLL = 1.0
#: Seconds between two scans of the ``ensemble-actuator`` bucket for pending drains this actuator does not
#: follow yet (its own before a restart, or another replica's).
DRAIN_SCAN = 30.0
#: Seconds between two looks at the node budget for held-back grows that may now go on (another replica's
#: release is seen within this; this actuator's own at once).
BUDGET_POLL = 1.0


class PendingDrain(msgspec.Struct, kw_only=True):
    """A shrink waiting for the nodes that leave to be idle: its decision, and when its drain began (unix s)."""

    decision: Decision
    since: float


class ActuatorRecord(msgspec.Struct, kw_only=True):
    """A member's entry in the ``ensemble-actuator`` bucket."""

    applied: dict[str, Applied] = {}
    order: list[str] = []
    last_scale: float = 0.0
    drain: PendingDrain | None = None


class Actuator:
    """Applies decisions through a driver."""

    def __init__(
        self,
        js: JetStreamContext,
        members: KeyValue,
        records: KeyValue,
        driver: Driver,
        cooldown: float,
        shrink_grace: float = 600.0,
        budget: Budget | None = None,
    ) -> None:
        self.js = js
        self.members = members
        self.records = records
        self.driver = driver
        self.cooldown = cooldown
        self.shrink_grace = shrink_grace
        self._draining: set[MemberAddress] = set()
        self._locks: dict[MemberAddress, asyncio.Lock] = {}
        #: The node budget (docs/budget.md); None: no budget, no grants kept.
        self.budget = budget
        #: Set when this actuator released nodes: held-back grows are looked at again at once.
        self._released = asyncio.Event()

    async def load(self, address: MemberAddress) -> tuple[ActuatorRecord, int | None]:
        """The member's record and its KV revision (None when it has none yet)."""
        try:
            entry = await self.records.get(address.key)
        except KeyNotFoundError:
            return ActuatorRecord(), None
        if not entry.value:
            return ActuatorRecord(), entry.revision
        try:
            return decode(entry.value, ActuatorRecord), entry.revision
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise natsio.Poison(f"actuator record of {address} is unreadable: {exc}") from exc

    async def save(self, address: MemberAddress, record: ActuatorRecord, revision: int | None) -> None:
        """Store the member's record (compare-and-set on ``revision``; None: it must not exist yet)."""
        try:
            if revision is None:
                await self.records.create(address.key, encode(record))
            else:
                await self.records.update(address.key, encode(record), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise natsio.Transient(f"{address}: record changed by another actuator; retrying", delay=0.1) from exc

    async def member(self, address: MemberAddress) -> tuple[MemberSpec, int] | None:
        """The member's record and revision, or None when it has none."""
        try:
            entry = await self.members.get(address.key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode(entry.value, MemberSpec), entry.revision or 0

    async def handle(self, decision: Decision, _msg: Msg | None) -> None:
        """Apply one decision (see the module docstring for the order of effects and for shrinks that wait)."""
        address = MemberAddress(decision.namespace, decision.ensemble, decision.member)
        async with self._lock(address):
            await self._handle(address, decision)

    async def _handle(self, address: MemberAddress, decision: Decision, raise_of: str | None = None) -> None:
        """Apply ``decision`` (``raise_of``: it applies again the held-back grow of that id, to a larger grant)."""
        record, revision = await self.load(address)
        if decision.id in record.applied:
            await self.report(address, record.applied[decision.id], None, decision)
            return
        found = await self.member(address)
        if raise_of is not None and self.budget is not None and (found is None or found[0].phase != "active"):
            await self.budget.forget(address)  # a held-back grow of a member that is no more: nothing to raise
            return
        if found is None or found[0].phase != "active":
            if found is None:
                applied = self.applied(decision, ok=False, error="the member has no record (never created or removed)")
            else:
                # terminate/complete moves the phase before its record is saved: after a crash between the
                # two, the redelivered decision finds its own effect and reports it as applied
                phase = found[0].phase
                own = {"terminate": "terminated", "complete": "completed"}.get(decision.action) == phase
                applied = self.applied(decision, ok=own, error="" if own else f"the member is already {phase}")
                if own and decision.action == "terminate" and self.budget is not None:
                    await self._release(self.budget.forget(address))
            if record.drain is not None and record.drain.decision.id == decision.id:
                record.drain = None  # nothing left to drain for
                await self.save(address, record, revision)
            await self.report(address, applied, None, decision)
            return
        member, member_revision = found
        budgeted: Reservation | None = None
        if self.budget is not None and decision.action == "scale" and decision.size is not None:
            budgeted = await self._reserve(address, member, decision, raise_of)
            if budgeted is None:
                log.info("held-back grow superseded meanwhile", extra={"member": str(address), "id": decision.id})
                return
            decision = msgspec.structs.replace(decision, size=budgeted.granted)
        now = time.time()
        drain = Drain(started=self._drain_start(record, member, decision, now), now=now, grace=self.shrink_grace)
        event: EventKind | None = None
        try:
            effect = await apply(
                decision,
                member,
                self.driver,
                since_scale=now - record.last_scale,
                cooldown=self.cooldown,
                drain=drain,
            )
        except CooldownPending as exc:
            raise natsio.Transient(f"{address}: {exc}", delay=exc.wait) from exc
        except DrainPending as exc:
            await self._pending(address, record, revision, decision, drain.started, exc)
            return
        except InvalidDecision as exc:
            raise natsio.Poison(str(exc)) from exc
        except DriverError as exc:
            if exc.transient:
                raise natsio.Transient(str(exc), delay=2.0) from exc
            applied = self.applied(decision, ok=False, error=str(exc))
            event = "failed"
        else:
            if effect.phase is not None:
                await self.set_phase(address, member, member_revision, effect.phase)
            if effect.scaled:
                record.last_scale = now
            applied = self.applied(
                decision,
                ok=effect.ok,
                before=effect.before,
                after=effect.after,
                error=effect.error,
                wanted=None if budgeted is None else budgeted.wanted,
            )
            event = effect.event
            await self._settle_budget(address, decision, effect.after)
        superseded = self._end_drain(record, decision, applied)
        self._remember(record, applied)
        await self.save(address, record, revision)
        if superseded is not None:
            await self.report(address, superseded[1], None, superseded[0])
        await self.report(address, applied, event, decision)
        labels = (decision.namespace, decision.ensemble, decision.action)
        APPLIED.labels(*labels, "ok" if applied.ok else "failed").inc()
        APPLY_SECONDS.labels(*labels).observe(max(0.0, applied.time - decision.time))

    # -- the node budget (docs/budget.md, services/actuator/budget.py) ---------------------------

    async def _reserve(
        self, address: MemberAddress, member: MemberSpec, decision: Decision, raise_of: str | None
    ) -> Reservation | None:
        """Record the scale's want and reserve its grant before it is applied (None: a stale raise)."""
        assert self.budget is not None and decision.size is not None
        want = target_size(member, decision.size)
        try:
            current = await self.driver.size(member)
        except DriverError as exc:
            if exc.transient:
                raise natsio.Transient(f"{address}: cannot read its size for the budget: {exc}", delay=2.0) from exc
            current = member.size
        unseen, gone = await self._census() if want > current else ({}, set())
        reservation = await self.budget.reserve(
            address, member, decision, want, current, unseen=unseen, gone=gone, raise_of=raise_of
        )
        if reservation is not None and reservation.held:
            log.info(
                "the node budget holds the member back: %d of %d nodes wanted",
                reservation.granted,
                reservation.wanted,
                extra={"member": str(address), "id": decision.id, "budget": self.budget.limits.describe()},
            )
        return reservation

    async def _census(self) -> tuple[dict[str, MemberSpec], set[str]]:
        """Active members the budget has no entry for yet (they hold their size at creation), and the entries
        of members whose record is gone (they hold nothing any more)."""
        assert self.budget is not None
        record, _ = await self.budget.load()
        try:
            keys = set(await self.members.keys())
        except NoKeysError:
            keys = set()
        gone = set(record.members) - keys
        unseen: dict[str, MemberSpec] = {}
        for key in keys:
            with contextlib.suppress(KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                entry = await self.members.get(key) if key not in record.members else None
                if entry is not None and entry.value:
                    spec = decode(entry.value, MemberSpec)
                    if spec.phase == "active":
                        unseen[key] = spec
        return unseen, gone

    async def _settle_budget(self, address: MemberAddress, decision: Decision, after: int | None) -> None:
        """After an applied scale, terminate or complete: the member holds ``after`` nodes; wake the raises
        if nodes were released."""
        if self.budget is None or after is None:
            return
        if decision.action == "terminate":
            await self._release(self.budget.forget(address))
        elif decision.action == "complete":
            await self._release(self.budget.settle(address, after, want=after))
        elif decision.action == "scale":
            await self._release(self.budget.settle(address, after))

    async def _release(self, change: Awaitable[bool]) -> None:
        if await change:
            self._released.set()

    async def watch_budget(self, stop: asyncio.Event) -> None:
        """Until ``stop``: apply again each held-back grow the budget now has nodes for, at once after this
        actuator released nodes and every :data:`BUDGET_POLL` seconds (another replica's release, a restart)."""
        if self.budget is None:
            await stop.wait()  # nothing to watch; returning would end the other tasks (run: FIRST_COMPLETED)
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BUDGET_POLL):
                    await self._released.wait()
            self._released.clear()
            try:
                raises = await self.budget.raises()
            except Exception as exc:  # NATS unreachable for now: the next look tries again
                log.warning("cannot read the node budget: %s", exc)
                continue
            for address, held, grant in raises:
                await self._raise(address, held, grant)

    async def _raise(self, address: MemberAddress, held: Decision, grant: int) -> None:
        """Apply the held-back decision ``held`` again, now that ``grant`` nodes are free for it."""
        again = msgspec.structs.replace(
            held,
            id=f"{held.id}:budget:{grant}",
            reason=f"nodes freed in the budget: {grant} of the {held.size} wanted ({held.reason})",
        )
        try:
            async with self._lock(address):
                await self._handle(address, again, raise_of=held.id)
        except natsio.Transient as exc:
            log.info("held-back grow: retrying: %s", exc, extra={"member": str(address)})
        except natsio.Poison as exc:
            log.error("held-back grow dropped: %s", exc, extra={"member": str(address)})
        except Exception:
            log.exception("held-back grow: trying again later", extra={"member": str(address)})

    # -- shrinks that wait -----------------------------------------------------------------------

    def _lock(self, address: MemberAddress) -> asyncio.Lock:
        """The lock that keeps one member's decisions and its drain's tries from interleaving in this process."""
        lock = self._locks.get(address)
        if lock is None:
            lock = self._locks[address] = asyncio.Lock()
        return lock

    @staticmethod
    def _drain_start(record: ActuatorRecord, member: MemberSpec, decision: Decision, now: float) -> float:
        """When the drain of ``decision`` (if it is a shrink) began: the pending drain's start for the decision
        it is pending for, and for a shrink that gives up no more nodes than it (it takes the drain over);
        ``now`` otherwise."""
        pending = record.drain
        if pending is None or decision.action != "scale" or decision.size is None:
            return now
        if pending.decision.id == decision.id:
            return pending.since
        wanted, waited_for = target_size(member, decision.size), target_size(member, pending.decision.size or 0)
        return pending.since if wanted >= waited_for else now

    async def _pending(
        self,
        address: MemberAddress,
        record: ActuatorRecord,
        revision: int | None,
        decision: Decision,
        since: float,
        why: DrainPending,
    ) -> None:
        """Keep ``decision`` as the member's pending drain (stored once), for :meth:`watch_drains` to finish."""
        pending = record.drain
        if pending is None or pending.decision.id != decision.id:
            superseded = None if pending is None else self._supersede(record, pending.decision, decision)
            record.drain = PendingDrain(decision=decision, since=since)
            await self.save(address, record, revision)
            if pending is not None and superseded is not None:
                await self.report(address, superseded, None, pending.decision)
            log.info(
                "shrink waits for the nodes that leave: %s (grace %g s)",
                why,
                self.shrink_grace,
                extra={"member": str(address), "id": decision.id, "size": decision.size},
            )
        else:
            log.debug("shrink still waits: %s", why, extra={"member": str(address), "id": decision.id})
        self._draining.add(address)

    def _end_drain(
        self, record: ActuatorRecord, decision: Decision, applied: Applied
    ) -> tuple[Decision, Applied] | None:
        """End the member's pending drain if ``decision`` ends it: its own outcome, or an applied scale,
        terminate or complete (which supersedes it: returned with its report, to publish)."""
        pending = record.drain
        if pending is None:
            return None
        if pending.decision.id == decision.id:
            record.drain = None
            return None
        if not applied.ok or decision.action not in ("scale", "terminate", "complete"):
            return None
        record.drain = None
        return pending.decision, self._supersede(record, pending.decision, decision)

    def _supersede(self, record: ActuatorRecord, old: Decision, new: Decision) -> Applied:
        """Record the pending drain's decision ``old`` as not applied because ``new`` came first; its report."""
        applied = self.applied(
            old, ok=False, error=f"superseded by decision {new.id} ({new.action}) before the nodes it gave up were idle"
        )
        self._remember(record, applied)
        return applied

    @staticmethod
    def _remember(record: ActuatorRecord, applied: Applied) -> None:
        record.applied[applied.decision] = applied
        record.order.append(applied.decision)
        for old in record.order[:-REMEMBER]:
            record.applied.pop(old, None)
        record.order = record.order[-REMEMBER:]

    async def watch_drains(self, stop: asyncio.Event) -> None:
        """Until ``stop``: every :data:`DRAIN_POLL` seconds try each pending drain again (see the module
        docstring), and every :data:`DRAIN_SCAN` seconds look in the bucket for pending drains not followed yet."""
        scanned = -math.inf
        while not stop.is_set():
            if time.monotonic() - scanned >= DRAIN_SCAN:
                scanned = time.monotonic()
                await self._scan_drains()
            if self._draining:
                await asyncio.gather(*(self._try_drain(address) for address in list(self._draining)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_POLL):
                    await stop.wait()

    async def _scan_drains(self) -> None:
        try:
            keys = await self.records.keys()
        except NoKeysError:
            return
        except Exception as exc:  # NATS unreachable for now: the next scan tries again
            log.warning("cannot list the actuator records for pending drains: %s", exc)
            return
        for key in keys:
            try:
                address = MemberAddress.from_key(key)
                record, _ = await self.load(address)
            except (ValueError, natsio.Poison, KeyNotFoundError) as exc:
                log.warning("actuator record %r: %s", key, exc)
                continue
            except Exception as exc:
                log.warning("cannot read the actuator record %r: %s", key, exc)
                return
            if record.drain is not None and address not in self._draining:
                log.info("following a pending drain", extra={"member": str(address), "id": record.drain.decision.id})
                self._draining.add(address)

    async def _try_drain(self, address: MemberAddress) -> None:
        """Apply the member's pending drain's decision again; forget the member once it has none."""
        try:
            async with self._lock(address):
                record, _ = await self.load(address)
                if record.drain is None:
                    self._draining.discard(address)
                    return
                await self._handle(address, record.drain.decision)
        except natsio.Transient as exc:
            log.info("pending drain: retrying: %s", exc, extra={"member": str(address)})
        except natsio.Poison as exc:
            log.error("pending drain dropped: %s", exc, extra={"member": str(address)})
            self._draining.discard(address)
        except Exception:
            log.exception("pending drain: trying again later", extra={"member": str(address)})

    async def set_phase(self, address: MemberAddress, member: MemberSpec, revision: int, phase: str) -> None:
        """Move the member's record to ``phase`` (compare-and-set)."""
        changed = msgspec.structs.replace(member, phase=phase)
        try:
            await self.members.update(address.key, encode(changed), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise natsio.Transient(f"{address}: member record changed meanwhile; retrying", delay=0.1) from exc

    def applied(
        self,
        decision: Decision,
        *,
        ok: bool,
        before: int | None = None,
        after: int | None = None,
        error: str = "",
        wanted: int | None = None,
    ) -> Applied:
        """The ``Applied`` report of a decision."""
        return Applied(
            namespace=decision.namespace,
            ensemble=decision.ensemble,
            member=decision.member,
            decision=decision.id,
            time=time.time(),
            ok=ok,
            action=decision.action,
            size_before=before,
            size_after=after,
            error=error,
            size_wanted=wanted,
        )

    async def report(
        self, address: MemberAddress, applied: Applied, event: EventKind | None, decision: Decision
    ) -> None:
        """Report through the driver, then publish ``Applied`` and, for a change of the member, its event.

        Every step is idempotent (the NATS messages are deduplicated), so a redelivered decision reports again.
        """
        try:
            await self.driver.report(decision, applied)
        except DriverError as exc:
            raise natsio.Transient(f"{address}: cannot report {decision.id}: {exc}", delay=2.0) from exc
        await self.js.publish(
            subjects.applied(address), encode(applied), headers={"Nats-Msg-Id": f"applied:{applied.decision}"}
        )
        if not applied.ok:
            log.warning("not applied: %s", applied.error, extra={"member": str(address), "id": applied.decision})
        if event is None:
            return
        message = applied.error or f"{applied.action} {applied.size_before} -> {applied.size_after}"
        member_event = MemberEvent(
            namespace=address.namespace,
            ensemble=address.ensemble,
            member=address.member,
            event=event,
            time=applied.time,
            size=applied.size_after,
            message=message,
        )
        await self.js.publish(
            subjects.events(address), encode(member_event), headers={"Nats-Msg-Id": f"event:{applied.decision}"}
        )


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Consume decisions until ``stop`` (or SIGTERM), then drain."""
    stop = stop or asyncio.Event()
    tls = client_tls(settings)  # a bad CA file stops the service here, naming the variable
    limits = Limits.from_settings(settings)  # so does a bad budget
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "actuator")
    local = LocalDriver(settings.sidecar_token, settings.sidecar_timeout, tls)
    driver: Driver = local
    if settings.mode == "kubernetes":
        driver = KubernetesDriver(Kube(api_client(settings.kube_api)), local, settings.complete_to_min_size)
    try:
        js = nc.jetstream()
        await natsio.declare(js, settings)
        members = await natsio.bucket(js, subjects.MEMBERS_BUCKET)
        jobs = Ledger(await natsio.bucket(js, subjects.JOBS_BUCKET), members, driver)
        actuator = Actuator(
            js,
            members,
            await natsio.bucket(js, subjects.ACTUATOR_BUCKET),
            LedgerDriver(driver, jobs),
            settings.scale_cooldown,
            settings.shrink_grace,
            Budget(await natsio.bucket(js, subjects.BUDGET_BUCKET), limits) if limits.enabled else None,
        )
        if limits.enabled:
            log.info("node budget: %s", limits.describe())
        subscription = await natsio.durable_subscription(js, natsio.ACTUATOR, settings)
        reports = await natsio.durable_subscription(js, natsio.LEDGER, settings)
        batch = settings.fetch_batch
        # the decisions, the job reports, the ledger's sweep and the pending drains: when one ends (a lost
        # connection), all do
        tasks = [
            asyncio.create_task(
                natsio.consume(js, subscription, Decision, actuator.handle, service="actuator", stop=stop, batch=batch)
            ),
            asyncio.create_task(
                natsio.consume(js, reports, REPORTS, jobs.handle, service="actuator", stop=stop, batch=batch)
            ),
            asyncio.create_task(jobs.run_sweeps(stop)),
            asyncio.create_task(actuator.watch_drains(stop)),
            asyncio.create_task(actuator.watch_budget(stop)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await driver.close()
        await nc.drain()
