"""The ``flux`` backend on real Flux: instances started with ``flux start --test-size=N``, real sidecar
processes talking to them through the helper run by Flux's own Python, checked against Flux's own
commands (``flux jobs``, ``flux resource list``, ``flux job info``).

Skipped, saying so, where no ``flux`` is on PATH (a fresh CI machine); the recorded-payload tests in
test_sidecar_flux.py guard the translation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import csv
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ensemble_core import minicluster
from ensemble_core.matrix import MatrixRange
from ensemble_core.messages import JobSpec
from ensemble_core.sidecar_client import SidecarError, SidecarUnavailable
from ensemble_core.spec import validate
from ensemble_core.wire import JobInfo, ResizePayload, ResizeResult, StatusPayload, SubmitPayload, SubmitResult
from sidecar.flux_link import HELPER
from sidecar.server import SERVICE_NAME
from tests.conftest import REPO, wait_for
from tests.flux_support import (
    FLUX,
    NEEDS_FLUX,
    NOBODY,
    OPERATOR_ACCESS,
    TOKEN,
    FluxSidecar,
    flux_cli,
    flux_instance,
    flux_jobs,
    flux_sidecar,
    python_for,
    start_sidecar,
)

pytestmark = [NEEDS_FLUX, pytest.mark.timeout(180)]


async def submit(sidecar: FluxSidecar, *jobs: JobSpec, key: str = "") -> SubmitResult:
    return await sidecar.client.action("submit", SubmitPayload(jobs=list(jobs), key=key), SubmitResult)


async def status_when(sidecar: FluxSidecar, predicate: object, timeout: float = 30) -> StatusPayload:
    """The first status for which ``predicate(status)`` holds (fails the test after ``timeout``)."""
    found: list[StatusPayload] = []

    async def check() -> bool:
        try:
            status = await sidecar.client.status()
        except SidecarUnavailable:  # reconnecting to Flux: ask again
            return False
        if predicate(status):  # type: ignore[operator]
            found.append(status)
            return True
        return False

    await wait_for(check, timeout)
    return found[0]


def states(jobs: list[dict[str, object]]) -> Counter[str]:
    """``flux jobs`` state names (``RUN``, ``SCHED``, ``INACTIVE`` ...) counted."""
    return Counter(str(job["state"]) for job in jobs)


async def test_status_counts_and_free_nodes_agree_with_flux_and_jobs_carry_their_group(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 4) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        first = await sidecar.client.status()
        assert (first.size, first.nodes.node_up_count, first.nodes.node_free_count) == (4, 4, 4)
        # two one-node jobs run; the three-node job cannot (two nodes left): it waits
        await submit(
            sidecar,
            JobSpec(name="single", command="sleep 60", count=2),
            JobSpec(name="wide", command="sleep 60", nodes=3),
        )
        status = await status_when(sidecar, lambda s: s.queue.run == 2 and s.queue.sched == 1)
        jobs = await flux_jobs(uri)
        assert states(jobs) == Counter({"RUN": 2, "SCHED": 1})
        assert sorted(str(job["name"]) for job in jobs) == ["single", "single", "wide"]
        free = int((await flux_cli(uri, "resource", "list", "-s", "free", "-no", "{nnodes}")).strip() or 0)
        assert status.nodes.node_free_count == free == 2  # whole nodes: each job took one exclusively
        assert (status.waiting, status.next_jobs, status.nodes.node_up_count) == ({3: 1}, [3], 4)
        assert status.groups["single"].submitted == 2 and status.groups["wide"].submitted == 1


async def test_a_retried_submit_is_queued_once_in_flux_also_by_a_restarted_sidecar(tmp_path: Path) -> None:
    jobs = (JobSpec(name="a", command="sleep 60", count=4), JobSpec(name="b", command="true", count=3))
    async with flux_instance(tmp_path / "flux", 2) as uri:
        async with flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
            first = await submit(sidecar, *jobs, key="decision-1")
            assert (first.submitted, first.duplicate) == (7, False) and "/flux/" in first.instance
            retried = await submit(sidecar, *jobs, key="decision-1")
            assert (retried.submitted, retried.duplicate, retried.instance) == (7, True, first.instance)
            assert len(await flux_jobs(uri)) == 7
        # a new sidecar learns the keys (and the attempts) from the journal's replay; same instance, same name
        async with flux_sidecar(uri, tmp_path / "sidecar2.log") as again:
            retried = await submit(again, *jobs, key="decision-1")
            assert (retried.submitted, retried.duplicate, retried.instance) == (7, True, first.instance)
            # the same attempts under another key are not sent again either
            same = [msgspec.structs.replace(job, start=0) for job in jobs]
            resent = await submit(again, *same, key="decision-1b")
            assert (resent.submitted, resent.duplicate) == (7, True)
            more = await submit(again, *jobs, key="decision-2")
            assert (more.submitted, more.duplicate) == (7, False)
        assert len(await flux_jobs(uri)) == 14


async def test_jobinfo_answers_for_1500_jobs_with_their_flux_outcome(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 8) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        started = time.monotonic()
        await submit(sidecar, JobSpec(name="ok", command="true", count=1499), JobSpec(name="bad", command="false"))
        took = time.monotonic() - started
        status = await status_when(sidecar, lambda s: s.finished == 1500, timeout=150)
        assert status.failed == 1 and status.groups["bad"].failed == 1
        listed = await sidecar.client.action("jobinfo", {}, list[JobInfo])
        assert len(listed) == 1000  # the most recent (JOBINFO_LIMIT), oldest first
        assert all(job.state == "inactive" and job.t_inactive for job in listed)
        bad = next(job for job in listed if job.group == "bad")
        assert (bad.success, bad.returncode, bad.command) == (False, 1, "false")
        one = await sidecar.client.action("jobinfo", {"id": listed[0].id}, JobInfo)
        assert (one.group, one.success, one.returncode, one.nodes) == ("ok", True, 0, 1)
        flux_view = {int(job["id"]): job for job in await flux_jobs(uri)}
        assert len(flux_view) == 1500 and flux_view[bad.id]["returncode"] == 1
        with pytest.raises(SidecarError, match="id: no job with id 12345"):
            await sidecar.client.action("jobinfo", {"id": 12345}, JobInfo)
    print(f"submit of 1500 jobs: {took:.2f} s")


async def test_cancel_of_a_group_cancels_its_running_and_waiting_jobs_in_flux(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 3) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        await submit(
            sidecar, JobSpec(name="doomed", command="sleep 60", count=4), JobSpec(name="kept", command="sleep 60")
        )
        await status_when(sidecar, lambda s: s.queue.run == 3)
        assert await sidecar.client.action("cancel", {"group": "doomed"}, dict) == {"cancelled": 4}
        status = await status_when(sidecar, lambda s: s.groups["doomed"].finished == 4 and s.queue.run == 1)
        assert status.groups["doomed"].failed == 4 and status.groups["kept"].finished == 0
        by_name = Counter(
            (str(job["name"]), str(job["result"] if "result" in job else job["state"])) for job in await flux_jobs(uri)
        )
        assert by_name[("doomed", "CANCELED")] == 4
        assert await sidecar.client.action("cancel", {"group": "doomed"}, dict) == {"cancelled": 0}


async def test_jobs_get_the_sidecars_environment_without_its_secrets(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 1) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        await submit(sidecar, JobSpec(name="env", command="sh -c 'env > " + str(tmp_path / "env.txt") + "'"))
        await status_when(sidecar, lambda s: s.finished == 1)
        (job,) = await flux_jobs(uri)
        jobspec = json.loads(await flux_cli(uri, "job", "info", "--original", str(job["id"]), "jobspec"))
        environment = jobspec["attributes"]["system"]["environment"]
        assert "ENSEMBLE_SIDECAR_TOKEN" not in environment and TOKEN not in json.dumps(jobspec)
        assert environment["PATH"] == os.environ["PATH"]
        seen = (tmp_path / "env.txt").read_text()
        assert TOKEN not in seen and "PATH=" in seen
        # of the ENSEMBLE_ variables only the job's identity, none of the sidecar's
        ours = sorted(line.split("=", 1)[0] for line in seen.splitlines() if line.startswith("ENSEMBLE_"))
        assert ours == ["ENSEMBLE_JOB_ATTEMPT", "ENSEMBLE_JOB_GROUP", "ENSEMBLE_JOB_INDEX"], ours
        assert "ENSEMBLE_JOB_GROUP=env" in seen and "ENSEMBLE_JOB_INDEX=0" in seen
        # nor the helper's environment, which any job of the same user could read
        assert not any(name.startswith("ENSEMBLE_") for name in helper_of(sidecar).environ())


async def test_a_command_with_shell_syntax_runs_through_sh_on_flux_as_on_the_local_backend(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    command = f"echo nodes $FLUX_JOB_NNODES > {out} && echo done >> {out}"
    async with flux_instance(tmp_path / "flux", 1) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        await submit(sidecar, JobSpec(name="shell", command=command), JobSpec(name="plain", command="echo '$HOME >'"))
        status = await status_when(sidecar, lambda s: s.finished == 2)
        infos = {info.group: info for info in await sidecar.client.action("jobinfo", {}, list[JobInfo])}
    assert status.failed == 0
    assert out.read_text() == "nodes 1\ndone\n"
    assert infos["shell"].command == command and infos["plain"].command == "echo '$HOME >'"


async def test_grow_and_shrink_drain_the_highest_ranks_and_never_kill_a_running_job(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 4) as uri:
        async with flux_sidecar(uri, tmp_path / "sidecar.log", "--nodes", "2", "--member", "m0") as sidecar:
            status = await sidecar.client.status()
            assert (status.size, status.nodes.node_up_count) == (2, 2)
            drained = await flux_cli(uri, "resource", "drain", "-no", "{ranks} {reason}")
            assert drained.split() == ["2-3", "ensemble-sidecar[m0]:", "size", "2"]
            grown = await sidecar.client.action("grow", ResizePayload(size=4), ResizeResult)
            assert grown == ResizeResult(size=4, nodes_up=4)
            assert (await flux_cli(uri, "resource", "drain", "-no", "{ranks}")).strip() == ""
            # four jobs, one a node; then shrink to 1 while they run: nothing is killed
            await submit(sidecar, JobSpec(name="long", command="sleep 4", count=4))
            await status_when(sidecar, lambda s: s.queue.run == 4)
            shrunk = await sidecar.client.action("shrink", ResizePayload(size=1), ResizeResult)
            assert shrunk == ResizeResult(size=1, nodes_up=4)  # ranks 1-3 draining: their jobs go on
            status = await sidecar.client.status()
            assert (status.size, status.queue.run, status.nodes.node_free_count) == (1, 4, 0)
            await submit(sidecar, JobSpec(name="after", command="true", count=2))
            status = await status_when(sidecar, lambda s: s.groups["long"].finished == 4, timeout=20)
            assert status.groups["long"].failed == 0
            status = await status_when(sidecar, lambda s: s.finished == 6, timeout=20)
            assert (status.nodes.node_up_count, status.failed) == (1, 0)
            ranks = {str(job["name"]): str(job["ranks"]) for job in await flux_jobs(uri) if job["name"] == "after"}
            assert ranks == {"after": "0"}  # the later jobs ran on the one rank kept
            with pytest.raises(SidecarError, match=r"size: 5 is outside 0..4"):
                await sidecar.client.action("grow", ResizePayload(size=5), ResizeResult)
        # without --release-on-exit the drains stay: a restarted sidecar finds its size in Flux
        async with flux_sidecar(uri, tmp_path / "sidecar2.log", "--member", "m0", "--release-on-exit") as again:
            assert (await again.client.status()).size == 1
        assert (await flux_cli(uri, "resource", "drain", "-no", "{ranks}")).strip() == ""


async def test_jobs_left_on_given_up_ranks_past_the_shrink_grace_are_killed_and_reported_lost(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 3) as uri:
        grace = ("--member", "m0", "--shrink-grace", "2")
        async with flux_sidecar(uri, tmp_path / "sidecar.log", "--nodes", "3", *grace) as sidecar:
            await submit(sidecar, JobSpec(name="long", command="sleep 60", count=3))
            await status_when(sidecar, lambda s: s.queue.run == 3)
            on_rank = {str(job["ranks"]): int(job["id"]) for job in await flux_jobs(uri)}
            shrunk = await sidecar.client.action("shrink", ResizePayload(size=1), ResizeResult)
            assert shrunk == ResizeResult(size=1, nodes_up=3)  # ranks 1-2 drained, their jobs going on
            status = await sidecar.client.status()
            assert (status.queue.run, status.draining, status.counts.get("lost")) == (3, 2, None)
            status = await status_when(sidecar, lambda s: s.counts.get("lost") == 2, timeout=30)
            reason = "lost: killed after the shrink grace of 2 s (its node was given up)"
            for rank in ("1", "2"):
                lost = await sidecar.client.action("jobinfo", {"id": on_rank[rank]}, JobInfo)
                assert (lost.lost, lost.reason) == (True, reason)
                eventlog = await flux_cli(uri, "job", "eventlog", str(on_rank[rank]))
                assert 'exception type="ensemble-shrink" severity=0' in eventlog and reason in eventlog
            status = await status_when(sidecar, lambda s: s.failed == 2 and s.draining == 0)
            assert (status.queue.run, status.nodes.node_up_count) == (1, 1)  # ranks 1-2 idle: gone
            kept = await sidecar.client.action("jobinfo", {"id": on_rank["0"]}, JobInfo)
            assert (kept.state, kept.lost) == ("run", False)  # the rank kept keeps its job
        # the journal says so to a restarted sidecar too
        async with flux_sidecar(uri, tmp_path / "sidecar2.log", *grace) as again:
            status = await again.client.status()
            assert (status.size, status.counts["lost"], status.queue.run, status.draining) == (1, 2, 1, 0)
            assert (await again.client.action("jobinfo", {"id": on_rank["2"]}, JobInfo)).reason == reason


async def test_members_sharing_an_instance_use_only_their_ranks_and_count_only_their_jobs(tmp_path: Path) -> None:
    async with (
        flux_instance(tmp_path / "flux", 4) as uri,
        flux_sidecar(uri, tmp_path / "a.log", "--ranks", "0-1", "--member", "a") as a,
        flux_sidecar(uri, tmp_path / "b.log", "--ranks", "2-3", "--member", "b", "--nodes", "1") as b,
    ):
        assert ((await a.client.status()).size, (await b.client.status()).size) == (2, 1)
        await submit(a, JobSpec(name="ja", command="sleep 1", count=3))
        await submit(b, JobSpec(name="jb", command="sleep 1", count=2))
        done_a = await status_when(a, lambda s: s.finished == 3)
        done_b = await status_when(b, lambda s: s.finished == 2)
        assert set(done_a.groups) == {"ja"} and set(done_b.groups) == {"jb"}
        ranks: dict[str, set[str]] = {}
        for job in await flux_jobs(uri):
            ranks.setdefault(str(job["name"]), set()).add(str(job["ranks"]))
        assert ranks["ja"] <= {"0", "1"} and ranks["jb"] == {"2"}  # b's size 1: rank 3 drained
        with pytest.raises(SidecarError, match=r"jobs\[0\]\.nodes: 3 exceeds the queue's maximum of 2"):
            await submit(a, JobSpec(name="too-wide", command="true", nodes=3))


def helper_of(sidecar: FluxSidecar) -> psutil.Process:
    """The sidecar's Flux helper process."""
    found = [
        child
        for child in psutil.Process(sidecar.process.pid).children(recursive=True)
        if any("flux_helper.py" in part for part in child.cmdline())
    ]
    assert len(found) == 1, found
    return found[0]


