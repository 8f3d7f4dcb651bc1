"""natsio.Publisher on a real nats-server: order, compare-and-set, no stream, lost acknowledgements."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError

from ensemble_core import natsio, subjects
from ensemble_core.subjects import MemberAddress

ADDRESS = MemberAddress("default", "pub", 0)


async def test_sends_keep_their_order_and_each_gets_its_own_sequence(publisher: natsio.Publisher) -> None:
    sent = [await publisher.send(subjects.metrics(ADDRESS), str(index).encode()) for index in range(50)]
    sequences = [await future for future in sent]
    assert sequences == sorted(sequences) and len(set(sequences)) == 50
    assert sequences[-1] - sequences[0] == 49


async def test_a_message_id_seen_before_is_stored_once(nc: Client, publisher: natsio.Publisher) -> None:
    subject = subjects.decisions(ADDRESS)
    first = await publisher.publish(subject, b"a", {"Nats-Msg-Id": "same"})
    again = await publisher.publish(subject, b"a", {"Nats-Msg-Id": "same"})
    assert again == first
    assert (await nc.jetstream().stream_info(subjects.DECISIONS_STREAM)).state.messages == 1


async def test_a_compare_and_set_against_another_revision_raises_wrong_last_sequence(
    nc: Client, publisher: natsio.Publisher
) -> None:
    bucket = await nc.jetstream().key_value(subjects.DECIDER_BUCKET)
    revision = await bucket.create("k", b"1")
    subject = f"$KV.{subjects.DECIDER_BUCKET}.k"
    updated = await publisher.publish(subject, b"2", {"Nats-Expected-Last-Subject-Sequence": str(revision)})
    assert (await bucket.get("k")).revision == updated
    with pytest.raises(KeyWrongLastSequenceError, match="wrong last sequence"):
        await publisher.publish(subject, b"3", {"Nats-Expected-Last-Subject-Sequence": str(revision)})
    assert (await bucket.get("k")).value == b"2"


async def test_a_subject_no_stream_takes_raises_no_stream_response(publisher: natsio.Publisher) -> None:
    with pytest.raises(NoStreamResponseError):
        await publisher.publish("nobody.listens.here", b"x")


async def test_a_lost_acknowledgement_times_out_and_a_late_one_is_ignored(nc: Client) -> None:
    received: list[str] = []

    async def silent(msg: nats.aio.msg.Msg) -> None:  # takes the message, never answers (for now)
        received.append(msg.reply)

    await nc.subscribe("silent.subject", cb=silent)
    publisher = natsio.Publisher(nc, timeout=0.3)
    await publisher.start()
    try:
        started = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await publisher.publish("silent.subject", b"x")
        assert 0.3 <= time.monotonic() - started < 2.0
        assert len(received) == 1
        await nc.publish(received[0], b'{"stream":"S","seq":1}')  # the answer arrives too late: no effect
        await nc.flush()
        await asyncio.sleep(0.05)
        assert await publisher.publish(subjects.metrics(ADDRESS), b"y") >= 1  # and the publisher goes on
    finally:
        await publisher.stop()


async def test_stop_fails_what_still_waits_and_send_needs_start(nc: Client) -> None:
    async def silent(msg: nats.aio.msg.Msg) -> None:
        pass

    await nc.subscribe("silent.stop", cb=silent)
    publisher = natsio.Publisher(nc)
    with pytest.raises(RuntimeError, match="start"):
        await publisher.send("silent.stop", b"x")
    await publisher.start()
    waiting = await publisher.send("silent.stop", b"x")
    await publisher.stop()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await waiting
