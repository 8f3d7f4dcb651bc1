"""The fault harness of ``tests/test_chaos.py``: a real ensemble on the local stack while its parts are
killed, hung and slowed at moments drawn from a seed, and its outcomes counted from what the parts recorded.

The stack is ``ensemble up``'s (``ensemble_cli.up.Stack``): a nats-server with a store directory, killed
and started again on the same store and port; one sidecar per member on the local queue with a state
directory (``--state-dir``), started again on the same port and directory; the four services as
processes. Every job appends its id to its member's marker file before it sleeps, so each job's
executions are counted. What happened is read back from the parts afterwards: the NATS streams (with
the time the server stored each message), the sidecars' ``jobinfo`` and the marker files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import yaml
from nats.aio.client import Client

from ensemble_cli.up import NatsAccess, Part, Stack, nats_command, nats_url
from ensemble_core import natsauth, subjects
from ensemble_core.messages import Applied, Decision, MemberSpec, Metrics
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import JobInfo
from sidecar.local import LOST

CLI = [sys.executable, "-m", "ensemble_cli"]
SERVICES = ("creator", "poller", "decider", "actuator")
#: Every kind of fault a run injects once.
KINDS = (
    "nats-kill",
    "creator-kill",
    "poller-kill",
    "decider-kill",
    "actuator-kill",
    "sidecar-kill",
    "sidecar-hang",
    "sidecar-slow",
)
MEMBERS = 3
MIN_SIZE, MAX_SIZE = 1, 4
#: A hung sidecar stays stopped longer than the poller's watch-silence limit (15 s) plus a call's
#: timeout (5 s), so both ways of noticing it fire.
HANG_SECONDS = 22.0
#: A slow sidecar answers every call, and sends every WatchStatus snapshot, this much later ...
SLOW_DELAY = 1.0
#: ... for this long.
SLOW_SECONDS = 10.0
#: Services' settings beyond the defaults: what a killed service had fetched is redelivered after
#: ``ENSEMBLE_ACK_WAIT``; 10 s instead of 30 s keeps the suite short (it only shortens that wait).
SERVICE_ENV = {"ENSEMBLE_ACK_WAIT": "10"}
NAMESPACE, NAME = "default", "chaos"
SECRET = "chaos-secret"
#: the harness's NATS user (no restrictions), beside the services' own
OBSERVER = "chaos"


def ensemble_document(marks: Path) -> dict[str, Any]:
    """Three members like ``examples/hello-world.yaml``, longer, each job marking its execution."""

    def jobs(member: int) -> list[dict[str, Any]]:
        # from the first task only: a job is a task per node, as on Flux
        mark = f"test $FLUX_TASK_RANK != 0 || echo $FLUX_JOB_ID >> {marks}/ran-{member}"
        return [
            {"name": "wide", "command": f"sh -c '{mark}; sleep 3'", "count": 3, "nodes": 3},
            {"name": "pair", "command": f"sh -c '{mark}; sleep 2'", "count": 4, "nodes": 2},
            {"name": "single", "command": f"sh -c '{mark}; sleep 1.5'", "count": 20, "nodes": 1},
        ]

    return {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1",
        "kind": "Ensemble",
        "metadata": {"name": NAME},
        "spec": {
            "checkSeconds": 1,
            "members": [
                {
                    "minicluster": {"spec": {"size": MIN_SIZE, "minSize": MIN_SIZE, "maxSize": MAX_SIZE}},
                    "algorithm": {
                        "name": "workload-demand",
                        "options": {"order": "descending", "scaleChecks": 2, "terminateChecks": 5},
                    },
                    "jobs": jobs(member),
                }
                for member in range(MEMBERS)
            ],
        },
    }


def jobs_per_member() -> int:
    """How many jobs each member's submit queues."""
    return sum(job["count"] for job in ensemble_document(Path())["spec"]["members"][0]["jobs"])


@dataclass
class Fault:
    """One injected fault: what, where, when it began and when the part was back (unix seconds)."""

    kind: str
    member: int | None
    start: float
    end: float


