"""The algorithms after workload-demand: demand-fit, random-selection, workload-success, the
select-*-runtime pair and rules — each on hand-written metric sequences, their options and rules
validation, a simulated replay of the recorded GKE workload, and properties over every algorithm."""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble_core import algorithms, spec
from ensemble_core.algorithms.select_runtime import GroupModel, learn
from ensemble_core.messages import (
    Decision,
    GroupStats,
    JobSpec,
    MemberSpec,
    Metrics,
)
from sidecar.queue import Queue
from tests.conftest import REPO, SHARED
from tests.factories import make_member, make_metrics

SEED_RUNS = SHARED / "data/seed-gke"


class Run:
    """Feeds metrics through one algorithm, keeping its state in JSON as the decider does."""

    def __init__(self, member: MemberSpec, **options: Any) -> None:
        self.member = member
        self.algorithm = algorithms.get(member.algorithm.name)
        self.options = algorithms.parse_options(member.algorithm.name, options)
        self.state = self.algorithm.initial_state(member, self.options)

    def feed(self, metrics: Metrics) -> list[Decision]:
        stored = msgspec.json.encode(self.state)
        state = msgspec.json.decode(stored, type=self.algorithm.state_type)
        self.state, decisions = self.algorithm.decide(self.member, self.options, state, metrics)
        return list(decisions)

    def feed_all(self, sequence: Iterable[Metrics]) -> list[Decision]:
        return [d for metrics in sequence for d in self.feed(metrics)]


def actions(decisions: Iterable[Decision]) -> list[tuple[str, Any]]:
    """Each decision as (action, size for scale / jobs per group for submit / None)."""
    out: list[tuple[str, Any]] = []
    for d in decisions:
        if d.action == "scale":
            out.append(("scale", d.size))
        elif d.action == "submit":
            out.append(("submit", {job.name: job.count for job in d.jobs}))
        else:
            out.append((d.action, None))
    return out


LAMMPS = [JobSpec(name=f"lammps-{n}", command="lmp", count=3, nodes=n) for n in (2, 4, 6, 8)]


# --- demand-fit ---------------------------------------------------------------------------------


def test_demand_fit_submits_and_asks_for_the_planned_nodes_at_once() -> None:
    run = Run(make_member("demand-fit", jobs=LAMMPS), waves=1)
    decisions = run.feed(make_metrics(0, size=1, free=1))
    assert actions(decisions) == [("submit", {job.name: 3 for job in LAMMPS}), ("scale", 24)]
    assert decisions[1].reason == (
        "12 jobs submitted need 60 nodes (widest 8); 0 busy; all at once: grow 1 → 24 (capped at maxSize 24)"
    )
    # With the default 3.5 waves it asks for ceil(60 / 3.5) = 18 nodes.
    default = Run(make_member("demand-fit", jobs=LAMMPS))
    assert actions(default.feed(make_metrics(0, size=1, free=1)))[1] == ("scale", 18)


def test_demand_fit_never_asks_again_for_nodes_still_coming() -> None:
    run = Run(make_member("demand-fit", jobs=LAMMPS), waves=1)
    run.feed(make_metrics(0, size=1, free=1))
    waiting = {2: 3, 4: 3, 6: 3, 8: 3}
    provisioning = [make_metrics(s, size=24, up=1, free=1, waiting=waiting, next_jobs=[8]) for s in range(1, 10)]
    assert run.feed_all(provisioning) == []


def test_demand_fit_grows_for_the_widest_waiting_job_and_the_busy_nodes() -> None:
    run = Run(make_member("demand-fit", jobs=LAMMPS, max_size=40), waves=2, podsPerVm=1)
    run.feed(make_metrics(0, size=20, free=20))
    # 10 nodes busy, 4+8 waiting: ceil(22 / 2) = 11, but the 8-node job needs 8 free of 10 busy → 11 ≥ 8.
    [grow] = run.feed(make_metrics(1, size=8, free=0, run=2, waiting={4: 1, 8: 1}, next_jobs=[8, 4], up=10))
    assert (grow.action, grow.size) == ("scale", 11)
    assert grow.reason.startswith("2 jobs waiting need 12 nodes (widest 8); 10 busy, 0 coming; in 2 waves")


