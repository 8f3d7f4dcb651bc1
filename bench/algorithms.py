"""Benchmark every algorithm and baseline on recorded and synthetic workloads, by closed-loop simulation.

Usage: .venv/bin/python bench/algorithms.py [--shared ../shared] [--out docs/benchmarks.md]
                                            [--json bench/results/algorithms.json]
                                            [--cost-json bench/results/cost.json]

Workloads: the three recorded GKE runs of the original (their trace, their options, 100 s provisioning
delay, 10 s checks) and two synthetic ensembles of 1,000 jobs of mixed sizes. Each algorithm's
makespan and node-seconds are set beside the reference model of the original (``seed-as-built``,
simulated in the same run) and beside the makespan lower bound: provisioning delay +
max(longest job, job node-seconds / maxSize). Also times the simulator itself. Then what users pay:
the same algorithms and more baselines under the GKE cluster models, in VM-seconds (``bench/cost.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cost  # noqa: E402

from ensemble_cli.simulation import SimulationConfig, simulate  # noqa: E402
from ensemble_core import algorithms  # noqa: E402
from ensemble_core.messages import DEFAULT_ALGORITHM  # noqa: E402
from ensemble_core.spec import Ensemble, load, validate  # noqa: E402
from sidecar.sim import TraceJob, load_trace  # noqa: E402

DELAY = 100.0
#: Options of each algorithm in this benchmark beyond its defaults (the seed runs add their own).
EXTRA: dict[str, dict[str, str | int | float | bool]] = {
    "static": {"size": 0, "preprovisioned": True},
}
#: Algorithms that need a configuration no workload here provides.
SKIP = {"rules": "needs user-written rules; see examples/rules.yaml"}
BASELINES = {"seed-as-built", "static", "static (not pre-provisioned)"}
#: A section of the same page another command writes (``python -m tests.chaos``): kept as it is.
KEPT_SECTION = "\n## Fault suite"


def ensemble_document(name: str, size: int, max_size: int, jobs: list[dict[str, Any]], members: int = 1) -> Ensemble:
    document = {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1",
        "kind": "Ensemble",
        "metadata": {"name": name},
        "spec": {
            "checkSeconds": 10,
            "members": [
                {"minicluster": {"spec": {"size": size, "minSize": 1, "maxSize": max_size}}, "jobs": jobs}
                for _ in range(members)
            ],
        },
    }
    ensemble, errors = validate(document)
    if ensemble is None:
        raise SystemExit("\n".join(errors))
    return ensemble


def synthetic(seed: int, total: int = 1000) -> tuple[Ensemble, str]:
    """1,000 jobs of mixed widths (1–16 nodes) and run times (30 s – 15 min), maxSize 32."""
    rng = random.Random(seed)
    widths = [1, 2, 4, 8, 16]
    jobs = []
    remaining = total
    for i in range(20):
        count = remaining if i == 19 else rng.randint(10, 2 * total // 20 - 10)
        count = min(count, remaining)
        remaining -= count
        if count <= 0:
            continue
        jobs.append(
            {
                "name": f"g{i}",
                "command": "true",
                "count": count,
                "nodes": rng.choice(widths),
                "duration": int(rng.lognormvariate(5, 0.8)) % 900 + 30,
            }
        )
    return ensemble_document(f"synthetic-{seed}", 1, 32, jobs), f"synthetic {total} jobs (seed {seed}), maxSize 32"


def lower_bound(ensemble: Ensemble, trace: list[TraceJob] | None) -> float:
    """Provisioning delay + max(longest job, job node-seconds / maxSize), per member, the worst member."""
    bounds = []
    for member in ensemble.members:
        if trace:
            runs = [(job.nodes, job.run_time) for job in trace]
        else:
            runs = [(job.nodes, float(job.duration)) for job in member.jobs for _ in range(job.count)]
        longest = max(run for _, run in runs)
        area = sum(nodes * run for nodes, run in runs)
        bounds.append(DELAY + max(longest, area / member.max_size))
    return max(bounds)


def run_one(ensemble: Ensemble, trace: list[TraceJob] | None, name: str, options: dict[str, Any]) -> dict[str, Any]:
    config = SimulationConfig(ensemble=ensemble, algorithm=name, options=options, trace=trace, delay=DELAY, seed=0)
    result = simulate(config)
    summary = result.summary()
    return summary


def workloads(shared: Path) -> list[tuple[str, Ensemble, list[TraceJob] | None, dict[str, Any]]]:
    found = []
    for run in ("run5-random", "run5-ascending", "run5-descending"):
        folder = shared / "data/seed-gke" / run
        ensemble = load(folder / "ensemble.yaml")
        options = dict(ensemble.members[0].algorithm.options)
        found.append((f"seed-gke {run}", ensemble, load_trace(folder / "jobs.jsonl"), options))
    for seed in (1, 2):
        ensemble, label = synthetic(seed)
        found.append((label, ensemble, None, {"order": "random"}))
    return found


def speed() -> dict[str, float]:
    """Wall seconds to simulate an 80-job ensemble, and 100 members × 10,000 jobs."""
    small = ensemble_document(
        "speed-80", 1, 16,
        [{"name": f"g{n}", "command": "true", "count": 20, "nodes": n, "duration": 30} for n in (1, 2, 4, 8)],
    )  # fmt: skip
    started = time.perf_counter()
    simulate(SimulationConfig(ensemble=small, delay=DELAY))
    eighty = time.perf_counter() - started
    big_jobs = [{"name": f"g{n}", "command": "true", "count": 2500, "nodes": n, "duration": 20} for n in (1, 2, 4, 8)]
    big = ensemble_document("speed-big", 1, 64, big_jobs, members=100)
    started = time.perf_counter()
    result = simulate(SimulationConfig(ensemble=big, algorithm="demand-fit", delay=DELAY))
    hundred = time.perf_counter() - started
    jobs = result.summary()["jobs"]
    return {"jobs_80_wall_s": round(eighty, 4), "members_100_x_jobs_10000_wall_s": round(hundred, 2), "big_jobs": jobs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--out", default=str(REPO / "docs/benchmarks.md"))
    parser.add_argument("--json", default=str(REPO / "bench/results/algorithms.json"))
    parser.add_argument("--cost-json", default=str(REPO / "bench/results/cost.json"))
    args = parser.parse_args()
    names = [name for name in algorithms.names() if name not in SKIP]
    rows: list[dict[str, Any]] = []
    for label, ensemble, trace, file_options in workloads(Path(args.shared)):
        bound = lower_bound(ensemble, trace)
        results: dict[str, dict[str, Any]] = {}
        variants = [(name, name) for name in names] + [("static (not pre-provisioned)", "static")]
        for shown, name in variants:
            accepted = algorithms.option_names(name)
            options: dict[str, Any] = {k: v for k, v in file_options.items() if k in accepted}
            options.update(EXTRA.get(name, {}))
            if shown == "static (not pre-provisioned)":
                options["preprovisioned"] = False
            results[shown] = run_one(ensemble, trace, name, options)
            results[shown]["options"] = options
        reference = results["seed-as-built"]
        for shown, summary in results.items():
            rows.append(
                {
                    "workload": label,
                    "algorithm": shown,
                    "makespan_s": summary["makespan_s"],
                    "node_seconds": summary["node_seconds"],
                    "utilization": summary["utilization"],
                    "scale_events": summary["scale_events"],
                    "peak_size": summary["peak_size"],
                    "completed": summary["completed"],
                    "makespan_vs_original": round(summary["makespan_s"] / reference["makespan_s"], 3),
                    "node_seconds_vs_original": round(summary["node_seconds"] / reference["node_seconds"], 3),
                    "makespan_vs_lower_bound": round(summary["makespan_s"] / bound, 3),
                    "lower_bound_s": round(bound, 1),
                    "options": summary["options"],
                }
            )
    timings = speed()
    command = "`.venv/bin/python bench/algorithms.py`"
    report = {
        "command": command.strip("`"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "delay_s": DELAY,
        "rows": rows,
        "speed": timings,
        "skipped": SKIP,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    costs = cost.measure(Path(args.shared))
    Path(args.cost_json).write_text(json.dumps(costs, indent=2) + "\n")
    out = Path(args.out)
    kept = out.read_text().partition(KEPT_SECTION) if out.exists() else ("", "", "")
    body = (markdown(report) + "\n" + cost.markdown(costs)).rstrip("\n") + "\n"
    # the kept section follows after one blank line, as tests/chaos.py's write_section() puts it
    out.write_text(body + ("\n" + KEPT_SECTION.lstrip("\n") + kept[2] if kept[1] else ""))
    for row in rows:
        print(
            f"{row['workload']:42s} {row['algorithm']:30s} makespan {row['makespan_s']:9.1f} "
            f"({row['makespan_vs_original']:.2f}× orig, {row['makespan_vs_lower_bound']:.2f}× LB) "
            f"node-s {row['node_seconds']:10.0f} ({row['node_seconds_vs_original']:.2f}× orig) "
            f"util {row['utilization']:.2f}"
        )
    print(json.dumps(timings))
    print(cost.markdown(costs))
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Algorithm benchmark",
        "",
        f"Produced by {report['command']} (closed-loop simulation: the real algorithms, the `sim` queue and the "
        f"actuator's logic on a virtual clock; {report['delay_s']:.0f} s provisioning delay, 10 s checks, seed 0; "
        f"{report['machine']}). Do not edit by hand: rerun the command.",
        "",
        "Columns: makespan (first submit → last job done) and node-seconds (a node costs from its request to its "
        "release), each also as a ratio to `seed-as-built` — the reference model of the original operator as it "
        "really behaved, simulated in the same run — and the makespan as a ratio to its lower bound "
        "(delay + max(longest job, job node-seconds ÷ maxSize)). `static` starts with maxSize nodes already up; "
        "`static (not pre-provisioned)` asks for them at the first check; pre-provisioned `static` never waits for a "
        "node, so it can beat the lower bound (which charges one provisioning delay). Baselines are not "
        "recommendations.",
        "",
    ]
    workloads_seen: list[str] = []
    for row in report["rows"]:
        if row["workload"] not in workloads_seen:
            workloads_seen.append(row["workload"])
    for workload in workloads_seen:
        rows = [row for row in report["rows"] if row["workload"] == workload]
        lines += [
            f"## {workload} (lower bound {rows[0]['lower_bound_s']} s)",
            "",
            "| algorithm | makespan s | × original | × lower bound | node-seconds | × original | utilisation "
            "| scale events | peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            name = row["algorithm"] + (" (baseline)" if row["algorithm"] in BASELINES else "")
            name += "" if row["completed"] else " — did not finish"
            lines.append(
                f"| {name} | {row['makespan_s']:.1f} | {row['makespan_vs_original']:.2f} | "
                f"{row['makespan_vs_lower_bound']:.2f} | {row['node_seconds']:.0f} | "
                f"{row['node_seconds_vs_original']:.2f} | {row['utilization']:.2f} | {row['scale_events']} | "
                f"{row['peak_size']} |"
            )
        lines.append("")
    lines += [
        f"## The target for the default algorithm (`{DEFAULT_ALGORITHM}`) on the recorded runs",
        "",
        "Target: makespan ≤ 0.6× and node-seconds ≤ 1.0× the original's (`seed-as-built`), in the same run. "
        "The best makespan ratio any algorithm can reach is the lower bound ÷ the original's makespan.",
        "",
        "| run | makespan × original | node-seconds × original | best possible makespan ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for workload in workloads_seen:
        if not workload.startswith("seed-gke"):
            continue
        row = next(r for r in report["rows"] if r["workload"] == workload and r["algorithm"] == DEFAULT_ALGORITHM)
        reference = next(r for r in report["rows"] if r["workload"] == workload and r["algorithm"] == "seed-as-built")
        best = row["lower_bound_s"] / reference["makespan_s"]
        met = row["makespan_vs_original"] <= 0.6 and row["node_seconds_vs_original"] <= 1.0
        verdict = "met" if met else ("unreachable: 0.6× is below the lower bound" if best > 0.6 else "missed")
        lines.append(
            f"| {workload} | {row['makespan_vs_original']:.2f} | {row['node_seconds_vs_original']:.2f} | "
            f"{best:.2f} | {verdict} |"
        )
    lines.append("")
    speed = report["speed"]
    lines += [
        "## Simulator speed",
        "",
        f"- an 80-job ensemble: {speed['jobs_80_wall_s']} s wall",
        f"- 100 members × 10,000 jobs each ({speed['big_jobs']:,} jobs, `demand-fit`): "
        f"{speed['members_100_x_jobs_10000_wall_s']} s wall",
        "",
        "Not run: " + "; ".join(f"`{name}` ({why})" for name, why in report["skipped"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
