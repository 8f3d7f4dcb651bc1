"""Sidecar benchmark: prints each figure beside its baseline and target, writes bench/results/sidecar.json.

Run from the repository root: ``.venv/bin/python bench/sidecar.py``. Every figure and its baseline are
measured in the same run, on real sidecar processes (``python -m sidecar``) over gRPC on loopback:

* ``status_p99_100k`` — RequestStatus p99 with 100,000 jobs queued (sim backend); baseline: an
  empty-payload unary call (RequestUpdate ``{}``) on the same server.
* ``local_throughput`` — ``true`` jobs submitted and completed per second (local backend); baseline:
  the same commands run one after another by a bare subprocess loop.
* ``watch_p99`` — a state change (grow / shrink) to the WatchStatus stream delivering it, p99;
  baseline: the round trip of the action call alone.
* ``rss_100k`` — the sidecar's resident memory with 100,000 jobs queued; baseline: the same
  process before the submit.
* ``sim_1m_jobs`` — 100 simulated members x 10,000 jobs run to completion in this process; baseline:
  the same jobs through the bare queue model (no clock, no events).

``--backend flux`` measures the flux backend on the real Flux instance it runs in (``flux start
--test-size=4 .venv/bin/python bench/sidecar.py --backend flux``) and writes
bench/results/sidecar-flux.json; each figure's baseline is the local backend in the same run:

* ``submit_1000`` — wall time of one submit of 1,000 jobs (RequestAction until its answer).
* ``heartbeat_gap_during_submit`` — the longest gap between two WatchStatus messages while that submit
  runs, heartbeat 1 s: the submit must not stall the stream by more than one heartbeat period.
* ``status_p99_1000_queued`` — RequestStatus p99 with 1,000 jobs queued (4 running, 996 waiting).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ensemble_core.messages import JobSpec  # noqa: E402
from ensemble_core.rpc import ensemble_service_pb2 as pb  # noqa: E402
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc  # noqa: E402
from ensemble_core.wire import SubmitPayload  # noqa: E402
from sidecar.queue import Queue  # noqa: E402
from sidecar.sim import SimQueue  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sidecar.json"
FLUX_RESULTS = ROOT / "bench" / "results" / "sidecar-flux.json"
HEARTBEAT = 1.0
QUEUED = 100_000


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


class Sidecar:
    """A ``python -m sidecar`` subprocess on a free port, and a stub on a channel to it."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_SIDECAR_TOKEN"}
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--port", "0", "--log-level", "WARNING", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.channel = aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = pb_grpc.EnsembleOperatorStub(self.channel)

    async def act(self, action: str, payload: object) -> dict[str, Any]:
        reply = await self.stub.RequestAction(pb.ActionRequest(action=action, payload=json.dumps(payload)), timeout=60)
        assert reply.status == pb.Response.SUCCESS, reply.payload
        result: dict[str, Any] = json.loads(reply.payload)
        return result

    async def status(self) -> dict[str, Any]:
        reply = await self.stub.RequestStatus(pb.StatusRequest(), timeout=10)
        result: dict[str, Any] = json.loads(reply.payload)
        return result

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    async def close(self) -> None:
        await self.channel.close(None)
        self.proc.terminate()
        self.proc.wait(10)


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def status_and_memory() -> tuple[dict[str, Any], dict[str, Any]]:
    sidecar = Sidecar("--backend", "sim", "--nodes", "1", "--max-nodes", "2")
    try:
        await sidecar.status()
        empty_rss = sidecar.rss_mb()
        await sidecar.act("submit", {"jobs": [{"name": "g", "command": "x", "count": QUEUED, "duration": 36000}]})
        snapshot = await sidecar.status()
        assert snapshot["counts"]["waiting"] + snapshot["counts"]["running"] == QUEUED
        full_rss = sidecar.rss_mb()

        async def update() -> None:
            await sidecar.stub.RequestUpdate(pb.UpdateRequest(payload="{}"), timeout=10)

        await timed(update, 200)  # warm-up of both paths
        await timed(sidecar.status, 200)
        baseline = await timed(update, 2000)
        status = await timed(sidecar.status, 2000)
    finally:
        await sidecar.close()
    return (
        figure(
            p99(status) * 1000,
            "ms",
            5.0,
            "<=",
            p99(baseline) * 1000,
            "RequestUpdate {} p99, same server",
            median=statistics.median(status) * 1000,
            baseline_median=statistics.median(baseline) * 1000,
        ),
        figure(full_rss, "MB", 300.0, "<", empty_rss, "the same sidecar before the submit"),
    )


