"""ensemble-python's rule files and semantics (issue 16), each test written from the successor's documented
behaviour (its README and ``ensemble/config/types.py``, ``members/flux/queue.py``; copies of its examples in
``tests/data/ensemble-python``)."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from nats.aio.client import Client

from ensemble_core import compat, spec, subjects
from ensemble_core.algorithms import get, parse_options
from ensemble_core.algorithms.rules import RulesState, validate_rules
from ensemble_core.messages import AlgorithmSpec, GroupStats, JobSpec, MemberSpec, Metrics, encode
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import SubmitPayload, SubmitResult
from services.decider.service import run as run_decider
from services.poller.service import run as run_poller
from sidecar.queue import Queue
from sidecar.server import serve
from tests.conftest import REPO, service_running, stream_messages, wait_for
from tests.factories import make_member, make_metrics
from tests.flux_support import FLUX, NEEDS_FLUX
from tests.test_poller import CountingBackend, register, stored

DATA = Path(__file__).parent / "data" / "ensemble-python"
COMPAT = {"compat": "ensemble-python"}


def rules_member(rules: list[dict[str, Any]], jobs: list[JobSpec], **options: Any) -> MemberSpec:
    member = make_member("rules", jobs=jobs, max_size=8)
    member.algorithm = AlgorithmSpec(name="rules", options={**COMPAT, **options}, rules=rules)
    return member


def run_rules(member: MemberSpec, snapshots: list[Metrics]) -> list[list[str]]:
    """The decisions (action and reason) of ``rules`` on each snapshot in turn."""
    algorithm = get("rules")
    options = parse_options("rules", member.algorithm.options)
    state: RulesState = algorithm.initial_state(member, options)
    taken = []
    for metrics in snapshots:
        state, decisions = algorithm.decide(member, options, state, metrics)
        taken.append([f"{d.action} {d.reason}" for d in decisions])
    return taken


def event(seq: int, number: int, **kwargs: Any) -> Metrics:
    """The ``number``-th event snapshot after check ``seq``."""
    metrics = make_metrics(seq, **kwargs)
    metrics.event = number
    metrics.time += 0.1 * number
    return metrics


# -- 1. pending time of waiting jobs ---------------------------------------------------------------------


def test_pending_time_grows_while_jobs_wait_and_a_compat_rule_reads_it_before_any_job_ends() -> None:
    # grow-shrink-example.yaml: ten `sleep 100` jobs of 4 nodes on a 4-node cluster, "when the pending time of
    # sleep is > 5 seconds, grow" — the successor adds now - submit of every waiting job at each heartbeat
    queue = Queue(nodes=4, max_nodes=16)
    queue.submit([JobSpec(name="sleep", command="sleep 100", count=10, nodes=4)], now=0.0)
    queue.schedule(0.0)
    stats = queue.status(9.0).groups["sleep"]
    assert (stats.started, stats.waiting, stats.queued_count) == (1, 9, 10)
    assert stats.queued_mean == pytest.approx(9 * 9.0 / 10)  # one started at once, nine waited 9 s
    assert (stats.queued_min, stats.queued_max) == (0.0, 9.0)
    assert stats.finished == 0 and stats.wait_mean == 0.0  # the finished-jobs series has nothing yet
    document = yaml.safe_load((DATA / "grow-shrink-example.yaml").read_text())
    member = rules_member(document["rules"][2:], [JobSpec(name="sleep", command="sleep 100", count=10, nodes=4)])
    snapshots = [make_metrics(seq, size=4, groups={"sleep": queue.status(3.0 * seq).groups["sleep"]}) for seq in (1, 2)]
    # at t=3 the mean is 2.7 s, at t=6 it is 5.4 s > 5: grow — no job has ended (the old reading waited ~200 s)
    assert run_rules(member, snapshots) == [[], ["scale rule 1 (mean.sleep-pending = 5.4 > 5): grow 4 → 5"]]


def test_waiting_statistics_drop_jobs_that_leave_the_queue_in_any_order() -> None:
    queue = Queue(nodes=1)
    queue.submit([JobSpec(name="a", command="true", count=3)], now=0.0)
    queue.submit([JobSpec(name="b", command="true", count=2)], now=2.0)
    queue.schedule(4.0)  # a[0] starts after 4 s
    assert queue.cancel("b", 5.0) == 2
    a, b = queue.status(10.0).groups["a"], queue.status(10.0).groups["b"]
    assert (a.waiting, a.queued_count, a.queued_mean, a.queued_max) == (2, 3, pytest.approx(24 / 3), 10.0)
    assert (b.waiting, b.queued_count, b.cancelled) == (0, 0, 2)
    # native rules read the same series as <stat>.<group>-waiting, and -pending stays the finished jobs'
    assert validate_rules("rules", [{"trigger": "metric", "name": "max.a-waiting", "when": "> 5",
                                     "action": {"name": "grow"}}]) == []  # fmt: skip


# -- 2. when rules run: job events at once, checks counted as checks -------------------------------------


def test_event_snapshots_fire_job_event_rules_and_only_checks_count_as_checks() -> None:
    jobs = [JobSpec(name="sleep", command="sleep 1", count=2), JobSpec(name="echo", command="echo", count=1)]
    member = rules_member(
        [
            {"trigger": "start", "action": {"name": "submit", "group": "sleep"}},
            {"trigger": "job-finish", "action": {"name": "submit", "group": "echo", "repetitions": 2}},
        ],
        jobs,
        idleChecks=2,
    )
    member.algorithm.options = {"idleChecks": 2}  # this project's semantics: backoff and idleChecks in checks
    one = {"sleep": GroupStats(submitted=2, finished=1, succeeded=1)}
    two = {"sleep": GroupStats(submitted=2, finished=2, succeeded=2)}
    done = {**two, "echo": GroupStats(submitted=2, finished=2, succeeded=2)}
    taken = run_rules(
        member,
        [
            make_metrics(0),
            event(0, 1, groups=one, finished=1),  # a job ended: the rule fires on the event, not at check 1
            event(0, 2, groups=two, finished=2),
            make_metrics(1, groups=two, finished=2),  # the check sees no new end: nothing twice
            event(1, 1, groups=done, finished=4),
            event(1, 2, groups=done, finished=4),  # idle, but an event is no check: no safety net yet
            make_metrics(2, groups=done, finished=4),
            make_metrics(3, groups=done, finished=4),
        ],
    )
    assert [len(d) for d in taken] == [1, 1, 1, 0, 0, 0, 0, 1]
    assert "job-finish of any job" in taken[1][0] and taken[7][0].startswith(
        "terminate safety net: no job active for 2"
    )


async def test_the_poller_publishes_a_pushed_change_at_once_for_a_rules_member_and_checks_stay_checks(
    nc: Client, settings: Settings
) -> None:
    backend = CountingBackend()
    sidecar = await serve(backend, token=ensemble_token(settings.sidecar_token, "default", "ev"), heartbeat=60)
    member = MemberSpec(
        namespace="default", ensemble="ev", member=0, name="ev-0", size=1, min_size=1, max_size=1,
        endpoint=f"127.0.0.1:{sidecar.port}", algorithm=AlgorithmSpec(name="rules", rules=[
            {"trigger": "job-finish", "action": {"name": "terminate"}}]),
        jobs=[JobSpec(name="j", command="sleep 0.3")], check_seconds=5,
    )  # fmt: skip
    try:
        async with stored(nc) as found, service_running(run_poller, settings):
            await register(nc, member)
            await wait_for(lambda: len(found.of(0)) >= 1)
            async with SidecarClient(member.endpoint, ensemble_token(settings.sidecar_token, "default", "ev")) as c:
                await c.action("submit", SubmitPayload(jobs=member.jobs), SubmitResult)
            await wait_for(lambda: any(m.finished == 1 for m in found.of(0)), timeout=4)
            ended = time.time()
        snapshots = found.of(0)
        checks = [m for m in snapshots if m.event == 0]
        events = [m for m in snapshots if m.event > 0]
        # check_seconds is 5: the end reached the stream as an event of check 0, long before check 1
        assert [m.seq for m in checks] == list(range(len(checks))) and len(checks) <= 2
        assert (
            events and all(m.seq == 0 for m in events) and [m.event for m in events] == list(range(1, len(events) + 1))
        )
        first_end = next(m for m in events if m.finished == 1)
        assert first_end.time < ended and first_end.time - snapshots[0].time < 4
    finally:
        await sidecar.stop()


async def test_the_decider_gives_event_snapshots_to_rules_and_never_to_an_algorithm_that_counts_checks(
    nc: Client, settings: Settings
) -> None:
    rules = make_member("rules", jobs=[JobSpec(name="j", command="true")], rules=[
        {"trigger": "job-finish", "action": {"name": "grow"}}])  # fmt: skip
    counting = make_member("workload-demand", jobs=[JobSpec(name="j", command="true")])
    counting.member = 1
    counting.algorithm.options = {"scaleChecks": 1}
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    for spec_ in (rules, counting):
        await members.put(MemberAddress(spec_.namespace, spec_.ensemble, spec_.member).key, encode(spec_))
    js = nc.jetstream()
    ended = {"j": GroupStats(submitted=1, finished=1, succeeded=1)}
    snapshots = [make_metrics(0, free=1), event(0, 1, groups=ended, finished=1)]
    waiting = [make_metrics(0, waiting={2: 1}, next_jobs=[2]), event(0, 1, waiting={2: 1}, next_jobs=[2])]
    for metrics in waiting:
        metrics.member = 1
    for metrics in (*snapshots, *waiting):
        metrics.time = time.time()
        address = MemberAddress(metrics.namespace, metrics.ensemble, metrics.member)
        await js.publish(subjects.metrics(address), encode(metrics))
    alone = get("workload-demand").decide(
        counting, parse_options("workload-demand", counting.algorithm.options),
        get("workload-demand").initial_state(counting, parse_options("workload-demand", counting.algorithm.options)),
        waiting[0],
    )[1]  # fmt: skip
    async with service_running(run_decider, settings):
        await wait_for(lambda: _decisions(nc, 1 + len(alone)), timeout=10)
        await wait_for(lambda: _drained(nc), timeout=10)
    found = await _decisions(nc, 0)
    # rules: grow on the event (its id names the event); workload-demand: what its check alone decides
    assert [(d.action, d.size, d.id.split("/")[3]) for d in found if d.member == 0] == [("scale", 2, "0e1")]
    assert [d.id for d in found if d.member == 1] == [d.id for d in alone] and alone


async def _drained(nc: Client) -> bool:
    from ensemble_core import natsio

    info = await nc.jetstream().consumer_info(subjects.METRICS_STREAM, natsio.DECIDER.name)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def _decisions(nc: Client, at_least: int) -> Any:
    from ensemble_core.messages import Decision

    raw = await stream_messages(nc, subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS)
    found = [msgspec.json.decode(data, type=Decision) for data in raw]
    return found if len(found) >= at_least else None


# -- 3. triggers -------------------------------------------------------------------------------------------


def test_job_depend_sched_run_cancel_and_cleanup_fire_for_every_job_without_a_group() -> None:
    # the successor's schema names job-depend, job-sched, job-run, job-cancel, job-cleanup; a job-event rule's
    # `name` is only a label there: the rule applies to every job
    triggers = ["job-depend", "job-sched", "job-run", "job-cancel", "job-cleanup"]
    rules = [
        {"trigger": trigger, "name": "sleep", "action": {"name": "submit", "label": "a", "repetitions": 100}}
        for trigger in triggers
    ]
    jobs = [JobSpec(name="a", command="true", count=3), JobSpec(name="b", command="true", count=2)]
    member = rules_member(rules, jobs)
    groups = {
        "a": GroupStats(submitted=3, started=2, finished=1, succeeded=1),
        "b": GroupStats(submitted=2, started=0, finished=2, failed=2, cancelled=2),
    }
    [first] = run_rules(member, [make_metrics(0, size=1, groups=groups)])
    fired = [reason.split("(")[1].split(")")[0] for reason in first]
    assert fired == (["job-depend of any job"] * 5 + ["job-sched of any job"] * 5 + ["job-run of any job"] * 2
                     + ["job-cancel of any job"] * 2 + ["job-cleanup of any job"] * 3)  # fmt: skip


# -- 4. semantics --------------------------------------------------------------------------------------------


def test_a_bare_number_is_equality_and_an_omitted_when_is_always_true() -> None:
    jobs = [JobSpec(name="sleep", command="sleep 10", count=5), JobSpec(name="echo", command="echo", count=5)]
    equal = rules_member([{"trigger": "metric", "name": "count.sleep.success", "when": 3, "action": {
        "name": "grow", "repetitions": 5}}], jobs)  # fmt: skip
    counts = [2, 3, 4, 3]
    snapshots = [make_metrics(i, groups={"sleep": GroupStats(finished=n, succeeded=n)}) for i, n in enumerate(counts)]
    assert [len(d) for d in run_rules(equal, snapshots)] == [0, 1, 0, 1]  # ours without compat: 0, 1, 1, 1
    # two ends within one coalesced snapshot (2 -> 4) still passed 3, as the successor saw on the event of the 3rd
    assert [len(d) for d in run_rules(equal, [snapshots[0], snapshots[2]])] == [0, 1]
    always = rules_member([{"trigger": "metric", "name": "count.sleep.success", "action": {
        "name": "grow", "repetitions": 2}}], jobs)  # fmt: skip
    assert [len(d) for d in run_rules(always, snapshots[:3])] == [1, 1, 0]


def test_backoff_counts_trigger_occurrences_as_in_the_successors_backoff_example() -> None:
    # backoff-example.yaml, rule 3: repetitions 3, backoff 2 on job-finish — performed on the 1st, 4th and 7th
    document = yaml.safe_load((DATA / "backoff-example.yaml").read_text())
    jobs = [JobSpec(name=j["name"], command=j["command"], count=j["count"]) for j in document["jobs"]]
    member = rules_member([document["rules"][2]], jobs)
    snapshots = [
        make_metrics(i, groups={"sleep": GroupStats(finished=i, succeeded=i)}) for i in range(1, 10)
    ]  # one finish per snapshot
    assert [len(d) for d in run_rules(member, snapshots)] == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    # nine finishes in one snapshot are nine occurrences: the same three performances at once
    assert [len(d) for d in run_rules(member, [snapshots[-1]])] == [3]


def test_repetitions_0_label_and_value_on_submit_are_accepted_and_custom_is_refused() -> None:
    jobs = [JobSpec(name="echo", command="echo", count=2), JobSpec(name="sleep", command="sleep 1", count=1)]
    member = rules_member(
        [
            {"trigger": "start", "action": {"name": "submit", "label": "echo", "value": 7}},
            {"trigger": "start", "action": {"name": "submit", "label": "sleep", "repetitions": 0}},
            {"trigger": "start", "action": {"name": "submit"}},  # no label: every group
        ],
        jobs,
    )
    [first] = run_rules(member, [make_metrics(0)])
    assert first == ["submit rule 1 (start): submit group echo (2 jobs)",
                     "submit rule 3 (start): submit every group (3 jobs)"]  # fmt: skip
    custom = [{"trigger": "start", "action": {"name": "custom", "label": "echo_again"}}]
    [problem] = validate_rules("rules", custom, options=COMPAT)
    assert problem.startswith("rules[0].action.name: custom actions are refused: they run the file's Python code "
                              "inside the decider")  # fmt: skip
    # without compat the same fields stay errors that name the fix
    assert validate_rules("rules", [{"trigger": "start", "action": {"name": "submit", "label": "echo"}}]) == [
        "rules[0].action.label: unknown field; did you mean group? (valid: name, group, value, repetitions, backoff)",
        "rules[0].action.group: required; submit needs the job group (a name from the member's jobs)",
    ]


# -- 5. the file format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hello-world", "backoff-example", "grow-shrink-example", "terminate-example"])
def test_the_successors_example_files_load_unchanged_with_a_note_for_every_field(name: str) -> None:
    ensemble = spec.load(DATA / f"{name}.yaml")
    [member] = ensemble.members
    assert member.algorithm.name == "rules" and member.algorithm.options["compat"] == "ensemble-python"
    document = yaml.safe_load((DATA / f"{name}.yaml").read_text())
    assert [job.name for job in member.jobs] == [job["name"] for job in document["jobs"]]
    assert member.algorithm.rules == document["rules"]
    heartbeat = document.get("logging", {}).get("heartbeat")
    assert ensemble.check_seconds == (heartbeat or 10)
    notes = spec.warnings(ensemble)
    assert notes[-1].startswith("ensemble-python file: converted into one member with algorithm rules")
    for index, rule in enumerate(document["rules"]):
        if "label" in rule["action"]:
            assert f"ensemble-python file: rules[{index}].action.label: read as the job group" in notes


def test_a_converted_file_with_a_custom_action_is_refused_naming_the_rule_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump({
        "jobs": [{"name": "echo", "command": "echo hi"}],
        "custom": "def echo_again(**kwargs):\n    return None\n",
        "rules": [{"trigger": "start", "action": {"name": "custom", "label": "echo_again"}}],
    }))  # fmt: skip
    with pytest.raises(spec.SpecError) as raised:
        spec.load(path)
    errors = raised.value.errors
    assert any(e.startswith("ensemble-python file: custom: refused") for e in errors)
    assert any(
        e.startswith("spec.members[0].algorithm.rules[0].action.name: custom actions are refused") for e in errors
    )
    assert compat.is_ensemble_python({"jobs": [], "rules": []}) and not compat.is_ensemble_python({"kind": "x"})


def _up(args: list[str], tmp_path: Path, flux: bool) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ensemble_cli", "up", str(DATA / "quick.yaml"), "--quiet", "--timeout", "90",
               "--logs", str(tmp_path / "logs"), *args]  # fmt: skip
    if flux:
        assert FLUX is not None
        command = [FLUX, "start", "--test-size=2", *command]
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=150, env=env)


def _check_quick_run(done: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ensemble-python file: rules[1].when: 2 means equal to it" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    cells = [cell.strip() for cell in rows[-1].strip("│").split("│")]
    assert cells[:6] == ["0", "5", "5", "0", "0", "0"], done.stdout  # member, jobs, succeeded, failed, lost, open
    with (tmp_path / "logs" / "results" / "jobs.csv").open() as table:
        attempts = list(csv.DictReader(table))
    # echo went in when exactly two sleep jobs had succeeded; the terminate came on the event of the last echo
    assert sorted(row["command"] for row in attempts) == ["echo hello world"] * 2 + ["sleep 0.5"] * 3


def test_ensemble_up_runs_an_ensemble_python_file_to_completion_on_the_local_backend(tmp_path: Path) -> None:
    _check_quick_run(_up([], tmp_path, flux=False), tmp_path)


@NEEDS_FLUX
def test_ensemble_up_runs_an_ensemble_python_file_to_completion_on_flux(tmp_path: Path) -> None:
    _check_quick_run(_up(["--backend", "flux"], tmp_path, flux=True), tmp_path)


def test_a_digit_int_does_not_read_is_an_error_naming_the_field_not_a_crash() -> None:
    # str.isdigit() takes '²', int() does not (found by test_bad_input's hypothesis run)
    problems = validate_rules("rules", [{"trigger": "start", "action": {"name": "grow", "value": "²"}}], options=COMPAT)
    assert problems == ["rules[0].action.value: expected an integer between 1 and 1000000, got '²'"]
    _, errors = spec.validate({"apiVersion": spec.API_VERSION, "kind": spec.KIND, "metadata": {"name": "x"},
                               "spec": {"checkSeconds": "²", "members": []}})  # fmt: skip
    assert any(error.startswith("spec.checkSeconds: expected an integer") for error in errors), errors


async def test_the_check_after_an_event_snapshot_is_stored_not_refused_as_out_of_sequence(
    nc: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # each metrics publish expects the member's last stored message: an event snapshot is one, so the check
    # after it must expect it (the check was refused and dropped after every event, and events waited a check)
    backend = CountingBackend()
    sidecar = await serve(backend, token=ensemble_token(settings.sidecar_token, "default", "seq"), heartbeat=60)
    member = MemberSpec(
        namespace="default", ensemble="seq", member=0, name="seq-0", size=1, min_size=1, max_size=1,
        endpoint=f"127.0.0.1:{sidecar.port}", algorithm=AlgorithmSpec(name="rules", rules=[
            {"trigger": "job-finish", "action": {"name": "terminate"}}]),
        jobs=[JobSpec(name="j", command="sleep 0.2")], check_seconds=1,
    )  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="poller"):
            async with stored(nc) as found, service_running(run_poller, settings):
                await register(nc, member)
                await wait_for(lambda: len(found.of(0)) >= 1)
                token = ensemble_token(settings.sidecar_token, "default", "seq")
                async with SidecarClient(member.endpoint, token) as c:
                    await c.action("submit", SubmitPayload(jobs=member.jobs), SubmitResult)
                await wait_for(lambda: any(m.event > 0 for m in found.of(0)), timeout=5)
                after = max(m.seq for m in found.of(0))
                await wait_for(lambda: any(m.event == 0 and m.seq >= after + 2 for m in found.of(0)), timeout=6)
        checks = [m.seq for m in found.of(0) if m.event == 0]
        assert checks == list(range(len(checks)))
        assert not [r.message for r in caplog.records if "publish failed" in r.getMessage()]
    finally:
        await sidecar.stop()
