"""From a job event to the applied action of a job-event rule, on a running stack (``ensemble up``'s parts).

Usage: ``.venv/bin/python bench/latency.py [--changes 200] [--check 10 --check 1] [--out FILE]``

For each ``--check`` (``checkSeconds``; the default runs 10 — the default — and 1) a private nats-server,
one local sidecar (4 nodes) and ``ensemble poller``, ``decider`` and ``actuator`` are started as processes,
exactly as ``ensemble up`` runs them, and one member is registered with the ``rules`` algorithm and two
job-event rules that keep each other going:

- ``job-finish`` of group ``tick`` (a job finishing) → submit group ``tock``;
- ``job-depend`` of group ``tock`` (a job submitted) → submit group ``tick`` (``sleep 0.2``);

so every cycle makes two queue changes, each answered by one decision, until ``--changes`` changes were
answered (a metric rule then terminates the member). Each change is matched to its decision (the k-th
decision of a rule answers the k-th change of that kind) and measured on one clock (same machine):

- change: the job's end (``t_inactive``) or queueing (``t_submit``) as the sidecar recorded it;
- published: the decision's JetStream timestamp (when nats-server stored it);
- applied: the JetStream timestamp of the actuator's ``Applied`` for that decision.

Writes p50/p99/max of change → published and change → applied per ``checkSeconds`` to
``bench/results/latency.json`` (or ``--out``), with the target (p99 ≤ 1 s to applied with the default
settings). ``--decider`` also runs ``bench/decider.py`` in the same session (bench/results/decider.json is
left as committed) and records its throughput beside the committed one; ``--decider-against DIR`` runs the
same benchmark of another checkout (e.g. ``git archive main``) alternately with it, so that both are
measured under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ensemble_cli.up import run_nats  # noqa: E402
from ensemble_core import natsio, subjects  # noqa: E402
from ensemble_core.messages import AlgorithmSpec, Applied, Decision, JobSpec, MemberSpec, encode  # noqa: E402
from ensemble_core.sidecar_client import SidecarClient  # noqa: E402
from ensemble_core.subjects import MemberAddress  # noqa: E402
from ensemble_core.tokens import ensemble_token  # noqa: E402
from ensemble_core.wire import JobInfo  # noqa: E402

RESULTS = REPO / "bench" / "results" / "latency.json"
DECIDER_RESULTS = REPO / "bench" / "results" / "decider.json"
NAMESPACE = "bench"
ENSEMBLE = "latency"
SECRET = "bench-secret"
#: p99 from a job event to the applied action of a job-event rule, default settings (seconds).
TARGET_P99 = 1.0
#: The decider's throughput must stay within this fraction of the committed baseline.
THROUGHPUT_TOLERANCE = 0.10


def member_spec(endpoint: str, check: float, changes: int) -> MemberSpec:
    cycles = (changes + 1) // 2
    again = 100_000  # repetitions: as often as it is triggered
    rules: list[dict[str, Any]] = [
        {"trigger": "start", "action": {"name": "submit", "group": "tick"}},
        {"trigger": "job-finish", "group": "tick", "action": {"name": "submit", "group": "tock", "repetitions": again}},
        {"trigger": "job-depend", "group": "tock", "action": {"name": "submit", "group": "tick", "repetitions": again}},
        {"trigger": "metric", "name": "count.tock.submitted", "when": cycles, "action": {"name": "terminate"}},
    ]
    return MemberSpec(
        namespace=NAMESPACE,
        ensemble=ENSEMBLE,
        member=0,
        name=f"{ENSEMBLE}-0",
        size=4,
        min_size=1,
        max_size=4,
        endpoint=endpoint,
        algorithm=AlgorithmSpec(name="rules", options={"idleChecks": 0}, rules=rules),
        jobs=[JobSpec(name="tick", command="sleep 0.2"), JobSpec(name="tock", command="true")],
        check_seconds=check,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def figures(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": round(percentile(values, 50), 4),
        "p99_s": round(percentile(values, 99), 4),
        "max_s": round(max(values), 4) if values else float("nan"),
    }


async def stored(url: str, stream: str, subject: str, kind: type[Any]) -> list[tuple[Any, float]]:
    """Every message of ``subject`` in ``stream`` decoded as ``kind``, with the time nats-server stored it."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    out: list[tuple[Any, float]] = []
    try:
        sub = await js.subscribe(subject, ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                out.append((msgspec.json.decode(msg.data, type=kind), msg.metadata.timestamp.timestamp()))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


def start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **env}
        )


