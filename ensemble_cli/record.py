"""``ensemble record --out FILE``: export the live streams to a recording that ``ensemble replay`` reads.

A recording is JSON Lines, one wire struct a line, each tagged with its ``kind``: every ``metrics``
of ``ENSEMBLE_METRICS``, every ``decision`` of ``ENSEMBLE_DECISIONS`` and every ``applied`` of
``ENSEMBLE_EVENTS`` (see DESIGN.md, "Recording and replay"), ordered by their ``time``. The streams
are read with temporary consumers that acknowledge nothing, so recording never disturbs the services;
what is read is what the streams held when the command started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ensemble_core import subjects
from ensemble_core.messages import Applied, Decision, Metrics, encode
from ensemble_core.settings import Settings, SettingsError, load
from ensemble_core.words import plural

#: Messages fetched per pull while reading a stream.
FETCH = 512
#: ``--since`` durations: a number and a unit.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Recorded = Metrics | Decision | Applied

#: The streams (and the part of each) that make a recording, in the order read.
SOURCES = (
    (subjects.METRICS_STREAM, subjects.ALL_METRICS),
    (subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS),
    (subjects.EVENTS_STREAM, subjects.ALL_APPLIED),
)


def since(text: str, now: float | None = None) -> float:
    """The unix time ``--since`` names: a duration back from ``now`` (``90s``, ``10m``, ``2h``, ``1d``) or
    an ISO 8601 timestamp (``2024-04-15T10:00:00Z``; no zone means UTC).

    Raises ``argparse.ArgumentTypeError`` saying what was expected.
    """
    now = time.time() if now is None else now
    duration = _DURATION.fullmatch(text.strip())
    if duration:
        return now - float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration (90s, 10m, 2h, 1d) or an ISO 8601 timestamp (2024-04-15T10:00:00Z), got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble record``."""
    parser.add_argument("--out", required=True, metavar="FILE", help="the recording to write (JSON Lines)")
    parser.add_argument(
        "--since",
        type=since,
        metavar="DURATION|TIMESTAMP",
        help="only messages stored since then: a duration back from now (10m, 2h, 1d) or a timestamp "
        "(2024-04-15T10:00:00Z); default: everything the streams hold",
    )
    parser.add_argument("--nats", metavar="URL", help="NATS server URL(s) (default: ENSEMBLE_NATS_URL)")


@dataclass
class Recording:
    """What was read: the messages and how many were left out because they did not decode."""

    messages: list[Recorded]
    unreadable: int = 0


def shown_url(url: str) -> str:
    """A NATS URL with any password in it replaced by ``***`` (what may be printed)."""
    return re.sub(r"(://[^:/@,]+:)[^@,]*@", r"\1***@", url)


def refused(errors: list[str]) -> bool:
    """Whether the server said that this client may not do something (a permissions violation)."""
    return any("permissions violation" in error.lower() for error in errors)


class Refused(Exception):
    """The server refused this user a request; the message is what the server said."""


T = TypeVar("T")


async def unless_refused(call: Awaitable[T], errors: list[str] | None) -> T:
    """Await ``call``, or raise :class:`Refused` as soon as the server reports a permissions violation into
    ``errors`` (see :func:`connect_once`): a refused request is never answered, and would otherwise take
    the whole request timeout to fail."""
    task = asyncio.ensure_future(call)
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and errors is not None and refused(errors):
            task.cancel()
            await asyncio.wait({task})
            raise Refused(next(e for e in reversed(errors) if "permissions violation" in e.lower()))
    return task.result()


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start: float | None,
    errors: list[str] | None = None,
    *,
    consumers: bool = True,
) -> Recording:
    """Every message on ``subject`` in ``stream`` (stored at or after ``start``), in stream order.

    Without ``consumers``, or when the server refuses this user a consumer (it appends the violation to
    ``errors``: see :func:`connect_once`), the messages are read one stream-message get at a time instead
    (:func:`read_by_get`): all the read-only user that ``ensemble up`` prints may do.
    """
    recording = Recording(messages=[])
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return recording
    if not info.state.messages:
        return recording
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL if start is None else DeliverPolicy.BY_START_TIME,
        opt_start_time=None if start is None else datetime.fromtimestamp(start, UTC),
        inactive_threshold=30.0,
    )
    subscription = None
    # not asked again once refused for an earlier stream
    if consumers and (errors is None or not refused(errors)):
        subscription = await _consumer(js, stream, subject, config, errors)
    if subscription is None:
        return await read_by_get(js, stream, subject, start, info.state.first_seq, info.state.last_seq)
    decoder = msgspec.json.Decoder(Recorded)
    try:
        last = info.state.last_seq
        # the consumer knows how many messages match (none: another part of the stream, or nothing
        # since the start), so the loop never waits out a fetch for messages that are not there
        pending = (await subscription.consumer_info()).num_pending or 0
        while pending > 0:
            try:
                batch = await subscription.fetch(min(FETCH, pending), timeout=5.0)
            except nats.errors.TimeoutError:
                break
            pending -= len(batch)
            for msg in batch:
                try:
                    recording.messages.append(decoder.decode(msg.data))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    recording.unreadable += 1
            if batch[-1].metadata.sequence.stream >= last:
                break  # what was published after the command started is left for the next recording
    finally:
        with contextlib.suppress(Exception):
            name = (await subscription.consumer_info()).name
            await subscription.unsubscribe()
            await js.delete_consumer(stream, name)
    return recording