def bare_subprocess_rate(jobs: int) -> float:
    """``true`` run ``jobs`` times, one after another, by a plain subprocess loop: jobs per second."""
    started = time.perf_counter()
    for _ in range(jobs):
        subprocess.run(["true"], check=True)
    return jobs / (time.perf_counter() - started)


async def local_throughput(jobs: int = 1000, *extra: str) -> dict[str, Any]:
    baseline = bare_subprocess_rate(jobs)

    sidecar = Sidecar("--backend", "local", "--nodes", "4", *extra)
    try:
        await sidecar.status()
        started = time.perf_counter()
        await sidecar.act("submit", {"jobs": [{"name": "t", "command": "true", "count": jobs}]})
        while (await sidecar.status())["finished"] < jobs:
            await asyncio.sleep(0.02)
        rate = jobs / (time.perf_counter() - started)
        failed = (await sidecar.status())["failed"]
        assert failed == 0, f"{failed} jobs failed"
    finally:
        await sidecar.close()
    return figure(rate, "jobs/s", 200.0, ">=", baseline, "bare subprocess.run loop, same commands")


async def watch_latency(samples: int = 100) -> dict[str, Any]:
    sidecar = Sidecar("--backend", "sim", "--nodes", "1", "--max-nodes", "2", "--heartbeat", "30")
    try:
        stream = sidecar.stub.WatchStatus(pb.StatusRequest())
        await stream.read()
        delays, round_trips = [], []
        for i in range(samples):
            size = 2 if i % 2 == 0 else 1
            await asyncio.sleep(0.12)  # beyond the stream's 0.1 s coalescing window: every change is pushed
            started = time.perf_counter()
            await sidecar.act("grow" if size == 2 else "shrink", {"size": size})
            round_trips.append(time.perf_counter() - started)
            while True:
                message = await stream.read()
                assert isinstance(message, pb.Response)
                if json.loads(message.payload)["nodes"]["node_up_count"] == size:
                    break
            delays.append(time.perf_counter() - started)
        stream.cancel()
    finally:
        await sidecar.close()
    return figure(
        p99(delays) * 1000,
        "ms",
        50.0,
        "<=",
        p99(round_trips) * 1000,
        "the action call's round trip p99",
        median=statistics.median(delays) * 1000,
        baseline_median=statistics.median(round_trips) * 1000,
    )


