"""The sidecar's gRPC server with the local backend: real server, real job subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.wire import MAX_SUBMIT_JOBS
from sidecar.server import RunningServer, serve_local

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def sidecar(**options: Any) -> AsyncIterator[tuple[RunningServer, Any]]:
    """A sidecar on a free port (2 nodes, at most 4, the test token unless overridden) and a stub.

    Not a fixture: servers and channels must live on the test's own event loop.
    """
    running = await serve_local(**{"nodes": 2, "max_nodes": 4, "token": TOKEN, **options})
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.EnsembleOperatorStub(channel)
    finally:
        await running.stop(grace=0.1)


async def act(stub: Any, action: str, payload: object = None, raw: str | None = None) -> tuple[int, Any]:
    text = raw if raw is not None else ("" if payload is None else json.dumps(payload))
    reply = await stub.RequestAction(pb.ActionRequest(action=action, payload=text), metadata=AUTH, timeout=5)
    return reply.status, json.loads(reply.payload)


async def status(stub: Any) -> dict[str, Any]:
    reply = await stub.RequestStatus(pb.StatusRequest(), metadata=AUTH, timeout=5)
    assert reply.status == pb.Response.SUCCESS
    result: dict[str, Any] = json.loads(reply.payload)
    return result


async def eventually(check: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Poll an async ``check`` until it returns something truthy."""
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def job(name: str, command: str, **fields: int | str) -> dict[str, object]:
    return {"name": name, "command": command, **fields}


async def test_real_jobs_succeed_fail_time_out_or_do_not_exist(tmp_path: Path) -> None:
    jobs = [
        job("ok", "true"),
        job("exit3", "sh -c 'echo out; echo err >&2; exit 3'"),
        job("slow", "sleep 5", duration=1),
        job("missing", "no-such-command-xyz"),
        job("here", "pwd", workdir=str(tmp_path)),
    ]
    async with sidecar() as (_, stub):
        code, result = await act(stub, "submit", {"jobs": jobs})
        assert result.pop("instance")
        assert (code, result) == (pb.Response.SUCCESS, {"submitted": 5, "duplicate": False})

        async def all_done() -> list[dict[str, Any]] | None:
            _, infos = await act(stub, "jobinfo")
            return infos if all(info["state"] == "inactive" for info in infos) else None

        infos = {info["group"]: info for info in await eventually(all_done)}
        code, one = await act(stub, "jobinfo", {"id": 2})
        snapshot = await status(stub)
    assert (infos["ok"]["returncode"], infos["ok"]["success"]) == (0, True)
    assert (infos["exit3"]["returncode"], infos["exit3"]["success"]) == (3, False)
    assert "out\n" in infos["exit3"]["output"] and "err\n" in infos["exit3"]["output"]
    assert infos["slow"]["success"] is False and "duration" in infos["slow"]["output"]
    assert 0.9 < infos["slow"]["t_inactive"] - infos["slow"]["t_run"] < 3
    assert (infos["missing"]["returncode"], infos["missing"]["success"]) == (127, False)
    assert infos["here"]["output"].strip() == str(tmp_path)
    assert (code, one["group"]) == (pb.Response.SUCCESS, "exit3")
    assert (snapshot["finished"], snapshot["failed"]) == (5, 3)
    assert snapshot["nodes"]["node_free_count"] == 2


async def test_a_command_with_shell_syntax_runs_through_sh_and_a_plain_one_without(tmp_path: Path) -> None:
    jobs = [
        job("redirect", "echo one > out.txt && echo two >> out.txt; echo job $FLUX_JOB_ID", workdir=str(tmp_path)),
        job("glob", "ls *.txt | wc -l", workdir=str(tmp_path)),
        job("plain", "echo '$HOME && > not.txt'", workdir=str(tmp_path)),
    ]
    async with sidecar() as (_, stub):
        await act(stub, "submit", {"jobs": jobs[:1]})

        async def done(count: int) -> list[dict[str, Any]] | None:
            _, infos = await act(stub, "jobinfo")
            return infos if len(infos) == count and all(i["state"] == "inactive" for i in infos) else None

        await eventually(lambda: done(1))
        await act(stub, "submit", {"jobs": jobs[1:]})
        infos = {info["group"]: info for info in await eventually(lambda: done(3))}
    assert (tmp_path / "out.txt").read_text() == "one\ntwo\n"
    assert infos["redirect"]["output"] == f"job {infos['redirect']['id']}\n" and infos["redirect"]["success"]
    assert infos["redirect"]["command"] == jobs[0]["command"]  # as given, not as run
    assert infos["glob"]["output"].strip() == "1"
    # no shell: the words are passed as they are, nothing expanded or redirected
    assert infos["plain"]["output"] == "$HOME && > not.txt\n" and not (tmp_path / "not.txt").exists()


