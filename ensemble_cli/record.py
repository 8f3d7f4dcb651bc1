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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import nats.errors
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


async def read_stream(js: JetStreamContext, stream: str, subject: str, start: float | None) -> Recording:
    """Every message on ``subject`` in ``stream`` (stored at or after ``start``), in stream order."""
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
    subscription = await js.pull_subscribe(subject, stream=stream, config=config)
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


def _order(message: Recorded) -> tuple[float, int, int]:
    # at the same time: the metrics, then the decision taken on them, then what became of it
    if isinstance(message, Metrics):
        return message.time, 0, message.seq
    if isinstance(message, Decision):
        return message.time, 1, message.based_on
    return message.time, 2, 0


async def record(settings: Settings, out: Path, start: float | None) -> Recording:
    """Read the three sources and write them to ``out``, ordered by time; returns what was written."""

    async def quiet(_: Exception) -> None:
        return  # the failure is reported once, by ``run``

    # a command fails fast when NATS is not there (the services' connect waits for it for ever):
    # each server is tried twice, then the client gives up
    nc = await nats.connect(
        servers=[url.strip() for url in settings.nats_url.split(",")],
        name="record",
        connect_timeout=5,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        allow_reconnect=False,
        error_cb=quiet,
    )
    try:
        js = nc.jetstream()
        everything = Recording(messages=[])
        for stream, subject in SOURCES:
            part = await read_stream(js, stream, subject, start)
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
        print(f"ensemble record: cannot record from {settings.nats_url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 3
    counts = {
        kind.__name__: sum(isinstance(m, kind) for m in recording.messages) for kind in (Metrics, Decision, Applied)
    }
    skipped = f"; {plural(recording.unreadable, 'unreadable message')} left out" if recording.unreadable else ""
    print(
        f"recorded {counts['Metrics']} metrics, {plural(counts['Decision'], 'decision')} and "
        f"{counts['Applied']} applied to {out}{skipped}"
    )
    return 0