@pytest.mark.parametrize(("waves", "pods", "size", "plan"), [
    (2, 2, 12, "in 2 waves, 11 rounded up to whole VMs of 2 pods: grow 8 → 12"),
    (2, 4, 12, "in 2 waves, 11 rounded up to whole VMs of 4 pods: grow 8 → 12"),
    (2.5, 1, 9, "in 2.5 waves: grow 8 → 9"),  # ceil(22 / 2.5) = 9
    (2.5, 2, 10, "in 2.5 waves, 9 rounded up to whole VMs of 2 pods: grow 8 → 10"),
    (1, 3, 24, "all at once, 22 rounded up to whole VMs of 3 pods: grow 8 → 24"),
])  # fmt: skip
def test_demand_fit_rounds_a_grow_up_to_whole_vms_and_takes_fractional_waves(
    waves: float, pods: int, size: int, plan: str
) -> None:
    run = Run(make_member("demand-fit", jobs=LAMMPS, max_size=40), waves=waves, podsPerVm=pods)
    run.feed(make_metrics(0, size=20, free=20))
    [grow] = run.feed(make_metrics(1, size=8, free=0, run=2, waiting={4: 1, 8: 1}, next_jobs=[8, 4], up=10))
    assert (grow.action, grow.size) == ("scale", size)
    assert grow.reason.endswith(plan), grow.reason


def test_demand_fit_rounding_to_whole_vms_stops_at_max_size() -> None:
    # 60 node-jobs at once want 60 → capped at an odd maxSize even though a VM holds 2 pods.
    run = Run(make_member("demand-fit", jobs=LAMMPS, max_size=23), waves=1, podsPerVm=2)
    [_, grow] = run.feed(make_metrics(0, size=1, free=1))
    assert (grow.action, grow.size) == ("scale", 23)
    assert grow.reason.endswith("all at once: grow 1 → 23 (capped at maxSize 23)")


def test_demand_fit_shrinks_idle_nodes_after_the_window_and_terminates_when_done() -> None:
    jobs = [JobSpec(name="a", command="true", count=4, nodes=2)]
    run = Run(make_member("demand-fit", jobs=jobs, min_size=2), shrinkChecks=2)
    run.feed(make_metrics(0, size=2, free=2))
    # The submission is not in the queue yet: nothing waiting does not mean idle nodes.
    assert run.feed(make_metrics(1, size=8, free=8)) == []
    assert run.feed(make_metrics(2, size=8, free=6, run=1, finished=3)) == []
    [shrink] = run.feed(make_metrics(3, size=8, free=6, run=1, finished=3))
    assert (shrink.action, shrink.size) == ("scale", 2)
    assert shrink.reason == "6 nodes free for 2 checks and no job waiting; 0 coming: shrink 8 → 2"
    [end] = run.feed(make_metrics(4, size=2, free=2, finished=4))
    assert end.action == "terminate"
    assert run.feed(make_metrics(5, size=2, free=2, finished=4)) == []


def test_demand_fit_waits_for_every_job_before_terminating() -> None:
    jobs = [JobSpec(name="a", command="true", count=4, nodes=1)]
    run = Run(make_member("demand-fit", jobs=jobs), terminateChecks=2)
    run.feed(make_metrics(0))
    assert run.feed_all(make_metrics(s, finished=3) for s in range(1, 6)) == []
    assert run.feed(make_metrics(6, finished=4)) == []
    assert actions(run.feed(make_metrics(7, finished=4))) == [("terminate", None)]


# --- a simulated replay of the recorded GKE workload --------------------------------------------