async def health(port: int) -> int:
    """The sidecar service's gRPC health now."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        return int(answer.status)


async def health_changes(port: int, seen: list[int]) -> None:
    """Append every health state the sidecar announces (gRPC health ``Watch``) to ``seen``, until cancelled."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for answer in stream:
                seen.append(int(answer.status))


async def test_a_lost_journal_makes_the_sidecar_unhealthy_until_it_reconnects(tmp_path: Path) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with flux_instance(tmp_path / "flux", 2) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        await submit(sidecar, JobSpec(name="g", command="sleep 30", count=3), key="k")
        await status_when(sidecar, lambda s: s.queue.run == 2)
        seen: list[int] = []
        watching_health = asyncio.create_task(health_changes(sidecar.port, seen))
        stream = sidecar.client.watch()
        await anext(stream)
        helper = helper_of(sidecar)
        helper.kill()
        # the sidecar says so at once: the status stream ends UNAVAILABLE with the reason, health NOT_SERVING
        lost = r"UNAVAILABLE: flux: lost Flux \(the flux helper was killed by signal 9"
        with pytest.raises(SidecarUnavailable, match=lost):
            async with asyncio.timeout(5):
                while True:
                    await anext(stream)
        await stream.aclose()
        # then it reconnects by itself, its counts rebuilt from the journal
        status = await status_when(sidecar, lambda s: s.queue.run == 2 and s.queue.sched == 1, timeout=20)
        assert status.groups["g"].submitted == 3
        await wait_for(lambda: seen[-1:] == [serving], 5)
        watching_health.cancel()
        assert seen[:3] == [serving, not_serving, serving], seen
        assert helper_of(sidecar).pid != helper.pid
        again = await submit(sidecar, JobSpec(name="g", command="sleep 30", count=3), key="k")
        assert (again.submitted, again.duplicate) == (3, True)
        log = sidecar.log.read_text()
        assert "unhealthy: lost Flux" in log and "healthy again" in log


