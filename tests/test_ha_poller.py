"""Several pollers share the members (services/poller/shard.py): real poller processes, a real nats-server."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from ensemble_core import subjects
from ensemble_core.messages import Metrics
from ensemble_core.settings import Settings, SettingsError, load
from services.poller.shard import preferred
from sidecar.local import LocalBackend
from sidecar.server import serve
from tests.conftest import stream_messages, wait_for
from tests.test_poller import member_spec, register, token

REPO = Path(__file__).resolve().parent.parent
CHECK = 1.0
MEMBERS = 9


def test_rendezvous_hashing_spreads_members_and_moves_only_a_lost_pollers_members() -> None:
    members = [f"default.demo.{i}" for i in range(3000)]
    four = frozenset({"a", "b", "c", "d"})
    before = {m: preferred(m, four) for m in members}
    counts = collections.Counter(before.values())
    assert set(counts) == four and min(counts.values()) > 600  # about 750 each
    after = {m: preferred(m, four - {"c"}) for m in members}
    moved = [m for m in members if before[m] != after[m]]
    assert moved and all(before[m] == "c" for m in moved)
    assert all(after[m] != "c" for m in members)


def test_a_lease_shorter_than_three_heartbeats_is_refused_naming_both_settings() -> None:
    with pytest.raises(SettingsError, match=r"ENSEMBLE_POLLER_LEASE_SECONDS.*ENSEMBLE_POLLER_HEARTBEAT"):
        load({"ENSEMBLE_POLLER_HEARTBEAT": "2", "ENSEMBLE_POLLER_LEASE_SECONDS": "5"})


@pytest.fixture
def pollers(settings: Settings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Three poller processes on the session's nats-server: heartbeat 0.2 s, lease 0.8 s."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ENSEMBLE_NATS_URL": settings.nats_url,
        "ENSEMBLE_SIDECAR_TOKEN": settings.sidecar_token,
        "ENSEMBLE_POLLER_HEARTBEAT": "0.2",
        "ENSEMBLE_POLLER_LEASE_SECONDS": "0.8",
    }
    started = []
    for i in range(3):
        log = (tmp_path / f"poller-{i}.log").open("wb")
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "ensemble_cli", "poller"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def owners(nc: Client) -> dict[str, str]:
    bucket = await nc.jetstream().key_value(subjects.OWNERS_BUCKET)
    found = {}
    for key in await bucket.keys():
        entry = await bucket.get(key)
        found[key] = (entry.value or b"").decode()
    return found


async def test_three_pollers_share_the_members_and_a_killed_ones_members_are_polled_again_within_two_checks(
    nc: Client, settings: Settings, pollers: list[subprocess.Popen[bytes]]
) -> None:
    sidecar = await serve(LocalBackend(nodes=1), token=token(settings), heartbeat=60)
    js = nc.jetstream()
    latest: dict[int, float] = {}

    async def seen(msg: object) -> None:
        metrics = msgspec.json.decode(msg.data, type=Metrics)  # type: ignore[attr-defined]
        latest[metrics.member] = time.time()

    sub = await js.subscribe(subjects.ALL_METRICS, ordered_consumer=True, cb=seen)
    try:
        for i in range(MEMBERS):
            await register(nc, member_spec(i, f"127.0.0.1:{sidecar.port}", check_seconds=CHECK))
        await wait_for(lambda: len(latest) == MEMBERS, timeout=30)

        async def shared() -> bool:
            held = await owners(nc)
            return len(held) == MEMBERS and len(set(held.values())) == 3

        # the three share the members once all three have started (a poller's start takes seconds here)
        await wait_for(shared, timeout=30, interval=0.2)
        held = await owners(nc)
        # the poller with the most members (its name ends with its pid's part: find its process)
        busiest, _ = collections.Counter(held.values()).most_common(1)[0]
        victim = next(p for p in pollers if f"-{p.pid}-" in busiest)
        orphans = [int(key.rsplit(".", 1)[1]) for key, owner in held.items() if owner == busiest]
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.time()
        await wait_for(lambda: all(latest.get(i, 0) > killed for i in orphans), timeout=10 * CHECK)
        took = max(latest[i] for i in orphans) - killed
        print(f"members of the killed poller polled again after {took:.2f} s")
        assert took <= 2 * CHECK, f"its members were polled again after {took:.2f} s"
        after = await owners(nc)
        assert all(after[key] != busiest for key in after)
        await asyncio.sleep(2 * CHECK)  # a few more checks by the new owners
    finally:
        await sub.unsubscribe()
        for process in pollers:
            if process.poll() is None:
                process.terminate()
        for process in pollers:
            # a poller force-exits 20 s after SIGTERM at the latest; more here only on a very loaded machine
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await sidecar.stop()
    stored = await stream_messages(nc, subjects.METRICS_STREAM, subjects.ALL_METRICS)
    by_member: dict[int, list[int]] = collections.defaultdict(list)
    for data in stored:
        metrics = msgspec.json.decode(data, type=Metrics)
        by_member[metrics.member].append(metrics.seq)
    for member, seqs in by_member.items():
        assert seqs == list(range(len(seqs))), f"member {member}: seqs {seqs} not gap-free and unique"


async def test_a_service_refuses_streams_of_another_replica_count_and_names_the_command(
    nc: Client, settings: Settings
) -> None:
    from ensemble_core import natsio

    with pytest.raises(natsio.ReplicasChanged, match=r"ENSEMBLE_NATS_REPLICAS=3.*ensemble nats-replicas 3"):
        await natsio.declare(nc.jetstream(), Settings(nats_url=settings.nats_url, nats_replicas=3))
    unchanged = await natsio.set_replicas(nc.jetstream(), 3, apply=False)
    assert unchanged and all(c.before == 1 and not c.changed for c in unchanged)