def simulate(run_name: str, algorithm: str, options: dict[str, Any], delay: float = 100.0) -> tuple[float, float]:
    """Makespan and node-seconds of one algorithm on the recorded run's jobs, on the sidecar's queue model.

    Checks every 10 s; every decision is applied at once; new nodes come up ``delay`` s after the
    request; each job takes the run time Flux recorded for a job of its width in that run.
    """
    recorded = yaml.safe_load((SEED_RUNS / run_name / "ensemble.yaml").read_text())["spec"]["members"][0]
    sizes = recorded["minicluster"]["spec"]
    member = make_member(
        algorithm,
        jobs=[msgspec.convert(job, JobSpec) for job in recorded["jobs"]],
        size=sizes["size"],
        min_size=sizes["minSize"],
        max_size=sizes["maxSize"],
    )
    runtimes: dict[int, list[float]] = {}
    for line in (SEED_RUNS / run_name / "jobs.jsonl").read_text().splitlines():
        job = json.loads(line)
        runtimes.setdefault(job["nnodes"], []).append(job["t_inactive"] - job["t_run"])
    sim = Run(member, **options)
    queue = Queue(nodes=member.size, max_nodes=member.max_size)
    events: list[tuple[float, int, int]] = []  # (time, 0 = job ends / 1 = nodes ready, job id or count)

    def start(now: float) -> None:
        for job in queue.schedule(now):
            heapq.heappush(events, (now + runtimes[job.nodes].pop(0), 0, job.id))

    history = [(0.0, queue.size)]
    first_submit, last_end, now = None, 0.0, 0.0
    for seq in range(1000):
        now = 10.0 * seq
        while events and events[0][0] <= now:
            when, kind, value = heapq.heappop(events)
            if kind == 0:
                queue.finish(value, when, 0)
                last_end = when
            else:
                queue.nodes_ready(value)
            start(when)
        status = queue.status(now)
        metrics = Metrics(
            namespace="default",
            ensemble="ens",
            member=0,
            seq=seq,
            time=now,
            size=status.size or 0,
            nodes=status.nodes,
            queue=status.queue,
            waiting=status.waiting,
            next_jobs=status.next_jobs,
            finished=status.finished or 0,
            failed=status.failed or 0,
            groups=status.groups,
        )
        ended = False
        for d in sim.feed(metrics):
            if d.action == "submit":
                queue.submit(d.jobs, now, order=d.order, seed=d.seed, key=d.id)
                first_submit = now if first_submit is None else first_submit
            elif d.action == "scale":
                assert d.size is not None
                provision = queue.resize(d.size)
                history.append((now, queue.size))
                if provision:
                    heapq.heappush(events, (now + delay, 1, provision))
            else:
                ended = True
            start(now)
        if ended:
            break
    else:
        pytest.fail(f"{algorithm} never ended the simulated {run_name}")
    node_seconds = sum(size * (t1 - t0) for (t0, size), (t1, _) in zip(history, [*history[1:], (now, 0)], strict=True))
    assert queue.status(now).finished == 12
    return last_end - (first_submit or 0.0), node_seconds


def recorded_options(run_name: str) -> dict[str, Any]:
    document = yaml.safe_load((SEED_RUNS / run_name / "ensemble.yaml").read_text())
    options: dict[str, Any] = document["spec"]["members"][0]["algorithm"]["options"]
    return options


@pytest.mark.parametrize("run_name", ["run5-random", "run5-ascending", "run5-descending"])
def test_demand_fit_finishes_the_recorded_workload_in_well_under_workload_demands_time(run_name: str) -> None:
    options = recorded_options(run_name)
    original = simulate(run_name, "workload-demand", options)
    fitted = simulate(run_name, "demand-fit", {"order": options["order"]})
    assert fitted[0] <= 0.6 * original[0], (fitted, original)


def test_demand_fit_also_saves_node_seconds_where_workload_demand_grows_stepwise() -> None:
    # In ascending order workload-demand grows for a 2-node job, then a 4, then a 6…: each step
    # costs a provisioning delay while the nodes asked for earlier sit idle.
    options = recorded_options("run5-ascending")
    original = simulate("run5-ascending", "workload-demand", options)
    fitted = simulate("run5-ascending", "demand-fit", {"order": options["order"]})
    assert fitted[1] <= 0.9 * original[1], (fitted, original)


# --- random-selection ---------------------------------------------------------------------------

MIXED = [
    JobSpec(name="a", command="true", count=5, nodes=1),
    JobSpec(name="b", command="true", count=3, nodes=2),
]


def test_random_selection_releases_a_random_batch_each_check_until_none_is_held() -> None:
    run = Run(make_member("random-selection", jobs=MIXED, max_size=4), batch=3, terminateChecks=1)
    released = [actions(run.feed(make_metrics(seq, run=1))) for seq in range(4)]
    batches = [dict(step[0][1]) for step in released[:3]]
    assert [sum(b.values()) for b in batches] == [3, 3, 2]
    assert {name: sum(b.get(name, 0) for b in batches) for name in ("a", "b")} == {"a": 5, "b": 3}
    assert released[3] == []
    assert run.feed(make_metrics(4, finished=7)) == []  # one job not accounted for yet
    assert actions(run.feed(make_metrics(5, finished=8))) == [("terminate", None)]
    # The same member draws the same jobs.
    again = Run(make_member("random-selection", jobs=MIXED, max_size=4), batch=3, terminateChecks=1)
    assert [actions(again.feed(make_metrics(seq, run=1))) for seq in range(4)] == released


def test_random_selection_grows_like_workload_demand() -> None:
    run = Run(make_member("random-selection", jobs=MIXED), batch=8, scaleChecks=2)
    run.feed(make_metrics(0, free=1))
    waiting = {"waiting": {2: 3}, "next_jobs": [2, 2, 2], "free": 1, "run": 1}
    assert run.feed(make_metrics(1, **waiting)) == []
    assert actions(run.feed(make_metrics(2, **waiting))) == [("scale", 2)]


# --- workload-success ---------------------------------------------------------------------------

FLAKY = [JobSpec(name="sim", command="./simulate", count=4, nodes=1)]