async def unhealthy(port: int) -> bool:
    return await health(port) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_the_sidecar_waits_for_a_broker_and_follows_it_through_a_restart(tmp_path: Path) -> None:
    uri = f"local://{tmp_path}/s/local"
    (tmp_path / "s").mkdir()
    log = tmp_path / "sidecar.log"
    process = start_sidecar(uri, log, "--wait-for-broker", "60")
    try:
        await asyncio.sleep(2)  # no broker yet: it waits
        assert process.poll() is None
        async with flux_instance(tmp_path / "first", 1, local_uri=uri):
            assert process.stdout is not None
            port = int(await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60))
            sidecar = FluxSidecar(process, port, log)
            await submit(sidecar, JobSpec(name="before", command="true"))
            await status_when(sidecar, lambda s: s.finished == 1)
        await wait_for(lambda: unhealthy(port), 10)
        async with flux_instance(tmp_path / "second", 1, local_uri=uri):
            # a new instance: its journal is empty, and the sidecar serves again
            status = await status_when(sidecar, lambda s: True, timeout=30)
            assert status.finished == 0 and status.nodes.node_up_count == 1
            await submit(sidecar, JobSpec(name="after", command="true"))
            await status_when(sidecar, lambda s: s.finished == 1)
        await sidecar.client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0, log.read_text()[-2000:]