@dataclass
class Stored:
    """A message read back from a stream, with the time the NATS server stored it."""

    at: float
    data: bytes


@dataclass
class FaultOutcome:
    """What became of one fault."""

    kind: str
    member: int | None
    #: seconds after the run's start
    at: float
    seconds: float
    #: the affected members went on (metrics again) or had already ended
    recovered: bool
    #: members left out of a whole-stack fault's recovery because their sidecar was hung at the time
    hung_members: list[int]
    #: fault's end → the first metrics stored after it, of every affected member still running
    to_metrics: float | None
    #: fault's end → the first decision applied after it, on an affected member
    to_applied: float | None


@dataclass
class RunOutcome:
    """The counted outcomes of one run."""

    seed: int
    seconds: float
    completed: bool
    jobs: int
    submitted_once: bool
    ran_exactly_once: int
    lost_reported: int
    lost_ran_once: int
    ran_twice: int
    never_ran: int
    failed_otherwise: int
    unknown_markers: int
    duplicate_applies: int
    out_of_bounds_sizes: int
    deadletters: int
    #: seconds from a decision stored to its ``Applied`` stored: p50 and max over the run's decisions
    apply_lag: dict[str, float | int | None] = field(default_factory=dict)
    faults: list[FaultOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Run:
    """One ensemble on the local stack, its parts at the mercy of :meth:`inject`."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.stack = Stack(workdir)
        self.marks = workdir / "marks"
        self.marks.mkdir()
        self.spec_file = workdir / "ensemble.yaml"
        self.spec_file.write_text(yaml.safe_dump(ensemble_document(self.marks)))
        self.token = ensemble_token(SECRET, NAMESPACE, NAME)
        self.parts: dict[str, Part] = {}
        self.starts: Counter[str] = Counter()
        self.sidecar_ports: dict[int, int] = {}
        self.nats_port = 0
        self.access: NatsAccess | None = None
        self.nc: Client | None = None
        self.background: list[asyncio.Task[None]] = []
        self.faults: list[Fault] = []
        self.started = 0.0

    # -- the stack -------------------------------------------------------------------------------

    def _start(self, role: str, argv: list[str], env: dict[str, str] | None = None) -> Part:
        """Start ``role`` (a new log per start: ``poller.log``, ``poller.1.log`` ...)."""
        n = self.starts[role]
        self.starts[role] += 1
        part = self.stack.start(role if n == 0 else f"{role}.{n}", argv, env)
        self.parts[role] = part
        return part

    async def _start_sidecar(self, member: int) -> None:
        port = self.sidecar_ports.get(member, 0)
        part = self._start(
            f"sidecar-{member}",
            [*CLI, "sidecar", "--backend", "local", "--port", str(port), "--nodes", str(MIN_SIZE),
             "--max-nodes", str(MAX_SIZE), "--provision-delay", "1",
             "--state-dir", str(self.workdir / f"state-{member}"),
             "--test-delay-file", str(self.workdir / f"delay-{member}")],
            {"ENSEMBLE_SIDECAR_TOKEN": self.token},
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while "\n" not in part.log.read_text():
            if part.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {member} did not start: {part.log.with_suffix('.err').read_text()}")
            await asyncio.sleep(0.02)
        self.sidecar_ports[member] = int(part.log.read_text().split("\n", 1)[0])

    def _start_service(self, name: str) -> None:
        endpoints = ",".join(f"{i}=127.0.0.1:{port}" for i, port in sorted(self.sidecar_ports.items()))
        env = {
            "ENSEMBLE_NATS_URL": self._access.url_for(name),
            "ENSEMBLE_SIDECAR_TOKEN": SECRET,
            "ENSEMBLE_FILE": str(self.spec_file),
            "ENSEMBLE_ENDPOINTS": endpoints,
            "ENSEMBLE_NAMESPACE": NAMESPACE,
            **SERVICE_ENV,
        }
        self._start(name, [*CLI, name], env)

    async def _restart_nats(self) -> None:
        self._start(
            "nats-server",
            nats_command(self.workdir / "jetstream", self.workdir / "ports", self.nats_port,
                         config=self.workdir / "nats-auth.conf"),
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not _port_open(self.nats_port):
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start again on its port")
            await asyncio.sleep(0.02)

    async def _start_nats(self) -> NatsAccess:
        """nats-server with the users `ensemble up` gives it (each service under production's permissions),
        and the harness's own unrestricted user: it reads every stream and bucket to count what happened."""
        users = [*natsauth.SERVICES, natsauth.MONITOR, OBSERVER]
        passwords = {user: secrets.token_hex(16) for user in users}
        text = natsauth.authorization({s: passwords[s] for s in natsauth.SERVICES}, monitor=passwords[natsauth.MONITOR])
        end = "  ]\n}\n"
        assert text.endswith(end), "natsauth.authorization() changed its layout"
        config = self.workdir / "nats-auth.conf"
        config.write_text(f'{text[: -len(end)]}    {{user: {OBSERVER}, password: "{passwords[OBSERVER]}"}},\n{end}')
        ports = self.workdir / "ports"
        ports.mkdir()
        part = self.stack.start("nats-server", nats_command(self.workdir / "jetstream", ports, config=config))
        deadline = time.monotonic() + 20
        while (url := nats_url(ports)) is None:
            if time.monotonic() > deadline or part.process.poll() is not None:
                raise RuntimeError(f"nats-server did not start: see {part.log}")
            await asyncio.sleep(0.05)
        return NatsAccess(url, passwords)

    async def start(self) -> None:
        """Start NATS, the sidecars and the services; return once the first decision is applied."""
        self.started = time.time()
        self.access = await self._start_nats()
        self.parts["nats-server"] = self.stack.parts[-1]
        self.starts["nats-server"] = 1
        self.nats_port = int(self.access.url.rsplit(":", 1)[1])
        for member in range(MEMBERS):
            await self._start_sidecar(member)
        for name in SERVICES:
            self._start_service(name)
        self.nc = await nats.connect(self._access.url_for(OBSERVER), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await self._wait(self._applied_any, 30, "no decision was applied")

    @property
    def _access(self) -> NatsAccess:
        assert self.access is not None, "start() first"
        return self.access

    async def _applied_any(self) -> bool:
        assert self.nc is not None
        try:
            info = await self.nc.jetstream().stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.ALL_APPLIED)
        except Exception:
            return False
        return bool(info.state.subjects)

    async def _phases(self) -> list[str]:
        assert self.nc is not None
        try:
            bucket = await self.nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
            phases = []
            for member in range(MEMBERS):
                entry = await bucket.get(MemberAddress(NAMESPACE, NAME, member).key)
                phases.append(msgspec.json.decode(entry.value or b"", type=MemberSpec).phase)
        except Exception:  # NATS down for a fault, or the members not registered yet
            return []
        return phases

    async def done(self) -> bool:
        """Every member terminated (a part dying on its own fails the run)."""
        dead = [role for role, part in self.parts.items() if part.process.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited on their own; see {self.workdir}")
        phases = await self._phases()
        return bool(phases) and all(phase == "terminated" for phase in phases)

    async def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f}s; logs in {self.workdir}")
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        """Resume anything hung, then stop services, sidecars and NATS in that order."""
        for task in self.background:
            task.cancel()
        for part in self.parts.values():
            with contextlib.suppress(ProcessLookupError):
                part.process.send_signal(signal.SIGCONT)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        order = {"nats-server": 0, "sidecar": 1}
        self.stack.parts.sort(key=lambda part: order.get(part.name.split(".")[0].rstrip("-0123456789"), 2))
        await self.stack.stop()

    # -- faults ----------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, int | None, float]]:
        """Every kind once in a seeded order, each after a seeded pause; the sidecar faults on distinct members."""
        kinds = self.rng.sample(KINDS, len(KINDS))
        sidecar_kinds = ("sidecar-kill", "sidecar-hang", "sidecar-slow")
        members = dict(zip(sidecar_kinds, self.rng.sample(range(MEMBERS), 3), strict=True))
        return [(kind, members.get(kind), self.rng.uniform(1.0, 3.5)) for kind in kinds]

    async def _kill(self, role: str) -> None:
        part = self.parts[role]
        part.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(part.process.wait)
        self.stack.parts.remove(part)

    async def inject(self, kind: str, member: int | None) -> Fault:
        """Inject one fault; kills come back after a seeded downtime, hangs and slowness end in the background."""
        start = time.time()
        fault = Fault(kind, member, start, start)
        if kind == "sidecar-hang":
            assert member is not None
            self.parts[f"sidecar-{member}"].process.send_signal(signal.SIGSTOP)
            self.background.append(asyncio.create_task(self._resume(fault)))
        elif kind == "sidecar-slow":
            (self.workdir / f"delay-{member}").write_text(str(SLOW_DELAY))
            self.background.append(asyncio.create_task(self._fast_again(fault)))
        else:
            role = {"nats-kill": "nats-server", "sidecar-kill": f"sidecar-{member}"}.get(kind, kind.split("-")[0])
            await self._kill(role)
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
            fault.end = time.time()
            if kind == "nats-kill":
                await self._restart_nats()
            elif kind == "sidecar-kill":
                assert member is not None
                await self._start_sidecar(member)
            else:
                self._start_service(role)
        self.faults.append(fault)
        return fault

    async def _resume(self, fault: Fault) -> None:
        await asyncio.sleep(HANG_SECONDS)
        self.parts[f"sidecar-{fault.member}"].process.send_signal(signal.SIGCONT)
        fault.end = time.time()

    async def _fast_again(self, fault: Fault) -> None:
        await asyncio.sleep(SLOW_SECONDS)
        (self.workdir / f"delay-{fault.member}").write_text("")

    async def run(self, timeout: float) -> None:
        """Inject the planned faults, then wait for every member to terminate."""
        for kind, member, pause in self.plan():
            await asyncio.sleep(pause)
            await self.inject(kind, member)
            if await self.done():
                break
        await asyncio.gather(*self.background)
        await self._wait(self.done, timeout, "the ensemble did not complete")

    # -- outcomes --------------------------------------------------------------------------------

    async def _stored(self, stream: str, subject: str) -> list[Stored]:
        """Every message of ``subject`` in ``stream`` with the time the server stored it."""
        assert self.nc is not None
        js = self.nc.jetstream()
        info = await js.stream_info(stream, subjects_filter=subject)
        expected = sum((info.state.subjects or {}).values())
        found: list[Stored] = []
        if not expected:
            return found
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        try:
            while len(found) < expected:
                msg = await sub.next_msg(timeout=5)
                found.append(Stored(msg.metadata.timestamp.timestamp(), msg.data))
        finally:
            await sub.unsubscribe()
        return found

    async def outcome(self, completed: bool) -> RunOutcome:
        """Count what happened, from the streams, the sidecars and the marker files."""
        metrics = [(s.at, msgspec.json.decode(s.data, type=Metrics)) for s in await self._stored(
            subjects.METRICS_STREAM, subjects.ALL_METRICS)]  # fmt: skip
        applied = [(s.at, msgspec.json.decode(s.data, type=Applied)) for s in await self._stored(
            subjects.EVENTS_STREAM, subjects.ALL_APPLIED)]  # fmt: skip
        decisions = [(s.at, msgspec.json.decode(s.data, type=Decision)) for s in await self._stored(
            subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS)]  # fmt: skip
        deadletters = len(await self._stored(subjects.EVENTS_STREAM, subjects.ALL_DEADLETTER))
        expected = jobs_per_member()
        outcome = RunOutcome(
            seed=self.seed, seconds=round(time.time() - self.started, 1), completed=completed, jobs=0,
            submitted_once=True, ran_exactly_once=0, lost_reported=0, lost_ran_once=0, ran_twice=0, never_ran=0,
            failed_otherwise=0, unknown_markers=0, duplicate_applies=0, out_of_bounds_sizes=0, deadletters=deadletters,
        )  # fmt: skip
        for member in range(MEMBERS):
            async with SidecarClient(f"127.0.0.1:{self.sidecar_ports[member]}", self.token) as client:
                jobs = await client.action("jobinfo", {}, list[JobInfo])
            marker = self.marks / f"ran-{member}"
            ran = Counter(int(line) for line in (marker.read_text().split() if marker.exists() else []))
            self._count_jobs(outcome, member, jobs, ran, expected)

        ok_applies = Counter(a.decision for _, a in applied if a.ok)
        outcome.duplicate_applies = sum(n - 1 for n in ok_applies.values() if n > 1)
        # after a member is terminated its size is 0: checks from the terminate decision on are exempt
        ended = {d.member: at for at, d in decisions if d.action == "terminate"}
        sizes = [m.size for at, m in metrics if at < ended.get(m.member, float("inf"))]
        sizes += [a.size_after for _, a in applied if a.ok and a.action == "scale" and a.size_after is not None]
        outcome.out_of_bounds_sizes = sum(1 for size in sizes if not MIN_SIZE <= size <= MAX_SIZE)
        first_applied: dict[str, float] = {}
        for at, a in applied:
            first_applied.setdefault(a.decision, at)
        outcome.apply_lag = _spread([first_applied[d.id] - at for at, d in decisions if d.id in first_applied])
        terminated_at = {a.member: at for at, a in applied if a.ok and a.action == "terminate"}
        for fault in self.faults:
            hung = sorted(
                f.member
                for f in self.faults
                if f.kind == "sidecar-hang" and f.member is not None and f is not fault and f.start <= fault.end < f.end
            )
            outcome.faults.append(_fault_outcome(fault, self.started, hung, metrics, applied, terminated_at))
        return outcome

    def _count_jobs(
        self, outcome: RunOutcome, member: int, jobs: list[JobInfo], ran: Counter[int], expected: int
    ) -> None:
        outcome.jobs += len(jobs)
        if len(jobs) != expected or len({job.id for job in jobs}) != expected:
            outcome.submitted_once = False
            outcome.problems.append(f"member {member}: the sidecar holds {len(jobs)} jobs, {expected} were submitted")
        ids = {job.id for job in jobs}
        outcome.unknown_markers += sum(n for job_id, n in ran.items() if job_id not in ids)
        for job in jobs:
            runs = ran[job.id]
            if job.output == LOST:
                outcome.lost_reported += 1
                outcome.lost_ran_once += runs == 1
                outcome.ran_twice += runs > 1
                continue
            if runs == 1:
                outcome.ran_exactly_once += 1
            elif runs > 1:
                outcome.ran_twice += 1
                outcome.problems.append(f"member {member}: job {job.id} ran {runs} times")
            else:
                outcome.never_ran += 1
                outcome.problems.append(f"member {member}: job {job.id} never ran ({job.state})")
            if job.success is not True and runs == 1:
                outcome.failed_otherwise += 1
                outcome.problems.append(f"member {member}: job {job.id} failed: {job.output[-200:]!r}")


def _fault_outcome(
    fault: Fault,
    started: float,
    hung: list[int],
    metrics: list[tuple[float, Metrics]],
    applied: list[tuple[float, Applied]],
    terminated_at: dict[int, float],
) -> FaultOutcome:
    """Recovery of one fault. A whole-stack fault's next metrics leave out members hung meanwhile: their
    metrics wait for the hang (and the poller's backoff after it), which the hang's own outcome measures."""
    if fault.member is not None:
        members, hung = [fault.member], []
    else:
        members = [m for m in range(MEMBERS) if m not in hung]
    running = [m for m in members if terminated_at.get(m, float("inf")) > fault.end]
    waits = []
    for member in running:
        after = [at for at, m in metrics if m.member == member and at > fault.end]
        waits.append(min(after) - fault.end if after else None)
    recovered = all(wait is not None for wait in waits)
    to_metrics = max((wait for wait in waits if wait is not None), default=None) if recovered else None
    applies = [at for at, a in applied if a.member in members and at > fault.end]
    return FaultOutcome(
        kind=fault.kind,
        member=fault.member,
        at=round(fault.start - started, 1),
        seconds=round(fault.end - fault.start, 2),
        recovered=recovered,
        hung_members=hung,
        to_metrics=None if to_metrics is None else round(to_metrics, 2),
        to_applied=round(min(applies) - fault.end, 2) if applies and running else None,
    )


def _spread(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 2) if values else None,
        "max": round(max(values), 2) if values else None,
    }


def report(runs: list[RunOutcome], wall_seconds: float) -> dict[str, Any]:
    """The counted outcomes as ``bench/results/chaos.json`` holds them."""
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        faults = [(run, f) for run in runs for f in run.faults if f.kind == kind]
        in_runs = {run.seed: run for run, _ in faults}.values()
        kinds[kind] = {
            "injected": len(faults),
            "recovered": sum(f.recovered for _, f in faults),
            "fault_seconds": _spread([f.seconds for _, f in faults]),
            "recovery_to_next_metrics_s": _spread([f.to_metrics for _, f in faults if f.to_metrics is not None]),
            "recovery_to_next_applied_s": _spread([f.to_applied for _, f in faults if f.to_applied is not None]),
            "runs_completed": sum(run.completed for run in in_runs),
            "jobs_run_exactly_once": sum(run.ran_exactly_once for run in in_runs),
            "lost_jobs_reported": sum(run.lost_reported for run in in_runs),
            "duplicate_applies": sum(run.duplicate_applies for run in in_runs),
            "out_of_bounds_sizes": sum(run.out_of_bounds_sizes for run in in_runs),
        }
    return {
        "suite": "tests/test_chaos.py",
        "what": "one real ensemble per seed (3 members, checkSeconds 1, local stack), every fault kind injected "
        "once per run at seeded moments; outcomes counted from the NATS streams, the sidecars' jobinfo and "
        "each job's marker line",
        "wall_seconds": round(wall_seconds, 1),
        "settings": {
            "members": MEMBERS,
            "jobs_per_member": jobs_per_member(),
            "size": [MIN_SIZE, MAX_SIZE],
            "hang_seconds": HANG_SECONDS,
            "slow_delay_seconds": SLOW_DELAY,
            "slow_seconds": SLOW_SECONDS,
            **SERVICE_ENV,
        },
        "recovery_is_measured": {
            "from": "the fault's end: a killed part started again (after 0.2-1.5 s down), a hung sidecar "
            "resumed (SIGCONT), a slow sidecar's slowness began",
            "to_next_metrics": "the first metrics stored after it, of every affected member still running "
            "(the slowest of them); a whole-stack fault leaves out members whose sidecar was hung at its end "
            "(listed in hung_members)",
            "to_next_applied": "the first decision applied after it on an affected member; it includes the time "
            "the algorithm had nothing to decide",
        },
        "faults": kinds,
        "runs": [msgspec.to_builtins(run) for run in runs],
        "covered_elsewhere": {
            "kubernetes-api-409-500-bursts": "tests/test_kubernetes.py::test_bursts_of_409_and_500_from_the_api_"
            "are_retried_and_the_decision_is_applied_once (kmock's emulator over real HTTP)",
            "dropped-watch-connections": "not applicable: the creator lists Ensembles every resync period "
            "(ENSEMBLE_RESYNC_SECONDS) rather than watching them, so there is no watch to drop",
        },
    }


def write_report(path: Path, runs: list[RunOutcome], wall_seconds: float) -> None:
    """Write :func:`report` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report(runs, wall_seconds), indent=2) + "\n")