def stats(finished: int, succeeded: int) -> dict[str, GroupStats]:
    return {"sim": GroupStats(submitted=0, finished=finished, succeeded=succeeded, failed=finished - succeeded)}


def test_workload_success_replaces_failures_at_the_observed_rate_until_the_target() -> None:
    run = Run(make_member("workload-success", jobs=FLAKY), successes=4, terminateChecks=1)
    assert actions(run.feed(make_metrics(0))) == [("submit", {"sim": 4})]
    # 2 of 4 failed, 2 succeeded: a 50 % rate, 2 successes short → 4 more.
    [more] = run.feed(make_metrics(1, finished=4, failed=2, groups=stats(4, 2)))
    assert actions([more]) == [("submit", {"sim": 4})]
    assert more.reason == "2 of 4 successes, 0 jobs in flight at a success rate of 50%: submit 4 more"
    # The 4 new jobs are in flight: nothing more is needed yet.
    assert run.feed(make_metrics(2, run=4, finished=4, failed=2, groups=stats(4, 2))) == []
    # Target reached with one still running: no new job, and no end until it finishes.
    assert run.feed(make_metrics(3, run=1, finished=7, failed=3, groups=stats(7, 4))) == []
    [end] = run.feed(make_metrics(4, finished=8, failed=3, groups=stats(8, 5)))
    assert end.action == "terminate"
    assert end.reason == "no job active for 1 check and 5 of 4 successes reached: terminate"


def test_workload_success_stops_at_max_jobs() -> None:
    run = Run(make_member("workload-success", jobs=FLAKY), successes=2, maxJobs=6, terminateChecks=1)
    assert actions(run.feed(make_metrics(0))) == [("submit", {"sim": 4})]
    # Everything fails: the rate floor would ask for 40 more, the cap allows 2.
    assert actions(run.feed(make_metrics(1, finished=4, failed=4, groups=stats(4, 0)))) == [("submit", {"sim": 2})]
    [end] = run.feed(make_metrics(2, finished=6, failed=6, groups=stats(6, 0)))
    assert end.reason.endswith("the cap of 6 jobs submitted with 0 of 2 successes: terminate")


# --- select-fastest-runtime / select-longest-runtime --------------------------------------------

GROUPS = [
    JobSpec(name="slow", command="sleep 9", count=3, nodes=2),
    JobSpec(name="fast", command="sleep 1", count=3, nodes=1),
]


def timed(finished: int, run_mean: float) -> GroupStats:
    return GroupStats(finished=finished, succeeded=finished, run_mean=run_mean)


@pytest.mark.parametrize("name", ["select-fastest-runtime", "select-longest-runtime"])
def test_select_runtime_probes_each_group_and_waits_for_a_prediction(name: str) -> None:
    run = Run(make_member(name, jobs=GROUPS, max_size=8), batch=2, terminateChecks=1)
    assert actions(run.feed(make_metrics(0))) == [("submit", {"slow": 1, "fast": 1})]
    # Only the fast probe finished: it is the only group with a prediction, so both pick it.
    one = run.feed(make_metrics(1, run=1, free=0, finished=1, groups={"fast": timed(1, 1.0)}))
    assert actions(one)[0] == ("submit", {"fast": 2})
    assert actions(one)[1] == ("scale", 3)  # two 1-node jobs, nothing free: grow 1 → 3
    probes_done = {"fast": timed(3, 1.0), "slow": timed(1, 9.0)}
    two = run.feed(make_metrics(2, size=3, free=3, finished=4, groups=probes_done))
    assert actions(two)[0] == ("submit", {"slow": 2})
    assert two[0].reason.startswith("group slow has the")


@pytest.mark.parametrize(("name", "chosen"), [("select-fastest-runtime", "slow"), ("select-longest-runtime", "fast")])
def test_select_runtime_follows_the_learned_runtimes_not_the_names(name: str, chosen: str) -> None:
    run = Run(make_member(name, jobs=GROUPS, max_size=8), terminateChecks=1)
    run.feed(make_metrics(0))
    both = {"fast": timed(1, 5.0), "slow": timed(1, 2.0)}  # the "slow" group turned out faster
    assert actions(run.feed(make_metrics(1, size=4, free=4, finished=2, groups=both)))[0] == ("submit", {chosen: 1})


def test_runtime_model_is_an_exponentially_weighted_mean_of_new_runs() -> None:
    model = learn(GroupModel(), GroupStats(finished=2, run_mean=10.0), smoothing=50)
    assert model.predicted == 10.0
    # Two more runs averaging 20 s (mean of 4 = 15): the prediction moves half-way to 20.
    model = learn(model, GroupStats(finished=4, run_mean=15.0), smoothing=50)
    assert model.predicted == pytest.approx(15.0)
    assert learn(model, GroupStats(finished=4, run_mean=15.0), smoothing=50) is model