async def test_a_sidecar_that_finds_the_socket_before_the_modules_waits_for_the_run_state(tmp_path: Path) -> None:
    # in a MiniCluster the sidecar starts beside the broker: the socket appears first, and until rc1 has loaded
    # job-manager a journal request answers ENOSYS; the sidecar must wait for the broker's run state
    uri = f"local://{tmp_path}/s/local"
    (tmp_path / "s").mkdir()
    log = tmp_path / "sidecar.log"
    process = start_sidecar(uri, log, "--wait-for-broker", "60")
    try:
        async with flux_instance(tmp_path / "slow", 1, local_uri=uri, rc1_delay=4):
            assert process.stdout is not None
            port = int(await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60) or 0)
            assert port, log.read_text()[-2000:]
            sidecar = FluxSidecar(process, port, log)
            await submit(sidecar, JobSpec(name="early", command="true"))
            await status_when(sidecar, lambda s: s.finished == 1)
            await sidecar.client.close()
        assert "No service matching" not in log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0, log.read_text()[-2000:]


async def test_a_sidecar_that_is_not_the_owner_is_refused_at_start_with_the_reason(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS) as uri:
        process = start_sidecar(uri, tmp_path / "guest.log", user=NOBODY)
        assert await asyncio.to_thread(process.wait, 60) == 1
        said = (tmp_path / "guest.log").read_text()
        assert f"runs as uid {NOBODY} but the instance owner is uid {os.getuid()}" in said, said
        assert "securityContext.runAsUser" in said


