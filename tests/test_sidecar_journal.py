"""A local sidecar with ``--state-dir`` survives its own restart: real sidecar processes killed with
SIGKILL (or stopped with SIGTERM) and started again on the same directory, real job subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ensemble_core.messages import JobSpec
from ensemble_core.sidecar_client import SidecarClient, SidecarError
from ensemble_core.wire import JobInfo, ResizePayload, ResizeResult, StatusPayload, SubmitPayload, SubmitResult
from sidecar.local import JOURNAL_FILE, LOST
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks job processes through /proc")

TOKEN = "journal-token"


class Sidecar:
    """One ``ensemble sidecar --backend local`` process and a client of it."""

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port
        self.client = SidecarClient(f"127.0.0.1:{port}", TOKEN, timeout=5)

    async def status(self) -> StatusPayload:
        return await self.client.status()

    async def job(self, job_id: int) -> JobInfo:
        return await self.client.action("jobinfo", {"id": job_id}, JobInfo)

    async def submit(self, key: str, *jobs: JobSpec) -> SubmitResult:
        return await self.client.action("submit", SubmitPayload(jobs=list(jobs), key=key), SubmitResult)

    async def resize(self, action: str, size: int) -> ResizeResult:
        return await self.client.action(action, ResizePayload(size=size), ResizeResult)


def start(state: Path, *extra: str) -> subprocess.Popen[str]:
    """Start a sidecar on ``state`` (1 node, at most 3) without waiting for it."""
    return subprocess.Popen(  # a plain Popen: the test reads its pipes from a thread
        [sys.executable, "-m", "sidecar", "--backend", "local", "--port", "0", "--nodes", "1", "--max-nodes", "3",
         "--state-dir", str(state), *extra],
        cwd=REPO, env={**os.environ, "ENSEMBLE_SIDECAR_TOKEN": TOKEN},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@asynccontextmanager
async def sidecar(state: Path, *extra: str) -> AsyncIterator[Sidecar]:
    """A running sidecar on ``state``; SIGKILLed on the way out unless the test ended it."""
    process = start(state, *extra)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.strip().isdigit(), line or process.communicate()[1]
        running = Sidecar(process, int(line))
        try:
            yield running
        finally:
            await running.client.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reapers(pid: int) -> list[int]:
    """The job reaper (``sidecar/reaper.py``) the sidecar ``pid`` started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"sidecar.reaper" in command:
            found.append(int(stat.parent.name))
    return found


def kill_with_its_reaper(process: subprocess.Popen[str]) -> None:
    """SIGKILL a sidecar and its reaper first: its jobs outlive it (a whole machine's processes killed
    at once, say), and only the next sidecar's journal can end them."""
    (reaper,) = reapers(process.pid)
    os.kill(reaper, signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait()


def job(name: str, command: str, nodes: int = 1, count: int = 1) -> JobSpec:
    return JobSpec(name=name, command=command, nodes=nodes, count=count)


async def test_a_killed_sidecar_keeps_results_queue_keys_and_size_and_reports_running_jobs_lost(
    tmp_path: Path,
) -> None:
    state, ran, pidfile = tmp_path / "state", tmp_path / "ran", tmp_path / "pid"
    # a job of N nodes is N tasks (one per node, as on Flux): its first task marks that the job ran
    marker = f"test $FLUX_TASK_RANK != 0 || echo $FLUX_JOB_ID >> {ran}"
    async with sidecar(state, "--provision-delay", "60") as first:
        submitted = await first.submit(
            "decision-1",
            job("quick", "sh -c 'echo hello'"),
            job("long", f"sh -c '{marker}; echo $$ > {pidfile}; exec sleep 60'"),
            job("wide", f"sh -c '{marker}'", nodes=3, count=2),
        )
        assert (submitted.submitted, submitted.duplicate) == (4, False)
        await first.resize("grow", 2)  # the new node takes 60 s: still coming when the sidecar dies
        await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
        assert (await first.job(1)).success
        long_pid = int(pidfile.read_text())
        kill_with_its_reaper(first.process)
        assert alive(long_pid)  # the job outlived its sidecar

    async with sidecar(state, "--provision-delay", "0") as second:
        quick, long = await second.job(1), await second.job(2)
        assert (quick.success, quick.returncode, quick.output) == (True, 0, "hello\n")
        assert (long.state, long.success, long.returncode, long.output) == ("inactive", False, None, LOST)
        await wait_for(lambda: not alive(long_pid), timeout=5)  # its leftover process was killed
        status = await second.status()
        assert (status.size, status.nodes.node_up_count) == (2, 2)  # the grow came back, its node with it
        assert status.next_jobs == [3, 3] and [(await second.job(i)).state for i in (3, 4)] == ["sched", "sched"]
        assert (status.finished, status.failed, status.counts["lost"]) == (2, 1, 1)
        assert (await second.submit("decision-1", job("quick", "true"))).duplicate  # the key came back
        await second.resize("grow", 3)

        async def wide_done() -> bool:
            return (await second.status()).finished == 4

        await wait_for(wide_done, timeout=10)
        assert [(await second.job(i)).success for i in (3, 4)] == [True, True]
        assert (await second.status()).finished == 4  # nothing more was queued by the retried submit
    # every job that started ran once: the lost one was not run again
    assert sorted(ran.read_text().split()) == ["2", "3", "4"]


async def test_a_sidecar_stopped_with_sigterm_reports_its_killed_jobs_lost_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with sidecar(state) as first:
        await first.submit("k", job("long", "sleep 60"), job("next", "true"))

        async def running() -> bool:
            return (await first.status()).queue.run == 1

        await wait_for(running, timeout=10)
        first.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.process.wait, 10) == 0
    async with sidecar(state) as second:
        assert (await second.job(1)).output == LOST  # not "failed with signal 15"

        async def next_ran() -> bool:
            return bool((await second.job(2)).success)

        await wait_for(next_ran, timeout=10)  # the waiting job starts on the node the lost one freed