# --- rules --------------------------------------------------------------------------------------

EXAMPLE = yaml.safe_load((REPO / "examples/rules.yaml").read_text())["spec"]["members"][0]
EXAMPLE_JOBS = [msgspec.convert(job, JobSpec) for job in EXAMPLE["jobs"]]
EXAMPLE_RULES: list[dict[str, Any]] = EXAMPLE["algorithm"]["rules"]


def group(finished: int = 0, succeeded: int | None = None, wait_mean: float = 0.0) -> GroupStats:
    succeeded = finished if succeeded is None else succeeded
    return GroupStats(finished=finished, succeeded=succeeded, failed=finished - succeeded, wait_mean=wait_mean)


def test_the_rules_example_runs_its_story() -> None:
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=EXAMPLE_RULES, max_size=4))
    assert actions(run.feed(make_metrics(0))) == [("submit", {"sleep": 2})]
    assert run.feed(make_metrics(1, run=1)) == []
    [echo] = run.feed(make_metrics(2, run=1, finished=1, groups={"sleep": group(1)}))
    assert actions([echo]) == [("submit", {"echo": 5})]
    assert echo.reason == "rule 2 (count.sleep.success = 1 >= 1): submit group echo (5 jobs)"
    # Rule 2 fired its one repetition; three echoes finished: three sleep-long submissions.
    three = run.feed(make_metrics(3, finished=5, groups={"sleep": group(2), "echo": group(3)}))
    assert actions(three) == [("submit", {"sleep-long": 2})] * 3
    # Two more echoes: rule 3 has two repetitions left.
    two = run.feed(make_metrics(4, finished=7, groups={"sleep": group(2), "echo": group(5)}))
    assert actions(two) == [("submit", {"sleep-long": 2})] * 2
    # Pending time above 5 s: grow by one, then wait out the backoff of 2 checks.
    slow = {"sleep": group(2), "echo": group(5), "sleep-long": group(2, wait_mean=6.0)}
    grows = [
        actions(run.feed(make_metrics(seq, size=1 if seq == 5 else 2, run=1, finished=9, groups=slow)))
        for seq in (5, 6, 7, 8)
    ]
    assert grows == [[("scale", 2)], [], [], [("scale", 3)]]
    done = {**slow, "sleep-long": group(10, wait_mean=6.0)}
    assert actions(run.feed(make_metrics(9, size=4, finished=17, groups=done))) == [("terminate", None)]
    assert run.feed(make_metrics(10, size=4, finished=17, groups=done)) == []


@pytest.mark.parametrize(
    ("when", "values", "fires"),
    [
        (3, [2, 3, 5], [False, True, True]),
        ("> 5", [5, 6], [False, True]),
        (">= 5", [4, 5], [False, True]),
        ("< 2", [2, 1], [False, True]),
        ("<= 2", [3, 2], [False, True]),
        ("== 4", [3, 5, 4], [False, False, True]),
    ],
)
def test_metric_thresholds(when: Any, values: list[int], fires: list[bool]) -> None:
    rules = [
        {
            "trigger": "metric",
            "name": "count.sleep.failed",
            "when": when,
            "action": {"name": "grow", "repetitions": 10},
        }
    ]
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules, max_size=20))
    fired = [bool(run.feed(make_metrics(seq, groups={"sleep": group(v, 0)}))) for seq, v in enumerate(values)]
    assert fired == fires


def test_duration_statistics_have_no_value_before_a_job_finished() -> None:
    rules = [{"trigger": "metric", "name": "max.sleep-duration", "when": "< 1", "action": {"name": "terminate"}}]
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules))
    assert run.feed(make_metrics(0, groups={"sleep": group(0)})) == []
    quick = GroupStats(finished=1, succeeded=1, run_max=0.5)
    assert actions(run.feed(make_metrics(1, finished=1, groups={"sleep": quick}))) == [("terminate", None)]