async def test_root_in_an_instance_another_user_owns_is_refused_at_start_with_the_reason(tmp_path: Path) -> None:
    # the broker runs as nobody, with the Flux Operator's [access] table: root may connect as an owner, but
    # job-ingest refuses root's jobs there, so the sidecar refuses to start
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS, user=NOBODY) as uri:
        process = start_sidecar(uri, tmp_path / "root.log")
        assert await asyncio.to_thread(process.wait, 60) == 1
        said = (tmp_path / "root.log").read_text()
        assert f"runs as root (uid 0) but the instance owner is uid {NOBODY}" in said, said
        assert "submission of jobs as user root not supported" in said and f"sidecar.runAsUser: {NOBODY}" in said


async def helper_session(uri: str, user: int, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the helper as ``user`` on ``uri``, send ``requests``, and return what it said in 5 s."""
    assert FLUX is not None
    lines = "".join(json.dumps(request) + "\n" for request in requests)
    done = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-c", f"(printf '%s' \"$LINES\"; sleep 5) | {FLUX} python {HELPER}"],
        env={**os.environ, "FLUX_URI": uri, "LINES": lines}, capture_output=True, text=True, timeout=60,
        user=user, cwd="/",
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def test_flux_refuses_a_guest_the_events_journal(tmp_path: Path) -> None:
    """What the sidecar's owner check stands on, seen in Flux itself: a guest connects (allow-guest-user),
    then its events journal ends with EPERM, which the sidecar reports with the owner's uid."""
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS) as uri:
        said = await helper_session(uri, NOBODY, {"id": 1, "op": "hello"}, {"id": 2, "op": "journal"})
    hello = next(message for message in said if message.get("id") == 1)
    assert (hello["result"]["uid"], hello["result"]["owner"]) == (NOBODY, os.getuid())
    [ended] = [message for message in said if message.get("push") == "journal-end"]
    assert ended["errno"] == errno.EPERM, said