async def _consumer(
    js: JetStreamContext, stream: str, subject: str, config: ConsumerConfig, errors: list[str] | None
) -> JetStreamContext.PullSubscription | None:
    """A temporary pull consumer, or None as soon as the server says this user may not make one."""
    try:
        return await unless_refused(js.pull_subscribe(subject, stream=stream, config=config), errors)
    except Refused:
        return None
    except nats.errors.TimeoutError:
        if errors is None or not refused(errors):
            raise
        return None


async def read_by_get(
    js: JetStreamContext, stream: str, subject: str, start: float | None, first: int, last: int
) -> Recording:
    """Every message on ``subject`` in ``stream`` between the sequences ``first`` and ``last`` (stored at or
    after ``start``), read with one get of the next matching message each (``$JS.API.STREAM.MSG.GET`` with
    ``next_by_subj``): no consumer is made. One request a message: slower than a consumer's batches."""
    recording = Recording(messages=[])
    decoder = msgspec.json.Decoder(Recorded)
    seq = first
    while seq <= last:
        try:
            found = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break  # none after seq
        if found.seq is None or found.seq > last:
            break
        seq = found.seq + 1
        if start is not None and found.time is not None and found.time.timestamp() < start:
            continue
        try:
            recording.messages.append(decoder.decode(found.data or b""))
        except (msgspec.DecodeError, msgspec.ValidationError):
            recording.unreadable += 1
    return recording


def _order(message: Recorded) -> tuple[float, int, int]:
    # at the same time: the metrics, then the decision taken on them, then what became of it
    if isinstance(message, Metrics):
        return message.time, 0, message.seq
    if isinstance(message, Decision):
        return message.time, 1, message.based_on
    return message.time, 2, 0


async def connect_once(settings: Settings, name: str, errors: list[str] | None = None) -> Client:
    """Connect a command (not a service) to NATS: it fails fast when NATS is not there, where a service's
    connect waits for it for ever. Each server is tried twice, then the client gives up. The server's
    asynchronous errors (a permissions violation) are appended to ``errors``, for the command to report."""

    async def keep(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(
        servers=[url.strip() for url in settings.nats_url.split(",")],
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        allow_reconnect=False,
        error_cb=keep,
    )


async def record(settings: Settings, out: Path, start: float | None, *, consumers: bool = True) -> Recording:
    """Read the three sources and write them to ``out``, ordered by time; returns what was written.
    ``consumers=False``: read without making a consumer (see :func:`read_stream`)."""
    errors: list[str] = []
    nc = await connect_once(settings, "record", errors)
    try:
        js = nc.jetstream()
        everything = Recording(messages=[])
        for stream, subject in SOURCES:
            part = await read_stream(js, stream, subject, start, errors, consumers=consumers)
            everything.messages.extend(part.messages)
            everything.unreadable += part.unreadable
    finally:
        await nc.close()
    everything.messages.sort(key=_order)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed, so an interrupted export never leaves half a recording
    with tempfile.NamedTemporaryFile("wb", dir=out.parent, prefix=f".{out.name}.", delete=False) as file:
        for message in everything.messages:
            file.write(encode(message) + b"\n")
    os.replace(file.name, out)
    return everything


def run(args: argparse.Namespace) -> int:
    """Write the recording; print what it holds. Exit 0 when written, 2 on a bad setting, 3 if NATS fails."""
    try:
        settings = load(nats_url=args.nats) if args.nats else load()
    except SettingsError as exc:
        print(f"ensemble record: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        recording = asyncio.run(asyncio.wait_for(record(settings, out, args.since), timeout=120))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        where = shown_url(settings.nats_url)
        print(f"ensemble record: cannot record from {where}: {exc or type(exc).__name__}", file=sys.stderr)
        return 3
    print(described(recording, out))
    return 0


def described(recording: Recording, out: Path) -> str:
    """What a recording written to ``out`` holds, in one line."""
    counts = {
        kind.__name__: sum(isinstance(m, kind) for m in recording.messages) for kind in (Metrics, Decision, Applied)
    }
    skipped = f"; {plural(recording.unreadable, 'unreadable message')} left out" if recording.unreadable else ""
    return (
        f"recorded {counts['Metrics']} metrics, {plural(counts['Decision'], 'decision')} and "
        f"{counts['Applied']} applied to {out}{skipped}"
    )


async def record_run(url: str, out: Path) -> tuple[bool, str]:
    """``ensemble up --record``: write the recording of the run on NATS at ``url`` (with the credentials of a
    user who may read single messages: no consumer is made); whether it was written, and the line that says
    what it holds or why it was not written."""
    try:
        async with asyncio.timeout(120):
            recording = await record(Settings(nats_url=url), out, None, consumers=False)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        return False, f"--record {out}: not written: {exc or type(exc).__name__}"
    return True, described(recording, out)
