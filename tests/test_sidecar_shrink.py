"""The shrink grace of the ``local`` backend: real subprocess jobs on nodes a shrink gave up go on until the
grace, then the youngest are killed (their whole process group), reported lost with the reason, and a
restarted sidecar replays them lost from its journal."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ensemble_core.messages import JobSpec
from ensemble_core.wire import SubmitPayload
from sidecar.backend import shrink_lost_reason
from sidecar.local import JOURNAL_FILE, LOST, LocalBackend
from sidecar.queue import Queue, QueueError
from tests.conftest import REPO, wait_for
from tests.test_sidecar_journal import job, sidecar

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks job processes through /proc")


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left (zombies not counted)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def tracked(pidfile: Path) -> str:
    """A job that writes its process group's id (its own pid: each job leads a session) and leaves a child
    in the group, so killing the group is what stops both."""
    return f"sh -c 'echo $$ > {pidfile}; sleep 30 & wait'"


@contextlib.asynccontextmanager
async def backend(grace: float, nodes: int = 2) -> AsyncIterator[LocalBackend]:
    running = LocalBackend(nodes=nodes, max_nodes=4, shrink_grace=grace)
    try:
        yield running
    finally:
        await running.aclose(grace=0.1)


async def pid_of(pidfile: Path) -> int:
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
    return int(pidfile.read_text())


def test_the_jobs_beyond_the_size_are_the_youngest_and_as_few_as_it_takes() -> None:
    queue = Queue(nodes=4)
    queue.submit([JobSpec(name="old", command="x", nodes=2)], 0.0)
    queue.schedule(1.0)
    queue.submit([JobSpec(name="young", command="x"), JobSpec(name="newest", command="x")], 2.0)
    queue.schedule(3.0)
    assert queue.jobs_beyond_size() == [] and queue.status(3.0).draining == 0
    queue.shrink(3)
    assert queue.status(3.0).draining == 1
    assert [j.group for j in queue.jobs_beyond_size()] == ["newest"]  # one node to free: the youngest job
    queue.shrink(1)
    assert queue.draining == 3
    # newest and young free 2 nodes, old's 2 the last one: every job goes, youngest first
    assert [j.group for j in queue.jobs_beyond_size()] == ["newest", "young", "old"]
    lost = queue.lose(3, 5.0, "lost: shrink")
    assert (lost.lost, lost.reason) == (lost.info().lost, lost.info().reason) == (True, "lost: shrink")
    assert queue.draining == 2 and [j.group for j in queue.jobs_beyond_size()] == ["young", "old"]


async def test_jobs_on_given_up_nodes_run_until_the_grace_then_the_youngest_is_killed_and_reported_lost(
    tmp_path: Path,
) -> None:
    old_pid, young_pid = tmp_path / "old", tmp_path / "young"
    async with backend(grace=1.0) as local:
        await local.submit(SubmitPayload(jobs=[job("old", tracked(old_pid)), job("young", tracked(young_pid))]))
        old, young = await pid_of(old_pid), await pid_of(young_pid)
        shrunk_at = time.monotonic()
        await local.shrink(1)
        status = local.status()
        assert (status.size, status.draining, status.queue.run) == (1, 1, 2)  # nothing killed by the shrink
        await asyncio.sleep(0.5)
        assert local.status().queue.run == 2 and group_alive(young)

        await wait_for(lambda: local.status().queue.run == 1, timeout=5)
        assert time.monotonic() - shrunk_at >= 1.0
        info = await local.job_info(2)
        reason = shrink_lost_reason(1.0)
        assert reason == "lost: killed after the shrink grace of 1 s (its node was given up)"
        assert (info.state, info.success, info.returncode, info.lost, info.reason, info.output) == (
            "inactive", False, None, True, reason, reason,
        )  # fmt: skip
        await wait_for(lambda: not group_alive(young), timeout=5)  # the job and its child: the whole group
        assert group_alive(old) and not (await local.job_info(1)).lost  # the older job keeps the node kept
        status = local.status()
        assert (status.draining, status.nodes.node_up_count, status.counts["lost"], status.failed) == (0, 1, 1, 1)


async def test_a_job_that_ends_within_the_grace_or_a_grow_back_keeps_every_job(tmp_path: Path) -> None:
    async with backend(grace=0.6) as local:
        await local.submit(SubmitPayload(jobs=[job("long", "sleep 30"), job("short", "sleep 0.2")]))
        await wait_for(lambda: local.status().queue.run == 2)
        await local.shrink(1)
        await wait_for(lambda: local.status().finished == 1, timeout=5)  # the short job's end ends the drain
        assert local.status().draining == 0
        await asyncio.sleep(0.8)
        assert (local.status().queue.run, local.status().counts.get("lost")) == (1, None)

        await local.grow(2)
        await local.submit(SubmitPayload(jobs=[job("more", "sleep 30")]))
        await wait_for(lambda: local.status().queue.run == 2)
        await local.shrink(1)
        assert local.status().draining == 1
        await asyncio.sleep(0.3)
        await local.grow(2)  # the nodes come back before the grace: the drain is over
        await asyncio.sleep(0.6)
        assert (local.status().queue.run, local.status().draining, local.status().counts.get("lost")) == (2, 0, None)


async def test_a_shrink_grace_of_zero_never_kills(tmp_path: Path) -> None:
    async with backend(grace=0.0) as local:
        await local.submit(SubmitPayload(jobs=[job("a", "sleep 30"), job("b", "sleep 30")]))
        await wait_for(lambda: local.status().queue.run == 2)
        await local.shrink(0)
        await asyncio.sleep(0.5)
        assert (local.status().queue.run, local.status().draining) == (2, 2)
    with pytest.raises(QueueError, match="shrink_grace: must be a number of seconds >= 0, got -1"):
        LocalBackend(shrink_grace=-1)


async def test_a_job_killed_after_the_grace_stays_lost_with_its_reason_after_a_restart(tmp_path: Path) -> None:
    state, old_pid, young_pid = tmp_path / "state", tmp_path / "old", tmp_path / "young"
    async with sidecar(state, "--shrink-grace", "1") as first:
        await first.resize("grow", 2)
        await first.submit("k", job("old", tracked(old_pid)), job("young", tracked(young_pid)))
        old, young = await pid_of(old_pid), await pid_of(young_pid)
        await first.resize("shrink", 1)

        async def killed() -> bool:
            return (await first.job(2)).lost

        await wait_for(killed, timeout=10)
        await wait_for(lambda: not group_alive(young), timeout=5)
        assert (await first.status()).draining == 0
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    reason = shrink_lost_reason(1)
    assert f'"reason":"{reason}"' in (state / JOURNAL_FILE).read_text()  # journaled, so replayed

    async with sidecar(state) as second:
        young_job, old_job = await second.job(2), await second.job(1)
        assert (young_job.lost, young_job.reason, young_job.output, young_job.success) == (True, reason, reason, False)
        # the older job was still running when the sidecar died: lost too, for that reason
        assert (old_job.lost, old_job.reason) == (True, LOST)
        await wait_for(lambda: not group_alive(old), timeout=5)
        status = await second.status()
        assert (status.size, status.counts["lost"], status.draining) == (1, 2, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--shrink-grace", "-1"), "argument --shrink-grace: must be a number of seconds >= 0, got -1"),
        (("--shrink-grace", "nan"), "--shrink-grace: must be a number of seconds >= 0, got nan"),
        (("--shrink-grace", "soon"), "argument --shrink-grace: must be a number of seconds >= 0, got 'soon'"),
        (("--backend", "sim", "--shrink-grace", "5"), "--shrink-grace: the sim backend never kills a job"),
    ],
)
def test_a_bad_shrink_grace_stops_the_sidecar_naming_the_option(args: tuple[str, ...], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "--port", "0", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