def start_sidecar(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """A local sidecar of 4 nodes and its endpoint (the port it prints first)."""
    process = subprocess.Popen(
        [*argv, "--backend", "local", "--port", "0", "--nodes", "4", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


async def one_run(check: float, changes: int, timeout: float) -> dict[str, Any]:
    processes: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        logs = Path(tmp)
        nats_process, url = run_nats(logs)
        processes.append(nats_process)
        cli = [sys.executable, "-m", "ensemble_cli"]
        base = {"PYTHONPATH": str(REPO), "ENSEMBLE_LOG_LEVEL": "WARNING"}
        try:
            token = ensemble_token(SECRET, NAMESPACE, ENSEMBLE)
            sidecar, endpoint = start_sidecar([*cli, "sidecar"], {**base, "ENSEMBLE_SIDECAR_TOKEN": token})
            processes.append(sidecar)
            nc = await nats.connect(url)
            js = nc.jetstream()
            await natsio.declare(js)
            members = await js.key_value(subjects.MEMBERS_BUCKET)
            spec = member_spec(endpoint, check, changes)
            env = {**base, "ENSEMBLE_NATS_URL": url, "ENSEMBLE_SIDECAR_TOKEN": SECRET}
            for name in ("decider", "actuator", "poller"):
                processes.append(start(name, [*cli, name], env, logs))
            await asyncio.sleep(2.0)  # the services are up and consuming
            started = time.time()
            await members.put(MemberAddress(NAMESPACE, ENSEMBLE, 0).key, encode(spec))
            address = MemberAddress(NAMESPACE, ENSEMBLE, 0)
            deadline = time.monotonic() + timeout
            done = False
            while time.monotonic() < deadline and not done:
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    last = await js.get_last_msg(subjects.DECISIONS_STREAM, subjects.decisions(address))
                    done = msgspec.json.decode(last.data or b"", type=Decision).action == "terminate"
            await asyncio.sleep(1.0)  # the terminate's Applied
            await nc.close()
            wall = time.time() - started
            ended: list[JobInfo] = []
            async with SidecarClient(endpoint, token) as client:
                while True:
                    page = await client.ended(len(ended))
                    ended += page.jobs
                    if not page.jobs or len(ended) >= page.ended:
                        break
            decisions = await stored(url, subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS, Decision)
            applied = await stored(url, subjects.EVENTS_STREAM, "ensemble.applied.>", Applied)
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(10)
                if process.poll() is None:
                    process.kill()
    applied_at = {a.decision: at for a, at in applied if a.ok}
    finishes = sorted(job.t_inactive or 0.0 for job in ended if job.group == "tick")
    submits = sorted(job.t_submit for job in ended if job.group == "tock")
    answers: dict[str, list[tuple[Decision, float]]] = {"tock": [], "tick": []}
    for decision, at in decisions:
        if decision.action == "submit" and "job-" in decision.reason:
            answers[decision.jobs[0].name].append((decision, at))
    published: list[float] = []
    to_applied: list[float] = []
    kinds: dict[str, dict[str, Any]] = {}
    for kind, changes_at, group in (("job finished", finishes, "tock"), ("job submitted", submits, "tick")):
        mine_published, mine_applied = [], []
        for change, (decision, at) in zip(changes_at, answers[group], strict=False):
            mine_published.append(at - change)
            if decision.id in applied_at:
                mine_applied.append(applied_at[decision.id] - change)
        published += mine_published
        to_applied += mine_applied
        kinds[kind] = {"published": figures(mine_published), "applied": figures(mine_applied)}
    return {
        "check_seconds": check,
        "changes_answered": len(published),
        "changes_applied": len(to_applied),
        "wall_s": round(wall, 1),
        "change_to_published": figures(published),
        "change_to_applied": figures(to_applied),
        "by_change": kinds,
        "event_decisions": sum(1 for d, _ in decisions if "e" in d.id.split("/")[3]),
        "check_decisions": sum(1 for d, _ in decisions if "e" not in d.id.split("/")[3]),
    }


def run_decider_bench(tree: Path) -> dict[str, Any]:
    """``tree``'s bench/decider.py run now; its results file is left as it was."""
    results = tree / "bench" / "results" / "decider.json"
    kept = results.read_bytes()
    try:
        subprocess.run([sys.executable, str(tree / "bench" / "decider.py")], cwd=tree, check=True,
                       env={**os.environ, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL)  # fmt: skip
        throughput: dict[str, Any] = json.loads(results.read_text())["throughput"]
    finally:
        results.write_bytes(kept)
    return throughput


def decider_throughput(against: Path | None, rounds: int) -> dict[str, Any]:
    """This tree's decider throughput now, against the committed figure and (``against``: another checkout,
    e.g. main before this change) the same benchmark of that tree run alternately in the same session."""
    committed = json.loads(DECIDER_RESULTS.read_text())["throughput"]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(run_decider_bench(REPO))
        if against is not None:
            theirs.append(run_decider_bench(against))
    best = max(run["decider_msgs_per_s"] for run in ours)
    result: dict[str, Any] = {
        "committed_msgs_per_s": committed["decider_msgs_per_s"],
        "committed_ratio_to_bare": committed["ratio"],
        "this_tree_msgs_per_s": [run["decider_msgs_per_s"] for run in ours],
        "this_tree_bare_pull_ack_msgs_per_s": [run["bare_pull_ack_msgs_per_s"] for run in ours],
        "this_tree_ratio_to_bare": [run["ratio"] for run in ours],
        "ratio_to_committed": round(best / committed["decider_msgs_per_s"], 3),
        "within_10_percent_of_committed": abs(best / committed["decider_msgs_per_s"] - 1) <= THROUGHPUT_TOLERANCE,
    }
    if theirs:
        other = max(run["decider_msgs_per_s"] for run in theirs)
        result |= {
            "against": str(against),
            "against_msgs_per_s": [run["decider_msgs_per_s"] for run in theirs],
            "against_bare_pull_ack_msgs_per_s": [run["bare_pull_ack_msgs_per_s"] for run in theirs],
            "against_ratio_to_bare": [run["ratio"] for run in theirs],
            "ratio_to_against": round(best / other, 3),
            "within_10_percent_of_against": abs(best / other - 1) <= THROUGHPUT_TOLERANCE,
        }
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = [await one_run(check, args.changes, args.timeout) for check in args.check]
    default = next((run for run in runs if run["check_seconds"] == 10), runs[0])
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": args.changes,
        "runs": runs,
        "target": {
            "p99_change_to_applied_s": TARGET_P99,
            "at_check_seconds": default["check_seconds"],
            "measured_p99_s": default["change_to_applied"]["p99_s"],
            "met": default["change_to_applied"]["p99_s"] <= TARGET_P99,
        },
    }
    if args.decider:
        result["decider_throughput"] = decider_throughput(args.decider_against, args.decider_rounds)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--changes", type=int, default=200, help="queue changes to answer per run")
    parser.add_argument("--check", type=float, action="append", help="checkSeconds of a run (default: 10 and 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest a run may take (s)")
    parser.add_argument("--decider", action="store_true", help="also run bench/decider.py and compare throughput")
    parser.add_argument("--decider-against", type=Path, help="another checkout whose decider bench runs alternately")
    parser.add_argument("--decider-rounds", type=int, default=2, help="runs of each decider bench (best counts)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.check = args.check or [10.0, 1.0]
    if shutil.which("true") is None:
        raise SystemExit("the jobs need the 'true' command")
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