async def test_the_helper_runs_on_fluxs_python_while_the_sidecar_runs_on_ours(tmp_path: Path) -> None:
    ours = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", "import flux"], capture_output=True)
    assert ours.returncode != 0  # our interpreter cannot import Flux's bindings: the helper must bridge
    async with flux_instance(tmp_path / "flux", 1) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        helper = helper_of(sidecar)
        assert helper.exe() != psutil.Process(sidecar.process.pid).exe()
        assert "connected to flux-core" in sidecar.log.read_text()


async def test_a_large_submit_does_not_stall_the_status_stream(tmp_path: Path) -> None:
    async with flux_instance(tmp_path / "flux", 2) as uri, flux_sidecar(uri, tmp_path / "sidecar.log") as sidecar:
        gaps: list[float] = []

        async def watch() -> None:
            last = time.monotonic()
            async for _ in sidecar.client.watch():
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        watching = asyncio.create_task(watch())
        await asyncio.sleep(1.5)
        started = time.monotonic()
        result = await submit(sidecar, JobSpec(name="many", command="true", count=1000))
        took = time.monotonic() - started
        await asyncio.sleep(1)
        watching.cancel()
        assert result.submitted == 1000
        assert took < 10, took
        assert max(gaps) < 1.0, max(gaps)  # the heartbeat is 0.5 s: no stall of more than one period


