"""Services on a real nats-server: dead letters, redelivery without duplicates, two decider replicas."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from nats.aio.client import Client

from ensemble_core import natsio, subjects
from ensemble_core.messages import (
    AlgorithmSpec,
    DeadLetter,
    Decision,
    JobSpec,
    MemberSpec,
    Metrics,
    NodeCounts,
    QueueCounts,
    encode,
)
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress
from services.decider.service import Decider, DeciderRecord
from services.decider.service import run as run_decider
from tests.conftest import service_running, stream_messages, wait_for

ADDRESS = MemberAddress("default", "demo.v1", 0)


def member_spec() -> MemberSpec:
    return MemberSpec(
        namespace=ADDRESS.namespace,
        ensemble=ADDRESS.ensemble,
        member=ADDRESS.member,
        name="demo-0",
        size=1,
        min_size=1,
        max_size=4,
        endpoint="127.0.0.1:9",
        algorithm=AlgorithmSpec(name="workload-demand", options={"scaleChecks": 1, "terminateChecks": 2}),
        jobs=[JobSpec(name="a", command="true", count=2, nodes=2)],
        check_seconds=1,
    )


def metrics(seq: int, sched: int = 2, finished: int = 0) -> Metrics:
    return Metrics(
        namespace=ADDRESS.namespace,
        ensemble=ADDRESS.ensemble,
        member=ADDRESS.member,
        seq=seq,
        time=100.0 + seq,
        size=1,
        nodes=NodeCounts(node_up_count=1, node_free_count=1, node_cores_up=1, node_cores_free=1),
        queue=QueueCounts(sched=sched, inactive=finished),
        waiting={2: sched} if sched else {},
        next_jobs=[2] * sched,
        finished=finished,
    )


async def register(nc: Client) -> None:
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    await members.put(ADDRESS.key, encode(member_spec()))


async def decisions(nc: Client) -> list[Decision]:
    raw = await stream_messages(nc, subjects.DECISIONS_STREAM, subjects.decisions(ADDRESS))
    return [msgspec.json.decode(data, type=Decision) for data in raw]


async def test_malformed_messages_are_dead_lettered_and_the_decider_keeps_running(
    nc: Client, settings: Settings
) -> None:
    await register(nc)
    js = nc.jetstream()
    subject = subjects.metrics(ADDRESS)
    async with service_running(run_decider, settings) as task:
        await js.publish(subject, b"{not json")
        await js.publish(subject, encode(metrics(0))[:25])
        await js.publish(subject, encode(msgspec.structs.replace(metrics(0), version=99)))
        await js.publish(subject, b'{"kind":"metrics","seq":"x"}')
        await js.publish(subject, encode(metrics(0)))

        async def letters() -> list[DeadLetter]:
            raw = await stream_messages(nc, subjects.EVENTS_STREAM, subjects.deadletter("decider"))
            return [msgspec.json.decode(data, type=DeadLetter) for data in raw]

        await wait_for(lambda: _has(letters, 4), timeout=15)
        await wait_for(lambda: _decided(nc, 1), timeout=15)
        assert not task.done()
    found = await letters()
    assert found[0].data == b"{not json"
    assert any("version: 99" in letter.error for letter in found)
    assert all(letter.subject == subject for letter in found)
    assert [d.action for d in await decisions(nc)] == ["submit"]


async def _has(source: object, count: int) -> bool:
    return len(await source()) >= count  # type: ignore[operator]


async def _decided(nc: Client, count: int) -> bool:
    return len(await decisions(nc)) >= count


async def test_redelivery_after_a_crash_before_ack_does_not_duplicate_decisions(
    nc: Client, publisher: natsio.Publisher
) -> None:
    await register(nc)
    js = nc.jetstream()
    members, records = await js.key_value(subjects.MEMBERS_BUCKET), await js.key_value(subjects.DECIDER_BUCKET)
    decider = Decider(js, members, records, publisher)
    first = metrics(0)
    await decider.handle(first, None)  # type: ignore[arg-type]
    await decider.handle(first, None)  # type: ignore[arg-type]  # redelivered: state saved, ack lost
    await decider.handle(metrics(1), None)  # type: ignore[arg-type]
    await decider.handle(first, None)  # type: ignore[arg-type]  # an old snapshot: skipped
    found = await decisions(nc)
    assert [d.action for d in found] == ["submit", "scale"]
    assert len({d.id for d in found}) == 2
    record = msgspec.json.decode(
        (await (await js.key_value(subjects.DECIDER_BUCKET)).get(ADDRESS.key)).value or b"", type=DeciderRecord
    )
    assert record.last_seq == 1


async def test_decisions_lost_between_save_and_publish_are_published_on_redelivery(
    nc: Client, publisher: natsio.Publisher
) -> None:
    await register(nc)
    js = nc.jetstream()
    members = await js.key_value(subjects.MEMBERS_BUCKET)
    records = await js.key_value(subjects.DECIDER_BUCKET)

    class CrashingDecider(Decider):
        async def publish(self, subject: str, found: Sequence[Decision]) -> None:
            raise ConnectionError("crashed after saving the state")

    with pytest.raises(ConnectionError):
        await CrashingDecider(js, members, records, publisher).handle(metrics(0), None)  # type: ignore[arg-type]
    assert await decisions(nc) == []
    await Decider(js, members, records, publisher).handle(metrics(0), None)  # type: ignore[arg-type]
    assert [d.action for d in await decisions(nc)] == ["submit"]


async def test_two_decider_replicas_never_interleave_a_members_state(nc: Client, settings: Settings) -> None:
    await register(nc)
    js = nc.jetstream()
    count = 40
    async with service_running(run_decider, settings), service_running(run_decider, settings):
        for seq in range(count):
            await js.publish(
                subjects.metrics(ADDRESS),
                encode(metrics(seq, sched=2 if seq < 30 else 0, finished=0 if seq < 30 else 2)),
            )
        records = await js.key_value(subjects.DECIDER_BUCKET)

        async def caught_up() -> bool:
            try:
                entry = await records.get(ADDRESS.key)
            except Exception:
                return False
            return msgspec.json.decode(entry.value or b"", type=DeciderRecord).last_seq == count - 1

        await wait_for(caught_up, timeout=30)
        info = await js.consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)
        await wait_for(lambda: _acked(js, count), timeout=15)
    found = await decisions(nc)
    ids = [d.id for d in found]
    assert len(ids) == len(set(ids))
    assert [d.action for d in found].count("submit") == 1
    assert [d.action for d in found].count("terminate") == 1
    assert found[-1].action == "terminate"
    assert info.config.durable_name == "decider"


async def _acked(js: object, count: int) -> bool:
    info = await js.consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)  # type: ignore[attr-defined]
    return bool(info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.stream_seq >= count)


async def test_declare_is_idempotent_and_leaves_existing_streams_alone(nc: Client) -> None:
    js = nc.jetstream()
    await js.publish(subjects.metrics(ADDRESS), encode(metrics(0)))
    before = await js.stream_info(subjects.METRICS_STREAM)
    await natsio.declare(js)
    await natsio.declare(js)
    after = await js.stream_info(subjects.METRICS_STREAM)
    assert after.created == before.created  # the same stream, not a new one
    assert after.state.messages == before.state.messages == 1  # nothing was lost or rewritten
    assert after.config.subjects == [subjects.ALL_METRICS]
