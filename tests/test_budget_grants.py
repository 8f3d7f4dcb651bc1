"""The node budget where decisions are applied: grants in KV (compare-and-set), and the actuator on real NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ensemble_core import subjects
from ensemble_core.messages import AlgorithmSpec, Applied, Decision, JobSpec, MemberSpec, encode
from ensemble_core.settings import Settings, SettingsError, parse_namespace_budgets
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from services.actuator.budget import Budget, BudgetRecord, Grant, Limits, allowed, shares
from services.actuator.service import run as run_actuator
from sidecar.server import serve_local
from tests.conftest import service_running, stream_messages, wait_for


def spec(ensemble: str, *, size: int = 1, weight: int = 1, endpoint: str = "127.0.0.1:9") -> MemberSpec:
    return MemberSpec(
        namespace="default", ensemble=ensemble, member=0, name=f"{ensemble}-0", size=size, min_size=1, max_size=4,
        endpoint=endpoint, algorithm=AlgorithmSpec(), jobs=[JobSpec(name="a", command="true")], weight=weight,
    )  # fmt: skip


def decision(ensemble: str, seq: int, action: str, size: int | None = None, ns: str = "default") -> Decision:
    address = MemberAddress(ns, ensemble, 0)
    return Decision(
        namespace=ns, ensemble=ensemble, member=0, id=f"{address.key}:{seq}", time=100.0 + seq, based_on=seq,
        action=action, size=size, reason=f"{action} {size}",
    )  # fmt: skip


def record(**entries: tuple[int, int, int]) -> BudgetRecord:
    """A document of one-member ensembles in ``default``: name=(want, granted, weight)."""
    return BudgetRecord(
        members={
            MemberAddress("default", name, 0).key: Grant(
                namespace="default", ensemble=name, want=want, granted=granted, weight=weight
            )
            for name, (want, granted, weight) in entries.items()
        }
    )


def key(ensemble: str) -> str:
    return MemberAddress("default", ensemble, 0).key


# -- the rule, without I/O ------------------------------------------------------------------------


def test_the_share_is_weighted_max_min_and_a_small_want_leaves_the_rest_to_the_others() -> None:
    limits = Limits(cluster=6)
    assert shares(record(a=(6, 1, 1), b=(6, 1, 2)), limits) == {key("a"): 2, key("b"): 4}
    assert shares(record(a=(6, 1, 1), b=(1, 1, 2)), limits) == {key("a"): 5, key("b"): 1}  # b's unused share


def test_a_grant_never_takes_nodes_another_member_holds_and_never_shrinks_a_member() -> None:
    limits = Limits(cluster=6)
    # b holds 5 (it got them while a wanted nothing): a's fair share is 3, but only 1 node is free
    held = record(a=(4, 1, 1), b=(5, 5, 1))
    assert shares(held, limits)[key("a")] == 3 and allowed(held, limits, key("a")) == 1
    # b above its share keeps what it holds (no preemption); it gets no more
    assert allowed(record(a=(4, 1, 1), b=(6, 5, 1)), limits, key("b")) == 5


def test_namespace_budgets_cap_their_namespace_within_the_cluster_budget() -> None:
    doc = BudgetRecord(
        members={
            MemberAddress(ns, name, 0).key: Grant(namespace=ns, ensemble=name, want=8, granted=1)
            for ns, name in (("x", "a"), ("x", "b"), ("y", "c"))
        }
    )
    limits = Limits(cluster=10, namespaces={"x": 4})
    found = shares(doc, limits)
    # x is capped at 4 (2 + 2); y takes the rest of the cluster's 10
    assert [found[MemberAddress(ns, n, 0).key] for ns, n in (("x", "a"), ("x", "b"), ("y", "c"))] == [2, 2, 6]


@pytest.mark.parametrize(
    ("value", "problem"),
    [("team-a", "is not <namespace>=<nodes>"), ("a=-1", "is not <namespace>=<nodes>"), ("a=1,a=2", "given twice")],
)
def test_a_bad_namespace_budget_is_refused_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=f"ENSEMBLE_NAMESPACE_BUDGETS: .*{problem}"):
        parse_namespace_budgets(value)
    assert parse_namespace_budgets(" team-a=8, team-b=0 ") == {"team-a": 8, "team-b": 0}


# -- the grants in KV ------------------------------------------------------------------------------


class Interfering:
    """A bucket whose first ``update`` is beaten by another writer: the compare-and-set must fail once."""

    def __init__(self, bucket: KeyValue, rival: Budget) -> None:
        self.bucket = bucket
        self.rival = rival
        self.conflicts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bucket, name)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if self.conflicts == 0:
            self.conflicts += 1
            await self.rival.reserve(MemberAddress("default", "b", 0), spec("b"), decision("b", 1, "scale", 4), 4, 1)
        return await self.bucket.update(key, value, last=last)


async def budget_bucket(nc: Client) -> KeyValue:
    return await nc.jetstream().key_value(subjects.BUDGET_BUCKET)


async def test_a_conflicting_write_is_retried_and_sees_the_other_grant(nc: Client) -> None:
    bucket = await budget_bucket(nc)
    limits = Limits(cluster=4)
    first = Budget(bucket, limits)
    await first.reserve(MemberAddress("default", "a", 0), spec("a"), decision("a", 1, "scale", 1), 1, 1)
    interfering = Interfering(bucket, Budget(bucket, limits))
    mine = Budget(interfering, limits)  # type: ignore[arg-type]
    got = await mine.reserve(MemberAddress("default", "a", 0), spec("a"), decision("a", 2, "scale", 4), 4, 1)
    assert interfering.conflicts == 1
    doc, _ = await first.load()
    # b reserved 3 in between (a wanted 1 then); a's retry saw it: 1 node was left, no over-grant
    assert got is not None and (got.granted, got.wanted, got.held) == (1, 4, True)
    assert doc.members[key("b")].granted == 3 and sum(g.granted for g in doc.members.values()) == 4


async def test_two_actuators_racing_never_grant_more_than_the_budget(nc: Client, nats_url: str) -> None:
    limits = Limits(cluster=7)
    other = await nats.connect(nats_url)
    try:
        replicas = [Budget(await budget_bucket(nc), limits), Budget(await budget_bucket(other), limits)]
        names = [f"e{i}" for i in range(8)]
        await asyncio.gather(
            *(
                replicas[i % 2].reserve(MemberAddress("default", n, 0), spec(n), decision(n, 1, "scale", 3), 3, 0)
                for i, n in enumerate(names)
            )
        )
        doc, _ = await replicas[0].load()
    finally:
        await other.close()
    granted = [doc.members[key(n)].granted for n in names]
    assert sum(granted) == 7 and max(granted) <= 3
    assert sum(1 for n in names if doc.members[key(n)].held is not None) >= 5  # each keeps its want


async def test_a_restarted_actuator_finds_the_held_grow_and_raises_it_when_nodes_are_released(
    nc: Client, nats_url: str
) -> None:
    limits = Limits(cluster=4)
    before = Budget(await budget_bucket(nc), limits)
    a, b = MemberAddress("default", "a", 0), MemberAddress("default", "b", 0)
    assert await before.reserve(a, spec("a"), decision("a", 1, "scale", 3), 3, 1) is not None
    held = decision("b", 1, "scale", 4)
    got = await before.reserve(b, spec("b"), held, 4, 1)
    assert got is not None and (got.granted, got.held) == (1, True)
    assert await before.raises() == []  # nothing free
    restarted = await nats.connect(nats_url)  # a new process: nothing but the bucket
    try:
        after = Budget(await budget_bucket(restarted), limits)
        assert await after.forget(a)  # a terminated: its 3 nodes are free
        [(address, decided, grant)] = await after.raises()
        assert (address, decided.id, grant) == (b, held.id, 4)
        # applying it again checks it is still the member's held decision: a newer one supersedes it
        await after.reserve(b, spec("b"), decision("b", 2, "scale", 1), 1, 1)
        assert await after.reserve(b, spec("b"), held, 4, 1, raise_of=held.id) is None
    finally:
        await restarted.close()


# -- the actuator on real NATS with real sidecars ----------------------------------------------------


@asynccontextmanager
async def sidecar(settings: Settings, ensemble: str) -> AsyncIterator[SidecarClient]:
    token = ensemble_token(settings.sidecar_token, "default", ensemble)
    running = await serve_local(token=token, nodes=1, max_nodes=4)
    client = SidecarClient(f"127.0.0.1:{running.port}", token, timeout=5)
    try:
        yield client
    finally:
        await client.close()
        await running.stop(grace=0.1)


async def publish(nc: Client, d: Decision) -> None:
    address = MemberAddress(d.namespace, d.ensemble, d.member)
    await nc.jetstream().publish(subjects.decisions(address), encode(d), headers={"Nats-Msg-Id": d.id})


async def applied(nc: Client, ensemble: str) -> list[Applied]:
    raw = await stream_messages(nc, subjects.EVENTS_STREAM, subjects.applied(MemberAddress("default", ensemble, 0)))
    return [msgspec.json.decode(data, type=Applied) for data in raw]


async def test_two_actuators_hold_two_members_to_the_budget_and_grow_the_held_one_when_the_other_ends(
    nc: Client, settings: Settings
) -> None:
    budgeted = msgspec.structs.replace(settings, node_budget=4)
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    async with sidecar(settings, "a") as a, sidecar(settings, "b") as b:
        await members.put(MemberAddress("default", "a", 0).key, encode(spec("a", endpoint=a.endpoint)))
        await members.put(MemberAddress("default", "b", 0).key, encode(spec("b", endpoint=b.endpoint, weight=2)))
        sizes: list[int] = []

        async def sample() -> None:
            while True:
                with contextlib.suppress(Exception):  # a terminated sidecar may stop answering
                    sizes.append(((await a.status()).size or 0) + ((await b.status()).size or 0))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        # two replicas, as the ha component runs them: they share the decisions and the budget's document
        async with service_running(run_actuator, budgeted), service_running(run_actuator, budgeted):
            await publish(nc, decision("a", 1, "scale", 4))  # b holds 1: a gets 3 of its 4
            await wait_for(lambda: _count(applied(nc, "a"), 1))
            await publish(nc, decision("b", 1, "scale", 4))  # nothing free: b is held at 1
            await wait_for(lambda: _count(applied(nc, "b"), 1))
            [grow_a], [grow_b] = await applied(nc, "a"), await applied(nc, "b")
            assert (grow_a.size_after, grow_a.size_wanted) == (3, 4)
            assert (grow_b.size_after, grow_b.size_wanted) == (1, 4)
            await publish(nc, decision("a", 2, "scale", 1))  # a gives 2 back: b's held grow goes on by itself

            async def b_grew() -> bool:
                return (await b.status()).size == 3

            await wait_for(b_grew, timeout=10)
            raised = (await applied(nc, "b"))[-1]
            assert raised.decision == f"{decision('b', 1, 'scale').id}:budget:3" and raised.size_wanted == 4
            await publish(nc, decision("a", 3, "terminate"))  # a ends: b gets its last node

            async def b_full() -> bool:
                return (await b.status()).size == 4

            await wait_for(b_full, timeout=10)
        sampler.cancel()
    assert sizes and max(sizes) <= 4  # at no sampled instant did the two hold more than the budget


async def _count(source: Any, count: int) -> bool:
    return len(await source) >= count


async def test_a_raise_reserved_but_not_applied_is_offered_again(nc: Client) -> None:
    budget = Budget(await budget_bucket(nc), Limits(cluster=4))
    a, b = MemberAddress("default", "a", 0), MemberAddress("default", "b", 0)
    await budget.reserve(a, spec("a"), decision("a", 1, "scale", 3), 3, 1)
    held = decision("b", 1, "scale", 4)
    await budget.reserve(b, spec("b"), held, 4, 1)
    await budget.forget(a)
    [(_, _, grant)] = await budget.raises()
    # the raise is reserved, then its scale does not go through (a cooldown, a sidecar that did not answer)
    got = await budget.reserve(b, spec("b"), held, 4, 1, raise_of=held.id)
    assert got is not None and got.granted == grant == 4
    assert [(address, d.id, g) for address, d, g in await budget.raises()] == [(b, held.id, 4)]
    await budget.settle(b, 4)  # applied: nothing left to raise
    assert await budget.raises() == []