@pytest.mark.parametrize(
    ("name", "when", "stats", "fires"),
    [
        # std is the square root of the sample variance; none before two jobs ran
        ("std.sleep-duration", "> 1.5", [GroupStats(finished=1, run_var=None), GroupStats(finished=2, run_var=4.0)],
         [False, True]),
        ("variance.sleep-pending", ">= 4", [GroupStats(finished=3, wait_var=3.9), GroupStats(finished=4, wait_var=4.0)],
         [False, True]),
        ("var.sleep-duration", "< 1", [GroupStats(finished=2, run_var=0.5)], [True]),
        ("iqr.sleep-duration", "> 10", [GroupStats(finished=5, run_iqr=10.0), GroupStats(finished=6, run_iqr=12.5)],
         [False, True]),
        # an original sidecar reports no spread at all: nothing fires, whatever the threshold
        ("mad.sleep-pending", "< 100", [GroupStats(finished=9), GroupStats(finished=9, wait_mad=2.0)], [False, True]),
    ],
)  # fmt: skip
def test_spread_statistics_fire_on_the_value_the_sidecar_reports(
    name: str, when: str, stats: list[GroupStats], fires: list[bool]
) -> None:
    rules = [{"trigger": "metric", "name": name, "when": when, "action": {"name": "grow", "repetitions": 10}}]
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules, max_size=20))
    fired = [bool(run.feed(make_metrics(seq, groups={"sleep": one}))) for seq, one in enumerate(stats)]
    assert fired == fires


def test_shrink_rule_and_failure_events() -> None:
    rules = [{"trigger": "job-failure", "group": "sleep", "action": {"name": "shrink", "value": 2, "repetitions": 3}}]
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules, min_size=2, max_size=8))
    # One failure: shrink 8 → 6; two more in one snapshot: 6 → 4 → 2 (held at minSize after that).
    assert actions(run.feed(make_metrics(0, size=8, groups={"sleep": group(1, 0)}))) == [("scale", 6)]
    assert actions(run.feed(make_metrics(1, size=6, groups={"sleep": group(3, 0)}))) == [("scale", 4), ("scale", 2)]


def test_rules_safety_net_ends_an_idle_member() -> None:
    rules = [{"trigger": "start", "action": {"name": "submit", "group": "sleep"}}]
    run = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules), idleChecks=3)
    run.feed(make_metrics(0))
    assert run.feed_all(make_metrics(seq, finished=1) for seq in range(1, 5)) == []  # one of two jobs done
    assert run.feed_all(make_metrics(seq, finished=2) for seq in (5, 6)) == []
    [end] = run.feed(make_metrics(7, finished=2))
    assert end.reason.startswith("safety net: no job active for 3 checks")
    off = Run(make_member("rules", jobs=EXAMPLE_JOBS, rules=rules), idleChecks=0)
    off.feed(make_metrics(0))
    assert off.feed_all(make_metrics(seq, finished=2) for seq in range(1, 100)) == []


def test_rules_are_plumbed_from_the_ensemble_file_to_the_member() -> None:
    ensemble = spec.load(REPO / "examples/rules.yaml")
    member = ensemble.member_spec(ensemble.members[0], "127.0.0.1:1")
    assert member.algorithm.name == "rules"
    assert member.algorithm.rules == EXAMPLE_RULES
    decoded = msgspec.json.decode(msgspec.json.encode(member), type=MemberSpec)
    assert decoded.algorithm.rules == EXAMPLE_RULES


