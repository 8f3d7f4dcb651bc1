"""The decider: a durable pull consumer on ``ENSEMBLE_METRICS`` that runs each member's algorithm.

For each metrics message, in order:
1. look up the member's record (``ensemble-members``, cached and kept current by a KV watch) and its
   decider record (``ensemble-decider``, cached with its revision — a copy changed by another replica is
   caught by the compare-and-set of step 5, which drops the copy and retries);
0. an event snapshot (``Metrics.event > 0``, pushed by a queue change after check ``seq``) is only for
   algorithms that take events (``algorithms.takes_events``: ``rules``); any other algorithm counts
   checks and never sees one (it is acknowledged without a write). Snapshots are ordered by
   (``seq``, ``event``): the record keeps ``last_event`` beside ``last_seq``;
2. a snapshot at or before the record's ``last_seq`` was already consumed: skip it — except the
   snapshot of ``last_seq`` itself, whose decisions are published again (a crash may have come between
   saving and publishing; ``Nats-Msg-Id`` deduplication makes the second publish harmless);
3. the decisions of ``last_seq`` are published again before they are replaced, unless this process
   published them itself (another replica may have saved them and died before publishing);
4. a **stale** snapshot (see :func:`stale_after`) takes no decision: its seq is recorded so that it is
   not consumed twice, the algorithm's state is left as it was, and the algorithm later sees the gap
   in seq as missed polls. Without fresh metrics the decider therefore does nothing — above all it
   never shrinks a member on what its nodes looked like minutes ago;
5. otherwise run the algorithm (pure) and save the new state and its decisions with compare-and-set
   (``Nats-Expected-Last-Subject-Sequence``: the revision read) — a replica that lost the race gets a
   transient error, the message is redelivered and then skipped by rule 2, so two replicas never
   interleave a member's state;
6. publish the decisions with their deterministic ids as ``Nats-Msg-Id``;
7. only then is the message acknowledged.

Messages of different members are independent, so they are handled concurrently (see
:func:`natsio.consume_groups`), each member's messages strictly in stream order: the round trips of one
member (save, acknowledge) overlap with those of the others. The snapshots of one member in a fetched
batch (``ENSEMBLE_DECIDER_BATCH``, 4096) are decided together: consecutive fresh ones are run through the
algorithm in memory and saved with **one** compare-and-set whose ``decisions`` are all of theirs, and
each is acknowledged only after that write and the publication of those decisions (see
:meth:`Decider.handle_group`). Under a backlog this divides the writes by the snapshots a member has
per batch, which is where the throughput comes from (bench/decider.py); no guarantee above is relaxed.
With two replicas a member's snapshots may be split between them; an older one that arrives after a
newer one was saved is skipped by rule 2, and the algorithm sees the gap as a missed poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from ensemble_core import algorithms, health, natsio, subjects
from ensemble_core.messages import Decision, MemberSpec, Metrics, decode, encode
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress

log = logging.getLogger("decider")
#: Decisions published, by action: the Grafana dashboard's decisions and their kinds.
DECISIONS = Counter("ensemble_decisions_total", "Decisions published, by action", [*health.ENSEMBLE_LABELS, "action"])

#: A snapshot is stale once it has waited in the stream for this many of its member's checks ...
STALE_CHECKS = 3
#: ... or for this many seconds, whichever is longer (clock steps and short pauses are not staleness).
STALE_MIN_SECONDS = 5.0


def stale_after(member: MemberSpec) -> float:
    """Seconds a snapshot may wait in ``ENSEMBLE_METRICS`` before the decider refuses to act on it.

    The age is measured from the time the NATS server stored the message (its JetStream timestamp) to
    the time the decider consumes it — so it is the decider's own backlog, whatever clock the sidecar
    reports in ``Metrics.time`` (a simulated queue may run on a virtual one). It is
    ``max(STALE_CHECKS * check_seconds, STALE_MIN_SECONDS)``: 30 s for the default 10 s checks. It
    assumes the decider's and the NATS server's clocks agree to within a few seconds (NTP).
    """
    return max(STALE_CHECKS * member.check_seconds, STALE_MIN_SECONDS)


class DeciderRecord(msgspec.Struct, kw_only=True):
    """A member's entry in the ``ensemble-decider`` bucket."""

    algorithm: str
    last_seq: int
    state: msgspec.Raw
    decisions: list[Decision] = []
    #: The last event snapshot consumed after check ``last_seq`` (``Metrics.event``; 0: the check itself).
    last_event: int = 0


