"""An ensemble on a three-node NATS JetStream cluster while its servers are killed (kill -9).

Real parts: three nats-server processes with routes on loopback, the four services and one sidecar per
member (local queue) as processes, streams and buckets with three replicas. One server is killed and
started again, then the server leading the metrics stream is killed and started again; the ensemble
must complete, and no metrics, decision or applied event may be lost or doubled.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats
import pytest
import yaml
from nats.aio.client import Client

from ensemble_core import natsio, subjects
from ensemble_core.messages import Applied, Decision, MemberSpec, Metrics
from ensemble_core.settings import Settings
from tests.conftest import wait_for
from tests.nats_cluster import NatsCluster, stream_leader, wait_current

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ensemble_cli"]
MEMBERS = 2
ENSEMBLE = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "metadata": {"name": "cluster"},
    "spec": {
        "checkSeconds": 1,
        "members": [
            {
                "minicluster": {"spec": {"size": 1, "minSize": 1, "maxSize": 3}},
                "algorithm": {
                    "name": "workload-demand",
                    "options": {"order": "descending", "scaleChecks": 1, "terminateChecks": 3},
                },
                "jobs": [
                    {"name": "pair", "command": "sleep 1", "count": 2, "nodes": 2},
                    {"name": "single", "command": "sleep 1", "count": 6, "nodes": 1},
                ],
            }
            for _ in range(MEMBERS)
        ],
    },
}


def first_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()
    assert line, f"the sidecar exited ({process.poll()}) before saying its port"
    assert time.monotonic() < deadline
    return line.strip()


async def read_all(nc: Client, stream: str, subject: str) -> list[bytes]:
    """Every message of ``subject`` in ``stream``, read with an ordered consumer until the stream's count."""
    js = nc.jetstream()
    info = await js.stream_info(stream, subjects_filter=subject)
    expected = sum((info.state.subjects or {}).values())
    out: list[bytes] = []
    if not expected:
        return out
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    while len(out) < expected:
        out.append((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()
    return out


async def test_an_ensemble_completes_with_nothing_lost_or_doubled_while_nats_servers_are_killed(
    tmp_path: Path,
) -> None:
    cluster = NatsCluster(tmp_path)
    cluster.start_all()
    parts: list[subprocess.Popen[str]] = []
    nc: Client | None = None
    try:
        nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        await wait_for(lambda: _meta_ready(nc), timeout=20, interval=0.2)
        # an installation that ran one replica: the streams moved to three explicitly (`ensemble nats-replicas`)
        await natsio.declare(js, Settings(nats_replicas=1))
        with pytest.raises(natsio.ReplicasChanged, match="ensemble nats-replicas 3"):
            await natsio.declare_once(js, Settings(nats_replicas=3))
        changed = await natsio.set_replicas(js, 3, apply=True)
        assert {c.stream for c in changed if c.changed} == set(natsio.stream_names())
        await natsio.declare_once(js, Settings(nats_replicas=3))
        token = "cluster-secret"
        file = tmp_path / "ensemble.yaml"
        file.write_text(yaml.safe_dump(ENSEMBLE))
        endpoints = []
        for index in range(MEMBERS):
            sidecar = subprocess.Popen(  # noqa: ASYNC220  (real sidecar processes)
                [*CLI, "sidecar", "--backend", "local", "--port", "0", "--nodes", "1", "--max-nodes", "3",
                 "--cores", "1", "--state-dir", str(tmp_path / f"sidecar-{index}")],
                env={**os.environ, "PYTHONPATH": str(REPO), "ENSEMBLE_SIDECAR_TOKEN": _member_token(token)},
                stdout=subprocess.PIPE, stderr=(tmp_path / f"sidecar-{index}.log").open("wb"), text=True,
            )  # fmt: skip
            parts.append(sidecar)
            endpoints.append(f"{index}=127.0.0.1:{first_line(sidecar)}")
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "ENSEMBLE_NATS_URL": cluster.url,
            "ENSEMBLE_NATS_REPLICAS": "3",
            "ENSEMBLE_SIDECAR_TOKEN": token,
            "ENSEMBLE_FILE": str(file),
            "ENSEMBLE_ENDPOINTS": ",".join(endpoints),
            "ENSEMBLE_ACK_WAIT": "5",
        }
        for name in ("creator", "poller", "decider", "actuator"):
            log = (tmp_path / f"{name}.log").open("wb")
            service = subprocess.Popen([*CLI, name], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)  # noqa: ASYNC220
            parts.append(service)

        async def checks() -> int:
            try:
                return (await js.stream_info(subjects.METRICS_STREAM)).state.messages
            except Exception:
                return 0

        async def decided() -> bool:
            try:
                return (await js.stream_info(subjects.DECISIONS_STREAM)).state.messages > 0
            except Exception:
                return False

        # every service up (a decision was made) before the first fault
        await wait_for(lambda: _at_least(checks, 4), timeout=40, interval=0.2)
        await wait_for(decided, timeout=30, interval=0.2)
        info = await js.stream_info(subjects.METRICS_STREAM)
        assert info.config.num_replicas == 3
        # 1. a server that leads nothing we read, killed and started again
        leader = cluster.index_of(await stream_leader(js, subjects.METRICS_STREAM))
        other = (leader + 1) % 3
        cluster.kill(other)
        await asyncio.sleep(1.5)
        cluster.start(other)
        for stream in (subjects.METRICS_STREAM, subjects.DECISIONS_STREAM, subjects.EVENTS_STREAM):
            await wait_current(js, stream, 3)
        # 2. the metrics stream's leader killed: the others elect a new one and the services go on
        before = await checks()
        cluster.kill(leader)
        killed = time.monotonic()
        await wait_for(lambda: _at_least(checks, before + 4), timeout=20, interval=0.1)
        print(f"metrics stored again {time.monotonic() - killed:.1f} s after the stream leader was killed")
        assert cluster.index_of(await stream_leader(js, subjects.METRICS_STREAM)) != leader
        cluster.start(leader)

        async def completed() -> bool:
            try:
                bucket = await js.key_value(subjects.MEMBERS_BUCKET)
                phases = [
                    msgspec.json.decode((await bucket.get(key)).value or b"", type=MemberSpec).phase
                    for key in await bucket.keys()
                ]
            except Exception:
                return False
            return len(phases) == MEMBERS and all(phase != "active" for phase in phases)

        await wait_for(completed, timeout=60, interval=0.5)
        await wait_current(js, subjects.METRICS_STREAM, 3)

        metrics = [msgspec.json.decode(m, type=Metrics) for m in await read_all(nc, subjects.METRICS_STREAM, ">")]
        decisions = [msgspec.json.decode(m, type=Decision) for m in await read_all(nc, subjects.DECISIONS_STREAM, ">")]
        applied = [
            msgspec.json.decode(m, type=Applied)
            for m in await read_all(nc, subjects.EVENTS_STREAM, subjects.ALL_APPLIED)
        ]
    finally:
        for part in parts:
            if part.poll() is None:
                part.terminate()
        for part in parts:
            try:
                part.wait(20)
            except subprocess.TimeoutExpired:
                part.kill()
        if nc is not None:
            await nc.close()
        cluster.stop_all()
    seqs: dict[int, list[int]] = collections.defaultdict(list)
    for m in metrics:
        seqs[m.member].append(m.seq)
    assert set(seqs) == set(range(MEMBERS))
    for member, found in seqs.items():
        assert found == list(range(len(found))), f"member {member}: metrics seqs lost or doubled: {found}"
    ids = [d.id for d in decisions]
    assert len(ids) == len(set(ids)), "a decision was stored twice"
    assert {d.action for d in decisions} >= {"scale"}
    assert {d.member for d in decisions if d.action in ("terminate", "complete")} == set(range(MEMBERS))
    done = collections.Counter(a.decision for a in applied)
    assert all(count == 1 for count in done.values()), f"applied twice: {[k for k, v in done.items() if v > 1]}"
    assert set(done) == set(ids), "a decision was never applied"
    if os.environ.get("ENSEMBLE_TEST_VERBOSE"):
        print(len(metrics), "metrics,", len(decisions), "decisions,", len(applied), "applied")


async def _meta_ready(nc: Client) -> bool:
    try:
        await nc.jetstream().account_info()
    except Exception:
        return False
    return True


async def _at_least(count: object, wanted: int) -> bool:
    return bool(await count() >= wanted)  # type: ignore[operator]


def _member_token(secret: str) -> str:
    from ensemble_core.tokens import ensemble_token

    return ensemble_token(secret, "default", "cluster")


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
