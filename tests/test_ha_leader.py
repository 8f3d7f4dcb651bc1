"""Creator leader election (ensemble_core/leader.py): candidates sharing a Lease on kmock's API emulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kmock

from ensemble_core.kube import Kube, KubeError, api_client
from ensemble_core.leader import LeaderElector
from tests.conftest import wait_for
from tests.test_kubernetes import api

__all__ = ["api"]  # the fixture

LEASES = kmock.resource("coordination.k8s.io/v1/leases")
NS = "ensemble-system"
DURATION = 1.0


def lease(emulator: kmock.KubernetesEmulator) -> dict[str, Any]:
    return dict(emulator.objects[LEASES, NS, "ensemble-creator"].raw.get("spec") or {})


class Candidate:
    """An elector whose leadership terms are recorded as (start, end) on the monotonic clock."""

    def __init__(self, url: str, name: str) -> None:
        self.kube = Kube(api_client(url))
        self.elector = LeaderElector(self.kube, NS, "ensemble-creator", identity=name, duration=DURATION, retry=0.1)
        self.terms: list[list[float]] = []
        self.frozen = False
        self.stop = asyncio.Event()
        real = self.elector.try_acquire_or_renew

        async def attempt() -> bool:
            if self.frozen:  # a process that hangs, or lost its way to the API server: it renews nothing
                raise KubeError("frozen", status=0, transient=True)
            return await real()

        self.elector.try_acquire_or_renew = attempt  # type: ignore[method-assign]

    async def lead(self, ended: asyncio.Event) -> None:
        self.terms.append([time.monotonic(), 0.0])
        await ended.wait()
        self.terms[-1][1] = time.monotonic()


async def test_one_of_two_candidates_leads_and_the_other_takes_over_when_it_stops_renewing(
    api: tuple[kmock.KubernetesEmulator, str],
) -> None:
    emulator, url = api
    a, b = Candidate(url, "creator-a"), Candidate(url, "creator-b")
    task_a = asyncio.create_task(a.elector.run(a.lead, a.stop))
    task_b: asyncio.Task[None] | None = None
    try:
        await wait_for(lambda: a.terms, timeout=5)
        task_b = asyncio.create_task(b.elector.run(b.lead, b.stop))
        await asyncio.sleep(3 * DURATION)  # b sees a renew all along: it stands by
        assert b.terms == [] and a.terms[0][1] == 0.0
        assert lease(emulator)["holderIdentity"] == "creator-a"
        assert lease(emulator)["leaseDurationSeconds"] == 1

        a.frozen = True
        frozen = time.monotonic()
        await wait_for(lambda: b.terms, timeout=5 * DURATION)
        took = b.terms[0][0] - frozen
        print(f"standby led {took:.2f} s after the leader stopped renewing")
        # a stopped leading (its renew deadline) before b started; b within the duration (plus a retry or two)
        assert 0.0 < a.terms[0][1] <= b.terms[0][0]
        assert took <= DURATION + 0.5
        assert lease(emulator)["holderIdentity"] == "creator-b"
        assert lease(emulator)["leaseTransitions"] == 1

        a.frozen = False  # a comes back: it stands by, b keeps leading
        await asyncio.sleep(2 * DURATION)
        assert len(a.terms) == 1 and b.terms[0][1] == 0.0
        b.stop.set()
        await asyncio.wait_for(task_b, 5)
        # b released the Lease on its way out: a leads at its next retry, not a whole duration later
        released = time.monotonic()
        await wait_for(lambda: len(a.terms) == 2, timeout=5)
        assert a.terms[1][0] - released < DURATION
        a.stop.set()
        await asyncio.wait_for(task_a, 5)
    finally:
        a.stop.set()
        b.stop.set()
        await asyncio.wait_for(asyncio.gather(task_a, *([task_b] if task_b else []), return_exceptions=True), 5)
    for kube in (a.kube, b.kube):
        await kube.close()


async def test_a_conflict_on_the_takeover_write_means_another_won_and_the_candidate_reads_again(
    api: tuple[kmock.KubernetesEmulator, str],
) -> None:
    emulator, url = api
    # a Lease released by its last holder: free to take at once
    emulator.objects[LEASES, NS, "ensemble-creator"] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "ensemble-creator", "namespace": NS, "resourceVersion": "7"},
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 3},
    }
    # the API server's answer to a PATCH whose resourceVersion is not the object's any more
    (emulator**1)["patch", LEASES][:1] << 409 << {"kind": "Status", "code": 409, "reason": "Conflict"}
    kube = Kube(api_client(url))
    elector = LeaderElector(kube, NS, "ensemble-creator", identity="creator-a", duration=DURATION)
    assert not await elector.try_acquire_or_renew()  # (kmock stores a refused patch anyway: not checked here)
    assert await elector.try_acquire_or_renew()
    patches = [request.data for request in emulator["patch", LEASES]]
    assert len(patches) == 2
    assert all(p["metadata"]["resourceVersion"] == "7" for p in patches)  # each write names what it read
    assert (lease(emulator)["holderIdentity"], lease(emulator)["leaseTransitions"]) == ("creator-a", 4)
    await kube.close()
