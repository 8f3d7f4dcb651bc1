"""Poller processes keeping thousands of members at their check period: lag, cadence, CPU and memory.

Usage: ``.venv/bin/python bench/poller.py [--members 2000] [--sidecars 4] [--check 1] [--duration 60]
[--warmup 15] [--mode watch|poll] [--backend local|sim] [--pollers 1] [--scale 1,4]``

``--pollers N`` runs N pollers that share the members (services/poller/shard.py). ``--scale 1,4`` runs
the whole benchmark once per poller count, each on a fresh nats-server, sidecars and members, and writes
``bench/results/scale.json`` with every run side by side (the first count is the baseline).

A private nats-server is started, then ``--sidecars`` sidecar processes (``ensemble sidecar --backend
BACKEND --nodes 1``, no jobs), ``--members`` members registered in the ``ensemble-members`` bucket
(round robin over the sidecars: many members share one sidecar here, where each MiniCluster would have
its own), and ``ensemble poller`` exactly as deployed. ``--mode poll`` serves the members with
original-shaped sidecars instead (this script with ``--serve-original``: ``RequestStatus`` only, so
the poller falls back to polling, one call per member per check).

After ``--warmup`` seconds, ``--duration`` seconds are measured:

- lag: for each ``Metrics`` stored in the window, the stream's timestamp (when nats-server stored
  it) minus ``Metrics.time`` (the check's instant on the poller's clock; same machine, same clock);
- cadence: the gaps between consecutive ``Metrics.time`` of a member, and the checks stored per
  member per check period (1.0: none missed);
- integrity: every member's seqs in the stream are contiguous, with no duplicate;
- the poller's CPU (psutil, sampled every second; 100 % is one core) and resident memory, summed over
  the pollers, and how many members each poller owned at the end (``ensemble-owners``).

Writes ``bench/results/poller.json`` (or ``--out``) and prints the figures with their targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ensemble_cli.up import run_nats  # noqa: E402
from ensemble_core import natsio, subjects  # noqa: E402
from ensemble_core.messages import AlgorithmSpec, JobSpec, MemberSpec, encode  # noqa: E402
from ensemble_core.subjects import MemberAddress  # noqa: E402
from ensemble_core.tokens import ensemble_token  # noqa: E402

RESULTS = REPO / "bench" / "results" / "poller.json"
SCALE_RESULTS = REPO / "bench" / "results" / "scale.json"
#: The ``ensemble`` command of this checkout (whichever Python runs the benchmark).
ENSEMBLE_CLI = [sys.executable, "-m", "ensemble_cli"]
CLI_ENV = {"PYTHONPATH": str(REPO)}
NAMESPACE = "bench"
ENSEMBLE = "poller"
SECRET = "bench-secret"
#: p99 of the lag (check → stored) the poller must stay under (seconds).
LAG_TARGET = 1.0

ORIGINAL_PAYLOAD = json.dumps(
    {
        "nodes": {"node_cores_free": 1, "node_cores_up": 1, "node_up_count": 1, "node_free_count": 1},
        "queue": {"new": 0, "depend": 0, "priority": 0, "sched": 0, "run": 0, "cleanup": 0, "inactive": 0},
        "waiting": {},
        "nextJobs": [],
        "counts": {},
        "metrics": {},
    }
)


class Check(msgspec.Struct):
    """The fields of a stored ``Metrics`` this benchmark reads."""

    member: int
    seq: int
    time: float


async def serve_original() -> None:
    """An original-shaped sidecar: ``RequestStatus`` only (``WatchStatus`` is UNIMPLEMENTED)."""
    import grpc

    from ensemble_core.rpc import ensemble_service_pb2 as pb

    async def status(request: pb.StatusRequest, context: object) -> pb.Response:
        return pb.Response(payload=ORIGINAL_PAYLOAD, status=pb.Response.SUCCESS)

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        status, request_deserializer=pb.StatusRequest.FromString, response_serializer=pb.Response.SerializeToString
    )
    service = pb.DESCRIPTOR.services_by_name["EnsembleOperator"].full_name
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"RequestStatus": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)


def start_sidecar(mode: str, backend: str) -> tuple[subprocess.Popen[str], str]:
    if mode == "poll":
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-original"]
    else:
        command = [*ENSEMBLE_CLI, "sidecar", "--backend", backend, "--port", "0", "--nodes", "1"]
        command += ["--log-level", "WARNING"]
    env = {**os.environ, **CLI_ENV, "ENSEMBLE_SIDECAR_TOKEN": ensemble_token(SECRET, NAMESPACE, ENSEMBLE)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None
    port = process.stdout.readline().strip()
    if not port.isdigit():
        process.kill()
        raise RuntimeError(f"sidecar did not start: {command}")
    return process, f"127.0.0.1:{port}"


def start_poller(url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **CLI_ENV, "ENSEMBLE_NATS_URL": url, "ENSEMBLE_SIDECAR_TOKEN": SECRET}
    env.update(ENSEMBLE_LOG_LEVEL="INFO", PYTHONFAULTHANDLER="1")
    with log_path.open("wb") as log:
        return subprocess.Popen([*ENSEMBLE_CLI, "poller"], stdout=log, stderr=subprocess.STDOUT, env=env)


def member_spec(member: int, endpoint: str, check: float) -> MemberSpec:
    return MemberSpec(
        namespace=NAMESPACE,
        ensemble=ENSEMBLE,
        member=member,
        name=f"bench-{member}",
        size=1,
        min_size=1,
        max_size=1,
        endpoint=endpoint,
        algorithm=AlgorithmSpec(),
        jobs=[JobSpec(name="idle", command="true", count=0)],
        check_seconds=check,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def read_checks(url: str) -> list[tuple[Check, float]]:
    """Every stored ``Metrics`` with the time nats-server stored it."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    expected = (await js.stream_info(subjects.METRICS_STREAM)).state.messages
    out: list[tuple[Check, float]] = []
    done = asyncio.Event()
    decoder = msgspec.json.Decoder(Check)

    async def collect(msg: Any) -> None:
        out.append((decoder.decode(msg.data), msg.metadata.timestamp.timestamp()))
        if len(out) >= expected:
            done.set()

    sub = await js.subscribe(subjects.ALL_METRICS, ordered_consumer=True, cb=collect, pending_msgs_limit=-1)
    await asyncio.wait_for(done.wait(), 600)
    await sub.unsubscribe()
    await nc.close()
    return out


