"""Decider throughput against a bare JetStream pull-and-ack loop, and ``decide()`` latency per algorithm.

Usage: ``.venv/bin/python bench/decider.py [--members 1000] [--checks 12] [--calls 20000]``

Throughput: a private nats-server is started, ``--members`` members are registered in the
``ensemble-members`` bucket and ``members * checks`` metrics are published, the members interleaved
(check 0 of every member, then check 1, ...). Then, on that same stream, two processes each drain
their own durable consumer while this script polls the consumer's state:

- the baselines: a bare nats-py loop that fetches batches and acks each message with ``ack()`` (no reply
  awaited), once with the decider's batch size (``ENSEMBLE_DECIDER_BATCH``'s default) and once with 64;
  and the same loop with ``ack_sync()`` (as the actuator acks) at the decider's batch size;
- ``ensemble decider``, exactly as deployed (``python -m services.decider`` with ``ENSEMBLE_*``
  settings): member cache, state compare-and-set in ``ensemble-decider``, decisions published; then,
  with its state and decisions cleared, once more with ``ENSEMBLE_DECIDER_BATCH=64``, where no member
  has two snapshots in a batch and every snapshot costs its own state write.

Each rate is messages acknowledged divided by the time from the first acknowledgement to the last. The
decider's ratio is taken against the *faster* of the two ``ack()`` baselines.
The metrics are stamped with the current time so that none is stale when the decider reads it.

Latency: ``decide()`` of workload-demand and demand-fit (when registered) over a realistic snapshot
sequence (a queue that fills, waits, runs and drains), each call timed on its own; median and p90.

Writes ``bench/results/decider.json`` and prints the figures with their targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ensemble_cli.up import run_nats  # noqa: E402
from ensemble_core import algorithms, natsio, subjects  # noqa: E402
from ensemble_core.messages import (  # noqa: E402
    AlgorithmSpec,
    JobSpec,
    MemberSpec,
    Metrics,
    NodeCounts,
    QueueCounts,
    encode,
)
from ensemble_core.settings import Settings  # noqa: E402
from ensemble_core.subjects import MemberAddress  # noqa: E402

RESULTS = REPO / "bench" / "results" / "decider.json"
#: The decider must reach this fraction of the bare loop's rate.
THROUGHPUT_TARGET = 0.5
#: Median ``decide()`` time these algorithms must stay under (microseconds).
LATENCY_TARGET_US = 20.0
LATENCY_TARGETED = ("workload-demand", "demand-fit")
#: The decider's own batch size, as deployed; the bare loop is also measured with the small one.
FETCH_BATCH = Settings().decider_batch
SMALL_BATCH = 64
NAMESPACE = "bench"
ENSEMBLE = "throughput"

BARE_LOOP = """
import asyncio, sys, nats
async def main(url, stream, durable, batch, ack):
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe_bind(durable, stream=stream)
    while True:
        try:
            messages = await sub.fetch(batch, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in messages:
            await getattr(msg, ack)()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
"""


def member_spec(index: int) -> MemberSpec:
    return MemberSpec(
        namespace=NAMESPACE,
        ensemble=ENSEMBLE,
        member=index,
        name=f"{ENSEMBLE}-{index}",
        size=1,
        min_size=1,
        max_size=16,
        endpoint="127.0.0.1:9",
        algorithm=AlgorithmSpec(name="workload-demand", options={"scaleChecks": 3, "terminateChecks": 4}),
        jobs=[JobSpec(name="a", command="true", count=6, nodes=2), JobSpec(name="b", command="true", count=3, nodes=4)],
        check_seconds=10,
    )


def snapshot(member: MemberSpec, seq: int, now: float, checks: int) -> Metrics:
    """Check ``seq`` of a run in which jobs wait, then run on more nodes, then the queue drains."""
    phase = seq / max(1, checks - 1)
    waiting = 9 if phase < 0.4 else (3 if phase < 0.8 else 0)
    size = 1 if phase < 0.4 else 8
    running = 0 if phase < 0.4 else (2 if phase < 0.8 else 0)
    finished = 9 - waiting - running
    free = size - 4 * running // 2 if running else size
    return Metrics(
        namespace=member.namespace,
        ensemble=member.ensemble,
        member=member.member,
        seq=seq,
        time=now + seq * member.check_seconds,
        size=size,
        nodes=NodeCounts(node_up_count=size, node_free_count=max(0, free), node_cores_up=size, node_cores_free=free),
        queue=QueueCounts(sched=waiting, run=running, inactive=finished),
        waiting={2: min(waiting, 6), 4: max(0, waiting - 6)} if waiting else {},
        next_jobs=[2] * min(waiting, 6) + [4] * max(0, waiting - 6),
        finished=finished,
    )


async def drain_rate(js: JetStreamContext, durable: str, total: int, command: list[str], env: dict[str, str]) -> float:
    """Start ``command`` and return the messages per second it acknowledges on ``durable``."""
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            info = await js.consumer_info(subjects.METRICS_STREAM, durable)
            acked = info.ack_floor.stream_seq if info.ack_floor else 0
            now = time.perf_counter()
            if first is None and acked > 0:
                first = (now, acked)
            if acked >= total and info.num_ack_pending == 0:
                assert first is not None
                return (acked - first[1]) / (now - first[0])
            if process.returncode is not None:
                error = await process.stderr.read() if process.stderr else b""
                raise RuntimeError(f"{command} exited: {error.decode()}")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{durable} did not drain the stream in time")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


def consumer(durable: str) -> ConsumerConfig:
    """The decider's consumer configuration (``natsio.durable_subscription``'s) under another name."""
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subjects.ALL_METRICS,
        ack_wait=30,
        max_deliver=-1,
        max_ack_pending=10_000,
    )


async def throughput(members: int, checks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server, url = run_nats(Path(tmp))
        try:
            nc = await nats.connect(url)
            js = nc.jetstream()
            await natsio.declare(js)
            bucket = await js.key_value(subjects.MEMBERS_BUCKET)
            specs = [member_spec(index) for index in range(members)]
            for spec in specs:
                await bucket.put(MemberAddress(spec.namespace, spec.ensemble, spec.member).key, encode(spec))
            now = time.time()
            pending = []
            for seq in range(checks):
                for spec in specs:
                    address = MemberAddress(spec.namespace, spec.ensemble, spec.member)
                    pending.append(js.publish(subjects.metrics(address), encode(snapshot(spec, seq, now, checks))))
                    if len(pending) >= 256:
                        await asyncio.gather(*pending)
                        pending.clear()
            await asyncio.gather(*pending)
            total = members * checks
            baselines = {
                "bare": ("ack", FETCH_BATCH),
                "bare-small": ("ack", SMALL_BATCH),
                "bare-sync": ("ack_sync", FETCH_BATCH),
            }
            for durable in (*baselines, natsio.DECIDER.name):
                await js.add_consumer(subjects.METRICS_STREAM, consumer(durable))
            env = {**os.environ, "ENSEMBLE_NATS_URL": url, "ENSEMBLE_LOG_LEVEL": "WARNING"}
            rates = {}
            for durable, (ack, size) in baselines.items():
                loop = [sys.executable, "-c", BARE_LOOP, url, subjects.METRICS_STREAM, durable, str(size), ack]
                rates[durable] = await drain_rate(js, durable, total, loop, env)
            deployed = [sys.executable, "-m", "services.decider"]
            decider = await drain_rate(js, natsio.DECIDER.name, total, deployed, {**env, "PYTHONPATH": str(REPO)})
            decisions = (await js.stream_info(subjects.DECISIONS_STREAM)).state.messages
            # Once more from scratch with small batches: a member has at most one snapshot per batch, so
            # every snapshot costs its own state write (what a decider that keeps up pays per message).
            await js.delete_consumer(subjects.METRICS_STREAM, natsio.DECIDER.name)
            await js.delete_key_value(subjects.DECIDER_BUCKET)
            await js.delete_stream(subjects.DECISIONS_STREAM)  # a purge keeps the msg-id window: ids repeat
            await natsio.declare(js)
            await js.add_consumer(subjects.METRICS_STREAM, consumer(natsio.DECIDER.name))
            small = {**env, "PYTHONPATH": str(REPO), "ENSEMBLE_DECIDER_BATCH": str(SMALL_BATCH)}
            decider_small = await drain_rate(js, natsio.DECIDER.name, total, deployed, small)
            decisions_small = (await js.stream_info(subjects.DECISIONS_STREAM)).state.messages
            await nc.drain()
        finally:
            server.terminate()
            server.wait(timeout=10)
    baseline = max(rates["bare"], rates["bare-small"])
    return {
        "members": members,
        "metrics": total,
        "fetch_batch": FETCH_BATCH,
        "bare_pull_ack_msgs_per_s": round(rates["bare"]),
        f"bare_pull_ack_batch_{SMALL_BATCH}_msgs_per_s": round(rates["bare-small"]),
        "bare_pull_ack_sync_msgs_per_s": round(rates["bare-sync"]),
        "decider_msgs_per_s": round(decider),
        "ratio": round(decider / baseline, 3),
        "ratio_to_ack_sync": round(decider / rates["bare-sync"], 3),
        "target_ratio": THROUGHPUT_TARGET,
        "met": decider / baseline >= THROUGHPUT_TARGET,
        "decisions_published": decisions,
        f"decider_batch_{SMALL_BATCH}_msgs_per_s": round(decider_small),
        f"decider_batch_{SMALL_BATCH}_ratio": round(decider_small / baseline, 3),
        f"decider_batch_{SMALL_BATCH}_decisions_published": decisions_small,
    }


def latency(calls: int) -> dict[str, Any]:
    """Median and p90 of one ``decide()`` call, in microseconds, for each targeted algorithm registered."""
    results: dict[str, Any] = {}
    checks = 40
    for name in [name for name in LATENCY_TARGETED if name in algorithms.names()]:
        algorithm = algorithms.get(name)
        member = msgspec.structs.replace(member_spec(0), algorithm=AlgorithmSpec(name=name, options={}))
        try:
            options = algorithms.parse_options(name, {})
        except algorithms.OptionsError as exc:
            results[name] = {"skipped": f"needs options: {exc}"}
            continue
        sequence = [snapshot(member, seq, 1_700_000_000.0, checks) for seq in range(checks)]
        timings: list[int] = []
        decisions = 0
        clock = time.perf_counter_ns
        while len(timings) < calls:
            state = algorithm.initial_state(member, options)
            for metrics in sequence:
                started = clock()
                state, made = algorithm.decide(member, options, state, metrics)
                timings.append(clock() - started)
                decisions += len(made)
        median = statistics.median(timings) / 1000
        entry: dict[str, Any] = {
            "calls": len(timings),
            "median_us": round(median, 2),
            "p90_us": round(statistics.quantiles(timings, n=10)[-1] / 1000, 2),
            "decisions_per_run": decisions * checks // len(timings),
        }
        entry["target_median_us"] = LATENCY_TARGET_US
        entry["met"] = median <= LATENCY_TARGET_US
        results[name] = entry
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--checks", type=int, default=16, help="metrics per member")
    parser.add_argument("--calls", type=int, default=20_000, help="decide() calls timed per algorithm")
    args = parser.parse_args()
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # the figures are only comparable within one run when other work shares the machine
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "throughput": asyncio.run(throughput(args.members, args.checks)),
        "decide_latency": latency(args.calls),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    put = report["throughput"]
    print(
        f"throughput, {put['members']} members, {put['metrics']} metrics, batch {put['fetch_batch']}: "
        f"bare pull+ack {put['bare_pull_ack_msgs_per_s']} msg/s (batch {SMALL_BATCH}: "
        f"{put[f'bare_pull_ack_batch_{SMALL_BATCH}_msgs_per_s']}), "
        f"pull+ack_sync {put['bare_pull_ack_sync_msgs_per_s']} msg/s, decider {put['decider_msgs_per_s']} msg/s = "
        f"{put['ratio']:.0%} of the faster pull+ack "
        f"(target ≥ {THROUGHPUT_TARGET:.0%}: {'met' if put['met'] else 'MISSED'}), {put['ratio_to_ack_sync']:.0%} of "
        f"pull+ack_sync; {put['decisions_published']} decisions published"
    )
    print(
        f"decider with batch {SMALL_BATCH} (one state write per snapshot): "
        f"{put[f'decider_batch_{SMALL_BATCH}_msgs_per_s']} msg/s = {put[f'decider_batch_{SMALL_BATCH}_ratio']:.0%}; "
        f"{put[f'decider_batch_{SMALL_BATCH}_decisions_published']} decisions published"
    )
    for name, entry in report["decide_latency"].items():
        if "skipped" in entry:
            print(f"decide() {name}: skipped ({entry['skipped']})")
            continue
        verdict = f" (target ≤ {LATENCY_TARGET_US:.0f} µs: {'met' if entry['met'] else 'MISSED'})"
        print(f"decide() {name}: median {entry['median_us']} µs, p90 {entry['p90_us']} µs{verdict}")
    print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
