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
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ensemble_core import natsio, subjects
from ensemble_core.kube import Kube, api_client
from ensemble_core.messages import Applied, Decision, EventKind, JobReport, MemberEvent, MemberSpec, decode, encode
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import client_tls
from ensemble_core.subjects import MemberAddress
from services.actuator.drivers import Driver, DriverError, LocalDriver
from services.actuator.effects import CooldownPending, InvalidDecision, apply
from services.actuator.kubernetes import KubernetesDriver
from services.actuator.ledger import Ledger, LedgerDriver

log = logging.getLogger("actuator")

#: What the ledger's consumer decodes: either kind of job report (a union of tagged structs).
REPORTS = cast(type[JobReport], JobReport)

#: Applied decisions remembered per member (older ones have long left the redelivery window).
REMEMBER = 256


class ActuatorRecord(msgspec.Struct, kw_only=True):
    """A member's entry in the ``ensemble-actuator`` bucket."""

    applied: dict[str, Applied] = {}
    order: list[str] = []
    last_scale: float = 0.0


class Actuator:
    """Applies decisions through a driver."""

    def __init__(
        self, js: JetStreamContext, members: KeyValue, records: KeyValue, driver: Driver, cooldown: float
    ) -> None:
        self.js = js
        self.members = members
        self.records = records
        self.driver = driver
        self.cooldown = cooldown

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

    async def member(self, address: MemberAddress) -> tuple[MemberSpec, int] | None:
        """The member's record and revision, or None when it has none."""
        try:
            entry = await self.members.get(address.key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode(entry.value, MemberSpec), entry.revision or 0

    async def handle(self, decision: Decision, _msg: Msg) -> None:
        """Apply one decision (see the module docstring for the order of effects)."""
        address = MemberAddress(decision.namespace, decision.ensemble, decision.member)
        record, revision = await self.load(address)
        if decision.id in record.applied:
            await self.report(address, record.applied[decision.id], None, decision)
            return
        found = await self.member(address)
        if found is None:
            applied = self.applied(decision, ok=False, error="the member has no record (never created or removed)")
            await self.report(address, applied, None, decision)
            return
        member, member_revision = found
        now = time.time()
        if member.phase != "active":
            # terminate/complete moves the phase before its record is saved: after a crash between the
            # two, the redelivered decision finds its own effect and reports it as applied
            own = {"terminate": "terminated", "complete": "completed"}.get(decision.action) == member.phase
            error = "" if own else f"the member is already {member.phase}"
            await self.report(address, self.applied(decision, ok=own, error=error), None, decision)
            return
        event: EventKind | None = None
        try:
            effect = await apply(
                decision, member, self.driver, since_scale=now - record.last_scale, cooldown=self.cooldown
            )
        except CooldownPending as exc:
            raise natsio.Transient(f"{address}: {exc}", delay=exc.wait) from exc
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
            applied = self.applied(decision, ok=effect.ok, before=effect.before, after=effect.after, error=effect.error)
            event = effect.event
        record.applied[decision.id] = applied
        record.order.append(decision.id)
        for old in record.order[:-REMEMBER]:
            record.applied.pop(old, None)
        record.order = record.order[-REMEMBER:]
        try:
            if revision is None:
                await self.records.create(address.key, encode(record))
            else:
                await self.records.update(address.key, encode(record), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise natsio.Transient(f"{address}: record changed by another actuator; retrying", delay=0.1) from exc
        await self.report(address, applied, event, decision)

    async def set_phase(self, address: MemberAddress, member: MemberSpec, revision: int, phase: str) -> None:
        """Move the member's record to ``phase`` (compare-and-set)."""
        changed = msgspec.structs.replace(member, phase=phase)
        try:
            await self.members.update(address.key, encode(changed), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise natsio.Transient(f"{address}: member record changed meanwhile; retrying", delay=0.1) from exc

    def applied(
        self, decision: Decision, *, ok: bool, before: int | None = None, after: int | None = None, error: str = ""
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
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "actuator")
    local = LocalDriver(settings.sidecar_token, settings.sidecar_timeout, tls)
    driver: Driver = local
    if settings.mode == "kubernetes":
        driver = KubernetesDriver(Kube(api_client(settings.kube_api)), local, settings.complete_to_min_size)
    try:
        js = nc.jetstream()
        await natsio.declare(js)
        members = await natsio.bucket(js, subjects.MEMBERS_BUCKET)
        jobs = Ledger(await natsio.bucket(js, subjects.JOBS_BUCKET), members, driver)
        actuator = Actuator(
            js,
            members,
            await natsio.bucket(js, subjects.ACTUATOR_BUCKET),
            LedgerDriver(driver, jobs),
            settings.scale_cooldown,
        )
        subscription = await natsio.durable_subscription(js, natsio.ACTUATOR, settings)
        reports = await natsio.durable_subscription(js, natsio.LEDGER, settings)
        batch = settings.fetch_batch
        # the decisions, the job reports and the ledger's sweep: when one ends (a lost connection), all do
        tasks = [
            asyncio.create_task(
                natsio.consume(js, subscription, Decision, actuator.handle, service="actuator", stop=stop, batch=batch)
            ),
            asyncio.create_task(
                natsio.consume(js, reports, REPORTS, jobs.handle, service="actuator", stop=stop, batch=batch)
            ),
            asyncio.create_task(jobs.run_sweeps(stop)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await driver.close()
        await nc.drain()
