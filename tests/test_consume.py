"""natsio.consume_groups on a real nats-server: grouping, order, and how each outcome settles a message."""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ensemble_core import natsio, subjects
from ensemble_core.messages import Metrics, NodeCounts, QueueCounts, encode
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress
from tests.conftest import wait_for


def metrics(member: int, seq: int) -> Metrics:
    return Metrics(
        namespace="default", ensemble="groups", member=member, seq=seq, time=0.0, size=1,
        nodes=NodeCounts(node_up_count=1, node_free_count=1, node_cores_up=1, node_cores_free=1),
        queue=QueueCounts(),
    )  # fmt: skip


async def test_each_subjects_messages_come_together_in_order_and_settle_by_their_outcome(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    for seq in range(4):
        for member in (0, 1):
            await js.publish(subjects.metrics(MemberAddress("default", "groups", member)), encode(metrics(member, seq)))
    await js.publish(subjects.metrics(MemberAddress("default", "groups", 2)), b"{not json")
    groups: list[list[tuple[int, int, int]]] = []
    delivered: dict[tuple[int, int], int] = {}

    async def handler(items: list[tuple[Metrics, Msg]]) -> list[natsio.Outcome]:
        groups.append([(m.member, m.seq, msg.metadata.num_delivered or 0) for m, msg in items])
        outcomes: list[natsio.Outcome] = []
        for message, _ in items:
            key = (message.member, message.seq)
            delivered[key] = delivered.get(key, 0) + 1
            if key == (1, 2) and delivered[key] == 1:
                outcomes.append(natsio.Transient("not now", delay=0.1))
            else:
                outcomes.append(None)
        if items[0][0].member == 0 and delivered[(0, 0)] == 1:
            return outcomes[:-1]  # a handler bug: too few outcomes, so the whole group comes again
        return outcomes

    stop = asyncio.Event()
    subscription = await natsio.durable_subscription(js, natsio.DECIDER, settings)
    task = asyncio.create_task(
        natsio.consume_groups(js, subscription, Metrics, handler, service="test", stop=stop, batch=64)
    )
    try:
        await wait_for(lambda: delivered.get((1, 2)) == 2 and delivered.get((0, 3)) == 2, timeout=15)
        info = await js.consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)
        await wait_for(lambda: _settled(js), timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    # the first fetch took everything: one group per member, in stream order; the bad message never came
    assert groups[0] == [(0, seq, 1) for seq in range(4)] or groups[1] == [(0, seq, 1) for seq in range(4)]
    assert [(1, seq, 1) for seq in range(4)] in groups[:2]
    # redelivered: member 1's transient snapshot alone, member 0's whole group (its handler call was bad)
    again = sorted(entry for group in groups[2:] for entry in group)
    assert again == [(0, 0, 2), (0, 1, 2), (0, 2, 2), (0, 3, 2), (1, 2, 2)]
    assert info.num_ack_pending <= 5
    letters = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.deadletter("test"))
    assert letters.state.messages == 1


async def _settled(js: object) -> bool:
    info = await js.consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)  # type: ignore[attr-defined]
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


class _SlowServer:
    """A connection whose server confirms an acknowledgement only at the ``confirm_on``-th request (0: never)."""

    def __init__(self, confirm_on: int) -> None:
        self.confirm_on = confirm_on
        self.requests = 0

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 1.0, **_: object) -> Msg:
        self.requests += 1
        if self.requests != self.confirm_on:
            raise nats.errors.TimeoutError
        return Msg(_client=self, subject=subject)  # type: ignore[arg-type]


async def test_an_acknowledgement_the_server_confirms_late_is_asked_for_again_and_never_kills_the_service() -> None:
    late = _SlowServer(confirm_on=2)
    msg = Msg(_client=late, subject="ensemble.metrics.x", reply="$JS.ACK.x")  # type: ignore[arg-type]
    assert await natsio.confirm(msg) is True
    assert late.requests == 2 and msg._ackd

    silent = _SlowServer(confirm_on=0)
    msg = Msg(_client=silent, subject="ensemble.metrics.x", reply="$JS.ACK.x")  # type: ignore[arg-type]
    assert await natsio.confirm(msg) is False  # given up, logged, and no exception: the handler's effect stands
    assert silent.requests == natsio.ACK_CONFIRM_TRIES
