"""What users pay: every algorithm and baseline under the GKE cluster models, in VM-seconds.

Run by ``bench/algorithms.py`` (which writes its section of docs/benchmarks.md and
``bench/results/cost.json``), or alone: ``.venv/bin/python bench/cost.py [--shared ../shared]``.

Workloads: the three recorded ensemble runs (their trace and options, maxSize 24), the two synthetic
1,000-job ensembles of bench/algorithms.py (maxSize 32), and a mix of 8 ensembles of different shapes
arriving over an hour on a 32-node budget. Under ``gke-optimize-utilization`` and ``gke-balanced``,
each algorithm is set beside baselines simulated in the same run: the original (``seed-as-built``), a
static partition (the member — or each of the 8 ensembles — a fixed share of the nodes on VMs that
stay up for the whole run), one MiniCluster per job on the autoscaler (a pool capped at the same number
of nodes), and ``hpa-proportional``. The fidelity of the model to the five recorded runs is printed first.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ensemble_cli.calibration import RUNS, compare, recorded  # noqa: E402
from ensemble_cli.cluster import MODELS, ClusterModel  # noqa: E402
from ensemble_cli.simulation import SimulationConfig, simulate  # noqa: E402
from ensemble_core import algorithms  # noqa: E402
from ensemble_core.messages import DEFAULT_ALGORITHM  # noqa: E402
from ensemble_core.spec import Ensemble, load, validate  # noqa: E402
from sidecar.sim import TraceJob, load_trace  # noqa: E402

GKE = ("gke-optimize-utilization", "gke-balanced")
SKIP = {"rules", "static", "seed-as-built", "hpa-proportional"}  # baselines run as such; rules needs rules
BUDGET = 32
MIX_SPAN = 3600.0
ONE_PER_JOB = "one MiniCluster per job"
STATIC = "static partition"
#: The default's options beside it on the recorded runs: its former defaults, one wave more, slower shrinks.
VARIANTS: dict[str, dict[str, Any]] = {
    "waves 3": {"waves": 3},
    "waves 4": {"waves": 4},
    "shrinkChecks 3": {"shrinkChecks": 3},
}
#: Targets of issue 14 for the default algorithm.
TARGETS = {"recorded_makespan": 0.7, "recorded_vm_seconds": 0.8, "mix_turnaround": 0.8, "mix_vm_seconds": 1.0,
           "mix_jain": 0.9, "synthetic_lower_bound": 1.05}  # fmt: skip


def _ensemble(name: str, members: list[dict[str, Any]], check: int = 10) -> Ensemble:
    found, errors = validate(
        {
            "apiVersion": "ensemble.flux-framework.org/v1alpha1",
            "kind": "Ensemble",
            "metadata": {"name": name},
            "spec": {"checkSeconds": check, "members": members},
        }
    )
    if found is None:
        raise SystemExit("; ".join(errors))
    return found


def _member(jobs: list[dict[str, Any]], max_size: int, algorithm: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"minicluster": {"spec": {"size": 1, "minSize": 1, "maxSize": max_size}},
            "algorithm": {"name": algorithm, "options": options}, "jobs": jobs}  # fmt: skip


def job_list(ensemble: Ensemble, trace: list[TraceJob] | None) -> list[tuple[int, float]]:
    """``(nodes, run time)`` of every job of a one-member ensemble (from the trace when there is one)."""
    if trace:
        return [(job.nodes, job.run_time) for job in trace]
    return [(job.nodes, float(job.duration)) for job in ensemble.members[0].jobs for _ in range(job.count)]


def one_per_job(name: str, runs: list[tuple[int, float]], arrival_groups: int = 1) -> Ensemble:
    """Each job in a MiniCluster of its own width, created at the start, deleted when its job is done."""
    members = [
        {"minicluster": {"spec": {"size": nodes, "minSize": 1, "maxSize": nodes}},
         "algorithm": {"name": "static", "options": {"size": nodes, "preprovisioned": False}},
         "jobs": [{"name": f"job-{i}", "command": "true", "nodes": nodes, "duration": max(1, math.ceil(run))}]}
        for i, (nodes, run) in enumerate(runs)
    ]  # fmt: skip
    return _ensemble(name, members)


def pool_of(model: ClusterModel, nodes: int) -> ClusterModel:
    """The model with a pool capped at ``nodes`` pods (never below its minimum)."""
    return replace(model, max_vms=max(model.min_vms, math.ceil(nodes / model.pods_per_vm)))


def static_pool(model: ClusterModel, nodes: int) -> ClusterModel:
    """A pool whose VMs for ``nodes`` pods are up for the whole run (the static partition's)."""
    vms = max(model.min_vms, math.ceil(nodes / model.pods_per_vm))
    return replace(model, min_vms=vms, max_vms=vms)


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("makespan_s", "vm_seconds", "vm_seconds_makespan", "vms_added", "node_seconds", "completed",
            "mean_turnaround_s", "jain", "peak_size")  # fmt: skip
    row = {key: summary[key] for key in keep if key in summary}
    row.setdefault("mean_turnaround_s", summary["makespan_s"])
    return row


def run(config: SimulationConfig) -> dict[str, Any]:
    return figures(simulate(config).summary())


def single(label: str, ensemble: Ensemble, trace: list[TraceJob] | None, file_options: dict[str, Any],
           model: ClusterModel) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every algorithm and baseline on one one-member workload under ``model``."""
    max_size = ensemble.members[0].max_size
    rows: dict[str, dict[str, Any]] = {}
    names = [name for name in algorithms.names() if name not in SKIP] + ["seed-as-built", "hpa-proportional"]
    for name in names:
        accepted = algorithms.option_names(name)
        options = {k: v for k, v in file_options.items() if k in accepted}
        rows[name] = run(SimulationConfig(ensemble=ensemble, algorithm=name, options=options, trace=trace,
                                          cluster=model))  # fmt: skip
    if trace:  # the default's trade-off between makespan and VMs, measured: more or fewer waves
        options = {k: v for k, v in file_options.items() if k in algorithms.option_names(DEFAULT_ALGORITHM)}
        for variant, more in VARIANTS.items():
            rows[f"{DEFAULT_ALGORITHM} ({variant})"] = run(SimulationConfig(
                ensemble=ensemble, algorithm=DEFAULT_ALGORITHM, options={**options, **more}, trace=trace,
                cluster=model))  # fmt: skip
    rows[STATIC] = run(SimulationConfig(ensemble=ensemble, algorithm="static", options={"size": max_size},
                                        trace=trace, cluster=static_pool(model, max_size)))  # fmt: skip
    runs = job_list(ensemble, trace)
    if len(runs) <= 100:
        rows[ONE_PER_JOB] = run(SimulationConfig(ensemble=one_per_job(label, runs), cold_start=True,
                                                 cluster=pool_of(model, max_size)))  # fmt: skip
    return rows


def synthetic(seed: int, total: int = 1000) -> Ensemble:
    """The 1,000-job ensembles of bench/algorithms.py (widths 1–16, 30 s – 15 min, maxSize 32)."""
    rng = random.Random(seed)
    jobs, remaining = [], total
    for i in range(20):
        count = min(remaining if i == 19 else rng.randint(10, 2 * total // 20 - 10), remaining)
        remaining -= count
        if count > 0:
            jobs.append({"name": f"g{i}", "command": "true", "count": count, "nodes": rng.choice([1, 2, 4, 8, 16]),
                         "duration": int(rng.lognormvariate(5, 0.8)) % 900 + 30})  # fmt: skip
    return _ensemble(f"synthetic-{seed}", [_member(jobs, 32, DEFAULT_ALGORITHM, {})])


def lower_bound(runs: list[tuple[int, float]], max_size: int, model: ClusterModel) -> float:
    """The fastest a new VM can bring a pod up, + max(longest job, job node-seconds / maxSize)."""
    first = min(model.scale_up_delay_s) + min(model.boot_s)
    return first + max(max(run for _, run in runs), sum(nodes * run for nodes, run in runs) / max_size)


#: The 8 ensembles of the mix: (name, [(count, nodes, seconds)]); every job fits a 4-node static share.
MIX_SHAPES: list[tuple[str, list[tuple[int, int, int]]]] = [
    ("many-small", [(120, 1, 40)]),
    ("few-wide", [(12, 4, 300)]),
    ("long", [(6, 2, 1200)]),
    ("burst", [(60, 2, 20)]),
    ("mixed", [(20, 1, 60), (10, 2, 120), (5, 4, 240)]),
    ("tiny", [(4, 1, 30)]),
    ("wide-short", [(40, 4, 30)]),
    ("steady", [(30, 2, 200)]),
]


def mix(algorithm: str, options: dict[str, Any] | None = None) -> list[tuple[Ensemble, float]]:
    """The 8 ensembles, arriving every 450 s over the hour, each one member of maxSize 32."""
    found = []
    for i, (name, groups) in enumerate(MIX_SHAPES):
        jobs = [{"name": f"g{n}", "command": "true", "count": c, "nodes": w, "duration": d}
                for n, (c, w, d) in enumerate(groups)]  # fmt: skip
        found.append((_ensemble(name, [_member(jobs, BUDGET, algorithm, options or {})]), i * MIX_SPAN / 8))
    return found


def mix_rows(model: ClusterModel) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    names = [name for name in algorithms.names() if name not in SKIP] + ["seed-as-built", "hpa-proportional"]
    for name in names:
        ensembles = mix(name)
        rows[name] = run(SimulationConfig(ensemble=ensembles[0][0], arrival=ensembles[0][1], more=ensembles[1:],
                                          cluster=model, budget=BUDGET))  # fmt: skip
    share = BUDGET // len(MIX_SHAPES)
    ensembles = mix("static", {"size": share})
    rows[STATIC] = run(SimulationConfig(ensemble=ensembles[0][0], arrival=ensembles[0][1], more=ensembles[1:],
                                        cluster=static_pool(model, BUDGET), budget=BUDGET))  # fmt: skip
    shapes = zip(mix("static"), MIX_SHAPES, strict=True)
    per_job = [(one_per_job(name, job_list(e, None)), at) for (e, at), (name, _) in shapes]
    rows[ONE_PER_JOB] = run(SimulationConfig(ensemble=per_job[0][0], arrival=per_job[0][1], more=per_job[1:],
                                             cold_start=True, cluster=pool_of(model, BUDGET)))  # fmt: skip
    return rows


def measure(shared: Path) -> dict[str, Any]:
    """Every figure of the cost benchmark (see the module docstring)."""
    seed = shared / "data/seed-gke"
    report: dict[str, Any] = {"default": DEFAULT_ALGORITHM, "budget": BUDGET, "targets": TARGETS, "fidelity": [],
                              "workloads": []}  # fmt: skip
    for folder in (seed / run for run in RUNS):
        if (folder / "nodes.jsonl").exists():
            report["fidelity"].append(compare(folder, MODELS["gke-optimize-utilization"]))
    for model_name in GKE:
        model = MODELS[model_name]
        for run_name in ("run5-random", "run5-ascending", "run5-descending"):
            folder = seed / run_name
            ensemble = load(folder / "ensemble.yaml")
            trace = load_trace(folder / "jobs.jsonl")
            rows = single(run_name, ensemble, trace, dict(ensemble.members[0].algorithm.options), model)
            report["workloads"].append({"workload": f"seed-gke {run_name}", "kind": "recorded", "model": model_name,
                                        "recorded": recorded(folder), "rows": rows})  # fmt: skip
        for seed_number in (1, 2):
            ensemble = synthetic(seed_number)
            rows = single(f"synthetic-{seed_number}", ensemble, None, {}, model)  # each one's own defaults
            bound = lower_bound(job_list(ensemble, None), 32, model)
            report["workloads"].append({"workload": f"synthetic 1000 jobs (seed {seed_number}), maxSize 32",
                                        "kind": "synthetic", "model": model_name, "lower_bound_s": round(bound, 1),
                                        "rows": rows})  # fmt: skip
        report["workloads"].append({"workload": f"8 ensembles over an hour, budget {BUDGET}", "kind": "mix",
                                    "model": model_name, "rows": mix_rows(model)})  # fmt: skip
    report["grid"] = grid(seed)
    report["spread"] = spread(seed)
    return report


DEFAULT_OPTIONS: Any = algorithms.parse_options(DEFAULT_ALGORITHM, {})
GRID_WAVES = (1, 2, 3, 3.5, 4, 5, 6, 8)
GRID_PODS = (1, 2)


def grid(seed: Path, model_name: str = "gke-optimize-utilization") -> list[dict[str, Any]]:
    """The default over a grid of ``waves`` x ``podsPerVm`` on each recorded run: how close the targets are."""
    found = []
    for run_name in ("run5-random", "run5-ascending", "run5-descending"):
        folder = seed / run_name
        ensemble, trace, rec = load(folder / "ensemble.yaml"), load_trace(folder / "jobs.jsonl"), recorded(folder)
        accepted = algorithms.option_names(DEFAULT_ALGORITHM)
        base = {k: v for k, v in ensemble.members[0].algorithm.options.items() if k in accepted}
        for waves in GRID_WAVES:
            for pods in GRID_PODS:
                row = run(SimulationConfig(ensemble=ensemble, algorithm=DEFAULT_ALGORITHM, trace=trace,
                                           options={**base, "waves": waves, "podsPerVm": pods},
                                           cluster=MODELS[model_name]))  # fmt: skip
                found.append({"run": run_name, "waves": waves, "pods_per_vm": pods, "vms_added": row["vms_added"],
                              "makespan": round(row["makespan_s"] / rec["makespan_s"], 4),
                              "vm_seconds": round(row["vm_seconds"] / rec["vm_seconds"], 4)})  # fmt: skip
    return found


SPREAD_SEEDS = 20
SPREAD_WAVES = (3, 3.5, 4)


def spread(seed: Path, model_name: str = "gke-optimize-utilization") -> list[dict[str, Any]]:
    """How often the recorded-run targets hold over ``SPREAD_SEEDS`` seeds of the model (its draws of boot,
    scale-up and unneeded times), for the default at a few values of ``waves``."""
    found = []
    for run_name in ("run5-random", "run5-ascending", "run5-descending"):
        folder = seed / run_name
        ensemble, trace, rec = load(folder / "ensemble.yaml"), load_trace(folder / "jobs.jsonl"), recorded(folder)
        accepted = algorithms.option_names(DEFAULT_ALGORITHM)
        base = {k: v for k, v in ensemble.members[0].algorithm.options.items() if k in accepted}
        for waves in SPREAD_WAVES:
            ratios = []
            for number in range(SPREAD_SEEDS):
                row = run(SimulationConfig(ensemble=ensemble, algorithm=DEFAULT_ALGORITHM, trace=trace, seed=number,
                                           options={**base, "waves": waves}, cluster=MODELS[model_name]))  # fmt: skip
                ratios.append((row["makespan_s"] / rec["makespan_s"], row["vm_seconds"] / rec["vm_seconds"]))
            met = sum(m <= TARGETS["recorded_makespan"] and v <= TARGETS["recorded_vm_seconds"] for m, v in ratios)
            found.append({"run": run_name, "waves": waves, "seeds": SPREAD_SEEDS, "met": met,
                          "makespan_mean": round(sum(m for m, _ in ratios) / len(ratios), 4),
                          "vm_seconds_mean": round(sum(v for _, v in ratios) / len(ratios), 4)})  # fmt: skip
    return found


def spread_lines(report: dict[str, Any]) -> list[str]:
    """The seed spread as a table: seeds meeting both targets, mean makespan x / VM-s x the recorded."""
    lines = ["| run | " + " | ".join(f"waves {w:g}" for w in SPREAD_WAVES) + " |",
             "|---|" + "---:|" * len(SPREAD_WAVES)]  # fmt: skip
    cells: dict[str, list[str]] = {}
    for g in report.get("spread", []):
        text = f"{g['met']}/{g['seeds']} (mean {g['makespan_mean']:.2f} / {g['vm_seconds_mean']:.2f})"
        cells.setdefault(g["run"], []).append(text)
    for run_name, texts in cells.items():
        lines.append(f"| {run_name} | " + " | ".join(texts) + " |")
    return lines


def grid_words(report: dict[str, Any]) -> list[str]:
    """What the grid shows, from its own cells."""
    cells = report.get("grid", [])
    desc = [g for g in cells if g["run"] == "run5-descending"]
    if not desc:
        return []
    fastest = min(desc, key=lambda g: (g["makespan"], g["vm_seconds"]))
    within = [g for g in desc if g["vm_seconds"] <= TARGETS["recorded_vm_seconds"] and g["vms_added"] > 0]
    cheap = min((g["makespan"] for g in within), default=float("nan"))
    return [
        "The default's `waves` and `podsPerVm` over a grid, on the recorded runs under `gke-optimize-utilization` "
        "(same run; cells: makespan × / VM-s × the recorded, VMs added; ✓ where both targets hold). On descending "
        f"the fastest cell ({fastest['makespan']:.2f}×, {fastest['vms_added']} VMs) bills "
        f"{fastest['vm_seconds']:.2f}×, and the fastest within 0.8× of the bill takes {cheap:.2f}× the makespan. "
        f"The default (`waves: {DEFAULT_OPTIONS.waves:g}`, `podsPerVm: {DEFAULT_OPTIONS.pods_per_vm}`) meets both "
        "on random by a small margin (the seed spread below). Holding nodes longer before a shrink "
        "(`shrinkChecks: 3`, rows above) bills more, not less: the early shrinks release pods whose VMs then empty "
        "sooner."
    ]


def grid_lines(report: dict[str, Any]) -> list[str]:
    """The grid as a table: makespan x / VM-s x the recorded (VMs added), a star where both targets hold."""
    lines = ["| run | podsPerVm | " + " | ".join(f"waves {w:g}" for w in GRID_WAVES) + " |",
             "|---|---:|" + "---:|" * len(GRID_WAVES)]  # fmt: skip
    cells: dict[tuple[str, int], list[str]] = {}
    for g in report.get("grid", []):
        ok = g["makespan"] <= TARGETS["recorded_makespan"] and g["vm_seconds"] <= TARGETS["recorded_vm_seconds"]
        text = f"{g['makespan']:.2f} / {g['vm_seconds']:.2f} ({g['vms_added']}){' ✓' if ok else ''}"
        cells.setdefault((g["run"], g["pods_per_vm"]), []).append(text)
    for (run_name, pods), texts in cells.items():
        lines.append(f"| {run_name} | {pods} | " + " | ".join(texts) + " |")
    return lines


def verdicts(report: dict[str, Any]) -> list[str]:
    """The issue's targets for the default, each met or missed, with the numbers."""
    lines = []
    name = report["default"]
    for workload in report["workloads"]:
        row = workload["rows"][name]
        where = f"{workload['workload']} ({workload['model']})"
        if workload["kind"] == "recorded":
            rec = workload["recorded"]
            m, v = row["makespan_s"] / rec["makespan_s"], row["vm_seconds"] / rec["vm_seconds"]
            ok = m <= TARGETS["recorded_makespan"] and v <= TARGETS["recorded_vm_seconds"]
            # The fastest any algorithm can be: the first new VM's pod (the model's shortest scale-up +
            # boot), then the run on every node already up (the static partition's makespan).
            model = MODELS[workload["model"]]
            best = min(model.scale_up_delay_s) + min(model.boot_s) + workload["rows"][STATIC]["makespan_s"]
            lines.append(f"| {where} | makespan {m:.2f}× recorded (≤ 0.7; no algorithm below ≈ "
                         f"{best / rec['makespan_s']:.2f}×: {best:.0f} s), VM-s {v:.2f}× recorded (≤ 0.8) "
                         f"| {'met' if ok else 'missed'} |")  # fmt: skip
        elif workload["kind"] == "synthetic":
            ratio = row["makespan_s"] / workload["lower_bound_s"]
            ok = ratio <= TARGETS["synthetic_lower_bound"]
            lines.append(f"| {where} | makespan {ratio:.2f}× lower bound (≤ 1.05) | {'met' if ok else 'missed'} |")
        else:
            static = workload["rows"][STATIC]
            t = row["mean_turnaround_s"] / static["mean_turnaround_s"]
            v = row["vm_seconds"] / static["vm_seconds"]
            ok = t <= TARGETS["mix_turnaround"] and v <= TARGETS["mix_vm_seconds"] and row["jain"] >= 0.9
            lines.append(f"| {where} | turnaround {t:.2f}× static (≤ 0.8), VM-s {v:.2f}× static (≤ 1.0), "
                         f"Jain {row['jain']:.2f} (≥ 0.9) | {'met' if ok else 'missed'} |")  # fmt: skip
    return lines


CLUSTER_MODEL = """\
### The cluster model (`ensemble simulate --cluster`, `ensemble_cli/cluster.py`)

MiniCluster nodes are pods; pods run on VMs, `pods_per_vm` to a VM, and the bill is VM lifetime: from
the moment the autoscaler creates a VM until it deletes it. A pod that fits on a VM already up starts
after `pod_start_s`. One that fits nowhere makes the autoscaler add VMs: `scale_up_delay_s` from the
pending pod to the VM's creation (billing starts), then `boot_s` until a pod on it runs. A VM with no
pod is deleted after `unneeded_s`, and no sooner than `delay_after_add_s` after the last VM was added,
never below `min_vms` — all due VMs at once (`bulk`) or one every `scale_down_interval_s`
(`one-at-a-time`). A pod released by one MiniCluster frees a slot that any member takes before the
VM is removed. `vm_seconds` runs from the start until the pool is back at its minimum. Lists are
distributions, drawn with the seed. `none` is the model without VMs (a node costs from its request to
its release; the default, as before).

| field | `gke-optimize-utilization` | `gke-balanced` |
|---|---|---|
{rows}

**Calibration of `gke-optimize-utilization`** on the three recorded ensemble runs (`recording.jsonl`:
the operator's scale requests and `node_up_count` every 10 s; `nodes.jsonl`: every VM's creation and
removal). Pods per VM: each run's VMs added = ceil((peak size − 6) / 2) exactly (21 → 8, 23 → 9,
17 → 6; 3 base VMs holding 2 pods each), and the first pods came up on the base VMs 30–60 s after the
request (pod start 30 s). Scale-up delay: the 16 VMs created in answer to a request that needed
them were created 25–31 s after it. Boot: `node_up_count` rose 65–85 s after those VMs' creation.
Unneeded time: the 23 added VMs were removed 208–243 s after the MiniCluster's `terminate` (its pods
gone), within 25 s of each other in each run (bulk); no removal was held by a delay after add (the last
add came 231–345 s before the removals, which followed the emptying, not the add). The values are used as
recorded, as the distributions above. `run5-static` and `run5-autoscaling` were not used to fit
anything; they are the check: simulated with their own settings (24 VMs of one pod each, static; one
MiniCluster per job on a pool of at most 24 VMs) they land within 7% and 5% of the recorded makespan
and VM-seconds (table above; `tests/test_simulate_cluster.py` pins every run within 15%).

**`gke-balanced`** is the same pool with the cluster autoscaler's documented defaults for scale-down:
`scale-down-unneeded-time` 10 min, `scale-down-delay-after-add` 10 min, and non-bulk removal (one VM
per 10 s scan). It is not calibrated: no recorded run used it.
"""


def _model_rows() -> str:
    rows = []
    for key in ("pods_per_vm", "min_vms", "max_vms", "scale_up_delay_s", "boot_s", "pod_start_s", "unneeded_s",
                "delay_after_add_s", "scale_down"):  # fmt: skip
        cells = []
        for name in GKE:
            value = getattr(MODELS[name], key)
            if isinstance(value, tuple):
                value = (
                    f"{min(value):.0f}"
                    if len(set(value)) == 1
                    else f"{min(value):.0f}–{max(value):.0f} ({len(value)} values)"
                )
            cells.append(str(value))
        rows.append(f"| `{key}` | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def explain(report: dict[str, Any]) -> list[str]:
    """Why the recorded-run targets are missed, from the figures of the same run."""
    name = report["default"]
    lines = []
    for workload in report["workloads"]:
        if workload["kind"] != "recorded":
            continue
        rec, rows = workload["recorded"], workload["rows"]
        default = rows[name]
        cheapest_name, cheapest = min(
            ((k, r) for k, r in rows.items() if k != STATIC and r["vms_added"] > 0), key=lambda kr: kr[1]["vm_seconds"]
        )
        m, v = default["makespan_s"] / rec["makespan_s"], default["vm_seconds"] / rec["vm_seconds"]
        text = f"- {workload['workload']} (`{workload['model']}`): {name} {m:.2f}× makespan / {v:.2f}× VM-s"
        text += f" with {default['vms_added']} VMs added"
        for label in VARIANTS:
            other = rows.get(f"{name} ({label})")
            if other:
                m, v = other["makespan_s"] / rec["makespan_s"], other["vm_seconds"] / rec["vm_seconds"]
                text += f"; with {label} {m:.2f}× / {v:.2f}× with"
                text += f" {other['vms_added']}"
        m, v = cheapest["makespan_s"] / rec["makespan_s"], cheapest["vm_seconds"] / rec["vm_seconds"]
        text += f"; the cheapest run that adds any VM (`{cheapest_name}`, {cheapest['vms_added']} added) bills"
        text += f" {v:.2f}× in {m:.2f}× the makespan."
        lines.append(text)
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    lines = [
        "## What users pay: VM-seconds under the GKE cluster models",
        "",
        "Produced by the same command (`bench/cost.py`, results in `bench/results/cost.json`). The bill is VM "
        "lifetime: `VM-s` from the start until the pool is back at its minimum, `VM-s makespan` during the "
        "makespan; `VMs added` by the autoscaler; `turnaround` the mean over ensembles of arrival → last job "
        "done; `Jain` Jain's index of the ensembles' node shares (at each check, the nodes an ensemble holds "
        "over its weighted max-min fair share of the budget given what every ensemble wants, averaged over the "
        "checks it was entitled to nodes). The synthetic mixes run each algorithm with its own default options "
        "(the tables above force `order: random` on every algorithm). "
        "One MiniCluster per job is not run on the 1,000-job mixes (a thousand MiniClusters). The static "
        "partition's VMs are up from the start to the end of the run and billed for exactly that, its best case. "
        "The cluster models and their calibration are described under *The cluster model* below.",
        "",
        "### Fidelity on the five recorded runs (`gke-optimize-utilization`)",
        "",
        "| run | makespan s recorded / simulated | VM-s recorded / simulated | VMs added recorded / simulated |",
        "|---|---:|---:|---:|",
    ]
    for f in report["fidelity"]:
        r, s, q = f["recorded"], f["simulated"], f["ratio"]
        lines.append(f"| {f['run']} | {r['makespan_s']:.0f} / {s['makespan_s']:.0f} ({q['makespan_s']:.2f}×) | "
                     f"{r['vm_seconds']:.0f} / {s['vm_seconds']:.0f} ({q['vm_seconds']:.2f}×) | "
                     f"{r['vms_added']} / {s['vms_added']} |")  # fmt: skip
    lines.append("")
    for workload in report["workloads"]:
        extra = ""
        if workload["kind"] == "recorded":
            rec = workload["recorded"]
            extra = f"; recorded: makespan {rec['makespan_s']:.0f} s, {rec['vm_seconds']:.0f} VM-s"
        elif workload["kind"] == "synthetic":
            extra = f"; lower bound {workload['lower_bound_s']} s"
        lines += [
            f"### {workload['workload']} — `{workload['model']}`{extra}",
            "",
            "| algorithm | makespan s | VM-s | VM-s makespan | VMs added | turnaround s | Jain |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in workload["rows"].items():
            shown = name + (" (baseline)" if name in ("seed-as-built", "hpa-proportional", STATIC, ONE_PER_JOB)
                            else "") + ("" if row["completed"] else " — did not finish")  # fmt: skip
            shown = f"**{shown}** (default)" if name == report["default"] else shown
            jain = f"{row['jain']:.2f}" if "jain" in row else "—"
            lines.append(f"| {shown} | {row['makespan_s']:.0f} | {row['vm_seconds']:.0f} | "
                         f"{row['vm_seconds_makespan']:.0f} | {row['vms_added']} | {row['mean_turnaround_s']:.0f} "
                         f"| {jain} |")  # fmt: skip
        lines.append("")
    lines += [f"### The targets for the default (`{report['default']}`)", "", "| workload | figures | target |",
              "|---|---|---|", *verdicts(report), "",
              "Why the targets missed are missed. Every VM the autoscaler adds is billed its boot plus the "
              "unneeded time after its last pod (208–243 s under `gke-optimize-utilization`, 600 s under "
              "`gke-balanced`), so VM-seconds follow the VMs added and makespan falls as more are added: on "
              "descending, ≤ 0.7× needs every node up at the first VM's boot (the floor in the table "
              "above), which takes all 9 VMs and bills more than the original did; under `gke-balanced` the 0.8× "
              "targets are against the bill recorded under optimize-utilization and even one added VM is billed "
              "over 10 minutes. The trade-off, measured:", "", *explain(report), "",
              *grid_words(report), "",
              *grid_lines(report), "",
              f"The same targets over {SPREAD_SEEDS} seeds of the model (its draws of scale-up, boot and unneeded "
              "times; the tables above use seed 0): seeds meeting both, and the mean makespan × / VM-s × the "
              "recorded.", "", *spread_lines(report), ""]  # fmt: skip
    return "\n".join(lines) + "\n" + CLUSTER_MODEL.format(rows=_model_rows())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--json", default=str(REPO / "bench/results/cost.json"))
    args = parser.parse_args()
    report = measure(Path(args.shared))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