def document(algorithm: dict[str, Any], *, member_algorithm: dict[str, Any] | None = None) -> dict[str, Any]:
    member: dict[str, Any] = {
        "minicluster": {"spec": {"size": 1, "maxSize": 4}},
        "jobs": [{"name": "sleep", "command": "sleep 1"}, {"name": "echo", "command": "echo"}],
    }
    if member_algorithm is not None:
        member["algorithm"] = member_algorithm
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": "r"},
        "spec": {"algorithm": algorithm, "members": [member]},
    }


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        (
            [{"trigger": "start", "action": {"name": "submit", "group": "slep"}}],
            "spec.algorithm.rules[0].action.group: 'slep' is not a job group of this member; did you mean sleep? "
            "(groups: echo, sleep) (for spec.members[0])",
        ),
        (
            [{"trigger": "metric", "name": "median.sleep-duration", "when": 1, "action": {"name": "grow"}}],
            "spec.algorithm.rules[0].name: 'median.sleep-duration' is not a statistic; one of "
            "count.<group>.finished|success|failed|submitted|started|cancelled|waiting, "
            "mean|min|max|variance|var|std|iqr|mad.<group>-duration, "
            "mean|min|max|variance|var|std|iqr|mad.<group>-pending or mean|min|max.<group>-waiting",
        ),
        (
            [{"trigger": "metric", "name": "count.sleep.succeeded", "when": 1, "action": {"name": "grow"}}],
            "spec.algorithm.rules[0].name: 'count.sleep.succeeded' is not a statistic; one of "
            "count.<group>.finished|success|failed|submitted|started|cancelled|waiting, "
            "mean|min|max|variance|var|std|iqr|mad.<group>-duration, "
            "mean|min|max|variance|var|std|iqr|mad.<group>-pending or mean|min|max.<group>-waiting",
        ),
        (
            [{"trigger": "metric", "name": "count.sleep.success", "when": "=> 2", "action": {"name": "grow"}}],
            'spec.algorithm.rules[0].when: expected a number (reaches: >= it) or a comparison such as "> 5" '
            "(>, >=, <, <=, ==), got '=> 2'",
        ),
        (
            [{"trigger": "job-finsh", "group": "sleep", "action": {"name": "terminate"}}],
            "spec.algorithm.rules[0].trigger: must be one of start, job-depend, job-sched, job-run, job-cancel, "
            "job-cleanup, job-finish, job-success, job-failure, job-fail, metric, got 'job-finsh'; "
            "did you mean job-finish?",
        ),
        (
            [{"trigger": "start", "action": {"name": "grow", "value": 0}}],
            "spec.algorithm.rules[0].action.value: expected an integer between 1 and 1000000, got 0",
        ),
        (
            [{"trigger": "start", "action": {"name": "grow", "backof": 2}}],
            "spec.algorithm.rules[0].action.backof: unknown field; did you mean backoff? "
            "(valid: name, group, value, repetitions, backoff)",
        ),
        (
            [{"trigger": "job-finish", "label": "echo", "action": {"name": "terminate"}}],
            "spec.algorithm.rules[0].label: unknown field; did you mean group? "
            "(valid: trigger, group, name, when, action)",
        ),
        (
            [{"trigger": "start", "action": {"name": "custom"}}],
            "spec.algorithm.rules[0].action.name: custom actions are refused: they run the file's Python code inside "
            "the decider, which decides for every ensemble of the operator (code execution in a shared service). "
            "Express the step with the actions submit, grow, shrink, terminate and metric or job-event triggers, or "
            "run that code as a job",
        ),
        ([], "spec.algorithm.rules: the rules algorithm needs at least one rule (a trigger and an action)"),
        (["start"], "spec.algorithm.rules[0]: expected a mapping with trigger and action, got a string"),
    ],
)
def test_rules_errors_name_their_path(rules: list[Any], error: str) -> None:
    _, errors = spec.validate(document({"name": "rules", "rules": rules}))
    assert error in errors, errors


def test_rules_for_another_algorithm_are_an_error() -> None:
    rules = [{"trigger": "start", "action": {"name": "terminate"}}]
    _, errors = spec.validate(
        document({"name": "workload-demand"}, member_algorithm={"name": "demand-fit", "rules": rules})
    )
    assert errors == [
        "spec.members[0].algorithm.rules: only the rules algorithm reads rules, not demand-fit; "
        "remove them or set name: rules"
    ]


def test_every_rules_problem_is_reported_at_once() -> None:
    rules = [
        {"trigger": "start", "action": {"name": "submit"}},
        {"trigger": "metric", "name": "mean.echo-pending", "action": {"name": "shrink", "repetitions": "x"}},
    ]
    problems = algorithms.validate_rules("rules", rules)
    assert [p.split(":")[0] for p in problems] == [
        "rules[0].action.group",
        "rules[1].when",
        "rules[1].action.repetitions",
    ]


# --- options of every algorithm -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("demand-fit", {"wave": 2}, "wave: unknown option for demand-fit; did you mean waves?"),
        ("demand-fit", {"waves": "many"}, "waves: expected a number between 1 and 1000, got 'many'"),
        ("demand-fit", {"shrinkChecks": 0}, "shrinkChecks: expected an integer between 1 and 1000, got 0"),
        ("random-selection", {"batchSize": 2}, "batchSize: unknown option for random-selection; did you mean batch?"),
        ("random-selection", {"batch": 2.5}, "batch: expected an integer between 1 and 100000, got 2.5"),
        ("random-selection", {"batch": 0}, "batch: expected an integer between 1 and 100000, got 0"),
        ("workload-success", {"success": 3}, "success: unknown option for workload-success; did you mean successes?"),
        ("workload-success", {"maxJobs": -1}, "maxJobs: expected an integer between 0 and 10000000, got -1"),
        ("workload-success", {"successes": "yes"}, "successes: expected an integer between 0 and 1000000, got 'yes'"),
        (
            "select-fastest-runtime",
            {"smooth": 5},
            "smooth: unknown option for select-fastest-runtime; did you mean smoothing?",
        ),
        ("select-longest-runtime", {"smoothing": 101}, "smoothing: expected an integer between 1 and 100, got 101"),
        ("select-longest-runtime", {"batch": "two"}, "batch: expected an integer between 1 and 100000, got 'two'"),
        ("rules", {"idlechecks": 3}, "idlechecks: unknown option for rules; did you mean idleChecks?"),
        ("rules", {"idleChecks": -2}, "idleChecks: expected an integer between 0 and 100000, got -2"),
        (
            "rules",
            {"disableTermination": "perhaps"},
            "disableTermination: expected a boolean (yes/no or true/false), got 'perhaps'",
        ),
    ],
)
def test_bad_options_are_named_with_the_fix(name: str, raw: dict[str, Any], problem: str) -> None:
    [error] = algorithms.validate_options(name, raw)
    assert error.startswith(problem), error


