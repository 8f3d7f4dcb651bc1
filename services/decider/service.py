"""The decider: a durable pull consumer on ``ENSEMBLE_METRICS`` that runs each member's algorithm.

For each metrics message, in order:
1. read the member's record (``ensemble-members``) and its decider record (``ensemble-decider``);
2. a snapshot at or before the record's ``last_seq`` was already decided on: skip it — except the
   snapshot of ``last_seq`` itself, whose decisions are published again (a crash may have come between
   saving and publishing; ``Nats-Msg-Id`` deduplication makes the second publish harmless);
3. run the algorithm (pure), save the new state and its decisions with compare-and-set
   (``update(last=revision)``) — a replica that lost the race gets a transient error, the message is
   redelivered and then skipped by rule 2, so two replicas never interleave a member's state;
4. publish the decisions with their deterministic ids as ``Nats-Msg-Id``;
5. only then is the message acknowledged (by the consume loop).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ensemble_core import algorithms, natsio, subjects
from ensemble_core.messages import Decision, MemberSpec, Metrics, encode
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress

log = logging.getLogger("decider")


class DeciderRecord(msgspec.Struct, kw_only=True):
    """A member's entry in the ``ensemble-decider`` bucket."""

    algorithm: str
    last_seq: int
    state: msgspec.Raw
    decisions: list[Decision] = []


class Decider:
    """Handles metrics messages; one instance per process."""

    def __init__(self, js: JetStreamContext, members: KeyValue, records: KeyValue) -> None:
        self.js = js
        self.members = members
        self.records = records

    async def member(self, address: MemberAddress) -> MemberSpec | None:
        """The member's record, or None when it has none (never created, or removed)."""
        try:
            entry = await self.members.get(address.key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=MemberSpec)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise natsio.Poison(f"member record of {address} is unreadable: {exc}") from exc

    async def handle(self, metrics: Metrics, _msg: Msg) -> None:
        """Decide on one snapshot (see the module docstring for the order of effects)."""
        address = MemberAddress(metrics.namespace, metrics.ensemble, metrics.member)
        member = await self.member(address)
        if member is None:
            log.info("metrics for an unknown member; skipped", extra={"member": str(address)})
            return
        try:
            algorithm = algorithms.get(member.algorithm.name)
            options = algorithms.parse_options(member.algorithm.name, member.algorithm.options)
        except (algorithms.UnknownAlgorithm, algorithms.OptionsError) as exc:
            raise natsio.Poison(f"member {address}: {exc}") from exc

        revision: int | None = None
        record: DeciderRecord | None = None
        try:
            entry = await self.records.get(address.key)
            if entry.value:
                record = msgspec.json.decode(entry.value, type=DeciderRecord)
                revision = entry.revision
        except KeyNotFoundError:
            pass
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise natsio.Poison(f"decider record of {address} is unreadable: {exc}") from exc

        if record is not None and record.algorithm == algorithm.name and metrics.seq <= record.last_seq:
            if metrics.seq == record.last_seq:
                await self.publish(address, record.decisions)
            return

        if record is not None and record.algorithm == algorithm.name:
            state = msgspec.json.decode(record.state, type=algorithm.state_type)
        else:
            state = algorithm.initial_state(member, options)
        state, decisions = algorithm.decide(member, options, state, metrics)
        new_record = DeciderRecord(
            algorithm=algorithm.name,
            last_seq=metrics.seq,
            state=msgspec.Raw(msgspec.json.encode(state)),
            decisions=decisions,
        )
        try:
            if revision is None:
                await self.records.create(address.key, encode(new_record))
            else:
                await self.records.update(address.key, encode(new_record), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise natsio.Transient(f"{address}: state changed by another decider; retrying", delay=0.1) from exc
        await self.publish(address, decisions)
        for decision in decisions:
            log.info(
                "decided %s",
                decision.action,
                extra={"member": str(address), "id": decision.id, "size": decision.size, "reason": decision.reason},
            )

    async def publish(self, address: MemberAddress, decisions: list[Decision]) -> None:
        """Publish decisions, each with its id as ``Nats-Msg-Id``."""
        for decision in decisions:
            await self.js.publish(subjects.decisions(address), encode(decision), headers={"Nats-Msg-Id": decision.id})


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Consume metrics until ``stop`` (or SIGTERM), then drain."""
    stop = stop or asyncio.Event()
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "decider")
    try:
        js = nc.jetstream()
        await natsio.declare(js)
        decider = Decider(
            js,
            await natsio.bucket(js, subjects.MEMBERS_BUCKET),
            await natsio.bucket(js, subjects.DECIDER_BUCKET),
        )
        subscription = await natsio.durable_subscription(js, natsio.DECIDER, settings)
        await natsio.consume(
            js, subscription, Metrics, decider.handle, service="decider", stop=stop, batch=settings.fetch_batch
        )
    finally:
        await nc.drain()
