"""The decider on a real nats-server: stale backlogs, crash and redelivery, replicas, poison, member changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client

from ensemble_core import algorithms, natsio, subjects
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
from services.decider.service import STALE_MIN_SECONDS, Decider, DeciderRecord, stale_after
from services.decider.service import run as run_decider
from tests.conftest import service_running, stream_messages, wait_for


def member(index: int = 0, *, max_size: int = 8, algorithm: str = "workload-demand") -> MemberSpec:
    """A member that grows after one check of waiting and shrinks after three of idle nodes."""
    return MemberSpec(
        namespace="default",
        ensemble="decide",
        member=index,
        name=f"decide-{index}",
        size=1,
        min_size=1,
        max_size=max_size,
        endpoint="127.0.0.1:9",
        algorithm=AlgorithmSpec(name=algorithm, options={"scaleChecks": 1, "terminateChecks": 3}),
        jobs=[JobSpec(name="a", command="true", count=4, nodes=8)],
        check_seconds=1,
    )


def address(spec: MemberSpec) -> MemberAddress:
    return MemberAddress(spec.namespace, spec.ensemble, spec.member)


def snapshot(spec: MemberSpec, seq: int, *, size: int, free: int, waiting: int = 0, done: int = 0) -> Metrics:
    """``size`` nodes, all up, ``free`` of them free, ``waiting`` 8-node jobs queued, ``done`` finished."""
    running = 4 - waiting - done
    return Metrics(
        namespace=spec.namespace,
        ensemble=spec.ensemble,
        member=spec.member,
        seq=seq,
        time=time.time(),
        size=size,
        nodes=NodeCounts(node_up_count=size, node_free_count=free, node_cores_up=size, node_cores_free=free),
        queue=QueueCounts(sched=waiting, run=running, inactive=done),
        waiting={8: waiting} if waiting else {},
        next_jobs=[8] * waiting,
        finished=done,
    )


async def register(nc: Client, *specs: MemberSpec) -> None:
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    for spec in specs:
        await members.put(address(spec).key, encode(spec))


async def publish(nc: Client, *snapshots: Metrics) -> None:
    js = nc.jetstream()
    for metrics in snapshots:
        await js.publish(
            subjects.metrics(MemberAddress(metrics.namespace, metrics.ensemble, metrics.member)), encode(metrics)
        )


async def decisions(nc: Client) -> list[Decision]:
    raw = await stream_messages(nc, subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS)
    return [msgspec.json.decode(data, type=Decision) for data in raw]


async def last_seq(nc: Client, spec: MemberSpec) -> int:
    records = await nc.jetstream().key_value(subjects.DECIDER_BUCKET)
    try:
        entry = await records.get(address(spec).key)
    except Exception:
        return -1
    return msgspec.json.decode(entry.value or b"", type=DeciderRecord).last_seq


async def drained(nc: Client) -> bool:
    info = await nc.jetstream().consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def test_metrics_are_stale_after_three_checks_and_never_sooner_than_a_few_seconds() -> None:
    assert stale_after(msgspec.structs.replace(member(), check_seconds=10)) == 30
    assert stale_after(member()) == STALE_MIN_SECONDS


async def test_a_backlog_left_while_the_decider_was_down_never_shrinks_the_member(
    nc: Client, settings: Settings
) -> None:
    spec = member()
    await register(nc, spec)
    async with service_running(run_decider, settings):
        # submitted, then grown to 8 for the waiting jobs: the member is busy
        await publish(nc, snapshot(spec, 0, size=1, free=1, waiting=4), snapshot(spec, 1, size=1, free=1, waiting=4))
        await wait_for(lambda: _seq_is(nc, spec, 1), timeout=10)
    assert [(d.action, d.size) for d in await decisions(nc)] == [("submit", None), ("scale", 8)]

    # While the decider is down the jobs run and then nodes sit idle for long enough to shrink ...
    backlog = [snapshot(spec, seq, size=8, free=8, waiting=0, done=2) for seq in range(2, 12)]
    await publish(nc, *backlog)
    await asyncio.sleep(stale_after(spec) + 0.5)
    # ... but by the time it is back those snapshots are stale: they are consumed, and nothing is decided.
    async with service_running(run_decider, settings):
        await wait_for(lambda: _seq_is(nc, spec, 11), timeout=15)
        await wait_for(lambda: drained(nc), timeout=10)
        assert [(d.action, d.size) for d in await decisions(nc)] == [("submit", None), ("scale", 8)]

        # Fresh snapshots count from scratch (the gap is missed polls): a shrink needs three of them.
        fresh = [snapshot(spec, seq, size=8, free=8, waiting=0, done=2) for seq in range(12, 15)]
        await publish(nc, *fresh[:2])
        await wait_for(lambda: _seq_is(nc, spec, 13), timeout=10)
        assert len(await decisions(nc)) == 2
        await publish(nc, fresh[2])
        await wait_for(lambda: _count(nc, 3), timeout=10)
    shrink = (await decisions(nc))[-1]
    assert (shrink.action, shrink.size, shrink.based_on) == ("scale", 1, 14)


async def _seq_is(nc: Client, spec: MemberSpec, seq: int) -> bool:
    return await last_seq(nc, spec) == seq


async def _count(nc: Client, count: int) -> bool:
    return len(await decisions(nc)) >= count


async def test_redelivery_after_a_crash_between_publish_and_ack_publishes_no_second_decision(
    nc: Client, nats_url: str, publisher: natsio.Publisher
) -> None:
    settings = Settings(nats_url=nats_url, ack_wait=1.0)
    spec = member()
    await register(nc, spec)
    js = nc.jetstream()
    await publish(nc, snapshot(spec, 0, size=1, free=1, waiting=4))
    subscription = await natsio.durable_subscription(js, natsio.DECIDER, settings)
    [msg] = await subscription.fetch(1, timeout=5)
    members, records = await js.key_value(subjects.MEMBERS_BUCKET), await js.key_value(subjects.DECIDER_BUCKET)
    decider = Decider(js, members, records, publisher)
    await decider.handle(msgspec.json.decode(msg.data, type=Metrics), msg)
    await subscription.unsubscribe()  # the process dies here: state saved, decision published, no ack
    assert [d.action for d in await decisions(nc)] == ["submit"]

    async with service_running(run_decider, settings):  # a new process gets the message again after ack_wait
        await wait_for(lambda: _redelivered_and_acked(nc), timeout=15)
    found = await decisions(nc)
    assert [d.action for d in found] == ["submit"]


async def _redelivered_and_acked(nc: Client) -> bool:
    info = await nc.jetstream().consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)
    return bool(info.delivered.consumer_seq >= 2 and info.num_ack_pending == 0 and info.ack_floor.stream_seq >= 1)


async def test_two_replicas_decide_each_member_once_per_snapshot(nc: Client, settings: Settings) -> None:
    specs = [member(index) for index in range(6)]
    await register(nc, *specs)
    checks = 12
    async with service_running(run_decider, settings), service_running(run_decider, settings):
        for seq in range(checks):
            # waiting at first, then everything done: submit, grow, then terminate after three idle checks
            await publish(
                nc,
                *(
                    snapshot(spec, seq, size=1, free=1, waiting=4)
                    if seq < 4
                    else snapshot(spec, seq, size=8, free=8, done=4)
                    for spec in specs
                ),
            )
        for spec in specs:
            await wait_for(lambda spec=spec: _seq_is(nc, spec, checks - 1), timeout=30)  # type: ignore[misc]
        await wait_for(lambda: drained(nc), timeout=15)
    found = await decisions(nc)
    assert len({d.id for d in found}) == len(found)
    for spec in specs:
        actions = [d.action for d in found if d.member == spec.member]
        assert actions.count("submit") == 1
        assert actions.count("terminate") == 1
        assert actions[-1] == "terminate"


async def test_a_member_record_the_decider_cannot_use_dead_letters_its_metrics_and_others_go_on(
    nc: Client, settings: Settings
) -> None:
    good, unknown, unreadable = member(0), member(1, algorithm="workload-demnd"), member(2)
    await register(nc, good, unknown)
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    await members.put(address(unreadable).key, b'{"kind": "member", "size": "big"}')
    async with service_running(run_decider, settings) as task:
        await publish(nc, *(snapshot(spec, 0, size=1, free=1, waiting=4) for spec in (unknown, unreadable, good)))

        async def letters() -> list[DeadLetter]:
            raw = await stream_messages(nc, subjects.EVENTS_STREAM, subjects.deadletter("decider"))
            return [msgspec.json.decode(data, type=DeadLetter) for data in raw]

        await wait_for(lambda: _has_letters(letters, 2), timeout=15)
        await wait_for(lambda: _count(nc, 1), timeout=10)
        assert not task.done()
    errors = sorted(letter.error for letter in await letters())
    assert "unknown algorithm 'workload-demnd'; did you mean workload-demand?" in errors[0]
    assert "unreadable" in errors[1]
    assert [(d.member, d.action) for d in await decisions(nc)] == [(0, "submit")]


async def _has_letters(source: object, count: int) -> bool:
    return len(await source()) >= count  # type: ignore[operator]


async def test_a_changed_member_record_takes_effect_without_restarting_the_decider(
    nc: Client, settings: Settings
) -> None:
    small = member(max_size=2)
    await register(nc, small)
    async with service_running(run_decider, settings):
        await publish(nc, snapshot(small, 0, size=1, free=1, waiting=4), snapshot(small, 1, size=1, free=1, waiting=4))
        await wait_for(lambda: _count(nc, 2), timeout=10)
        await register(nc, msgspec.structs.replace(small, max_size=16))
        await asyncio.sleep(0.3)  # the KV watch delivers the change
        await publish(nc, snapshot(small, 2, size=2, free=2, waiting=4))
        await wait_for(lambda: _count(nc, 3), timeout=10)
    assert [(d.action, d.size) for d in await decisions(nc)] == [("submit", None), ("scale", 2), ("scale", 8)]


async def test_metrics_of_a_member_registered_after_the_decider_started_are_decided(
    nc: Client, settings: Settings
) -> None:
    late = member(3)
    async with service_running(run_decider, settings):
        await asyncio.sleep(0.2)
        await register(nc, late)
        await publish(nc, snapshot(late, 0, size=1, free=1, waiting=4))
        await wait_for(lambda: _count(nc, 1), timeout=10)
    assert [(d.member, d.action) for d in await decisions(nc)] == [(3, "submit")]


# --- a member's snapshots decided together (handle_group) -------------------------------------------


def busy_then_idle(spec: MemberSpec, count: int) -> list[Metrics]:
    """Jobs wait (grow), run, then the member idles (terminate): every kind of decision in one backlog."""
    out = []
    for seq in range(count):
        if seq < 4:
            out.append(snapshot(spec, seq, size=1, free=1, waiting=4))
        elif seq < 10:
            out.append(snapshot(spec, seq, size=8, free=0, waiting=2, done=1))
        else:
            out.append(snapshot(spec, seq, size=8, free=8, waiting=0, done=4))
    return out


def decided_one_by_one(spec: MemberSpec, snapshots: list[Metrics]) -> list[Decision]:
    """What the algorithm decides when it is given the snapshots one at a time (no NATS)."""
    algorithm = algorithms.get(spec.algorithm.name)
    options = algorithms.parse_options(spec.algorithm.name, spec.algorithm.options)
    state = algorithm.initial_state(spec, options)
    out: list[Decision] = []
    for metrics in snapshots:
        state, made = algorithm.decide(spec, options, state, metrics)
        out.extend(made)
    return out


async def decider_writes(nc: Client) -> int:
    """Writes to the ``ensemble-decider`` bucket since it was created (its stream's last sequence)."""
    return (await nc.jetstream().stream_info(f"KV_{subjects.DECIDER_BUCKET}")).state.last_seq


async def test_a_backlog_of_a_member_is_decided_with_few_writes_and_the_same_decisions(
    nc: Client, settings: Settings
) -> None:
    spec = member()
    await register(nc, spec)
    backlog = busy_then_idle(spec, 30)
    expected = decided_one_by_one(spec, backlog)
    assert {d.action for d in expected} >= {"submit", "scale", "terminate"}
    await publish(nc, *backlog)  # all in the stream before the decider starts: one fetch takes them
    async with service_running(run_decider, settings):
        await wait_for(lambda: _seq_is(nc, spec, 29), timeout=15)
        await wait_for(lambda: drained(nc), timeout=10)
    found = await decisions(nc)
    assert [(d.id, d.action, d.size, d.based_on) for d in found] == [
        (d.id, d.action, d.size, d.based_on) for d in expected
    ]
    # the first snapshot creates the record; the other 29 share one write (two if the fetch split them)
    assert 2 <= await decider_writes(nc) <= 4


async def test_a_crash_after_a_shared_write_publishes_every_decision_it_covered_on_redelivery(
    nc: Client, publisher: natsio.Publisher
) -> None:
    spec = member()
    await register(nc, spec)
    backlog = busy_then_idle(spec, 14)
    expected = decided_one_by_one(spec, backlog)
    js = nc.jetstream()
    members, records = await js.key_value(subjects.MEMBERS_BUCKET), await js.key_value(subjects.DECIDER_BUCKET)

    class CrashingDecider(Decider):
        crash = False

        async def publish(self, subject: str, found: Sequence[Decision]) -> None:
            if self.crash and found:
                raise ConnectionError("crashed after saving the state")
            await super().publish(subject, found)

    first = CrashingDecider(js, members, records, publisher)
    await first.members.start()
    try:
        assert await first.handle_group([(backlog[0], None)]) == [None]  # type: ignore[list-item]
        first.crash = True
        group = [(metrics, None) for metrics in backlog[1:]]
        outcomes = await first.handle_group(group)  # type: ignore[arg-type]
    finally:
        await first.members.stop()
    # every snapshot of the group was covered by the one write, so none may be acknowledged
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes) and len(outcomes) == 13
    assert await last_seq(nc, spec) == 13
    assert [d.action for d in await decisions(nc)] == ["submit"]

    restarted = Decider(js, members, records, publisher)  # the snapshots come again
    await restarted.members.start()
    try:
        assert await restarted.handle_group(group) == [None] * 13  # type: ignore[arg-type]
    finally:
        await restarted.members.stop()
    assert [d.id for d in await decisions(nc)] == [d.id for d in expected]