async def owners_per_poller(url: str) -> list[int]:
    """How many members each poller owns (``ensemble-owners``), largest first."""
    nc = await nats.connect(url)
    counts: dict[str, int] = {}
    try:
        bucket = await nc.jetstream().key_value(subjects.OWNERS_BUCKET)
        watcher = await bucket.watchall()
        async for entry in _until_synced(watcher):
            if entry.value:
                counts[entry.value.decode()] = counts.get(entry.value.decode(), 0) + 1
        await watcher.stop()  # type: ignore[no-untyped-call]
    finally:
        await nc.close()
    return sorted(counts.values(), reverse=True)


async def _until_synced(watcher: Any) -> Any:
    while True:
        entry = await watcher.updates(timeout=30)
        if entry is None:
            return
        yield entry


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    processes: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-poller-") as tmp:
        nats_process, url = run_nats(Path(tmp))
        processes.append(nats_process)
        try:
            endpoints = []
            for _ in range(args.sidecars):
                sidecar, endpoint = start_sidecar(args.mode, args.backend)
                processes.append(sidecar)
                endpoints.append(endpoint)
            nc = await nats.connect(url)
            js = nc.jetstream()
            await natsio.declare(js)
            members = await js.key_value(subjects.MEMBERS_BUCKET)
            for i in range(args.members):
                spec = member_spec(i, endpoints[i % len(endpoints)], args.check)
                await members.put(MemberAddress(NAMESPACE, ENSEMBLE, i).key, encode(spec))
            await nc.close()

            pollers = [start_poller(url, Path(tmp) / f"poller-{i}.log") for i in range(args.pollers)]
            processes.extend(pollers)
            watched = [psutil.Process(p.pid) for p in pollers]
            for w in watched:
                w.cpu_percent(None)
            await asyncio.sleep(args.warmup)
            start = time.time()
            cpu: list[float] = []
            rss: list[int] = []
            for w in watched:
                w.cpu_percent(None)
            while time.time() - start < args.duration:
                await asyncio.sleep(1.0)
                cpu.append(sum(w.cpu_percent(None) for w in watched))
                rss.append(sum(w.memory_info().rss for w in watched))
            end = time.time()
            owned = await owners_per_poller(url)
            stopping = time.monotonic()
            for poller in pollers:
                poller.send_signal(signal.SIGTERM)
            for poller in pollers:
                try:
                    poller.wait(60)
                except subprocess.TimeoutExpired:
                    poller.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
                    poller.wait()
            # a poller that did not stop within its grace exits 1: recorded (and failing "ok"), not hidden
            exit_codes = [poller.returncode for poller in pollers]
            stop_seconds = time.monotonic() - stopping
            stored = await read_checks(url)
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(10)
                if process.poll() is None:
                    process.kill()

    by_member: dict[int, list[Check]] = {}
    for check, _ in stored:
        by_member.setdefault(check.member, []).append(check)
    broken = [m for m, checks in by_member.items() if [c.seq for c in checks] != list(range(len(checks)))]
    in_window = [(check, at) for check, at in stored if start <= at < end]
    lags = [at - check.time for check, at in in_window]
    gaps = [
        b.time - a.time
        for checks in by_member.values()
        for a, b in itertools.pairwise(checks)
        if start <= a.time and b.time < end
    ]
    per_period = len(in_window) / (args.members * (end - start) / args.check)
    return {
        "benchmark": "poller",
        "mode": args.mode,
        "sidecar_backend": args.backend if args.mode == "watch" else "original-shaped (RequestStatus only)",
        "members": args.members,
        "sidecar_processes": args.sidecars,
        "pollers": args.pollers,
        "members_per_poller": owned,
        "check_seconds": args.check,
        "warmup_seconds": args.warmup,
        "window_seconds": round(end - start, 2),
        "metrics_stored_in_window": len(in_window),
        "members_seen": len(by_member),
        "checks_per_member_per_period": round(per_period, 4),
        "members_with_seq_gaps_or_duplicates": len(broken),
        "lag_seconds": {
            "p50": round(percentile(lags, 50), 4),
            "p90": round(percentile(lags, 90), 4),
            "p99": round(percentile(lags, 99), 4),
            "max": round(max(lags), 4) if lags else None,
            "target_p99": LAG_TARGET,
        },
        "check_gap_seconds": {
            "p1": round(percentile(gaps, 1), 4),
            "p50": round(percentile(gaps, 50), 4),
            "p99": round(percentile(gaps, 99), 4),
            "max": round(max(gaps), 4) if gaps else None,
        },
        # summed over the pollers
        "poller_cpu_percent_of_one_core": {
            "mean": round(statistics.fmean(cpu), 1) if cpu else None,
            "max": round(max(cpu), 1) if cpu else None,
        },
        "poller_stop_seconds": round(stop_seconds, 2),
        "poller_exit_codes": exit_codes,
        "poller_rss_mib": {"end": round(rss[-1] / 2**20, 1) if rss else None, "max": round(max(rss) / 2**20, 1)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]},
        "ok": bool(lags)
        and percentile(lags, 99) < LAG_TARGET
        and not broken
        and per_period > 0.97
        and not any(exit_codes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--sidecars", type=int, default=4)
    parser.add_argument("--check", type=float, default=1.0, help="check period of every member (seconds)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before measuring")
    parser.add_argument("--mode", choices=("watch", "poll"), default="watch")
    parser.add_argument("--backend", choices=("local", "sim"), default="local", help="sidecar backend (watch mode)")
    parser.add_argument("--pollers", type=int, default=1, help="pollers sharing the members")
    parser.add_argument("--scale", help="comma-separated poller counts: one run each, written to scale.json")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: poller.json, scale.json)")
    parser.add_argument("--serve-original", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_original:
        asyncio.run(serve_original())
        return 0
    if args.scale:
        return scale(args)
    result = asyncio.run(bench(args))
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {out}")
    return 0 if result["ok"] else 1


def scale(args: argparse.Namespace) -> int:
    """One run per poller count of ``--scale``, side by side against the first (the baseline)."""
    runs = []
    for count in [int(part) for part in args.scale.split(",")]:
        args.pollers = count
        runs.append(asyncio.run(bench(args)))
        report(runs[-1])
    base = runs[0]
    summary = [
        {
            "pollers": run["pollers"],
            "members_per_poller": run["members_per_poller"],
            "lag_p99_seconds": run["lag_seconds"]["p99"],
            "checks_per_member_per_period": run["checks_per_member_per_period"],
            "cpu_percent_of_one_core_total": run["poller_cpu_percent_of_one_core"]["mean"],
            "lag_p99_vs_baseline": round(run["lag_seconds"]["p99"] / base["lag_seconds"]["p99"], 3)
            if base["lag_seconds"]["p99"]
            else None,
            "ok": run["ok"],
        }
        for run in runs
    ]
    out = args.out or SCALE_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "poller-scale", "baseline_pollers": base["pollers"], "summary": summary,
                               "runs": runs}, indent=2) + "\n")  # fmt: skip
    for row in summary:
        print(
            f"{row['pollers']} poller(s): lag p99 {row['lag_p99_seconds']} s "
            f"({row['lag_p99_vs_baseline']}x the baseline), checks/member/period "
            f"{row['checks_per_member_per_period']}, CPU {row['cpu_percent_of_one_core_total']} % of a core, "
            f"members per poller {row['members_per_poller']}"
        )
    print(f"wrote {out}")
    return 0 if all(row["ok"] for row in summary) else 1


def report(result: dict[str, Any]) -> None:
    lag, cpu = result["lag_seconds"], result["poller_cpu_percent_of_one_core"]
    print(
        f"{result['members']} members at {result['check_seconds']} s ({result['mode']}, "
        f"{result['pollers']} poller(s)): "
        f"lag p50 {lag['p50']} s, p99 {lag['p99']} s (target < {LAG_TARGET}), max {lag['max']} s; "
        f"checks/member/period {result['checks_per_member_per_period']}; "
        f"seq gaps/duplicates in {result['members_with_seq_gaps_or_duplicates']} members; "
        f"poller CPU {cpu['mean']} % of a core (max {cpu['max']}), "
        f"RSS {result['poller_rss_mib']['max']} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