async def test_every_task_a_killed_sidecar_left_running_is_killed_by_the_next_one(tmp_path: Path) -> None:
    state, pids = tmp_path / "state", tmp_path / "pids"
    async with sidecar(state) as first:
        await first.submit("k", JobSpec(name="tasks", command=f"sh -c 'echo $$ >> {pids}; exec sleep 60'", tasks=3))
        await wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3, timeout=10)
        kill_with_its_reaper(first.process)
        left = [int(pid) for pid in pids.read_text().split()]
        assert all(alive(pid) for pid in left)  # the tasks outlived their sidecar
    async with sidecar(state) as second:
        assert (await second.job(1)).output == LOST
        await wait_for(lambda: not any(alive(pid) for pid in left), timeout=5)


async def test_the_jobs_of_a_sidecar_killed_with_sigkill_die_with_it(tmp_path: Path) -> None:
    state, pids = tmp_path / "state", tmp_path / "pids"
    async with sidecar(state) as first:
        command = f"sh -c 'sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait'"
        await first.submit("k", JobSpec(name="tasks", command=command, tasks=2))
        await wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 4, timeout=10)
        (reaper,) = reapers(first.process.pid)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        left = [int(pid) for pid in pids.read_text().split()]
        # the reaper saw its input end and killed every task's process group, children included; then it went
        await wait_for(lambda: not any(alive(pid) for pid in left), timeout=5)
        await wait_for(lambda: not alive(reaper), timeout=5)
    async with sidecar(state) as second:
        assert (await second.job(1)).output == LOST  # and the next one reports the job lost


async def test_a_terminated_queue_stays_terminated_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with sidecar(state) as first:
        await first.client.action("terminate", {}, dict)
    async with sidecar(state) as second:
        status = await second.status()
        assert (status.terminated, status.size) == (True, 0)
        with pytest.raises(SidecarError, match="terminated"):
            await second.submit("late", job("late", "true"))


async def test_an_incomplete_last_line_is_dropped_and_a_damaged_journal_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with sidecar(state) as first:
        await first.submit("k", job("a", "true"))
    journal = state / JOURNAL_FILE
    with journal.open("a") as out:
        out.write('{"e":"submit","t":1.0,"jo')  # a write cut short by the kill
    async with sidecar(state) as second:
        assert (await second.job(1)).group == "a"
        assert (await second.submit("k", job("a", "true"))).duplicate
    assert journal.read_text().endswith("\n")

    lines = journal.read_text().splitlines()
    lines.insert(2, "not json")
    journal.write_text("\n".join(lines) + "\n")
    process = start(state)
    _, err = await asyncio.to_thread(process.communicate, timeout=20)
    assert process.returncode == 2
    assert f"{journal} line 3:" in err


async def test_a_second_sidecar_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with sidecar(state):
        process = start(state)
        _, err = await asyncio.to_thread(process.communicate, timeout=20)
    assert process.returncode == 1
    assert "held by another running sidecar" in err