async def test_ensemble_up_on_flux_runs_hello_world_with_a_true_summary(tmp_path: Path) -> None:
    assert FLUX is not None
    script = (
        f"{sys.executable} -m ensemble_cli up examples/hello-world.yaml --backend flux --quiet --timeout 240 "
        f"--results {tmp_path}/results; rc=$?; "
        "echo drained: $(flux resource drain -no {ranks}); exit $rc"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [FLUX, "start", "--test-size=4", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    cells = [cell.strip() for cell in rows[-1].strip("│").split("│")]
    assert cells[:4] == ["0", "11", "11", "0"], done.stdout  # member, jobs, succeeded, failed
    assert cells[6:8] == ["11", "0"], done.stdout  # attempts, retried
    assert float(cells[9]) > 0 and cells[11] == "4"  # node-seconds of ranks available; peak size
    assert "member 0: Flux ranks 0-3" in done.stdout
    # the results: a row per attempt, each attempt's stdout in the file Flux's shell wrote
    with (tmp_path / "results" / "jobs.csv").open() as table:
        attempts = list(csv.DictReader(table))
    assert len(attempts) == 11 and {row["result"] for row in attempts} == {"succeeded"}
    assert all(Path(row["stdout"]).is_file() and Path(row["stderr"]).is_file() for row in attempts)
    assert all(str(tmp_path / "results" / "outputs" / "member-0") in row["stdout"] for row in attempts)
    said = [Path(row["stdout"]).read_text() for row in attempts if "echo hello" in row["command"]]
    assert said and all(text == "hello from a single-node job\n" for text in said), said
    assert done.stdout.strip().splitlines()[-1] == "drained:"  # the run gave back what it drained


async def test_ensemble_up_on_flux_refuses_members_that_do_not_fit_the_instance(tmp_path: Path) -> None:
    assert FLUX is not None
    done = await asyncio.to_thread(
        subprocess.run,
        [FLUX, "start", "--test-size=2", sys.executable, "-m", "ensemble_cli", "up", "examples/hello-world.yaml",
         "--backend", "flux", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "maxSize: the members need 4 = 4 ranks of their own, but this Flux instance has 2" in done.stdout


# --- the pod the Flux Operator makes, rehearsed -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def mount() -> Iterator[Path]:
    """Where the rehearsal pod's view is mounted: a directory every uid of the rehearsal can traverse."""
    path = Path(tempfile.mkdtemp(prefix="ensemble-pod-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rehearsal_pod(mount: Path, run_as: int | None = None, broker: int = NOBODY) -> tuple[Path, dict[str, Any], int]:
    """A directory laid out as a MiniCluster pod sees it — the view at ``<mount>/view`` (this machine's
    flux-core plays the view), the broker's socket directory at ``<mount>/config/run/flux`` — and the
    sidecar container the creator injects for a member whose MiniCluster mounts the view there.

    ``broker``: the broker's uid. Returns the mount path, that container, and its port. The start script and
    the ``ensemble`` command go there too (:func:`start_script`, :func:`ensemble_on_path`)."""
    assert FLUX is not None
    (mount / "config" / "run" / "flux").mkdir(parents=True)
    for part in (mount / "config", mount / "config" / "run", mount / "config" / "run" / "flux"):
        part.chmod(0o755)
    # the broker makes its socket there, as the application image's user (wait.sh): it must own the directory
    os.chown(mount / "config" / "run" / "flux", broker, broker)
    (mount / "view").symlink_to(Path(FLUX).resolve().parent.parent)
    port = free_port()
    document = copy.deepcopy(MINICLUSTER_ENSEMBLE)
    document["spec"]["members"][0]["minicluster"]["spec"]["flux"] = {"container": {"mountPath": str(mount)}}
    document["spec"]["members"][0]["sidecar"] = {"port": port, **({} if run_as is None else {"runAsUser": run_as})}
    ensemble, errors = validate(document, "science")
    assert ensemble is not None, errors
    body = minicluster.build(ensemble, ensemble.members[0], {}, token_secret="demo-sidecar-token-x")
    return mount, body["spec"]["containers"][-1], port


def start_script(mount: Path, command: str, directory: Path) -> Path:
    """What the operator's start script does for a container beside the broker, as far as the sidecar is
    concerned (pkg/flux/templates/start.sh): the view's bin after PATH, the view's site-packages on
    PYTHONPATH, then the container's command, run by bash as PID 1 of the container would be."""
    found = sorted((mount / "view" / "lib").glob("python3*/site-packages"))
    site = str(found[0]) if found else ""
    script = directory / "start-1.sh"
    script.write_text(
        f'#!/bin/bash\nexport PATH=$PATH:{mount}/view/bin\nexport PYTHONPATH=${{PYTHONPATH:-""}}:{site}\n{command}\n'
    )
    script.chmod(0o755)
    return script


def ensemble_on_path(directory: Path, user: int | None) -> Path:
    """A bin directory whose ``ensemble`` runs this checkout's command (for ``user``, on a Python it may run)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    bin_dir.chmod(0o755)
    python = python_for(user)[0] if user is not None else sys.executable
    site = os.pathsep.join([str(REPO), *(p for p in sys.path if p.endswith("site-packages"))])
    wrapper = bin_dir / "ensemble"
    # the injected command unsets PYTHONPATH (the view's): this wrapper sets ours again, as our image's
    # ensemble command needs none
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {python} -m ensemble_cli "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def run_pod_container(
    script: Path, bin_dir: Path, container: dict[str, Any], index: int, log: Path
) -> subprocess.Popen[str]:
    """Start the container's start script as its securityContext says, with the environment Kubernetes
    gives it (its ``environment``, the token Secret, the Indexed Job's completion index)."""
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        **container["environment"],
        "ENSEMBLE_SIDECAR_TOKEN": TOKEN,
        "JOB_COMPLETION_INDEX": str(index),
    }
    user = int(container["securityContext"]["runAsUser"])
    with log.open("a") as out:
        return subprocess.Popen(
            ["/bin/bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=out, text=True,
            user=None if user == os.getuid() else user, cwd="/",
        )  # fmt: skip


MINICLUSTER_ENSEMBLE: dict[str, Any] = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "metadata": {"name": "demo", "namespace": "science"},
    "spec": {
        "members": [
            {
                "minicluster": {"spec": {"size": 1, "maxSize": 1, "containers": [{"image": "app"}]}},
                "jobs": [{"name": "hello", "command": "true", "count": 2}],
            }
        ]
    },
}


async def test_pod_rehearsal_the_injected_sidecar_serves_as_the_brokers_user(tmp_path: Path, mount: Path) -> None:
    # the application image runs the broker as nobody; the member says so (sidecar.runAsUser)
    _, container, port = rehearsal_pod(mount, run_as=NOBODY)
    assert container["securityContext"] == {"runAsUser": NOBODY, "runAsNonRoot": True}
    uri = container["environment"]["FLUX_URI"]
    assert uri == f"local://{mount}/config/run/flux/local"
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS, local_uri=uri, user=NOBODY):
        process = run_pod_container(
            start_script(mount, container["command"], mount), ensemble_on_path(mount, NOBODY), container, 0,
            tmp_path / "sidecar.log",
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
            assert line.strip() == str(port), (line, (tmp_path / "sidecar.log").read_text()[-3000:])
            sidecar = FluxSidecar(process, port, tmp_path / "sidecar.log")
            await submit(sidecar, JobSpec(name="hello", command="true", count=2))
            status = await status_when(sidecar, lambda s: s.finished == 2)
            assert (status.nodes.node_up_count, status.failed) == (1, 0)
            await sidecar.client.close()
            # PID 1 of the container is the start script, which passes no signal on: the command's exec made
            # the sidecar that process, so the kubelet's SIGTERM stops it
            os.kill(process.pid, signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 15) == 0
        finally:
            if process.poll() is None:
                process.kill()
    said = (tmp_path / "sidecar.log").read_text()
    assert f"(uid {NOBODY}, owner {NOBODY}" in said and "stopping: signal received" in said


async def test_pod_rehearsal_the_default_root_sidecar_beside_a_broker_of_another_user_is_refused(
    tmp_path: Path, mount: Path
) -> None:
    _, container, _ = rehearsal_pod(mount)
    assert container["securityContext"]["runAsUser"] == 0  # the default: most application images run as root
    uri = container["environment"]["FLUX_URI"]
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS, local_uri=uri, user=NOBODY):
        process = run_pod_container(
            start_script(mount, container["command"], mount), ensemble_on_path(mount, None), container, 0,
            tmp_path / "root.log",
        )  # fmt: skip
        assert await asyncio.to_thread(process.wait, 60) == 1
    assert f"sidecar.runAsUser: {NOBODY}" in (tmp_path / "root.log").read_text()


async def test_pod_rehearsal_a_sidecar_run_as_neither_root_nor_the_brokers_user_is_refused(
    tmp_path: Path, mount: Path
) -> None:
    guest = 12345
    _, container, _ = rehearsal_pod(mount, run_as=guest)
    uri = container["environment"]["FLUX_URI"]
    async with flux_instance(tmp_path / "flux", 1, access=OPERATOR_ACCESS, local_uri=uri, user=NOBODY):
        process = run_pod_container(
            start_script(mount, container["command"], mount), ensemble_on_path(mount, guest), container, 0,
            tmp_path / "guest.log",
        )  # fmt: skip
        assert await asyncio.to_thread(process.wait, 60) == 1
    said = (tmp_path / "guest.log").read_text()
    assert f"runs as uid {guest} but the instance owner is uid {NOBODY}" in said, said


async def test_pod_rehearsal_the_sidecar_of_a_pod_that_is_not_the_lead_brokers_stays_idle(
    tmp_path: Path, mount: Path
) -> None:
    _, container, _ = rehearsal_pod(mount)
    # no broker at all: a worker pod's sidecar never looks for one
    process = run_pod_container(
        start_script(mount, container["command"], mount), ensemble_on_path(mount, None), container, 3,
        tmp_path / "worker.log",
    )  # fmt: skip
    try:
        await asyncio.sleep(3)
        assert process.poll() is None
        os.kill(process.pid, signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "JOB_COMPLETION_INDEX=3: not the pod of index 0" in (tmp_path / "worker.log").read_text()


async def test_a_sweep_and_a_retry_on_flux_carry_their_identity_parameters_and_outputs(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    sweep = JobSpec(
        name="lj", command="sh -c 'echo x=$1 seed=$ENSEMBLE_PARAM_SEED attempt=$ENSEMBLE_JOB_ATTEMPT' lj {x}",
        count=4, matrix={"x": [1, 2], "seed": MatrixRange(start=0, stop=2)},
    )  # fmt: skip
    async with (
        flux_instance(tmp_path / "flux", 2) as uri,
        flux_sidecar(uri, tmp_path / "sidecar.log", "--output-dir", str(outputs)) as sidecar,
    ):
        first = await submit(sidecar, sweep, key="d-1")
        # job 3 again as its attempt 2 (a retry), twice: queued once
        again = msgspec.structs.replace(sweep, count=1, start=3, attempt=2)
        assert (await submit(sidecar, again, key="retry-a")).submitted == 1
        assert (await submit(sidecar, again, key="retry-b")).duplicate
        await status_when(sidecar, lambda s: s.finished == 5)
        ended = await sidecar.client.ended(0)
    assert ended.instance == first.instance and ended.ended == 5
    seen = {(job.index, job.attempt): job for job in ended.jobs}
    assert sorted(seen) == [(0, 1), (1, 1), (2, 1), (3, 1), (3, 2)]
    assert [job.end_seq for job in ended.jobs] == [1, 2, 3, 4, 5]
    assert all(job.result == "succeeded" for job in ended.jobs)
    assert seen[(2, 1)].params == {"x": "2", "seed": "0"} and seen[(2, 1)].command.endswith("lj 2")
    assert Path(seen[(2, 1)].stdout).read_text() == "x=2 seed=0 attempt=1\n"
    assert Path(seen[(3, 2)].stdout).read_text() == "x=2 seed=1 attempt=2\n"
    assert Path(seen[(3, 2)].stdout) == outputs / "lj" / "3.2.out" and Path(seen[(3, 2)].stderr).read_text() == ""