def simulated_members(members: int = 100, jobs: int = 10_000) -> dict[str, Any]:
    def specs() -> list[JobSpec]:
        return [
            JobSpec(name="a", command="x", nodes=1, count=jobs // 2, duration=5),
            JobSpec(name="b", command="x", nodes=2, count=jobs // 2, duration=7),
        ]

    started = time.perf_counter()
    for _ in range(members):
        queue = Queue(nodes=16, max_nodes=16)
        queue.submit(specs(), 0.0)
        running = queue.schedule(0.0)
        while running:
            job = running.pop()
            queue.finish(job.id, 1.0, 0)
            running.extend(queue.schedule(1.0))
    baseline = time.perf_counter() - started

    started = time.perf_counter()
    for member in range(members):
        sim = SimQueue(nodes=1, max_nodes=16, provision_delay=[30.0, 90.0, 150.0], seed=member)
        sim.submit(SubmitPayload(jobs=specs()))
        sim.grow(16)
        sim.run_until_idle()
        assert sim.status().finished == jobs
    elapsed = time.perf_counter() - started
    return figure(elapsed, "s", 60.0, "<", baseline, "the bare queue model, same jobs, no clock")


def figure(
    value: float, unit: str, target: float, sense: str, baseline: float, baseline_is: str, **medians: float
) -> dict[str, Any]:
    met = {"<=": value <= target, "<": value < target, ">=": value >= target}[sense]
    return {
        **{name: round(value, 3) for name, value in medians.items()},
        "value": round(value, 3),
        "unit": unit,
        "target": f"{sense} {target:g}",
        "met": met,
        "baseline": round(baseline, 3),
        "baseline_is": baseline_is,
    }


async def submit_under_watch(sidecar: Sidecar, jobs: int) -> tuple[float, float]:
    """Submit ``jobs`` long jobs while a WatchStatus stream runs: (the submit's wall time, the stream's
    longest gap between two messages while the submit ran)."""
    stream = sidecar.stub.WatchStatus(pb.StatusRequest())
    await stream.read()
    arrivals: list[float] = []

    async def follow() -> None:
        while isinstance(await stream.read(), pb.Response):
            arrivals.append(time.perf_counter())

    following = asyncio.create_task(follow())
    await asyncio.sleep(2 * HEARTBEAT)
    started = time.perf_counter()
    await sidecar.act("submit", {"jobs": [{"name": "q", "command": "sleep 600", "count": jobs}]})
    ended = time.perf_counter()
    await asyncio.sleep(2 * HEARTBEAT)
    following.cancel()
    stream.cancel()
    during = [started, *(t for t in arrivals if started < t < ended), ended]
    # the gap that spans the submit's end counts too: the next message must come within a heartbeat
    after = next((t for t in arrivals if t >= ended), ended + 2 * HEARTBEAT)
    during.append(after)
    return ended - started, max(b - a for a, b in itertools.pairwise(during))


async def queued_status(sidecar: Sidecar, jobs: int) -> list[float]:
    """RequestStatus latencies with ``jobs`` queued (the submit of :func:`submit_under_watch` done)."""
    while (await sidecar.status())["counts"]["waiting"] + (await sidecar.status())["counts"]["running"] < jobs:
        await asyncio.sleep(0.1)
    await timed(sidecar.status, 100)
    return await timed(sidecar.status, 2000)


async def flux_figures(jobs: int = 1000) -> dict[str, Any]:
    """The flux backend on the instance at FLUX_URI, beside the local backend (4 nodes) as the baseline."""
    measured: dict[str, tuple[float, float, list[float]]] = {}
    for backend in ("local", "flux"):
        extra = ("--nodes", "4") if backend == "local" else ()
        sidecar = Sidecar("--backend", backend, "--heartbeat", str(HEARTBEAT), *extra)
        try:
            await sidecar.status()
            took, gap = await submit_under_watch(sidecar, jobs)
            measured[backend] = (took, gap, await queued_status(sidecar, jobs))
            await sidecar.act("cancel", {"group": "q"})
        finally:
            await sidecar.close()
    (flux_took, flux_gap, flux_status), (local_took, local_gap, local_status) = measured["flux"], measured["local"]
    return {
        "submit_1000": figure(flux_took, "s", 5.0, "<", local_took, "the local backend's submit of the same jobs"),
        "heartbeat_gap_during_submit": figure(
            flux_gap, "s", 2 * HEARTBEAT, "<=", local_gap, f"the local backend's, heartbeat {HEARTBEAT:g} s"
        ),
        "status_p99_1000_queued": figure(
            p99(flux_status) * 1000,
            "ms",
            5.0,
            "<=",
            p99(local_status) * 1000,
            "the local backend with the same jobs queued",
            median=statistics.median(flux_status) * 1000,
            baseline_median=statistics.median(local_status) * 1000,
        ),
    }


def flux_about() -> dict[str, Any]:
    """The flux-core version and the number of ranks of the instance at FLUX_URI."""
    version = subprocess.run(["flux", "version"], capture_output=True, text=True, check=True).stdout
    size = subprocess.run(["flux", "getattr", "size"], capture_output=True, text=True, check=True).stdout
    core = next(line.split()[-1] for line in version.splitlines() if line.startswith("libflux-core"))
    return {"flux_core": core, "flux_ranks": int(size)}


def report(results: dict[str, Any], path: Path, **about: Any) -> None:
    for name, result in results.items():
        print(
            f"{name:28} {result['value']:>10.3f} {result['unit']:7} target {result['target']:>8} "
            f"{'met' if result['met'] else 'MISSED':6}  baseline {result['baseline']:.3f} ({result['baseline_is']})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(), **about}
    path.write_text(json.dumps({"machine": machine, "time": time.time(), "figures": results}, indent=2) + "\n")
    print(f"written {path.relative_to(ROOT)}")


async def main() -> None:
    if "--backend" in sys.argv[1:] and sys.argv[sys.argv.index("--backend") + 1] == "flux":
        if not os.environ.get("FLUX_URI"):
            sys.exit(
                "run it in a Flux instance: flux start --test-size=4 .venv/bin/python bench/sidecar.py --backend flux"
            )
        report(await flux_figures(), FLUX_RESULTS, **flux_about())
        return
    status, memory = await status_and_memory()
    results = {
        "status_p99_100k": status,
        "rss_100k": memory,
        "local_throughput": await local_throughput(),
        # what `ensemble up` runs: every job start and end journalled (fsync) for restarts
        "local_throughput_journal": await local_throughput(1000, "--state-dir", tempfile.mkdtemp(prefix="bench-")),
        "watch_p99": await watch_latency(),
        "sim_1m_jobs": simulated_members(),
    }
    report(results, RESULTS)


if __name__ == "__main__":
    asyncio.run(main())
