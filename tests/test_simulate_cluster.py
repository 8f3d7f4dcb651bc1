"""`ensemble simulate --cluster`: the VMs and the autoscaler under the MiniClusters, their fidelity to the
recorded GKE runs, several ensembles on one node budget, and the command's new options."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_cli.calibration import RUNS, compare, recorded
from ensemble_cli.cluster import MODELS, Cluster, ClusterError, ClusterModel, load_model, model_from
from ensemble_cli.simulate import parse_arrival
from ensemble_cli.simulation import SimulationConfig, simulate
from ensemble_core import algorithms
from ensemble_core.messages import JobSpec
from ensemble_core.spec import Ensemble, load, validate
from sidecar.sim import load_trace
from tests.conftest import SHARED
from tests.factories import make_member, make_metrics

SEED_RUNS = SHARED / "data/seed-gke"
CLI = [sys.executable, "-m", "ensemble_cli", "simulate"]
SIMPLE = ClusterModel(
    name="test", pods_per_vm=2, min_vms=1, scale_up_delay_s=(10.0,), boot_s=(50.0,), pod_start_s=(5.0,),
    unneeded_s=(100.0,),
)  # fmt: skip


@pytest.mark.parametrize("run", RUNS)
def test_recorded_runs_makespan_and_vm_seconds_within_15_percent(run: str) -> None:
    if not (SEED_RUNS / run / "nodes.jsonl").exists():
        pytest.skip(f"{SEED_RUNS / run} has no nodes.jsonl")
    found = compare(SEED_RUNS / run, MODELS["gke-optimize-utilization"])
    for figure in ("makespan_s", "vm_seconds"):
        assert 0.85 <= found["ratio"][figure] <= 1.15, found


def test_pods_fill_vms_and_the_autoscaler_adds_only_what_does_not_fit() -> None:
    cluster = Cluster(SIMPLE)
    ups: list[float] = []
    cluster.join(0, ups.append)
    cluster.start(0, 1, 0.0)  # one pod on the base VM
    delays = cluster.place(0, 0.0, 4)
    # one slot left on the up VM: pod start; three pods need two new VMs: scale-up delay + boot
    assert delays == [5.0, 60.0, 60.0, 60.0]
    assert cluster.vms_added() == 2


def test_an_empty_vm_is_billed_until_unneeded_time_passes_then_removed() -> None:
    cluster = Cluster(SIMPLE)
    cluster.join(0, lambda at: None)
    cluster.place(0, 0.0, 6)  # 2 new VMs created at 10 (the base VM takes 2 pods)
    cluster.hold(0, 0, 200.0)
    end = cluster.finish(200.0)
    assert end == 300.0  # empty at 200, unneeded 100 s
    assert cluster.vm_seconds(0.0, end) == 300.0 + 2 * (300.0 - 10.0)
    assert len(cluster.alive(end)) == 1  # back at min_vms


def test_delay_after_add_and_one_at_a_time_hold_the_vms_longer() -> None:
    model = replace(SIMPLE, delay_after_add_s=600.0, scale_down="one-at-a-time", scale_down_interval_s=10.0)
    cluster = Cluster(model)
    cluster.join(0, lambda at: None)
    cluster.place(0, 0.0, 8)  # 3 new VMs, the last added at 10
    cluster.hold(0, 0, 50.0)
    cluster.finish(50.0)
    assert sorted(vm.removed for vm in cluster.vms if vm.removed is not None) == [610.0, 620.0, 630.0]


def test_a_pod_released_by_one_member_is_taken_by_a_waiting_one_before_the_vm_goes() -> None:
    cluster = Cluster(replace(SIMPLE, max_vms=1))
    ups: list[float] = []
    cluster.join(0, lambda at: None)
    cluster.join(1, ups.append)
    cluster.start(0, 2, 0.0)
    assert cluster.place(1, 0.0, 1) == [None]  # the pool is full: the pod waits
    cluster.hold(0, 1, 40.0)
    assert ups == [45.0]  # the freed slot, pod start 5 s
    assert cluster.vms_added() == 0


def test_cluster_files_are_validated_with_the_field_named(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("base: gke-balanced\npods_per_vm: 4\nboot_s: [60, 90]\nbudget: 12\n")
    model = load_model(str(path))
    assert model is not None
    assert (model.pods_per_vm, model.boot_s, model.budget, model.unneeded_s) == (4, (60.0, 90.0), 12, (600.0,))
    assert load_model("none") is None
    for document, field in [
        ({"pods_per_vm": 0}, "pods_per_vm"),
        ({"boot_s": [-1]}, "boot_s"),
        ({"scale_down": "sometimes"}, "scale_down"),
        ({"unneded_s": 3}, "unneded_s"),
        ({"min_vms": 5, "max_vms": 2}, "max_vms"),
        ({"base": "aws"}, "base"),
    ]:
        with pytest.raises(ClusterError, match=field):
            model_from(document)
    with pytest.raises(ClusterError, match="not a model name"):
        load_model(str(tmp_path / "missing.yaml"))


def ensemble(name: str, jobs: int, nodes: int, duration: int, max_size: int) -> Ensemble:
    document = {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "metadata": {"name": name},
        "spec": {"checkSeconds": 10, "members": [{
            "minicluster": {"spec": {"size": 1, "minSize": 1, "maxSize": max_size}},
            "algorithm": {"name": "demand-fit"},
            "jobs": [{"name": "j", "command": "true", "count": jobs, "nodes": nodes, "duration": duration}],
        }]},
    }  # fmt: skip
    found, errors = validate(document)
    assert found is not None, errors
    return found


def test_a_budget_is_shared_fairly_and_never_exceeded() -> None:
    first, second = ensemble("first", 40, 2, 120, 16), ensemble("second", 40, 2, 120, 16)
    config = SimulationConfig(ensemble=first, more=[(second, 300.0)], cluster=SIMPLE, budget=10, record=True)
    result = simulate(config)
    assert result.completed
    by_time: dict[float, dict[int, int]] = {}
    for sample in result.samples:
        by_time.setdefault(sample.time, {})[sample.member] = max(sample.size, sample.nodes_up)
    assert all(sum(sizes.values()) <= 10 for sizes in by_time.values())
    # while both have work, each holds half (alone, the first took the whole budget)
    assert by_time[100.0][0] == 10
    # (the first gives nodes back as their jobs end: within one 120 s job of the second arriving)
    both = [sizes for at, sizes in by_time.items() if 300.0 + 130.0 <= at <= 900.0]
    assert both and all(sizes == {0: 5, 1: 5} for sizes in both)
    summary = result.summary()
    assert summary["budget"] == 10 and set(summary["ensembles"]) == {"first", "second"}
    assert summary["jain"] >= 0.9


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def write(path: Path, found: Ensemble) -> Path:
    member = found.members[0]
    document: dict[str, Any] = {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "metadata": {"name": found.name},
        "spec": {"members": [{"minicluster": {"spec": {"size": 1, "minSize": 1, "maxSize": member.max_size}},
                              "jobs": [{"name": "j", "command": "true", "count": 6, "nodes": 2, "duration": 60}]}]},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(document))
    return path


def test_command_runs_two_ensembles_on_a_gke_pool_with_a_budget(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", ensemble("a", 6, 2, 60, 8))
    b = write(tmp_path / "b.yaml", ensemble("b", 6, 2, 60, 8))
    plot = tmp_path / "run.png"
    done = run_cli(str(a), f"{b}@120", "--cluster", "gke-balanced", "--budget", "6", "--json", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["cluster"] == "gke-balanced" and summary["budget"] == 6
    assert summary["ensembles"]["b"]["arrival_s"] == 120.0
    assert summary["vm_seconds"] >= summary["vm_seconds_makespan"] > 0
    assert summary["peak_size"] <= 6
    assert (tmp_path / "run-vms.png").stat().st_size > 0


def test_arrival_times_are_parsed_from_the_file_argument() -> None:
    assert parse_arrival("a.yaml") == ("a.yaml", 0.0)
    assert parse_arrival("dir@x/b.yaml@600") == ("dir@x/b.yaml", 600.0)
    for bad in ("b.yaml@soon", "b.yaml@-5", "b.yaml@inf"):
        with pytest.raises(ValueError, match="after @"):
            parse_arrival(bad)


def hpa_step(state: Any, seq: int, **metrics: Any) -> tuple[Any, list[Any]]:
    member = make_member("hpa-proportional", jobs=[JobSpec(name="j", command="true", count=8, nodes=2)], max_size=24)
    options = algorithms.parse_options("hpa-proportional", {})
    if state is None:
        state = algorithms.get("hpa-proportional").initial_state(member, options)
    result: tuple[Any, list[Any]] = algorithms.get("hpa-proportional").decide(
        member, options, state, make_metrics(seq, **metrics)
    )
    return result


def test_hpa_baseline_scales_in_proportion_and_holds_a_shrink_for_its_window() -> None:
    state, decisions = hpa_step(None, 0, size=2)
    assert [d.action for d in decisions] == ["submit"]
    # 2 nodes busy, 6 waiting on 2 up: demand 8 / (2 × 0.8) → 10, limited to max(2 × 2, 2 + 4) = 6
    state, decisions = hpa_step(state, 1, size=2, free=0, run=1, waiting={2: 3})
    assert [(d.action, d.size) for d in decisions] == [("scale", 6)]
    # demand falls to 2 nodes on 6 up: the desired 3 waits out the 300 s stabilisation window
    state, decisions = hpa_step(state, 2, size=6, free=4, run=1)
    assert decisions == []
    for seq in range(3, 31):
        state, decisions = hpa_step(state, seq, size=6, free=4, run=1)
        assert decisions == [], seq
    state, decisions = hpa_step(state, 32, size=6, free=4, run=1)
    assert [(d.action, d.size) for d in decisions] == [("scale", 3)]


def test_demand_fit_submits_widest_first_unless_told_otherwise() -> None:
    assert algorithms.parse_options("demand-fit", {}).order == "descending"  # type: ignore[attr-defined]
    assert algorithms.parse_options("demand-fit", {"order": "random"}).order == "random"  # type: ignore[attr-defined]


def _recorded_run(run: str, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = SEED_RUNS / run
    ensemble = load(folder / "ensemble.yaml")
    accepted = algorithms.option_names("demand-fit")
    merged = {k: v for k, v in {**ensemble.members[0].algorithm.options, **options}.items() if k in accepted}
    config = SimulationConfig(
        ensemble=ensemble,
        algorithm="demand-fit",
        options=merged,
        trace=load_trace(folder / "jobs.jsonl"),
        cluster=MODELS["gke-optimize-utilization"],
    )
    return simulate(config).summary(), recorded(folder)


def test_the_default_meets_the_cost_targets_on_the_random_and_ascending_runs_where_three_waves_did_not() -> None:
    # Issue 14's targets: makespan <= 0.7x and VM-seconds <= 0.8x the recorded run (seed 0 of the model).
    for run in ("run5-random", "run5-ascending"):
        summary, rec = _recorded_run(run)
        assert summary["makespan_s"] <= 0.7 * rec["makespan_s"], (run, summary)
        assert summary["vm_seconds"] <= 0.8 * rec["vm_seconds"], (run, summary)
    # The former default (3 waves) adds a VM more and bills above the target on random.
    former, rec = _recorded_run("run5-random", waves=3)
    current, _ = _recorded_run("run5-random")
    assert former["vm_seconds"] > 0.8 * rec["vm_seconds"]
    assert current["vms_added"] < former["vms_added"]


def test_pods_per_vm_rounds_the_first_grow_to_whole_vms_and_never_adds_a_vm_for_it() -> None:
    # waves 4 asks for ceil(60 / 4) = 15 nodes; with 2 pods per VM, 16: the same VMs, one more pod on them.
    plain, _ = _recorded_run("run5-random", waves=4, podsPerVm=1)
    whole, _ = _recorded_run("run5-random", waves=4, podsPerVm=2)
    assert (plain["peak_size"], whole["peak_size"]) == (15, 16)
    assert whole["vms_added"] == plain["vms_added"]
    assert whole["makespan_s"] <= plain["makespan_s"]