async def test_a_group_with_a_gap_or_an_old_snapshot_falls_back_to_one_at_a_time(
    nc: Client, publisher: natsio.Publisher
) -> None:
    spec = member()
    await register(nc, spec)
    backlog = busy_then_idle(spec, 8)
    js = nc.jetstream()
    members, records = await js.key_value(subjects.MEMBERS_BUCKET), await js.key_value(subjects.DECIDER_BUCKET)
    decider = Decider(js, members, records, publisher)
    await decider.members.start()
    try:
        # 0 and 1 decided; 1 again (redelivered) skipped; 2 and 3 decided together; 3 again skipped
        group = [backlog[0], backlog[1], backlog[1], backlog[2], backlog[3], backlog[3]]
        assert await decider.handle_group([(m, None) for m in group]) == [None] * 6  # type: ignore[misc]
        assert await last_seq(nc, spec) == 3
        # a snapshot of a member nobody registered, in the same group, changes nothing of the others
        stranger = msgspec.structs.replace(backlog[4], member=7)
        outcomes = await decider.handle_group([(stranger, None), (backlog[4], None)])  # type: ignore[list-item]
        assert outcomes == [None, None]
    finally:
        await decider.members.stop()
    assert await last_seq(nc, spec) == 4
    assert [d.id for d in await decisions(nc)] == [d.id for d in decided_one_by_one(spec, backlog[:5])]
