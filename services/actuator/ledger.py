"""The actuator's job ledger: indices for submitted jobs, and failed or lost attempts submitted again.

The ledger's model and rules are in :mod:`ensemble_core.ledger`; this is where they meet NATS and the
sidecars. Two paths change a member's record (``ensemble-jobs``, key: the member address), each with
compare-and-set, and each writes *before* it acts, so that a crash anywhere leaves a record from which
the same work is redone and never doubled:

* a **submit decision** (:meth:`Ledger.submit`, through :class:`LedgerDriver`): its jobs get their
  indices (recorded under the decision id, so a redelivered decision gets the same ones), then go to
  the sidecar with the decision id as key, then the queue that took them is recorded;
* a **job report** (:meth:`Ledger.handle`, a durable consumer ``ledger`` on ``ENSEMBLE_JOBS``): the
  attempt's end, or the member's queue replaced, is applied and the attempts to queue again are
  recorded as a submit in the same write; then every submit not yet answered is sent, and the report
  is acknowledged only after that.

Attempts are identified by (group, index, attempt) and a sidecar queues an attempt once, so a submit
sent twice queues nothing twice. A submit the sidecar cannot take now (unreachable) is sent again on
the report's redelivery and by a periodic sweep; one it refuses for good (its queue was terminated)
is recorded as refused and its jobs stay open. A member no longer active gets nothing submitted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ensemble_core import ledger, natsio
from ensemble_core.ledger import LedgerRecord
from ensemble_core.messages import Applied, Decision, InstanceChanged, JobEnded, JobReport, MemberSpec, decode
from ensemble_core.subjects import MemberAddress
from ensemble_core.wire import SubmitResult
from services.actuator.drivers import Driver, DriverError

log = logging.getLogger("actuator.ledger")

T = TypeVar("T")

#: Compare-and-set attempts before a change gives up (and the message is retried later).
CAS_TRIES = 8
#: Seconds between two sweeps for submits not yet answered.
SWEEP_SECONDS = 10.0


class Ledger:
    """Keeps the members' job ledgers and submits through ``driver``."""

    def __init__(self, bucket: KeyValue, members: KeyValue, driver: Driver) -> None:
        self.bucket = bucket
        self.members = members
        self.driver = driver
        #: members whose record may hold a submit not yet answered
        self.unsent: set[MemberAddress] = set()

    async def load(self, address: MemberAddress) -> tuple[LedgerRecord, int | None]:
        """The member's record and its revision (None: it has none yet)."""
        try:
            entry = await self.bucket.get(address.key)
        except KeyNotFoundError:
            return LedgerRecord(), None
        if not entry.value:
            return LedgerRecord(), entry.revision
        try:
            return ledger.decode_record(entry.value), entry.revision
        except ValueError as exc:
            raise natsio.Poison(f"job ledger of {address} is unreadable: {exc}") from exc

    async def change(self, address: MemberAddress, change: Callable[[LedgerRecord], T]) -> tuple[T, LedgerRecord]:
        """Apply ``change`` to the member's record and save it with compare-and-set, again on a conflict."""
        for _ in range(CAS_TRIES):
            record, revision = await self.load(address)
            result = change(record)
            ledger.prune(record)
            data = ledger.encode_record(record)
            try:
                if revision is None:
                    await self.bucket.create(address.key, data)
                else:
                    await self.bucket.update(address.key, data, last=revision)
            except KeyWrongLastSequenceError:
                continue
            return result, record
        raise natsio.Transient(f"{address}: job ledger changed {CAS_TRIES} times meanwhile; retrying", delay=0.2)

    async def member(self, address: MemberAddress) -> MemberSpec | None:
        """The member's record, or None when it has none."""
        try:
            entry = await self.members.get(address.key)
        except KeyNotFoundError:
            return None
        return decode(entry.value, MemberSpec) if entry.value else None

    # -- the submit path -------------------------------------------------------------------------

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        """Allocate the decision's jobs their indices, send them, record the queue that took them."""
        address = MemberAddress(member.namespace, member.ensemble, member.member)
        await self.change(address, lambda record: ledger.allocate(record, decision.id, decision.jobs))
        result = await self.send(member, address, decision.id, order=decision.order, seed=decision.seed)
        if result is None:
            raise DriverError(f"submit {decision.id}: refused by the sidecar", transient=False)
        return result

    async def send(
        self, member: MemberSpec, address: MemberAddress, key: str, *, order: str = "", seed: int = 0
    ) -> SubmitResult | None:
        """Send the recorded submit ``key`` and record the answer; None when the sidecar refused it for good.

        Raises the driver's transient :class:`DriverError` when the sidecar cannot be reached.
        """
        record, _ = await self.load(address)
        if key not in record.sent:
            return None
        jobs = ledger.to_send(record, key)
        decision = Decision(
            namespace=member.namespace,
            ensemble=member.ensemble,
            member=member.member,
            id=key,
            time=0.0,
            based_on=0,
            action="submit",
            jobs=jobs,
            order=order,
            seed=seed,
        )
        try:
            result = await self.driver.submit(member, decision)
        except DriverError as exc:
            if exc.transient:
                self.unsent.add(address)
                raise
            log.error("submit refused: %s", exc, extra={"member": str(address), "key": key})
            await self.change(address, lambda record: ledger.refused(record, key))
            return None
        lost, _ = await self.change(address, lambda record: ledger.answered(record, key, result.instance))
        if lost:
            # the queue that took them was gone already: queue them again
            log.warning("%d attempts went to a replaced queue", len(lost), extra={"member": str(address)})
            await self.change(address, lambda record: ledger.resubmit(record, lost))
            await self.flush(member, address)
        return result

    async def flush(self, member: MemberSpec, address: MemberAddress) -> None:
        """Send every submit of the member's record that no sidecar answered yet."""
        record, _ = await self.load(address)
        for key in ledger.pending(record):
            await self.send(member, address, key)
        self.unsent.discard(address)

    # -- the report path -------------------------------------------------------------------------

    async def handle(self, report: JobReport, _msg: Msg) -> None:
        """Apply one job report, queue again what it says to, and send it (see the module docstring)."""
        address = MemberAddress(report.namespace, report.ensemble, report.member)
        member = await self.member(address)
        active = member is not None and member.phase == "active"

        def apply(record: LedgerRecord) -> list[ledger.Identity]:
            again = ledger.instance_seen(record, report.instance)
            if isinstance(report, JobEnded):
                again += ledger.ended(record, report)
            if active and again:
                ledger.resubmit(record, again)
            return again

        again, record = await self.change(address, apply)
        if isinstance(report, JobEnded):
            log.info(
                "job %s[%d] attempt %d %s%s", report.group, report.index, report.attempt, report.result,
                f"; queued again as attempt {again[0].attempt}" if again else "",
                extra={"member": str(address)},
            )  # fmt: skip
        elif isinstance(report, InstanceChanged) and again:
            log.warning(
                "queue %s replaced by %s: %d attempts lost, queued again",
                report.previous or "?", report.instance, len(again), extra={"member": str(address)},
            )  # fmt: skip
        if member is not None and active and ledger.pending(record):
            try:
                await self.flush(member, address)
            except DriverError as exc:
                raise natsio.Transient(f"{address}: cannot submit again now: {exc}", delay=2.0) from exc

    async def sweep(self) -> None:
        """Send what some member's record still holds unsent (after a sidecar was unreachable for long)."""
        for address in list(self.unsent):
            member = await self.member(address)
            if member is None or member.phase != "active":
                self.unsent.discard(address)
                continue
            try:
                await self.flush(member, address)
            except (DriverError, natsio.Transient) as exc:
                log.info("still cannot submit: %s", exc, extra={"member": str(address)})

    async def find_unsent(self) -> None:
        """At start: every member whose record holds a submit not answered (a crash between write and send)."""
        try:
            keys = await self.bucket.keys()
        except Exception:  # nats-py raises NoKeysError (or a timeout) for an empty bucket
            return
        for key in keys:
            try:
                address = MemberAddress.from_key(key)
                record, _ = await self.load(address)
            except (ValueError, natsio.Poison) as exc:
                log.error("job ledger %s: %s", key, exc)
                continue
            if ledger.pending(record):
                self.unsent.add(address)

    async def run_sweeps(self, stop: asyncio.Event) -> None:
        """:meth:`find_unsent`, then :meth:`sweep` every :data:`SWEEP_SECONDS` until ``stop``."""
        await self.find_unsent()
        while not stop.is_set():
            await self.sweep()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_SECONDS):  # not wait_for: it can swallow a cancel (3.11)
                    await stop.wait()


class LedgerDriver:
    """A driver whose ``submit`` goes through the ledger; everything else is ``inner``'s."""

    def __init__(self, inner: Driver, ledger_: Ledger) -> None:
        self.inner = inner
        self.ledger = ledger_

    async def size(self, member: MemberSpec) -> int:
        return await self.inner.size(member)

    async def scale(self, member: MemberSpec, target: int) -> int:
        return await self.inner.scale(member, target)

    async def drain(self, member: MemberSpec, target: int) -> int | None:
        return await self.inner.drain(member, target)

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        return await self.ledger.submit(member, decision)

    async def terminate(self, member: MemberSpec) -> None:
        await self.inner.terminate(member)

    async def complete(self, member: MemberSpec) -> int:
        return await self.inner.complete(member)

    async def report(self, decision: Decision, applied: Applied) -> None:
        await self.inner.report(decision, applied)

    async def close(self) -> None:
        await self.inner.close()