async def test_a_command_with_a_quote_left_open_is_refused_naming_the_job() -> None:
    async with sidecar() as (_, stub):
        code, result = await act(stub, "submit", {"jobs": [job("ok", "true"), job("open", "echo 'oops && ls")]})
    assert code == pb.Response.ERROR
    assert result["error"].startswith("jobs[1].command: cannot be split into arguments: a ' quote is never closed")


async def finished(stub: Any, count: int, seconds: float = 10.0) -> dict[str, dict[str, Any]]:
    """The job records by group once ``count`` jobs are inactive (all of them, else the test fails)."""

    async def done() -> list[dict[str, Any]] | None:
        _, infos = await act(stub, "jobinfo")
        return infos if len(infos) == count and all(i["state"] == "inactive" for i in infos) else None

    infos = await eventually(done, seconds)
    assert infos, "the jobs did not finish"
    return {info["group"]: info for info in infos}


async def test_a_job_runs_its_tasks_as_processes_with_fluxs_task_variables() -> None:
    variables = "$FLUX_TASK_RANK $FLUX_TASK_LOCAL_ID $FLUX_JOB_SIZE $FLUX_JOB_NNODES"
    show = f"sh -c 'sleep 0.$((3 - FLUX_TASK_RANK)); echo {variables}'"
    jobs = [
        job("three-on-two", show, nodes=2, tasks=3),
        job("one-per-node", show, nodes=2),  # tasks 0: one per node, as flux run -N2 runs it
        job("worst", "sh -c 'exit $FLUX_TASK_RANK'", tasks=4),
        job("one-fails", "sh -c 'test $FLUX_TASK_RANK != 1'", tasks=3),
        job("all-succeed", "true", tasks=5),
    ]
    async with sidecar(nodes=4, max_nodes=4) as (_, stub):
        await act(stub, "submit", {"jobs": jobs})
        infos = await finished(stub, len(jobs))
    # the last task finishes first, yet the output is in task order; ranks go node after node, the first
    # node taking the extra task (Flux's job shell places three tasks on two nodes 2 + 1)
    assert infos["three-on-two"]["output"] == "0 0 3 2\n1 1 3 2\n2 0 3 2\n" and infos["three-on-two"]["success"]
    assert infos["one-per-node"]["output"] == "0 0 2 2\n1 0 2 2\n"
    assert (infos["worst"]["returncode"], infos["worst"]["success"]) == (3, False)  # the largest
    assert (infos["one-fails"]["returncode"], infos["one-fails"]["success"]) == (1, False)
    assert (infos["all-succeed"]["returncode"], infos["all-succeed"]["success"]) == (0, True)