def test_defaults_and_yaml_strings_parse_for_every_algorithm() -> None:
    for name in algorithms.names():
        assert algorithms.validate_options(name, {}) == []
    options = algorithms.parse_options("demand-fit", {"waves": "2", "disableTermination": "yes", "order": ""})
    assert options == algorithms.DemandFitOptions(waves=2, disable_termination=True, order="")


# --- properties over every algorithm -----------------------------------------------------------

PROPERTY_JOBS = [
    JobSpec(name="sleep", command="sleep 1", count=2, nodes=1),
    JobSpec(name="echo", command="echo", count=3, nodes=2),
    JobSpec(name="sleep-long", command="sleep 2", count=2, nodes=3),
]


def property_member(name: str, min_size: int, max_size: int) -> MemberSpec:
    rules = EXAMPLE_RULES if name == "rules" else []
    return make_member(name, jobs=PROPERTY_JOBS, rules=rules, min_size=min_size, max_size=max_size)


@st.composite
def metric_streams(draw: st.DrawFn) -> list[Metrics]:
    steps = draw(st.lists(st.integers(min_value=-1, max_value=2), min_size=1, max_size=40))
    stream: list[Metrics] = []
    seq = 0
    for step in steps:
        seq = max(0, seq + step)
        size = draw(st.integers(0, 30))
        up = draw(st.integers(0, 30))
        groups = draw(
            st.dictionaries(
                st.sampled_from(["sleep", "echo", "sleep-long", "other"]),
                st.builds(
                    lambda finished, ok, wait: GroupStats(
                        finished=finished,
                        succeeded=min(ok, finished),
                        failed=finished - min(ok, finished),
                        run_mean=wait,
                        wait_mean=wait,
                    ),
                    st.integers(0, 12),
                    st.integers(0, 12),
                    st.floats(0, 20),
                ),
                max_size=3,
            )
        )
        stream.append(
            make_metrics(
                seq,
                size=size,
                up=up,
                free=draw(st.integers(0, up)),
                waiting=draw(st.dictionaries(st.integers(1, 30), st.integers(0, 4), max_size=3)),
                next_jobs=draw(st.lists(st.integers(1, 30), max_size=3)),
                run=draw(st.integers(0, 3)),
                finished=draw(st.integers(0, 10)),
                failed=draw(st.integers(0, 3)),
                groups=groups,
            )
        )
    return stream


def fast_options(name: str) -> dict[str, Any]:
    """Options that make each algorithm act within a short stream."""
    if name == "rules":
        return {"idleChecks": 2}
    if name == "demand-fit":
        return {"terminateChecks": 2, "shrinkChecks": 1}
    return {"scaleChecks": 1, "terminateChecks": 2}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(algorithms.names()),
    stream=metric_streams(),
    bounds=st.tuples(st.integers(1, 6), st.integers(0, 20)),
    disable=st.booleans(),
)
def test_every_algorithm_stays_in_bounds_ends_once_and_is_deterministic(
    name: str, stream: list[Metrics], bounds: tuple[int, int], disable: bool
) -> None:
    min_size, extra = bounds
    member = property_member(name, min_size, min_size + extra)
    accepted = algorithms.option_names(name)
    options = {k: v for k, v in {**fast_options(name), "disableTermination": disable}.items() if k in accepted}

    def decide_all() -> list[list[Decision]]:
        run = Run(member, **options)
        out = []
        last = -1
        for metrics in stream:
            before = run.state
            decisions = run.feed(metrics)
            if metrics.seq <= last:
                # A snapshot at or before the last one consumed changes nothing.
                assert decisions == []
                assert run.state == before
            last = max(last, metrics.seq)
            out.append(decisions)
        return out

    first = decide_all()
    assert first == decide_all()
    ended = False
    ids: set[str] = set()
    for decisions in first:
        assert not (ended and decisions), "a decision after terminate/complete"
        for index, d in enumerate(decisions):
            assert d.id not in ids
            ids.add(d.id)
            if d.action == "scale":
                assert d.size is not None and min_size <= d.size <= min_size + extra
            if d.action in ("terminate", "complete"):
                assert index == len(decisions) - 1
                ended = True
