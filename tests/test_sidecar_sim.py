"""The ``sim`` backend: the queue on a virtual clock, run times from durations or a trace of Flux jobs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from ensemble_core.messages import JobSpec
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.wire import SubmitPayload
from sidecar.backend import Listeners
from sidecar.queue import QueueError, QueueTerminated
from sidecar.server import serve
from sidecar.sim import SimBackend, SimQueue, Trace, TraceError, load_trace, parse_trace

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

RUNS = SHARED / "data" / "seed-gke"
RANDOM_RUN = RUNS / "run5-random" / "jobs.jsonl"


def jobs(name: str, count: int = 1, nodes: int = 1, duration: int = 0) -> JobSpec:
    return JobSpec(name=name, command="true", count=count, nodes=nodes, duration=duration)


def submit(sim: SimQueue, *specs: JobSpec, **options: Any) -> int:
    return sim.submit(SubmitPayload(jobs=list(specs), **options)).submitted


def ends(sim: SimQueue) -> list[tuple[str, float, float]]:
    """(group, start, end) of every job, in id order."""
    return [
        (info.group, -1.0 if info.t_run is None else info.t_run, -1.0 if info.t_inactive is None else info.t_inactive)
        for info in sim.recent_jobs(10**6)
    ]


def test_jobs_run_for_their_duration_fcfs_on_the_virtual_clock() -> None:
    sim = SimQueue(nodes=2, start=100.0)
    submit(sim, jobs("long", nodes=2, duration=10), jobs("short", count=2, duration=3))
    assert sim.next_event_time() == 110.0
    assert sim.advance(105.0) == 0
    assert sim.status().counts == {"waiting": 2, "running": 1}
    assert sim.advance(110.0) == 1  # the long job ends; both short jobs start at once
    assert sim.status().counts == {"waiting": 0, "running": 2}
    assert sim.run_until_idle() == 113.0
    assert ends(sim) == [("long", 100.0, 110.0), ("short", 110.0, 113.0), ("short", 110.0, 113.0)]
    status = sim.status()
    assert (status.finished, status.failed, status.time) == (3, 0, 113.0)
    assert status.groups["short"].wait_mean == 10.0
    assert sim.next_event_time() is None


def test_time_only_moves_forward_and_jobs_need_a_run_time() -> None:
    sim = SimQueue(nodes=1, start=5.0)
    with pytest.raises(QueueError, match=r"to: 4\.0 is before the virtual clock"):
        sim.advance(4.0)
    with pytest.raises(QueueError, match=r"jobs\[1\]\.duration: the sim backend runs a job for its duration"):
        submit(sim, jobs("a", duration=1), jobs("b"))
    assert sim.status().queue.sched == 0  # all or nothing
    fallback = SimQueue(nodes=1, default_duration=2.5)
    submit(fallback, jobs("b"))
    assert fallback.run_until_idle() == 2.5


def test_a_trace_replays_its_own_jobs_in_trace_order() -> None:
    records = load_trace(RANDOM_RUN)
    trace = Trace(records)
    sim = SimQueue(nodes=24, max_nodes=24, trace=trace)
    assert submit(sim, *trace.job_specs()) == 12
    assert sim.status().counts == {"waiting": 7, "running": 5}  # 60 node-widths on 24 nodes
    sim.run_until_idle()
    run_times = [end - start for _, start, end in ends(sim)]
    assert run_times == pytest.approx([record.run_time for record in records])
    assert [info.nodes for info in sim.recent_jobs(12)] == [record.nodes for record in records]
    assert sim.status().finished == 12


def test_groups_named_otherwise_take_records_of_their_width_and_the_seed_draws_the_rest() -> None:
    records = load_trace(RANDOM_RUN)  # all named "lmp"; three of each width 2, 4, 6, 8
    widths = {2: [r.run_time for r in records if r.nodes == 2], 8: [r.run_time for r in records if r.nodes == 8]}

    def run(seed: int) -> list[float]:
        sim = SimQueue(nodes=8, trace=records, seed=seed)
        submit(sim, jobs("lammps-2", count=5, nodes=2), jobs("lammps-8", count=2, nodes=8))
        sim.run_until_idle()
        return [end - start for _, start, end in ends(sim)]

    first = run(seed=1)
    assert first[:3] == pytest.approx(widths[2])  # the three recorded 2-node jobs, in trace order
    assert all(any(t == pytest.approx(w) for w in widths[2]) for t in first[3:5])  # then drawn among them
    assert first[5:] == pytest.approx(widths[8][:2])
    assert run(seed=1) == first  # deterministic for a seed
    assert any(run(seed) != first for seed in range(2, 8))


def test_a_width_missing_from_the_trace_draws_from_every_record_and_failures_carry_over() -> None:
    lines = [
        {"name": "a", "nnodes": 1, "t_run": 10.0, "t_inactive": 14.0, "success": False},
        {"name": "a", "nnodes": 2, "t_run": 10.0, "t_inactive": 30.0, "success": True},
    ]
    trace = parse_trace("\n".join(json.dumps(line) for line in lines))
    sim = SimQueue(nodes=4, trace=trace)
    submit(sim, jobs("a"), jobs("wide", nodes=3), jobs("limited", nodes=2, duration=5))
    sim.run_until_idle()
    infos = sim.recent_jobs(3)
    assert (infos[0].success, infos[0].returncode, infos[0].t_inactive) == (False, 1, 4.0)
    assert infos[1].t_inactive is not None and infos[1].t_inactive - (infos[1].t_run or 0) in (4.0, 20.0)
    # A recorded 20 s job with a 5 s limit is cut at its limit and fails, as Flux would kill it.
    assert (infos[2].success, infos[2].returncode) == (False, -9)
    assert "duration of 5 s" in infos[2].output


def test_trace_formats_and_errors_name_the_record_and_field(tmp_path: Path) -> None:
    lines = RANDOM_RUN.read_text().splitlines()
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"jobs": [json.loads(line) for line in lines] + [{"nnodes": 1, "t_run": 0}]}))
    assert load_trace(dump) == load_trace(RANDOM_RUN)  # the never-run record is skipped
    bad = [
        ('{"nnodes": 2, "t_run": 5, "t_inactive": 4}', "line 1: t_inactive: must be a time at or after t_run"),
        ('{"nnodes": 0, "t_run": 5, "t_inactive": 6}', "line 1: nnodes: must be a whole number >= 1"),
        ('{"nnodes": 1, "t_run": "x", "t_inactive": 6}', "line 1: t_run: must be a number"),
        ('{"nnodes": 1, "t_run": 5, "t_inactive": 6, "success": 1}', "line 1: success: must be true or false"),
        (lines[0] + "\n{oops", "line 2: not valid JSON"),
        ('{"jobs": 3}', "jobs: must be a list"),
        ("[1, 2]", "line 1: must be a JSON object"),
        ('{"nnodes": 1}', "no job that ran"),
    ]
    for text, message in bad:
        with pytest.raises(TraceError, match=message):
            parse_trace(text, "t.jsonl")
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "missing.jsonl")


def test_provisioning_delays_are_drawn_per_node_with_the_seed_and_terminate_drops_them() -> None:
    def grown(seed: int) -> list[float]:
        sim = SimQueue(nodes=1, max_nodes=6, provision_delay=[30.0, 90.0, 150.0], seed=seed)
        sim.grow(6)
        times = []
        while (at := sim.next_event_time()) is not None:
            sim.advance(at)
            times.append((at, sim.status().nodes.node_up_count))
        return times

    first = grown(seed=3)
    assert {at for at, _ in first} <= {30.0, 90.0, 150.0} and first[-1][1] == 6
    assert grown(seed=3) == first
    assert any(grown(seed) != first for seed in range(4, 10))

    sim = SimQueue(nodes=1, max_nodes=3, provision_delay=60.0)
    submit(sim, jobs("wide", nodes=3, duration=10))
    assert sim.grow(3).nodes_up == 1
    sim.advance(59.0)
    assert sim.status().counts["running"] == 0
    sim.advance(60.0)
    assert sim.status().counts["running"] == 1
    sim.shrink(1)  # busy nodes drain: the running job keeps them
    assert sim.status().nodes.node_up_count == 3
    sim.run_until_idle()
    assert sim.status().nodes.node_up_count == 1
    sim.grow(3)
    assert sim.terminate().size == 0
    assert sim.next_event_time() is None
    with pytest.raises(QueueTerminated):
        submit(sim, jobs("late", duration=1))


def test_retried_submit_random_order_and_cancel_are_those_of_the_queue_model() -> None:
    sim = SimQueue(nodes=1)
    spec = [jobs("a", count=3, duration=1), jobs("b", count=3, duration=2)]
    first = sim.submit(SubmitPayload(jobs=spec, order="random", seed=7, key="k"))
    again = sim.submit(SubmitPayload(jobs=spec, order="random", seed=7, key="k"))
    assert (first.submitted, again.duplicate, sim.status().groups["a"].submitted) == (6, True, 3)
    other = SimQueue(nodes=1)
    other.submit(SubmitPayload(jobs=spec, order="random", seed=7))
    assert [i.group for i in sim.recent_jobs(6)] == [i.group for i in other.recent_jobs(6)]
    plain = SimQueue(nodes=1)
    submit(plain, *spec)
    assert plain.cancel("b") == 3  # b's jobs all wait behind a's
    assert plain.run_until_idle() == 3.0
    assert (plain.status().finished, plain.status().failed) == (6, 3)


def test_bad_settings_are_refused_naming_them() -> None:
    with pytest.raises(QueueError, match="provision_delay: the list of delays is empty"):
        SimQueue(provision_delay=[])
    with pytest.raises(QueueError, match="provision_delay: every delay must be a finite number >= 0"):
        SimQueue(provision_delay=[1.0, -2.0])
    with pytest.raises(QueueError, match="default_duration"):
        SimQueue(default_duration=float("nan"))
    with pytest.raises(QueueError, match="speed: must be a finite number > 0"):
        SimBackend(SimQueue(), speed=0)


def test_ten_thousand_jobs_on_a_hundred_nodes_take_well_under_a_second() -> None:
    sim = SimQueue(nodes=1, max_nodes=100)
    started = time.perf_counter()
    submit(sim, jobs("a", count=5_000, duration=5), jobs("b", count=5_000, nodes=2, duration=7))
    sim.grow(100)
    sim.run_until_idle()
    elapsed = time.perf_counter() - started
    assert sim.status().finished == 10_000
    assert elapsed < 2.0, f"10,000 simulated jobs took {elapsed:.2f} s"


async def test_behind_grpc_the_clock_follows_wall_time_times_speed_and_watchers_see_job_ends() -> None:
    sim = SimQueue(nodes=2, start=1000.0)
    running = await serve(SimBackend(sim, speed=50.0))
    try:
        async with SidecarClient(f"127.0.0.1:{running.port}") as client:
            await client.action("submit", {"jobs": [{"name": "g", "command": "x", "count": 4, "duration": 10}]}, dict)
            async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stream = pb_grpc.EnsembleOperatorStub(channel).WatchStatus(pb.StatusRequest())
                started = time.monotonic()
                finished = 0
                while finished < 4:  # 20 virtual seconds at speed 50: 0.4 s of wall time
                    finished = json.loads((await asyncio.wait_for(stream.read(), 3)).payload)["finished"]
                elapsed = time.monotonic() - started
                stream.cancel()
            status = await client.status()
    finally:
        await running.stop(grace=0.1)
    assert 0.3 < elapsed < 2.0
    assert status.time is not None and status.time >= 1020.0
    assert status.groups["g"].run_mean == pytest.approx(10.0)


def _sidecar(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ENSEMBLE_SIDECAR_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_command_line_runs_a_trace_fast_and_refuses_a_bad_trace_or_missing_flux(tmp_path: Path) -> None:
    proc = _sidecar("--backend", "sim", "--speed", "1000", "--trace", str(RANDOM_RUN), "--nodes", "8", "--seed", "2")
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10))
        async with SidecarClient(f"127.0.0.1:{port}") as client:
            spec = {"name": "lammps-2", "command": "lmp", "count": 3, "nodes": 2}
            await client.action("submit", {"jobs": [spec]}, dict)
            deadline = time.monotonic() + 5
            while (status := await client.status()).finished != 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert status.finished == 3 and status.failed == 0
        assert status.groups["lammps-2"].run_max < 9.0  # the recorded 2-node jobs ran 7.9 to 8.8 s
    finally:
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 10) == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nnodes": 2, "t_run": 5, "t_inactive": 1}\n')
    for args, code, message in [
        (("--backend", "sim", "--trace", str(bad)), 2, "bad.jsonl: line 1: t_inactive"),
        (("--backend", "sim", "--speed", "0"), 2, "--speed: must be a number > 0"),
        (("--backend", "local", "--provision-delay", "1,2"), 2, "a list is for --backend sim"),
        (("--backend", "flux", "--flux", "no-such-flux"), 1, "no flux command 'no-such-flux' found"),
    ]:
        proc = _sidecar(*args)
        _, stderr = await asyncio.to_thread(proc.communicate, None, 20)
        assert proc.returncode == code, stderr
        assert message in stderr
    assert "--flux" in stderr and "/mnt/flux/view/bin/flux" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cores", "0"), "argument --cores: must be an integer >= 1, got 0"),
        (("--nodes", "-1"), "argument --nodes: must be an integer >= 0, got -1"),
        (("--nodes", "4", "--max-nodes", "2"), "argument --max-nodes: must be >= --nodes (4), got 2"),
        (("--port", "70000"), "argument --port: must be an integer in 0..65535, got 70000"),
        (("--provision-delay", "-1"), "argument --provision-delay: must be a number of seconds >= 0"),
        (("--provision-delay", "nan"), "argument --provision-delay: must be a number of seconds >= 0"),
        (("--backend", "sim", "--provision-delay", "1,inf"), "argument --provision-delay: must be a number"),
        (("--heartbeat", "0"), "argument --heartbeat: must be a number of seconds > 0, got 0"),
        (("--heartbeat", "nan"), "argument --heartbeat: must be a number of seconds > 0, got nan"),
        (("--wait-for-broker", "nan"), "argument --wait-for-broker: must be a number of seconds >= 0 (inf: forever)"),
        (("--backend", "sim", "--speed", "inf"), "argument --speed: must be a number > 0, got inf"),
        (("--backend", "sim", "--default-duration", "-3"), "argument --default-duration: must be a number of seconds"),
        (("--serve-on-index", "-1"), "argument --serve-on-index: must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_numeric_flag_exits_2_naming_the_flag_and_its_range(args: tuple[str, ...], message: str) -> None:
    proc = _sidecar(*args)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2, stdout + stderr
    assert f"ensemble sidecar: error: {message}" in stderr and stderr.startswith("usage: ")
    assert stdout == ""  # never served


def test_a_listener_that_fails_does_not_stop_the_others_nor_the_queue(caplog: pytest.LogCaptureFixture) -> None:
    called: list[str] = []

    def broken() -> None:
        called.append("broken")
        raise RuntimeError("a watcher bug")

    listeners = Listeners()
    listeners.add_listener(broken)
    listeners.add_listener(lambda: called.append("next"))
    listeners._notify()
    assert called == ["broken", "next"] and "status listener failed" in caplog.text
    listeners.remove_listener(broken)
    listeners.remove_listener(broken)  # not there any more: no error
    listeners._notify()
    assert called == ["broken", "next", "next"]