async def test_every_task_is_killed_at_the_jobs_duration_and_on_cancel(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    record = f"sh -c 'echo $$ >> {pids}; exec sleep 60'"
    async with sidecar(nodes=2, max_nodes=2) as (_, stub):
        await act(stub, "submit", {"jobs": [job("timed", record, tasks=3, duration=1)]})
        timed = (await finished(stub, 1))["timed"]
        assert timed["success"] is False and "duration" in timed["output"]
        assert len(pids.read_text().split()) == 3 and not any(_alive(int(pid)) for pid in pids.read_text().split())
        pids.unlink()
        await act(stub, "submit", {"jobs": [job("cancelled", record, nodes=2, tasks=4)]})

        async def four_running() -> bool:
            return pids.exists() and len(pids.read_text().split()) == 4

        assert await eventually(four_running)
        code, result = await act(stub, "cancel", {"group": "cancelled"})
        assert (code, result) == (pb.Response.SUCCESS, {"cancelled": 1})
        cancelled = (await finished(stub, 2))["cancelled"]
    assert cancelled["success"] is False and "cancelled" in cancelled["output"]
    assert not any(_alive(int(pid)) for pid in pids.read_text().split())


async def test_more_tasks_than_the_local_backend_runs_is_refused_naming_the_field() -> None:
    async with sidecar() as (_, stub):
        code, result = await act(stub, "submit", {"jobs": [job("ok", "true"), job("huge", "true", tasks=10_000)]})
        _, infos = await act(stub, "jobinfo")
    assert code == pb.Response.ERROR and infos == []
    assert result["error"] == (
        "jobs[1].tasks: 10000 exceeds the local backend's limit of 1024 processes per job; lower tasks, "
        "or run the ensemble on Flux"
    )


async def test_token_is_required_and_checked() -> None:
    async with sidecar() as (running, stub):
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            with pytest.raises(aio.AioRpcError) as unary:
                await stub.RequestStatus(pb.StatusRequest(), metadata=metadata, timeout=5)
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(aio.AioRpcError) as stream:
                async for _ in stub.WatchStatus(pb.StatusRequest(), metadata=metadata, timeout=5):
                    pass
            assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "nodes" in await status(stub)
        async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_retried_submit_with_the_same_key_queues_once() -> None:
    payload = {"jobs": [job("g", "sleep 10", count=3)], "key": "decision-42"}
    async with sidecar() as (_, stub):
        await act(stub, "submit", payload)  # the reply is "lost": the client never reads it
        code, retry = await act(stub, "submit", payload)
        snapshot = await status(stub)
    assert retry.pop("instance")
    assert (code, retry) == (pb.Response.SUCCESS, {"submitted": 3, "duplicate": True})
    assert snapshot["groups"]["g"]["submitted"] == 3
    assert snapshot["counts"] == {"waiting": 1, "running": 2}
    assert snapshot["nextJobs"] == [1]


async def test_watch_status_pushes_a_change_promptly() -> None:
    async with sidecar() as (_, stub):
        stream = stub.WatchStatus(pb.StatusRequest(), metadata=AUTH)
        first = json.loads((await asyncio.wait_for(stream.read(), 2)).payload)
        assert first["queue"]["sched"] == 0 and first["queue"]["inactive"] == 0
        await act(stub, "submit", {"jobs": [job("g", "true")]})
        seen = first
        deadline = time.monotonic() + 2  # far below the 5 s heartbeat: this is a pushed change
        while seen["queue"]["inactive"] == 0:
            seen = json.loads((await asyncio.wait_for(stream.read(), deadline - time.monotonic())).payload)
        assert seen["groups"]["g"]["succeeded"] == 1
        stream.cancel()


async def test_watch_status_heartbeat_and_clean_cancel() -> None:
    async with sidecar(heartbeat=0.2, token=None) as (running, stub):
        stream = stub.WatchStatus(pb.StatusRequest())
        started = time.monotonic()
        for _ in range(3):  # the first snapshot, then two heartbeats without any change
            await asyncio.wait_for(stream.read(), 2)
        assert 0.3 < time.monotonic() - started < 2
        stream.cancel()

        async def unsubscribed() -> bool:
            return not running.backend._listeners  # type: ignore[attr-defined]

        assert await eventually(unsubscribed)


@pytest.mark.parametrize(
    ("action", "payload", "field"),
    [
        ("submit", "{not json", "payload: not valid JSON"),
        ("submit", "", "payload: submit needs"),
        ("explode", "{}", "action: unknown action 'explode'"),
        ("submit", json.dumps({"jobs": [job("g", "true", nodes=5)]}), "jobs[0].nodes"),
        ("submit", json.dumps({"jobs": [job("g", "true", count=-1)]}), "$.jobs[0].count"),
        ("submit", json.dumps({"jobs": [job("g", "")]}), "jobs[0].command"),
        ("submit", json.dumps({"jobs": [job("g", "sh -c 'oops")]}), "jobs[0].command"),
        ("submit", json.dumps({"jobs": [job("g", "true", count=MAX_SUBMIT_JOBS + 1)]}), "jobs:"),
        ("submit", json.dumps({"jobs": [], "order": "sideways"}), "$.order"),
        ("grow", json.dumps({"size": 1}), "size: grow to 1 is below the current size 2"),
        ("grow", json.dumps({"size": 9}), "size: 9 is outside 0..4"),
        ("shrink", json.dumps({"size": 3}), "size: shrink to 3 is above the current size 2"),
        ("shrink", json.dumps({"size": -1}), "$.size"),
        ("grow", json.dumps({"nodes": 3}), "unknown field `nodes`"),
        ("grow", "{}", "missing required field `size`"),
        ("jobinfo", json.dumps({"id": 999}), "id: no job with id 999"),
        ("cancel", "{}", "group"),
    ],
)
async def test_bad_input_is_an_error_naming_the_field(action: str, payload: str, field: str) -> None:
    async with sidecar() as (_, stub):
        code, reply = await act(stub, action, raw=payload)
        snapshot = await status(stub)  # still serving
    assert code == pb.Response.ERROR
    assert field in reply["error"]
    assert snapshot["queue"]["sched"] + snapshot["queue"]["run"] == 0  # nothing queued


async def test_grow_with_provisioning_delay_then_shrink_cancel_and_terminate() -> None:
    async with sidecar(nodes=1, max_nodes=3, provision_delay=0.3) as (_, stub):
        assert await act(stub, "grow", {"size": 3}) == (pb.Response.SUCCESS, {"size": 3, "nodes_up": 1})
        assert await act(stub, "grow", {"size": 3}) == (pb.Response.SUCCESS, {"size": 3, "nodes_up": 1})

        async def up() -> bool:
            return bool((await status(stub))["nodes"]["node_up_count"] == 3)

        assert await eventually(up, 2)
        assert await act(stub, "shrink", {"size": 2}) == (pb.Response.SUCCESS, {"size": 2, "nodes_up": 2})
        await act(stub, "submit", {"jobs": [job("a", "sleep 10", count=3)]})
        # two running and one waiting: all three are cancelled, the running ones killed
        assert await act(stub, "cancel", {"group": "a"}) == (pb.Response.SUCCESS, {"cancelled": 3})

        async def ended() -> bool:
            snapshot = await status(stub)
            return bool(snapshot["counts"]["running"] == 0 and snapshot["failed"] == 3)

        assert await eventually(ended, 3)
        _, cancelled = await act(stub, "jobinfo", {"id": 1})
        assert cancelled["success"] is False and "cancelled" in cancelled["output"]
        await act(stub, "submit", {"jobs": [job("c", "sleep 10", count=2)]})
        assert await act(stub, "resetCounter") == (pb.Response.SUCCESS, {})
        update = await stub.RequestUpdate(pb.UpdateRequest(payload='{"anything": 1}'), metadata=AUTH)
        assert (update.status, update.payload) == (pb.Response.SUCCESS, "{}")
        assert await act(stub, "terminate") == (pb.Response.SUCCESS, {"size": 0, "nodes_up": 2})
        snapshot = await status(stub)
        assert (snapshot["terminated"], snapshot["size"], snapshot["counts"]["running"]) == (True, 0, 2)
        code, refused = await act(stub, "submit", {"jobs": [job("b", "true")]})
        assert code == pb.Response.DENIED and "terminated" in refused["error"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds child processes through /proc")
async def test_command_line_prints_port_serves_and_stops_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENSEMBLE_SIDECAR_TOKEN": TOKEN}
    proc = subprocess.Popen(  # noqa: ASYNC220  # a plain Popen: the test reads its pipes from a thread
        [sys.executable, "-m", "sidecar", "--backend", "local", "--port", "0", "--nodes", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10))
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EnsembleOperatorStub(channel)
            code, _ = await act(stub, "submit", {"jobs": [job("g", "sh -c 'sleep 30; true'", count=2)]})
            assert code == pb.Response.SUCCESS

            async def two_running() -> bool:
                return bool((await status(stub))["counts"]["running"] == 2)

            assert await eventually(two_running)
        children = set(_children(proc.pid))
        # the two jobs, and the reaper that kills them should the sidecar be killed (sidecar/reaper.py)
        reaper = {pid for pid in children if "sidecar.reaper" in Path(f"/proc/{pid}/cmdline").read_text()}
        jobs = children - reaper
        assert len(jobs) == 2 and len(reaper) == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert not [pid for pid in jobs | reaper if _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert TOKEN not in stderr
