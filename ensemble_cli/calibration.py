"""The recorded GKE runs (``shared/data/seed-gke``) as simulations under a cluster model, beside what they cost.

Each of the five run5 runs is simulated with its own trace and settings — the three ensemble runs with
the original's behaviour (``seed-as-built``, their ``ensemble.yaml``), ``run5-static`` as a static
MiniCluster of 24 nodes on its 24 pre-provisioned VMs (one pod a VM), ``run5-autoscaling`` as one
MiniCluster per job (each created when the run starts, terminated when its job is done) on a pool of
at most 24 VMs — and set beside the makespan, VM-seconds and VMs added measured from its
``jobs.jsonl`` and ``nodes.jsonl``. ``tests/test_simulate_cluster.py`` pins the agreement;
``bench/algorithms.py`` prints it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ensemble_cli.cluster import ClusterModel
from ensemble_cli.simulation import SimulationConfig, simulate
from ensemble_core import algorithms
from ensemble_core.spec import Ensemble, load, validate
from sidecar.sim import load_trace

ENSEMBLE_RUNS = ("run5-random", "run5-ascending", "run5-descending")
RUNS = (*ENSEMBLE_RUNS, "run5-static", "run5-autoscaling")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recorded(folder: Path) -> dict[str, float]:
    """What a recorded run took and cost: makespan (first submit → last job done), VM-seconds from the
    first submit until the pool was back at its minimum (or, for a pool that stays at its minimum, until
    the MiniCluster was gone: the last job + the recorded wait), during the makespan, and VMs added."""
    jobs = _lines(folder / "jobs.jsonl")
    vms = _lines(folder / "nodes.jsonl")
    start = min(job["t_submit"] for job in jobs)
    end = max(job["t_inactive"] for job in jobs)
    gone = [vm["gone"] for vm in vms if vm["gone"] is not None]
    until = max(gone) if gone else end + STATIC_TEARDOWN

    def overlap(lo: float, hi: float) -> float:
        return float(sum(max(0.0, min(vm["gone"] or hi, hi) - max(vm["created"], lo)) for vm in vms))

    return {
        "makespan_s": round(end - start, 1),
        "vm_seconds": round(overlap(start, until), 1),
        "vm_seconds_makespan": round(overlap(start, end), 1),
        "vms_added": sum(1 for vm in vms if not vm["base"]),
    }


#: run5-static: seconds from the last job to the MiniCluster being gone (the README's table: 52 s).
STATIC_TEARDOWN = 52.0


def _document(name: str, members: list[dict[str, Any]]) -> Ensemble:
    ensemble, errors = validate(
        {
            "apiVersion": "ensemble.flux-framework.org/v1alpha1",
            "kind": "Ensemble",
            "metadata": {"name": name},
            "spec": {"checkSeconds": 10, "members": members},
        }
    )
    if ensemble is None:
        raise ValueError("; ".join(errors))
    return ensemble


def run_config(folder: Path, model: ClusterModel, algorithm: str | None = None) -> SimulationConfig:
    """The simulation of the recorded run in ``folder`` under ``model`` (with the run's own pool settings);
    ``algorithm`` replaces the original's in the three ensemble runs."""
    run = folder.name
    trace = load_trace(folder / "jobs.jsonl")
    if run in ENSEMBLE_RUNS:
        ensemble = load(folder / "ensemble.yaml")
        name = algorithm or "seed-as-built"
        # The run's own options (order, scaleChecks, terminateChecks) where the algorithm takes them.
        accepted = algorithms.option_names(name)
        options = {k: v for k, v in ensemble.members[0].algorithm.options.items() if k in accepted}
        return SimulationConfig(ensemble=ensemble, algorithm=name, options=options, trace=trace, cluster=model)
    if run == "run5-static":
        member = {"minicluster": {"spec": {"size": 24, "minSize": 1, "maxSize": 24}},
                  "algorithm": {"name": "static", "options": {"size": 24}},
                  "jobs": [{"name": "lmp", "command": "true", "nodes": 1}]}  # fmt: skip
        return SimulationConfig(ensemble=_document("run5-static", [member]), trace=trace,
                                cluster=replace(model, min_vms=24, pods_per_vm=1, max_vms=24))  # fmt: skip
    if run == "run5-autoscaling":
        members = [
            {
                "minicluster": {"spec": {"size": job.nodes, "minSize": 1, "maxSize": job.nodes}},
                "algorithm": {"name": "static", "options": {"size": job.nodes, "preprovisioned": False}},
                "jobs": [
                    {"name": f"job-{i}", "command": "true", "nodes": job.nodes, "duration": max(1, round(job.run_time))}
                ],
            }
            for i, job in enumerate(trace)
        ]
        return SimulationConfig(ensemble=_document("run5-autoscaling", members), cold_start=True,
                                cluster=replace(model, max_vms=24))  # fmt: skip
    raise ValueError(f"{run}: not a recorded run ({', '.join(RUNS)})")


def compare(folder: Path, model: ClusterModel) -> dict[str, Any]:
    """The recorded and simulated figures of one run, and their ratios (simulated / recorded)."""
    measured = recorded(folder)
    summary = simulate(run_config(folder, model)).summary()
    simulated = {key: summary[key] for key in measured}
    ratios = {key: round(simulated[key] / measured[key], 3) for key in measured if measured[key]}
    return {"run": folder.name, "recorded": measured, "simulated": simulated, "ratio": ratios}