def _follows(last_seq: int, last_event: int, metrics: Metrics) -> bool:
    """Whether ``metrics`` is the next snapshot after (``last_seq``, ``last_event``): the next check, or an
    event snapshot after the same check (events are numbered upwards; one lost in the poller is no gap)."""
    if metrics.event == 0:
        return metrics.seq == last_seq + 1
    return metrics.seq == last_seq and metrics.event > last_event


def _ignored(metrics: Metrics, algorithm: algorithms.Algorithm[Any, Any]) -> bool:
    """An event snapshot for an algorithm that counts checks: it never sees one (acknowledged, no write)."""
    return metrics.event > 0 and not algorithms.takes_events(algorithm)


class _Pending:
    """Snapshots of one member decided in memory whose state is not saved yet (see :meth:`Decider.handle_group`)."""

    __slots__ = (
        "address", "decisions", "indices", "key", "last_event", "last_seq", "member", "revision", "state", "subject",
    )  # fmt: skip

    def __init__(
        self, address: MemberAddress, key: str, subject: str, member: Member, revision: int, last_seq: int, state: Any
    ) -> None:
        self.address = address
        self.key = key
        self.subject = subject
        self.member = member
        self.revision = revision
        self.last_seq = last_seq
        self.last_event = 0
        self.state = state
        self.decisions: list[Decision] = []
        self.indices: list[int] = []


class Member(NamedTuple):
    """A member's record with its algorithm looked up and its options parsed (done once per change)."""

    spec: MemberSpec
    algorithm: algorithms.Algorithm[Any, Any]
    options: msgspec.Struct


class _Unusable(NamedTuple):
    """A member record the decider cannot use; every metrics message of the member is poison until fixed."""

    error: str


def _member(value: bytes, key: str) -> Member | _Unusable:
    try:
        spec = decode(value, MemberSpec)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _Unusable(f"member record {key} is unreadable: {exc}")
    try:
        algorithm = algorithms.get(spec.algorithm.name)
        options = algorithms.parse_options(spec.algorithm.name, spec.algorithm.options)
    except (algorithms.UnknownAlgorithm, algorithms.OptionsError) as exc:
        return _Unusable(f"member {key}: {exc}")
    return Member(spec, algorithm, options)


#: Longest the decider waits at start for the member records to be loaded (seconds).
LOAD_WAIT = 10.0


