"""The one place that talks to NATS: connection, stream / consumer / bucket declarations, the consume loop.

Services use only this module's helpers, so the idioms of DESIGN.md live here once:
- streams, consumers and KV buckets are declared idempotently, with ``ENSEMBLE_NATS_REPLICAS`` replicas,
  and an existing stream's configuration is never silently rewritten (other subjects are logged; another
  replica count stops the service, and ``ensemble nats-replicas`` / :func:`set_replicas` changes it);
- consumers are durable pull consumers; a message is acknowledged (``ack_sync``) only after its handler
  stored its effect (:func:`consume` one message at a time, :func:`consume_groups` a subject's messages
  of a batch at once); a :class:`Transient` error naks with a delay; a message that cannot be decoded,
  has the wrong version, raises :class:`Poison`, or was delivered too often goes to the dead-letter
  subject and is terminated;
- hot-path JetStream publishes go through :class:`Publisher` (one reply subscription, no timer per call);
- SIGTERM / SIGINT drain the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ensemble_core import health, subjects
from ensemble_core.messages import Addressed, Base, DeadLetter, Decision, check_version, decode_with, encode
from ensemble_core.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: Deliveries after which a message that keeps failing is dead-lettered instead of retried.
MAX_DELIVER = 20
#: Seconds a transient failure waits before the message is redelivered.
RETRY_DELAY = 1.0
#: Seconds between two log lines of the same NATS connection error.
ERROR_LOG_EVERY = 30.0
#: Bytes of a bad message kept in its dead letter.
DEADLETTER_KEEP = 64 * 1024


def _stream(name: str, *filters: str) -> StreamConfig:
    """One of our streams: on disk, a week of messages, two minutes of ``Nats-Msg-Id`` deduplication."""
    return StreamConfig(
        name=name, subjects=list(filters), storage=StorageType.FILE, max_age=7 * 24 * 3600, duplicate_window=120
    )


STREAMS = (
    _stream(subjects.EVENTS_STREAM, subjects.ALL_EVENTS, subjects.ALL_APPLIED, subjects.ALL_DEADLETTER),
    _stream(subjects.METRICS_STREAM, subjects.ALL_METRICS),
    _stream(subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS),
    _stream(subjects.JOBS_STREAM, subjects.ALL_JOBS),
)

#: Buckets and how many revisions of a key each keeps.
BUCKETS = {
    subjects.MEMBERS_BUCKET: 1,
    subjects.DECIDER_BUCKET: 1,
    subjects.ACTUATOR_BUCKET: 1,
    subjects.JOBS_BUCKET: 1,
    subjects.BUDGET_BUCKET: 1,
    subjects.POLLERS_BUCKET: 1,
    subjects.OWNERS_BUCKET: 1,
}


def _bucket_ttl(bucket: str, settings: Settings) -> float | None:
    """Seconds after which a key not written again expires: only the pollers' heartbeats, long after the lease
    (liveness is judged by heartbeats seen to change; expiry only clears away the keys of pollers gone)."""
    return 10 * settings.poller_lease_seconds if bucket == subjects.POLLERS_BUCKET else None


def stream_names() -> list[str]:
    """Every stream of ours, the buckets' streams (``KV_<bucket>``) included."""
    return [str(config.name) for config in STREAMS] + [f"KV_{bucket}" for bucket in BUCKETS]


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer: its name, stream and subject filter."""

    name: str
    stream: str
    filter_subject: str


DECIDER = Durable("decider", subjects.METRICS_STREAM, subjects.ALL_METRICS)
ACTUATOR = Durable("actuator", subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS)
#: The actuator's ledger: job reports, to submit failed and lost attempts again.
LEDGER = Durable("ledger", subjects.JOBS_STREAM, subjects.ALL_JOBS)


async def connect(settings: Settings, name: str) -> Client:
    """Connect to NATS, retrying until it answers (or SIGTERM), reconnecting for ever, every change logged.

    NATS may come up after the service (a new cluster, a restarted StatefulSet): until it answers the
    service is not ready. Repeated identical connection errors are logged once per ``ERROR_LOG_EVERY``.
    """
    last_error: list[tuple[str, float]] = [("", 0.0)]

    async def error_cb(exc: Exception) -> None:
        text, now = str(exc), time.monotonic()
        if text != last_error[0][0] or now - last_error[0][1] > ERROR_LOG_EVERY:
            log.warning("nats error: %s", text, extra={"client": name})
            last_error[0] = (text, now)

    async def disconnected_cb() -> None:
        log.warning("nats disconnected", extra={"client": name})

    async def reconnected_cb() -> None:
        log.info("nats reconnected", extra={"client": name})

    async def closed_cb() -> None:
        log.info("nats connection closed", extra={"client": name})

    connecting = asyncio.create_task(
        nats.connect(
            servers=[url.strip() for url in settings.nats_url.split(",")],
            name=name,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=closed_cb,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
        )
    )
    stopping = asyncio.create_task(_stopping.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting})
        raise ConnectionAbortedError("stopped before NATS could be reached")
    return connecting.result()


class ReplicasChanged(SettingsError):
    """An existing stream or bucket has another replica count than ``ENSEMBLE_NATS_REPLICAS``; the message says
    how to change it (it is never changed silently)."""


#: Seconds ``declare`` keeps retrying while JetStream does not answer (a cluster electing its leaders).
DECLARE_PATIENCE = 120.0


async def declare(js: JetStreamContext, settings: Settings | None = None) -> None:
    """:func:`declare_once`, tried again while JetStream answers "not now" (a timeout, no responders, 503):
    a cluster that lost a server, or is electing a stream's leader, does for a few seconds, and a service
    starting then must wait for it rather than exit."""
    deadline = time.monotonic() + DECLARE_PATIENCE
    while True:
        try:
            await declare_once(js, settings)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("JetStream not answering while declaring streams (%s); trying again", type(exc).__name__)
            await asyncio.sleep(1.0)


async def declare_once(js: JetStreamContext, settings: Settings | None = None) -> None:
    """Create the streams and KV buckets that do not exist yet (with ``settings.nats_replicas`` replicas);
    leave existing ones as they are.

    An existing one with another replica count stops the service with :class:`ReplicasChanged`: a service
    started with ``ENSEMBLE_NATS_REPLICAS=3`` against streams of one replica would otherwise run, unnoticed,
    without the redundancy it was configured for. ``ensemble nats-replicas N`` (:func:`set_replicas`)
    changes them explicitly.
    """
    settings = settings or Settings()
    replicas = settings.nats_replicas
    wrong: list[str] = []
    for config in STREAMS:
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(_with_replicas(config, replicas))
            log.info("created stream", extra={"stream": config.name, "replicas": replicas})
            continue
        if sorted(info.config.subjects or []) != sorted(config.subjects or []):
            log.warning(
                "stream exists with other subjects; not changing it",
                extra={"stream": config.name, "found": info.config.subjects, "wanted": config.subjects},
            )
        if (info.config.num_replicas or 1) != replicas:
            wrong.append(f"{config.name} has {info.config.num_replicas or 1}")
    for bucket, history in BUCKETS.items():
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                bucket=bucket, history=history, replicas=replicas, ttl=_bucket_ttl(bucket, settings)
            )
            log.info("created bucket", extra={"bucket": bucket, "replicas": replicas})
            continue
        found = (await js.stream_info(f"KV_{bucket}")).config.num_replicas or 1
        if found != replicas:
            wrong.append(f"bucket {bucket} has {found}")
    if wrong:
        raise ReplicasChanged(
            f"ENSEMBLE_NATS_REPLICAS={replicas}, but {', '.join(wrong)} replica(s); nothing was changed. Change "
            f"them with `ensemble nats-replicas {replicas}` (needs a cluster of at least {replicas} servers), "
            "or set ENSEMBLE_NATS_REPLICAS to what they have"
        )
    health.mark_ready()


def _with_replicas(config: StreamConfig, replicas: int) -> StreamConfig:
    return dataclasses.replace(config, num_replicas=replicas)


@dataclass(frozen=True)
class ReplicaChange:
    """What :func:`set_replicas` found and did for one stream."""

    stream: str
    before: int
    after: int
    changed: bool


async def set_replicas(
    js: JetStreamContext, replicas: int, *, apply: bool, timeout: float = 60.0
) -> list[ReplicaChange]:
    """Set every existing stream and bucket of ours to ``replicas`` replicas (``apply=False``: only report).

    Each stream is updated in turn (a stream update changes only its ``num_replicas``) and, before the
    next, waited on until its cluster reports every replica current, so at most one stream is ever
    catching up. Streams that do not exist yet are skipped: services create them with their setting.
    """
    changes: list[ReplicaChange] = []
    for name in stream_names():
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        before = info.config.num_replicas or 1
        if before == replicas or not apply:
            changes.append(ReplicaChange(name, before, before, False))
            continue
        info.config.num_replicas = replicas
        await js.update_stream(info.config)
        deadline = time.monotonic() + timeout
        while True:
            cluster = (await js.stream_info(name)).cluster
            peers = list(cluster.replicas or []) if cluster is not None else []
            if len(peers) + 1 >= replicas and all(peer.current for peer in peers):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name}: its {replicas} replicas were not current after {timeout:g} s")
            await asyncio.sleep(0.2)
        log.info("changed replicas", extra={"stream": name, "before": before, "after": replicas})
        changes.append(ReplicaChange(name, before, replicas, True))
    return changes


async def bucket(js: JetStreamContext, name: str) -> KeyValue:
    """A KV bucket declared by :func:`declare`."""
    return await js.key_value(name)


def consumer_config(durable: Durable, settings: Settings) -> ConsumerConfig:
    """The configuration of one of our durable pull consumers."""
    return ConsumerConfig(
        durable_name=durable.name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=durable.filter_subject,
        ack_wait=settings.ack_wait,
        # a message that keeps failing is dead-lettered by the consume loop at MAX_DELIVER deliveries;
        # the server stops delivering it a little later whatever happens (never redelivered for ever)
        max_deliver=MAX_DELIVER + 5,
        max_ack_pending=10_000,
    )


class ConsumerChanged(RuntimeError):
    """A durable consumer of ours has another configuration and could not be set back; the message says how."""


def consumer_drift(found: ConsumerConfig, wanted: ConsumerConfig) -> list[str]:
    """The settings in which an existing consumer differs from ours (``field: found != wanted``)."""
    drift = []
    for field in ("filter_subject", "ack_policy", "deliver_policy", "max_deliver", "deliver_subject", "ack_wait"):
        have, want = getattr(found, field, None), getattr(wanted, field, None)
        if field == "ack_wait" and have is not None and want is not None and abs(float(have) - float(want)) < 1e-3:
            continue
        if have != want:
            drift.append(f"{field}: {have!r} != {want!r}")
    return drift


async def durable_subscription(
    js: JetStreamContext, durable: Durable, settings: Settings
) -> JetStreamContext.PullSubscription:
    """Bind to a durable pull consumer, creating it first if it does not exist.

    An existing consumer whose configuration is not ours (its filter dropped, say, so that it would
    deliver other subjects) is set back, loudly; one that cannot be set back stops the service with
    :class:`ConsumerChanged`, which says how to remove it.
    """
    config = consumer_config(durable, settings)
    try:
        info = await js.consumer_info(durable.stream, durable.name)
    except NotFoundError:
        await js.add_consumer(durable.stream, config)
        return await js.pull_subscribe_bind(durable.name, stream=durable.stream)
    drift = consumer_drift(info.config, config)
    if drift:
        where = f"consumer {durable.name} on {durable.stream}"
        remove = f"remove it (nats consumer rm {durable.stream} {durable.name}) and start again"
        log.error("%s was changed (%s); setting it back", where, "; ".join(drift))
        try:
            await js.add_consumer(durable.stream, config)
        except nats.js.errors.Error as exc:
            raise ConsumerChanged(
                f"{where} is not ours ({'; '.join(drift)}) and cannot be set back ({exc}); {remove}"
            ) from None
        still = consumer_drift((await js.consumer_info(durable.stream, durable.name)).config, config)
        if still:
            raise ConsumerChanged(f"{where} still differs ({'; '.join(still)}); {remove}")
    return await js.pull_subscribe_bind(durable.name, stream=durable.stream)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    """A JetStream publish acknowledgement (or its error)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


#: JetStream error codes of a compare-and-set that found another last sequence.
WRONG_LAST_SEQUENCE = (10071, 10164)


class Publisher:
    """JetStream publishes whose acknowledgements all come to one reply subscription (for hot paths).

    ``JetStreamContext.publish`` makes each publish a request, which draws a token from ``os.urandom``
    and arms a timer per call: about a tenth of the decider's CPU under load (measured with py-spy).
    Here a counter names each reply, and one sweep a second fails the publishes whose acknowledgement
    did not come within ``timeout`` with :class:`nats.errors.TimeoutError`, as ``js.publish`` would.
    Errors are those of ``js.publish``: :class:`nats.js.errors.KeyWrongLastSequenceError` when an
    expected last subject sequence does not match, :class:`nats.js.errors.APIError` otherwise,
    :class:`nats.js.errors.NoStreamResponseError` when no stream takes the subject.

    :meth:`send` returns as soon as the message is written, so several sends in a row keep their
    order on the server and their acknowledgements are awaited together.
    """

    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._next = 0
        #: Futures by reply token, in the order sent (so their deadlines ascend).
        self._waiting: dict[str, tuple[asyncio.Future[int], float]] = {}
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._subscription = await self.nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper})
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self._waiting.clear()

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> asyncio.Future[int]:
        """Publish; the returned future gives the stream sequence the message was stored at."""
        if self._sweeper is None:
            raise RuntimeError("Publisher.start() was not called")
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + self.timeout)
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return future

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish and wait for the acknowledgement; the stream sequence the message was stored at."""
        return await (await self.send(subject, payload, headers))

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None or waiting[0].done():
            return  # timed out meanwhile
        future = waiting[0]
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = msgspec.json.decode(msg.data, type=_PubAck)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(nats.js.errors.APIError(description=f"unreadable acknowledgement: {exc}"))
            return
        if ack.error is not None:
            error = ack.error
            if error.err_code in WRONG_LAST_SEQUENCE:
                future.set_exception(nats.js.errors.KeyWrongLastSequenceError(description=error.description))
            else:
                future.set_exception(
                    nats.js.errors.APIError(code=error.code, err_code=error.err_code, description=error.description)
                )
            return
        future.set_result(ack.seq)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout))
            now = time.monotonic()
            expired = []
            for token, (future, deadline) in self._waiting.items():
                if deadline > now:
                    break
                expired.append(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())
            for token in expired:
                del self._waiting[token]


class Transient(Exception):
    """The handler could not store its effect now; the message is redelivered after ``delay`` seconds."""

    def __init__(self, message: str, delay: float = RETRY_DELAY) -> None:
        super().__init__(message)
        self.delay = delay


class Poison(Exception):
    """The message can never be handled; it is dead-lettered and terminated."""


M = TypeVar("M", bound=Base)

#: Set by the signal handler of :func:`stop_on_signals`, so a connection still being retried gives up.
_stopping = asyncio.Event()


async def publish_deadletter(js: JetStreamContext, service: str, msg: Msg, error: str) -> None:
    """Keep a message that cannot be handled, with the reason, on ``ensemble.deadletter.<service>``."""
    letter = DeadLetter(
        service=service, subject=msg.subject, error=error, time=time.time(), data=msg.data[:DEADLETTER_KEEP]
    )
    await js.publish(subjects.deadletter(service), encode(letter))
    health.DEADLETTERS.labels(service).inc()
    log.warning("dead-lettered a message", extra={"subject": msg.subject, "error": error})


#: What a group handler says of each message it was given: None (its effect is stored: acknowledge it)
#: or the exception that settles it (:class:`Transient`, :class:`Poison`, or any other).
Outcome = BaseException | None


async def consume(
    js: JetStreamContext,
    subscription: JetStreamContext.PullSubscription,
    message_type: type[M],
    handler: Callable[[M, Msg], Awaitable[None]],
    *,
    service: str,
    stop: asyncio.Event,
    batch: int = 64,
    confirm_ack: bool = True,
) -> None:
    """Fetch and handle messages until ``stop`` is set: subjects concurrently, each subject in stream order.

    A subject is one member's, so one member is never handled twice at once (and a slow or hung
    member does not hold up the others) while other members, and the next fetch, go on; at most about
    two batches are in flight. Each message is settled as soon as its handler returns (see
    :func:`settle`): handler returned → ack; :class:`Transient` → ``nak(delay)``; undecodable, wrong
    version, :class:`Poison`, or any other exception ``MAX_DELIVER`` times → dead letter + ``term``; any
    other exception fewer times → ``nak`` (never dropped on a first failure). A lost connection ends the
    loop once the messages in flight are settled.
    """
    decoder = msgspec.json.Decoder(message_type)

    async def run(messages: list[Msg]) -> None:
        for msg in messages:
            await settle(js, msg, decoder, handler, service, confirm_ack=confirm_ack)

    await _consume_loop(subscription, run, stop, batch)


async def consume_groups(
    js: JetStreamContext,
    subscription: JetStreamContext.PullSubscription,
    message_type: type[M],
    handler: Callable[[list[tuple[M, Msg]]], Awaitable[list[Outcome]]],
    *,
    service: str,
    stop: asyncio.Event,
    batch: int = 64,
    confirm_ack: bool = True,
) -> None:
    """Like :func:`consume`, but the handler gets all the messages of one subject in a fetched batch at once.

    The messages come in stream order; the handler returns one :data:`Outcome` per message, and each
    message is then settled as :func:`consume` documents. A handler may so store the effect of several
    messages with one write (the decider: one state write per member and batch); each message is still
    acknowledged only after the write that covers it. Undecodable messages are dead-lettered first and
    never reach the handler; an exception escaping the handler settles every message of the group with it.
    """
    decoder = msgspec.json.Decoder(message_type)

    async def run(messages: list[Msg]) -> None:
        items: list[tuple[M, Msg]] = []
        for msg in messages:
            try:
                items.append((_decode(decoder, msg), msg))
            except Exception as exc:  # whatever the decoder raised: this message can never be handled
                await publish_deadletter(js, service, msg, f"cannot decode: {exc}")
                await msg.term()
                health.MESSAGES.labels(service, "deadletter").inc()
        if not items:
            return
        outcomes: list[Outcome]
        try:
            outcomes = await handler(items)
        except Exception as exc:
            outcomes = [exc] * len(items)
        if len(outcomes) != len(items):  # a bug in the handler: nothing is known to be stored
            bug = RuntimeError(f"the handler gave {len(outcomes)} outcomes for {len(items)} messages")
            outcomes = [bug] * len(items)
        settled: dict[str, int] = {}
        for (_, msg), error in zip(items, outcomes, strict=True):
            outcome = await _settle_outcome(js, msg, error, service, confirm_ack)
            settled[outcome] = settled.get(outcome, 0) + 1
        for outcome, number in settled.items():
            health.MESSAGES.labels(service, outcome).inc(number)

    await _consume_loop(subscription, run, stop, batch)


async def _consume_loop(
    subscription: JetStreamContext.PullSubscription,
    run: Callable[[list[Msg]], Awaitable[None]],
    stop: asyncio.Event,
    batch: int,
) -> None:
    """Fetch until ``stop``; each batch's messages are grouped by subject and ``run`` per group.

    A subject's group waits for that subject's previous group (stream order), other subjects' groups
    run concurrently; fetching pauses while a batch or more of messages is in flight.
    """
    running: dict[asyncio.Task[None], int] = {}
    tails: dict[str, asyncio.Task[None]] = {}
    in_flight = 0

    async def run_after(previous: asyncio.Task[None] | None, messages: list[Msg]) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own: these messages are settled regardless
        await run(messages)

    def forget(subject: str, task: asyncio.Task[None]) -> None:
        if tails.get(subject) is task:
            del tails[subject]

    try:
        while not stop.is_set():
            if in_flight >= batch:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight -= running.pop(task)
                    task.result()
                continue
            try:
                messages = await subscription.fetch(batch, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                return
            except Exception as exc:  # a broken connection: wait for the client to reconnect
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            groups: dict[str, list[Msg]] = {}
            for msg in messages:
                groups.setdefault(msg.subject, []).append(msg)
            for subject, group in groups.items():
                task = asyncio.create_task(run_after(tails.get(subject), group))
                task.add_done_callback(functools.partial(forget, subject))
                tails[subject] = task
                running[task] = len(group)
                in_flight += len(group)
    finally:
        if running:
            await asyncio.wait(running)
        # a pull subscription keeps the status replies of expired pulls queued; draining the connection
        # would wait for them for ever, so the subscription is dropped first
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def settle(
    js: JetStreamContext,
    msg: Msg,
    decoder: msgspec.json.Decoder[M],
    handler: Callable[[M, Msg], Awaitable[None]],
    service: str,
    *,
    confirm_ack: bool = True,
) -> None:
    """Decode one message, run the handler and settle the message as :func:`consume` documents.

    ``confirm_ack=False`` acknowledges without waiting for the server's confirmation: only for a
    handler whose effect is idempotent, where a lost ack costs a harmless redelivery (the decider:
    a redelivered snapshot is at or below its member's last seq and is skipped).
    """
    outcome = await _handle(js, msg, decoder, handler, service, confirm_ack)
    health.MESSAGES.labels(service, outcome).inc()


def _decode(decoder: msgspec.json.Decoder[M], msg: Msg) -> M:
    """Decode a consumed message and check it: its version, and that a message about a member came on
    that member's subject of its kind (the body is what the handler trusts: a message stored on another
    subject than its own — a forgery that got into the stream — is refused)."""
    message = decode_with(decoder, msg.data)
    check_version(message)
    if isinstance(message, Addressed):
        _check_subject(message, msg)
    return message


#: The subject kind (second token) each kind of message is published under.
_SUBJECT_KINDS = {
    "metrics": "metrics",
    "decision": "decisions",
    "applied": "applied",
    "event": "events",
    "job": "jobs",
    "instance": "jobs",
}


def _check_subject(message: Addressed, msg: Msg) -> None:
    """:class:`ValueError` when ``msg``'s subject is not the one the message's body says it belongs on
    (and, for a decision, when it lacks the ``Nats-Msg-Id`` the decider always gives it)."""
    tag = type(message).__struct_config__.tag
    kind = _SUBJECT_KINDS.get(tag) if isinstance(tag, str) else None
    tokens = msg.subject.split(".")
    try:
        address: subjects.MemberAddress | None = subjects.MemberAddress.from_subject(msg.subject)
    except ValueError:
        address = None
    body = subjects.MemberAddress(message.namespace, message.ensemble, message.member)
    if len(tokens) != 5 or tokens[0] != "ensemble" or (kind is not None and tokens[1] != kind) or address != body:
        raise ValueError(
            f"subject {msg.subject!r} is not this message's: its body is a {type(message).__name__} of member "
            f"{body} (subject ensemble.{kind or '?'}.{body.key}); refused as a forgery"
        )
    if isinstance(message, Decision) and (msg.headers or {}).get("Nats-Msg-Id") != message.id:
        raise ValueError(f"decision {message.id!r} came without its id as Nats-Msg-Id (the decider always sets it)")


async def _handle(
    js: JetStreamContext,
    msg: Msg,
    decoder: msgspec.json.Decoder[M],
    handler: Callable[[M, Msg], Awaitable[None]],
    service: str,
    confirm_ack: bool,
) -> str:
    try:
        message = _decode(decoder, msg)
    except Exception as exc:  # whatever the decoder raised: this message can never be handled
        await publish_deadletter(js, service, msg, f"cannot decode: {exc}")
        await msg.term()
        return "deadletter"
    error: Outcome = None
    try:
        await handler(message, msg)
    except Exception as exc:
        error = exc
    return await _settle_outcome(js, msg, error, service, confirm_ack)


async def _settle_outcome(js: JetStreamContext, msg: Msg, error: Outcome, service: str, confirm_ack: bool) -> str:
    """Acknowledge, nak or dead-letter ``msg`` for the handler's outcome; the outcome's metric label."""
    if isinstance(error, Transient):
        log.info("transient failure, retrying: %s", error, extra={"subject": msg.subject})
        await msg.nak(delay=error.delay)
        return "retry"
    if isinstance(error, Poison):
        await publish_deadletter(js, service, msg, str(error))
        await msg.term()
        return "deadletter"
    if error is not None:
        deliveries = msg.metadata.num_delivered or 1
        if deliveries >= MAX_DELIVER:
            await publish_deadletter(js, service, msg, f"failed {deliveries} times: {error!r}")
            await msg.term()
            return "deadletter"
        log.error(
            "handler failed; redelivering: %r",
            error,
            exc_info=(type(error), error, error.__traceback__),
            extra={"subject": msg.subject},
        )
        await msg.nak(delay=RETRY_DELAY)
        return "retry"
    if confirm_ack:
        await confirm(msg)
    else:
        await msg.ack()
    return "ok"


#: Tries, and seconds each, for the server's confirmation of an acknowledgement (nats-py waits 1 s once).
ACK_CONFIRM_TRIES = 3
ACK_CONFIRM_TIMEOUT = 5.0


async def confirm(msg: Msg) -> bool:
    """Acknowledge ``msg`` and wait for the server to confirm it; False when no confirmation came.

    A confirmation that does not come (a loaded server, a slow link) is asked for again; after the last try
    the message is left as it is — acknowledged or not, the server decides — and the service goes on: the
    handler's effect is done and every handler is idempotent, so at worst the message is delivered once more
    after the consumer's ack wait and skipped or applied again to the same absolute target.
    """
    for attempt in range(1, ACK_CONFIRM_TRIES + 1):
        try:
            await msg.ack_sync(timeout=ACK_CONFIRM_TIMEOUT)
            return True
        except nats.errors.TimeoutError:
            if attempt == ACK_CONFIRM_TRIES:
                log.warning(
                    "no confirmation of an acknowledgement after %d tries of %.0fs; it may be delivered again",
                    ACK_CONFIRM_TRIES,
                    ACK_CONFIRM_TIMEOUT,
                    extra={"subject": msg.subject},
                )
    return False


#: Seconds after SIGTERM / SIGINT before a service that has not finished stopping is ended.
SHUTDOWN_GRACE = 20.0
_watchdog: list[threading.Timer] = []


def _force_exit() -> None:
    log.error("still stopping %.0fs after the signal; exiting (stacks on stderr)", SHUTDOWN_GRACE)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(1)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (the service then drains its connection and returns)."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        stop.set()
        _stopping.set()
        if not _watchdog:
            # A drain that never ends must not keep a pod (or `ensemble up`) waiting for ever: after the
            # grace period, dump every thread's stack (to find the cause) and exit.
            timer = threading.Timer(SHUTDOWN_GRACE, _force_exit)
            timer.daemon = True
            timer.start()
            _watchdog.append(timer)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