class MemberCache:
    """Member records of ``ensemble-members``, read once and then kept current by a KV watch.

    Members change rarely (created, then a phase change at the end) while their metrics arrive every
    check, so the hot path reads this dictionary instead of the bucket, with the algorithm and its
    parsed options ready. A member not in the cache yet (created after the watch delivered its initial
    values, its update not arrived yet) is read from the bucket. Entries carry their revision so that a
    slower read never overwrites a newer update.
    """

    def __init__(self, bucket: KeyValue) -> None:
        self.bucket = bucket
        self._entries: dict[str, tuple[int, Member | _Unusable | None]] = {}
        self._follower: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def start(self, wait: float = LOAD_WAIT) -> None:
        """Load every member and follow the bucket's changes until :meth:`stop`.

        Waits up to ``wait`` seconds for the initial values, so that the first metrics do not each
        read their member from the bucket; past that, it goes on (a member not loaded yet is read).
        """
        watcher = await self.bucket.watchall()
        self._follower = asyncio.create_task(self._follow(watcher))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), wait)

    async def stop(self) -> None:
        """Stop following the bucket (the cached records stay readable)."""
        if self._follower is not None:
            self._follower.cancel()
            # asyncio.wait, not `await` under suppress(CancelledError): that would also swallow a
            # cancellation of this task arriving meanwhile, and the caller would never stop
            await asyncio.wait({self._follower})

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial values
                    self._loaded.set()
                    continue
                deleted = entry.operation is not None or not entry.value
                self._store(entry.key, entry.revision or 0, None if deleted else entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _store(self, key: str, revision: int, value: bytes | None) -> Member | _Unusable | None:
        current = self._entries.get(key)
        if current is not None and current[0] > revision:
            return current[1]
        member = None if value is None else _member(value, key)
        self._entries[key] = (revision, member)
        return member

    def cached(self, key: str) -> Member | None:
        """The member under ``key`` if it is cached and usable, else None (then :meth:`get` tells why)."""
        cached = self._entries.get(key)
        return cached[1] if cached is not None and isinstance(cached[1], Member) else None

    async def get(self, key: str) -> Member | None:
        """The member stored under ``key``, or None when it has none (never created, or removed).

        Raises :class:`natsio.Poison` when the record cannot be decoded or names an unknown algorithm
        or bad options.
        """
        cached = self._entries.get(key)
        if cached is not None:
            member = cached[1]
        else:
            try:
                entry = await self.bucket.get(key)
            except KeyNotFoundError:
                return None
            member = self._store(key, entry.revision or 0, entry.value or None)
        if isinstance(member, _Unusable):
            raise natsio.Poison(member.error)
        return member


class Decider:
    """Handles metrics messages; one instance per process."""

    def __init__(self, js: JetStreamContext, members: KeyValue, records: KeyValue, publisher: natsio.Publisher) -> None:
        self.js = js
        self.members = MemberCache(members)
        self.records = records
        #: Writes of existing records and decisions go through it (one reply subscription, no timer per call).
        self.publisher = publisher
        #: The decider record last read or written per member key, with its revision and whether its
        #: decisions are known to be published: it has none, or this process published them (those of a
        #: record read from the bucket may never have been).
        self._records: dict[str, tuple[int, DeciderRecord, bool]] = {}
        #: Each member's key and decisions subject (escaping the names on every message is measurable).
        self._names: dict[MemberAddress, tuple[str, str]] = {}

    async def record(self, key: str) -> tuple[int | None, DeciderRecord | None]:
        """The decider record under ``key`` and its revision (None, None before the member's first metrics)."""
        cached = self._records.get(key)
        if cached is not None:
            return cached[0], cached[1]
        try:
            entry = await self.records.get(key)
        except KeyNotFoundError:
            return None, None
        if not entry.value:
            return None, None
        try:
            record = decode(entry.value, DeciderRecord)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise natsio.Poison(f"decider record {key} is unreadable: {exc}") from exc
        revision = entry.revision or 0
        # its decisions may never have been published (a replica died between saving and publishing)
        self._records[key] = (revision, record, not record.decisions)
        return revision, record

    async def handle_group(self, items: list[tuple[Metrics, Msg]]) -> list[natsio.Outcome]:
        """Decide on the snapshots of one subject in a fetched batch, in order; one outcome per snapshot.

        The common case — a member whose records are cached, each snapshot the successor of the last
        one, fresh, same algorithm, the last decisions published by this process — runs the algorithm
        over the snapshots in memory and then saves **one** record for all of them (compare-and-set,
        ``last_seq`` the last one, ``decisions`` all of theirs), publishes their decisions in order and
        only then reports them stored, so each is acknowledged after the write that covers it. Under a
        backlog (a restart, a burst) a member has several snapshots per batch, and this is what keeps the
        decider's throughput close to the stream's. A crash before the write loses nothing: the snapshots
        are redelivered and decided again from the saved state (the algorithms are deterministic, the
        decision ids too). Anything else — a snapshot out of order, stale, the first of a member, a
        record not cached — first saves what is pending, then takes the one-snapshot path
        (:meth:`handle`) with all its rules.
        """
        outcomes: list[natsio.Outcome] = [None] * len(items)
        pending: _Pending | None = None
        for index, (metrics, msg) in enumerate(items):
            try:
                pending_now = self._extend(pending, metrics, msg, index)
            except Exception:  # a state that does not decode, an algorithm that fails: the one-snapshot
                pending_now = None  # path meets the same error and settles this snapshot with it
            if pending_now is not None:
                pending = pending_now
                continue
            if pending is not None:
                await self._flush(pending, outcomes)
                pending = None
            try:
                await self.handle(metrics, msg)
            except Exception as exc:
                outcomes[index] = exc
        if pending is not None:
            await self._flush(pending, outcomes)
        return outcomes

    def _extend(self, pending: _Pending | None, metrics: Metrics, msg: Msg, index: int) -> _Pending | None:
        """Decide ``metrics`` in memory on top of ``pending`` if it is the common case, else None."""
        address = MemberAddress(metrics.namespace, metrics.ensemble, metrics.member)
        names = self._names.get(address)
        if names is None:
            return None
        key, subject = names
        if pending is not None and pending.key != key:
            return None
        member = self.members.cached(key)
        if member is None or (pending is not None and pending.member is not member):
            return None
        spec, algorithm, options = member
        if _ignored(metrics, algorithm):
            return None
        if pending is None:
            cached = self._records.get(key)
            if cached is None or not cached[2]:
                return None
            revision, record, _ = cached
            if record.algorithm != algorithm.name or not _follows(record.last_seq, record.last_event, metrics):
                return None
            if _waited(msg) > stale_after(spec):
                return None
            state = decode(record.state, algorithm.state_type)
            pending = _Pending(address, key, subject, member, revision, record.last_seq, state)
            pending.last_event = record.last_event
        elif not _follows(pending.last_seq, pending.last_event, metrics):
            # no staleness check: stored after the pending group's first snapshot, which was fresh
            return None
        pending.state, decisions = algorithm.decide(spec, options, pending.state, metrics)
        pending.last_seq = metrics.seq
        pending.last_event = metrics.event
        pending.decisions.extend(decisions)
        pending.indices.append(index)
        return pending

    async def _flush(self, pending: _Pending, outcomes: list[natsio.Outcome]) -> None:
        """Save ``pending`` as one record, publish its decisions; its snapshots' outcome is how that went."""
        record = DeciderRecord(
            algorithm=pending.member.algorithm.name,
            last_seq=pending.last_seq,
            state=msgspec.Raw(msgspec.json.encode(pending.state)),
            decisions=pending.decisions,
            last_event=pending.last_event,
        )
        try:
            await self.save(pending.key, pending.revision, record)
            await self.publish(pending.subject, pending.decisions)
        except Exception as exc:
            for index in pending.indices:
                outcomes[index] = exc
            return
        self._records[pending.key] = (*self._records[pending.key][:2], True)
        self._log_decisions(str(pending.address), pending.decisions)

    def _log_decisions(self, member: str, decisions: Sequence[Decision]) -> None:
        """Log and count decisions just published (their first publish: never those published again)."""
        for decision in decisions:
            DECISIONS.labels(decision.namespace, decision.ensemble, decision.action).inc()
            log.info(
                "decided %s",
                decision.action,
                extra={"member": member, "id": decision.id, "size": decision.size, "reason": decision.reason},
            )

    async def handle(self, metrics: Metrics, msg: Msg | None) -> None:
        """Decide on one snapshot (see the module docstring for the order of effects).

        ``msg`` is the JetStream message the snapshot came in; its stream timestamp tells how long it
        waited. A direct call without one (a tool, a test) takes the snapshot as fresh.
        """
        address = MemberAddress(metrics.namespace, metrics.ensemble, metrics.member)
        names = self._names.get(address)
        if names is None:
            names = self._names[address] = (address.key, subjects.decisions(address))
        key, subject = names
        member = await self.members.get(key)
        if member is None:
            log.info("metrics for an unknown member; skipped", extra={"member": str(address)})
            return
        spec, algorithm, options = member
        if _ignored(metrics, algorithm):
            return
        # an event snapshot belongs to check ``seq``: it is ahead when that check is not decided yet
        next_seq = metrics.seq if metrics.event else metrics.seq - 1

        revision, record = await self.record(key)
        same_algorithm = record is not None and record.algorithm == algorithm.name
        if record is not None and same_algorithm and next_seq > record.last_seq and msg is not None:
            # The poller numbers snapshots without gaps, so an earlier one is still in flight — most
            # likely at another replica. Read the record afresh; if the gap is still there, hold this
            # snapshot briefly so a member's snapshots are decided in order. A snapshot that never comes
            # (dead-lettered) stops holding after max(HOLD_FOR_GAP, check_seconds): then the algorithm sees a gap.
            self._records.pop(key, None)
            revision, record = await self.record(key)
            same_algorithm = record is not None and record.algorithm == algorithm.name
            if (
                record is not None
                and same_algorithm
                and next_seq > record.last_seq
                and _waited(msg) < max(HOLD_FOR_GAP, spec.check_seconds)
            ):
                raise natsio.Transient(f"{key}: snapshot {record.last_seq + 1} not decided yet", delay=0.05)
        last = (record.last_seq, record.last_event) if record is not None else (-1, 0)
        if record is not None and same_algorithm and (metrics.seq, metrics.event) <= last:
            if (metrics.seq, metrics.event) == last:
                await self.publish(subject, record.decisions)
            return
        if record is not None and record.decisions and not self._records[key][2]:
            await self.publish(subject, record.decisions)

        waited = _waited(msg)
        if waited > stale_after(spec):
            if record is not None and same_algorithm:
                await self.save(
                    key,
                    revision,
                    DeciderRecord(
                        algorithm=algorithm.name, last_seq=metrics.seq, state=record.state, last_event=metrics.event
                    ),
                )
            # Without a state yet (or for a new algorithm) nothing is saved: the first fresh snapshot
            # starts it, rather than a snapshot that may no longer describe the member.
            log.info(
                "stale metrics; no decision",
                extra={"member": str(address), "seq": metrics.seq, "waited": round(waited, 1)},
            )
            return

        if record is not None and same_algorithm:
            state = decode(record.state, algorithm.state_type)
        else:
            state = algorithm.initial_state(spec, options)
        state, decisions = algorithm.decide(spec, options, state, metrics)
        new_record = DeciderRecord(
            algorithm=algorithm.name,
            last_seq=metrics.seq,
            state=msgspec.Raw(msgspec.json.encode(state)),
            decisions=decisions,
            last_event=metrics.event,
        )
        await self.save(key, revision, new_record)
        await self.publish(subject, decisions)
        self._records[key] = (*self._records[key][:2], True)
        self._log_decisions(str(address), decisions)

    async def save(self, key: str, revision: int | None, record: DeciderRecord) -> None:
        """Store ``record`` under ``key`` if the stored one is still at ``revision`` (created if None).

        Raises :class:`natsio.Transient` when another decider changed it first.
        """
        try:
            if revision is None:
                new_revision = await self.records.create(key, encode(record))
            else:
                new_revision = await self.publisher.publish(
                    f"$KV.{subjects.DECIDER_BUCKET}.{key}",
                    encode(record),
                    {"Nats-Expected-Last-Subject-Sequence": str(revision)},
                )
        except KeyWrongLastSequenceError as exc:
            self._records.pop(key, None)
            raise natsio.Transient(f"{key}: state changed by another decider; retrying", delay=0.1) from exc
        except Exception:
            # the outcome is unknown (the write may have landed): read the record again next time
            self._records.pop(key, None)
            raise
        self._records[key] = (new_revision, record, not record.decisions)

    async def publish(self, subject: str, decisions: Sequence[Decision]) -> None:
        """Publish decisions on ``subject``, each with its id as ``Nats-Msg-Id``, in order.

        All are sent before any acknowledgement is awaited (one connection keeps their order); an error
        of any is raised once all have been answered.
        """
        if not decisions:
            return
        sent = [await self.publisher.send(subject, encode(d), {"Nats-Msg-Id": d.id}) for d in decisions]
        await asyncio.wait(sent)
        for future in sent:
            future.result()


#: Longest a snapshot waits for an earlier one of its member still being decided elsewhere (seconds).
HOLD_FOR_GAP = 3.0


def _waited(msg: Msg | None) -> float:
    """Seconds since the NATS server stored ``msg`` (0 without a message)."""
    if msg is None:
        return 0.0
    return time.time() - msg.metadata.timestamp.timestamp()


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Consume metrics until ``stop`` (or SIGTERM), then drain."""
    stop = stop or asyncio.Event()
    natsio.stop_on_signals(stop)
    nc = await natsio.connect(settings, "decider")
    try:
        js = nc.jetstream()
        await natsio.declare(js, settings)
        publisher = natsio.Publisher(nc)
        await publisher.start()
        decider = Decider(
            js,
            await natsio.bucket(js, subjects.MEMBERS_BUCKET),
            await natsio.bucket(js, subjects.DECIDER_BUCKET),
            publisher,
        )
        await decider.members.start()
        try:
            subscription = await natsio.durable_subscription(js, natsio.DECIDER, settings)
            # a lost ack only redelivers a snapshot the member's last_seq already covers: skipped, harmless
            await natsio.consume_groups(
                js, subscription, Metrics, decider.handle_group, service="decider", stop=stop,
                batch=settings.decider_batch, confirm_ack=False,
            )  # fmt: skip
        finally:
            await decider.members.stop()
            await publisher.stop()
    finally:
        await nc.drain()
