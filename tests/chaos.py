"""The fault harness of ``tests/test_chaos.py``: a real ensemble on the local stack while its parts are
killed, hung and slowed at moments drawn from a seed, and its outcomes counted from what the parts recorded.

The stack is ``ensemble up``'s (``ensemble_cli.up.Stack``): a nats-server with a store directory, killed
and started again on the same store and port; one sidecar per member on the local queue with a state
directory (``--state-dir``), started again on the same port and directory; the four services as
processes. Faults come one at a time, in a seeded order: each part killed (``kill -9``) alone, two parts
killed at once (the actuator and a sidecar; the poller and nats-server), the whole stack killed at once
and started again, a sidecar hung (SIGSTOP) and one slow.

Every job knows which attempt of which job it is (``ENSEMBLE_JOB_GROUP``, ``ENSEMBLE_JOB_INDEX``,
``ENSEMBLE_JOB_ATTEMPT``) and writes a ``start`` line to its member's marker file before it sleeps and an
``end`` line after, so an attempt killed on the way shows a start without an end. What happened is read
back from the parts afterwards and cross-checked: the marker lines, the job reports on ``ENSEMBLE_JOBS``,
the members' job ledgers (``ensemble-jobs``), the sidecars' ``jobinfo``, and the NATS streams of metrics,
decisions and applied decisions (with the time the server stored each message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import yaml
from nats.aio.client import Client

from ensemble_cli import results
from ensemble_cli.up import NatsAccess, Part, Stack, nats_command, nats_url
from ensemble_core import ledger, natsauth, subjects
from ensemble_core.messages import Applied, Decision, InstanceChanged, JobEnded, JobReport, MemberSpec, Metrics
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import JobInfo

CLI = [sys.executable, "-m", "ensemble_cli"]
SERVICES = ("creator", "poller", "decider", "actuator")
#: Every kind of fault a run injects once: which parts it kills, hangs or slows ("sidecar": one sidecar,
#: drawn from the seed; "stack": nats-server, the four services and every sidecar at once).
KINDS: dict[str, tuple[str, ...]] = {
    "nats-kill": ("nats-server",),
    "creator-kill": ("creator",),
    "poller-kill": ("poller",),
    "decider-kill": ("decider",),
    "actuator-kill": ("actuator",),
    "sidecar-kill": ("sidecar",),
    "sidecar-hang": ("sidecar",),
    "sidecar-slow": ("sidecar",),
    "actuator+sidecar-kill": ("actuator", "sidecar"),
    "poller+nats-kill": ("poller", "nats-server"),
    "stack-kill": ("stack",),
}
MEMBERS = 3
#: The ensemble's checkSeconds: the poller checks each member this often.
CHECK_SECONDS = 1
MIN_SIZE, MAX_SIZE = 1, 4
#: Each member's jobs: (group, count, nodes, seconds each sleeps).
JOBS = (("wide", 3, 3, 3.0), ("pair", 4, 2, 2.0), ("single", 20, 1, 1.5))
#: Seconds between two faults (drawn from this range) ...
PAUSE = (0.5, 2.5)
#: ... and how long each killed part stays down (drawn for each part).
DOWN = (0.2, 1.5)
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
#: A fault's window, for what it may have caused later (an applied decision redelivered after it): from
#: its start to its end plus the ack wait and this margin.
WINDOW_MARGIN = 5.0
NAMESPACE, NAME = "default", "chaos"
SECRET = "chaos-secret"
#: the harness's NATS user (no restrictions), beside the services' own
OBSERVER = "chaos"
#: A marker line's fields after ``start`` / ``end``: group, index, attempt, the sidecar's job id, unix time.
MARK_FIELDS = 5

Job = tuple[int, str, int]
"""A job's identity: member, group, index."""
AttemptKey = tuple[int, str, int, int]
"""One attempt of a job: member, group, index, attempt."""


def ensemble_document(marks: Path) -> dict[str, Any]:
    """Three members like ``examples/hello-world.yaml``, longer, each job marking its start and its end."""

    def jobs(member: int) -> list[dict[str, Any]]:
        who = "$ENSEMBLE_JOB_GROUP $ENSEMBLE_JOB_INDEX $ENSEMBLE_JOB_ATTEMPT $FLUX_JOB_ID $(date +%s.%N)"
        # from the first task only: a job is a task per node, as on Flux
        mark = f">> {marks}/ran-{member}"
        return [
            {
                "name": name,
                "command": f"sh -c 'test $FLUX_TASK_RANK != 0 || echo start {who} {mark}; "
                f"sleep {seconds} && {{ test $FLUX_TASK_RANK != 0 || echo end {who} {mark}; }}'",
                "count": count,
                "nodes": nodes,
            }
            for name, count, nodes, seconds in JOBS
        ]

    return {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1",
        "kind": "Ensemble",
        "metadata": {"name": NAME},
        "spec": {
            "checkSeconds": CHECK_SECONDS,
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
    return sum(count for _, count, _, _ in JOBS)


@dataclass
class Fault:
    """One injected fault: what, which parts, which members' sidecars, when it began and when it ended."""

    kind: str
    #: the roles it killed, hung or slowed (``nats-server``, ``poller``, ``sidecar-1`` ...)
    parts: list[str]
    #: the members whose sidecar it killed, hung or slowed
    sidecars: list[int]
    start: float
    #: when the last part was started again (a hung sidecar: resumed; a slow one: its slowness began)
    end: float


@dataclass
class Stored:
    """A message read back from a stream, with the time the NATS server stored it."""

    at: float
    data: bytes


@dataclass
class Attempt:
    """One attempt of one job, as every source saw it."""

    #: times of its ``start`` / ``end`` marker lines (more than one start: it ran twice)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    #: its JobEnded report: result, start and end on the sidecar's clock
    result: str = ""
    t_run: float | None = None
    t_end: float | None = None
    #: how the sidecar's ``jobinfo`` lists it (empty: not listed)
    listed: str = ""

    @property
    def started(self) -> bool:
        """It ran: its process marked its start, or the sidecar reported it ended after it had started."""
        return bool(self.starts) or (bool(self.result) and self.t_run is not None)

    @property
    def succeeded(self) -> bool:
        """Its process got to its end line and exited 0 (reported succeeded)."""
        return bool(self.ends) and self.result == "succeeded"

    @property
    def lost(self) -> bool:
        """Reported lost, or started and never got to its end line."""
        return self.result == "lost" or (bool(self.starts) and not self.ends)

    @property
    def began(self) -> float | None:
        """When it started as its sidecar saw it: the report's start (recorded before the process is spawned,
        so a sidecar killed at once still loses it), else its start line."""
        if self.t_run is not None:
            return self.t_run
        return min(self.starts) if self.starts else None

    @property
    def stopped(self) -> float | None:
        """When it stopped running as its sidecar saw it: the report's end (a lost attempt's is when the sidecar,
        started again, declared it lost, though its process may have ended before), else its end line."""
        if self.t_end is not None:
            return self.t_end
        return max(self.ends) if self.ends else None


@dataclass
class FaultOutcome:
    """What one fault itself caused, and how the ensemble recovered from it."""

    kind: str
    parts: list[str]
    sidecars: list[int]
    #: seconds after the run's start
    at: float
    seconds: float
    #: other faults that struck while it lasted or before it was recovered from (they share its figures' time)
    overlapped_by: list[str]
    #: the affected members went on (metrics again) or had already ended
    recovered: bool
    #: members left out of a whole-stack fault's recovery because their sidecar was hung at the time
    hung_members: list[int]
    #: fault's end → the first metrics stored after it, of every affected member still running
    to_metrics: float | None
    #: fault's end → the first decision applied after it, on an affected member
    to_applied: float | None
    #: attempts running (as their sidecar saw it) at its start on the members it affected
    running_attempts: int
    #: attempts it lost: running on a sidecar it killed when it struck
    lost_attempts: int
    #: of those, attempts whose process still got to its end line (the sidecar was gone and reported it lost)
    lost_ran_to_end: int
    #: jobs that got another attempt because of it
    jobs_retried: int
    #: fault's end → the start of the last attempt that replaced one it lost
    to_rerun: float | None
    #: decisions applied a second time, and sizes out of bounds, within its window
    duplicate_applies: int
    out_of_bounds_sizes: int


@dataclass
class RunOutcome:
    """The counted outcomes of one run."""

    seed: int
    seconds: float
    completed: bool
    #: jobs the members' ledgers allocated (member, group, index)
    jobs: int = 0
    #: jobs that ended with exactly one successful attempt (its end line, and reported succeeded)
    succeeded_exactly_once: int = 0
    #: attempts that ran (started), of all jobs
    attempts: int = 0
    #: attempts reported lost, or started without getting to their end line
    lost_attempts: int = 0
    #: lost attempts whose process still got to its end line (its sidecar had been killed)
    lost_ran_to_end: int = 0
    failed_attempts: int = 0
    #: jobs with more than one attempt
    retried: int = 0
    #: jobs no attempt of which ran
    never_ran: int = 0
    #: jobs with two or more successful attempts
    ran_twice: int = 0
    #: one attempt with two start lines (a sidecar ran an attempt twice)
    attempts_started_twice: int = 0
    duplicate_applies: int = 0
    out_of_bounds_sizes: int = 0
    deadletters: int = 0
    #: replaced queues reported (InstanceChanged after the first)
    instance_changes: int = 0
    #: what the markers, the reports, the jobinfo and the ledgers disagree on (listed in ``problems``)
    cross_check_mismatches: int = 0
    #: the ledgers, summed over members: jobs by state, outstanding, extra_successes, attempts ended by result
    ledger: dict[str, Any] = field(default_factory=dict)
    #: seconds from a decision stored to its ``Applied`` stored: p50 and max over the run's decisions
    apply_lag: dict[str, float | int | None] = field(default_factory=dict)
    faults: list[FaultOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def target_met(self) -> bool:
        """Every job succeeded exactly once; nothing never ran or ran twice; no duplicate apply, no bad size."""
        return (
            self.completed
            and self.jobs == MEMBERS * jobs_per_member()
            and self.succeeded_exactly_once == self.jobs
            and (self.never_ran, self.ran_twice, self.duplicate_applies, self.out_of_bounds_sizes) == (0, 0, 0, 0)
        )


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

    async def _restart(self, role: str) -> None:
        """Start a killed part again: on the same port, store or state directory."""
        if role == "nats-server":
            await self._restart_nats()
        elif role.startswith("sidecar-"):
            await self._start_sidecar(int(role.removeprefix("sidecar-")))
        else:
            self._start_service(role)

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
        """Start NATS, the sidecars and the services; return once the first job runs (so faults strike work)."""
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
        await self._wait(self._job_started, 30, "no job started")

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

    async def _job_started(self) -> bool:
        return any(marker.stat().st_size for marker in self.marks.iterdir())

    async def _phases(self) -> list[str]:
        assert self.nc is not None
        try:
            bucket = await self.nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
            phases: list[str] = []
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
        """Every kind once in a seeded order, each after a seeded pause. The hang is in the first half: it
        lasts longer than the rest of the plan, and drawn late it would strike a member whose work is done.
        The whole stack is killed before the hang (a kill of the hung sidecar would end the hang before the
        poller notices the silence). The single-sidecar faults strike distinct members; the actuator's
        partner is a sidecar other than the one that hangs."""
        kinds = self.rng.sample([kind for kind in KINDS if kind != "sidecar-hang"], len(KINDS) - 1)
        hang = self.rng.randrange(len(KINDS) // 2)
        kinds.insert(hang, "sidecar-hang")
        if kinds.index("stack-kill") > hang:
            kinds.remove("stack-kill")
            kinds.insert(hang, "stack-kill")
        sidecar_kinds = ("sidecar-kill", "sidecar-hang", "sidecar-slow")
        members: dict[str, int] = dict(zip(sidecar_kinds, self.rng.sample(range(MEMBERS), 3), strict=True))
        members["actuator+sidecar-kill"] = self.rng.choice([m for m in range(MEMBERS) if m != members["sidecar-hang"]])
        return [(kind, members.get(kind), self.rng.uniform(*PAUSE)) for kind in kinds]

    def _roles(self, kind: str, member: int | None) -> list[str]:
        if KINDS[kind] == ("stack",):
            return ["nats-server", *SERVICES, *(f"sidecar-{m}" for m in range(MEMBERS))]
        return [f"sidecar-{member}" if part == "sidecar" else part for part in KINDS[kind]]

    async def _kill(self, roles: list[str]) -> None:
        """``kill -9`` these parts at once."""
        parts = [self.parts[role] for role in roles]
        for part in parts:
            part.process.send_signal(signal.SIGKILL)
        for part in parts:
            await asyncio.to_thread(part.process.wait)
            self.stack.parts.remove(part)

    async def inject(self, kind: str, member: int | None) -> Fault:
        """Inject one fault. Killed parts come back after a seeded downtime (each its own; the whole stack
        one, then nats-server, the sidecars and the services in that order); hangs and slowness end in the
        background."""
        roles = self._roles(kind, member)
        start = time.time()
        sidecars = sorted(int(role.removeprefix("sidecar-")) for role in roles if role.startswith("sidecar-"))
        fault = Fault(kind, roles, sidecars, start, start)
        if kind == "sidecar-hang":
            process = self.parts[roles[0]].process
            process.send_signal(signal.SIGSTOP)
            self.background.append(asyncio.create_task(self._resume(fault, process)))
        elif kind == "sidecar-slow":
            (self.workdir / f"delay-{member}").write_text(str(SLOW_DELAY))
            self.background.append(asyncio.create_task(self._fast_again(fault)))
        else:
            await self._kill(roles)
            if kind == "stack-kill":
                await asyncio.sleep(self.rng.uniform(*DOWN))
                for role in roles:
                    fault.end = time.time()
                    await self._restart(role)
            else:
                waited = 0.0
                for down, role in sorted((self.rng.uniform(*DOWN), role) for role in roles):
                    await asyncio.sleep(max(0.0, down - waited))
                    waited = down
                    fault.end = time.time()
                    await self._restart(role)
        self.faults.append(fault)
        return fault

    async def _resume(self, fault: Fault, process: subprocess.Popen[bytes]) -> None:
        await asyncio.sleep(HANG_SECONDS)
        process.send_signal(signal.SIGCONT)
        fault.end = time.time()

    async def _fast_again(self, fault: Fault) -> None:
        await asyncio.sleep(SLOW_SECONDS)
        (self.workdir / f"delay-{fault.sidecars[0]}").write_text("")

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

    def _marks(self, outcome: RunOutcome, attempts: dict[AttemptKey, Attempt]) -> None:
        """Read every member's marker lines into ``attempts``."""
        for member in range(MEMBERS):
            marker = self.marks / f"ran-{member}"
            for line in marker.read_text().splitlines() if marker.exists() else []:
                what, *rest = line.split() or [""]
                try:
                    group, index, attempt, _job_id, at = rest
                    key = (member, group, int(index), int(attempt))
                    when = float(at)
                except ValueError:
                    what = ""
                if what not in ("start", "end"):
                    _mismatch(outcome, f"member {member}: unreadable marker line {line!r}")
                    continue
                seen = attempts.setdefault(key, Attempt())
                (seen.starts if what == "start" else seen.ends).append(when)

    async def _reports(self, outcome: RunOutcome, attempts: dict[AttemptKey, Attempt]) -> None:
        """Read every attempt's end reported on ``ENSEMBLE_JOBS`` into ``attempts``; count replaced queues."""
        assert self.nc is not None
        js = self.nc.jetstream()
        for member, reports in (await results.read_reports(js, NAMESPACE, NAME)).items():
            for report in reports:
                seen = attempts.setdefault((member, report.group, report.index, report.attempt), Attempt())
                if seen.result:
                    _mismatch(outcome, f"member {member}: {_name(report)} reported twice ({seen.result}, "
                                       f"{report.result})")  # fmt: skip
                seen.result, seen.t_run, seen.t_end = report.result, report.t_run, report.t_end
        decoder = msgspec.json.Decoder(JobReport)
        for stored in await self._stored(subjects.JOBS_STREAM, subjects.ALL_JOBS):
            changed = decoder.decode(stored.data)
            outcome.instance_changes += isinstance(changed, InstanceChanged) and bool(changed.previous)

    async def _listed(self, outcome: RunOutcome, attempts: dict[AttemptKey, Attempt]) -> None:
        """Read every sidecar's ``jobinfo`` into ``attempts``."""
        for member in range(MEMBERS):
            async with SidecarClient(f"127.0.0.1:{self.sidecar_ports[member]}", self.token) as client:
                jobs = await client.action("jobinfo", {}, list[JobInfo])
            for job in jobs:
                seen = attempts.setdefault((member, job.group, job.index, job.attempt), Attempt())
                if seen.listed:
                    _mismatch(outcome, f"member {member}: {job.group}[{job.index}] attempt {job.attempt} is "
                                       "queued twice on its sidecar")  # fmt: skip
                seen.listed = job.result or job.state

    async def _ledgers(self, outcome: RunOutcome) -> dict[Job, int]:
        """The jobs the members' ledgers allocated, each with its ledger's current attempt; check the ledgers."""
        assert self.nc is not None
        bucket = await self.nc.jetstream().key_value(subjects.JOBS_BUCKET)
        allocated: dict[Job, int] = {}
        totals: Counter[str] = Counter()
        ended: Counter[str] = Counter()
        for member in range(MEMBERS):
            record = await results.read_ledger(bucket, MemberAddress(NAMESPACE, NAME, member))
            if record is None:
                _mismatch(outcome, f"member {member}: no job ledger")
                continue
            counts = ledger.counts(record)
            totals.update(counts)
            totals["outstanding"] += record.outstanding
            totals["extra_successes"] += record.extra_successes
            ended.update(record.ended)
            jobs = sum(counts.values())
            if jobs != jobs_per_member():
                _mismatch(outcome, f"member {member}: its ledger holds {jobs} jobs, {jobs_per_member()} were submitted")
            if counts["succeeded"] != jobs or record.outstanding or record.extra_successes:
                _mismatch(outcome, f"member {member}: ledger {counts}, outstanding {record.outstanding}, "
                                   f"extra_successes {record.extra_successes}")  # fmt: skip
            for name, group in record.groups.items():
                for i, attempt in enumerate(group.attempts):
                    allocated[(member, name, i)] = attempt
        outcome.ledger = {**{k: totals[k] for k in (*ledger.STATE_NAMES.values(), "outstanding", "extra_successes")},
                          "attempts_ended": dict(sorted(ended.items()))}  # fmt: skip
        return allocated

    async def outcome(self, completed: bool) -> RunOutcome:
        """Count what happened, from the marker lines, the job reports, the ledgers, the sidecars and the streams."""
        metrics = [(s.at, msgspec.json.decode(s.data, type=Metrics)) for s in await self._stored(
            subjects.METRICS_STREAM, subjects.ALL_METRICS)]  # fmt: skip
        applied = [(s.at, msgspec.json.decode(s.data, type=Applied)) for s in await self._stored(
            subjects.EVENTS_STREAM, subjects.ALL_APPLIED)]  # fmt: skip
        decisions = [(s.at, msgspec.json.decode(s.data, type=Decision)) for s in await self._stored(
            subjects.DECISIONS_STREAM, subjects.ALL_DECISIONS)]  # fmt: skip
        outcome = RunOutcome(seed=self.seed, seconds=round(time.time() - self.started, 1), completed=completed)
        outcome.deadletters = len(await self._stored(subjects.EVENTS_STREAM, subjects.ALL_DEADLETTER))
        attempts: dict[AttemptKey, Attempt] = {}
        self._marks(outcome, attempts)
        await self._reports(outcome, attempts)
        await self._listed(outcome, attempts)
        allocated = await self._ledgers(outcome)
        _count_jobs(outcome, attempts, allocated)

        # a decision applied twice: the time of each apply after its first
        applies: dict[str, list[float]] = {}
        for at, a in applied:
            if a.ok:
                applies.setdefault(a.decision, []).append(at)
        again = [at for ats in applies.values() for at in ats[1:]]
        outcome.duplicate_applies = len(again)
        # after a member is terminated its size is 0: checks from the terminate decision on are exempt
        ended = {d.member: at for at, d in decisions if d.action == "terminate"}
        sizes = [(at, m.size) for at, m in metrics if at < ended.get(m.member, float("inf"))]
        sizes += [(at, a.size_after) for at, a in applied if a.ok and a.action == "scale" and a.size_after is not None]
        bad_sizes = [at for at, size in sizes if not MIN_SIZE <= size <= MAX_SIZE]
        outcome.out_of_bounds_sizes = len(bad_sizes)
        first_applied: dict[str, float] = {}
        for at, a in applied:
            first_applied.setdefault(a.decision, at)
        outcome.apply_lag = _spread([first_applied[d.id] - at for at, d in decisions if d.id in first_applied])
        # a member ends for the recovery figures at its terminate decision: the poller stops polling it then,
        # so no metrics are due from it afterwards even when the terminate is applied later
        terminated_at = {a.member: at for at, a in applied if a.ok and a.action == "terminate"}
        for at, d in decisions:
            if d.action == "terminate":
                terminated_at[d.member] = min(at, terminated_at.get(d.member, at))
        caused = _attribute_losses(outcome, self.faults, attempts)
        for fault in self.faults:
            hung = sorted(
                f.sidecars[0]
                for f in self.faults
                if f.kind == "sidecar-hang" and f is not fault and f.start <= fault.end < f.end
            )
            row = _fault_outcome(fault, self.started, hung, metrics, applied, terminated_at)
            until = fault.end + (row.to_metrics or 0.0)
            row.overlapped_by = [
                f.kind for f in self.faults if f is not fault and f.start <= until and f.end >= fault.start
            ]
            _fault_jobs(row, fault, attempts, caused.get(id(fault), []))
            window = (fault.start, fault.end + float(SERVICE_ENV["ENSEMBLE_ACK_WAIT"]) + WINDOW_MARGIN)
            row.duplicate_applies = sum(window[0] <= at <= window[1] for at in again)
            row.out_of_bounds_sizes = sum(window[0] <= at <= window[1] for at in bad_sizes)
            outcome.faults.append(row)
        return outcome


def _name(report: JobEnded) -> str:
    return f"{report.group}[{report.index}] attempt {report.attempt}"


def _mismatch(outcome: RunOutcome, problem: str) -> None:
    outcome.cross_check_mismatches += 1
    outcome.problems.append(problem)


def _count_jobs(outcome: RunOutcome, attempts: dict[AttemptKey, Attempt], allocated: dict[Job, int]) -> None:
    """Count the run's jobs and attempts, and cross-check each attempt's marker lines, report and listing."""
    by_job: dict[Job, dict[int, Attempt]] = {job: {} for job in allocated}
    for (member, group, index, number), seen in sorted(attempts.items()):
        where = f"member {member}: {group}[{index}] attempt {number}"
        if (member, group, index) not in by_job:
            _mismatch(outcome, f"{where}: a job its ledger never allocated")
            continue
        by_job[(member, group, index)][number] = seen
        if len(seen.starts) > 1:
            outcome.attempts_started_twice += 1
            _mismatch(outcome, f"{where}: started {len(seen.starts)} times")
        if seen.result == "succeeded" and not seen.ends:
            _mismatch(outcome, f"{where}: reported succeeded without its end line")
        if seen.ends and seen.result not in ("succeeded", "lost"):
            _mismatch(outcome, f"{where}: got to its end line but was reported {seen.result or 'nothing'}")
        if seen.started and not seen.result:
            _mismatch(outcome, f"{where}: ran but its end was never reported")
        if seen.result and seen.listed != seen.result:
            _mismatch(outcome, f"{where}: reported {seen.result}, its sidecar lists it {seen.listed or 'not at all'}")
        if seen.listed in ledger.STATE_NAMES.values() and not seen.result:
            _mismatch(outcome, f"{where}: its sidecar lists it {seen.listed}, no report says so")
    outcome.jobs = len(by_job)
    for (member, group, index), tries in by_job.items():
        ran = [seen for seen in tries.values() if seen.started]
        successes = [number for number, seen in tries.items() if seen.succeeded]
        outcome.attempts += len(ran)
        outcome.lost_attempts += sum(seen.lost for seen in ran)
        outcome.lost_ran_to_end += sum(seen.lost and bool(seen.ends) for seen in ran)
        outcome.failed_attempts += sum(seen.result == "failed" for seen in ran)
        outcome.retried += max([*tries, allocated[(member, group, index)]]) > 1
        where = f"member {member}: {group}[{index}]"
        if not ran:
            outcome.never_ran += 1
            outcome.problems.append(f"{where} never ran")
        elif len(successes) == 1:
            outcome.succeeded_exactly_once += 1
        elif successes:
            outcome.ran_twice += 1
            outcome.problems.append(f"{where} succeeded {len(successes)} times (attempts {successes})")
        else:
            outcome.problems.append(f"{where} never succeeded: {[(n, s.result) for n, s in sorted(tries.items())]}")


def _attribute_losses(
    outcome: RunOutcome, faults: list[Fault], attempts: dict[AttemptKey, Attempt]
) -> dict[int, list[AttemptKey]]:
    """Each lost attempt, by the fault that killed its sidecar while it ran (keyed by the fault's ``id``)."""
    caused: dict[int, list[AttemptKey]] = {}
    for key, seen in sorted(attempts.items()):
        if not (seen.started and seen.lost):
            continue
        began, stopped = seen.began, seen.stopped
        killers = [
            f
            for f in faults
            if key[0] in f.sidecars and f.kind != "sidecar-hang" and f.kind != "sidecar-slow"
            and began is not None and began <= f.start and (stopped is None or f.start <= stopped)
        ]  # fmt: skip
        if killers:
            caused.setdefault(id(min(killers, key=lambda f: f.start)), []).append(key)
        else:
            _mismatch(outcome, f"member {key[0]}: {key[1]}[{key[2]}] attempt {key[3]} was lost to no fault")
    return caused


def _fault_jobs(row: FaultOutcome, fault: Fault, attempts: dict[AttemptKey, Attempt], lost: list[AttemptKey]) -> None:
    """The attempts one fault struck, lost and had run again."""
    members = fault.sidecars or list(range(MEMBERS))
    row.running_attempts = sum(
        1
        for (member, *_), seen in attempts.items()
        if member in members and seen.began is not None and seen.began <= fault.start
        and (seen.stopped is None or seen.stopped > fault.start)
    )  # fmt: skip
    row.lost_attempts = len(lost)
    row.lost_ran_to_end = sum(bool(attempts[key].ends) for key in lost)
    reruns: list[float] = []
    retried: set[Job] = set()
    for member, group, index, number in lost:
        later = [
            began
            for (m, g, i, n), seen in attempts.items()
            if (m, g, i) == (member, group, index) and n > number and (began := seen.began) is not None
        ]
        if later:
            retried.add((member, group, index))
            reruns.append(min(later) - fault.end)
    row.jobs_retried = len(retried)
    row.to_rerun = round(max(reruns), 2) if reruns else None


def _fault_outcome(
    fault: Fault,
    started: float,
    hung: list[int],
    metrics: list[tuple[float, Metrics]],
    applied: list[tuple[float, Applied]],
    terminated_at: dict[int, float],
) -> FaultOutcome:
    """Recovery of one fault. A fault of sidecars only is measured on their members; one that struck a
    service or nats-server on every member but those hung meanwhile: their metrics wait for the hang (and
    the poller's backoff after it), which the hang's own outcome measures."""
    if all(part.startswith("sidecar-") for part in fault.parts):
        members, hung = fault.sidecars, []
    else:
        members = [m for m in range(MEMBERS) if m not in hung]
    # metrics are due from a member still polled a whole check after the fault: one that terminated sooner
    # (its last check came just before the fault ended, its terminate decision before the next) owes none
    running = [m for m in members if terminated_at.get(m, float("inf")) > fault.end + CHECK_SECONDS]
    waits = []
    for member in running:
        after = [at for at, m in metrics if m.member == member and at > fault.end]
        waits.append(min(after) - fault.end if after else None)
    recovered = all(wait is not None for wait in waits)
    to_metrics = max((wait for wait in waits if wait is not None), default=None) if recovered else None
    applies = [at for at, a in applied if a.member in members and at > fault.end]
    return FaultOutcome(
        kind=fault.kind,
        parts=fault.parts,
        sidecars=fault.sidecars,
        at=round(fault.start - started, 1),
        seconds=round(fault.end - fault.start, 2),
        overlapped_by=[],
        recovered=recovered,
        hung_members=hung,
        to_metrics=None if to_metrics is None else round(to_metrics, 2),
        to_applied=round(min(applies) - fault.end, 2) if applies and running else None,
        running_attempts=0,
        lost_attempts=0,
        lost_ran_to_end=0,
        jobs_retried=0,
        to_rerun=None,
        duplicate_applies=0,
        out_of_bounds_sizes=0,
    )


def _spread(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 2) if values else None,
        "max": round(max(values), 2) if values else None,
    }


#: The figures of a run that :func:`report` sums over the runs.
TOTALS = (
    "jobs", "succeeded_exactly_once", "attempts", "lost_attempts", "lost_ran_to_end", "failed_attempts", "retried",
    "never_ran", "ran_twice", "attempts_started_twice", "duplicate_applies", "out_of_bounds_sizes", "deadletters",
    "instance_changes", "cross_check_mismatches",
)  # fmt: skip


def report(runs: list[RunOutcome], wall_seconds: float) -> dict[str, Any]:
    """The counted outcomes as ``bench/results/chaos.json`` holds them."""
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        faults = [f for run in runs for f in run.faults if f.kind == kind]
        kinds[kind] = {
            "parts": list(KINDS[kind]),
            "injected": len(faults),
            "recovered": sum(f.recovered for f in faults),
            "fault_seconds": _spread([f.seconds for f in faults]),
            "recovery_to_next_metrics_s": _spread([f.to_metrics for f in faults if f.to_metrics is not None]),
            "recovery_to_next_applied_s": _spread([f.to_applied for f in faults if f.to_applied is not None]),
            "running_attempts": sum(f.running_attempts for f in faults),
            "lost_attempts": sum(f.lost_attempts for f in faults),
            "lost_ran_to_end": sum(f.lost_ran_to_end for f in faults),
            "jobs_retried": sum(f.jobs_retried for f in faults),
            "lost_to_rerun_s": _spread([f.to_rerun for f in faults if f.to_rerun is not None]),
            "duplicate_applies_in_window": sum(f.duplicate_applies for f in faults),
            "out_of_bounds_sizes_in_window": sum(f.out_of_bounds_sizes for f in faults),
        }
    by_kind = Counter(f.kind for run in runs for f in run.faults)
    return {
        "suite": "tests/test_chaos.py",
        "what": "one real ensemble per seed (3 members, checkSeconds 1, local stack; the runs at the same time, each "
        "on a stack of its own), every fault kind injected "
        "once per run at seeded moments; outcomes counted by job identity (member, group, index, attempt) from "
        "each attempt's start and end marker lines, cross-checked with the job reports on ENSEMBLE_JOBS, the "
        "members' job ledgers (ensemble-jobs) and the sidecars' jobinfo",
        "runs": len(runs),
        "seeds": [run.seed for run in runs],
        "wall_seconds": round(wall_seconds, 1),
        "faults_injected": {"total": sum(by_kind.values()), "by_kind": {kind: by_kind[kind] for kind in KINDS}},
        "target": "in every run: succeeded_exactly_once == jobs; never_ran, ran_twice, duplicate_applies, "
        "out_of_bounds_sizes all 0",
        "target_met": {str(run.seed): run.target_met for run in runs},
        "totals": {name: sum(getattr(run, name) for run in runs) for name in TOTALS},
        "settings": {
            "members": MEMBERS,
            "jobs_per_member": jobs_per_member(),
            "jobs": [{"group": g, "count": c, "nodes": n, "seconds": s} for g, c, n, s in JOBS],
            "size": [MIN_SIZE, MAX_SIZE],
            "retries": 0,
            "lostRetries": 3,
            "faults_begin": "once the first job has started",
            "order": "seeded; the hang in the first half of the plan (it outlasts the rest), the whole-stack kill "
            "before the hang (killing the hung sidecar would end it)",
            "pause_between_faults_seconds": list(PAUSE),
            "down_seconds": list(DOWN),
            "hang_seconds": HANG_SECONDS,
            "slow_delay_seconds": SLOW_DELAY,
            "slow_seconds": SLOW_SECONDS,
            "window_margin_seconds": WINDOW_MARGIN,
            **SERVICE_ENV,
        },
        "how_counted": {
            "attempt_succeeded": "its process wrote its end line (after its sleep) and its report says succeeded",
            "succeeded_exactly_once": "jobs with exactly one successful attempt",
            "ran_twice": "jobs with two or more successful attempts",
            "never_ran": "jobs no attempt of which started",
            "attempts": "attempts that started (a start line, or a report of an attempt that had started)",
            "lost_attempts": "attempts reported lost, or with a start line and no end line",
            "lost_ran_to_end": "lost attempts whose process still wrote its end line: its sidecar was killed "
            "(or hung, then killed) and the job process outlived it, or ended unseen (the sidecar started again "
            "reports it lost, it is run again)",
            "retried": "jobs with more than one attempt",
            "cross_check_mismatches": "disagreements between an attempt's marker lines, its report, its sidecar's "
            "jobinfo and the ledger (every job succeeded, outstanding 0, extra_successes 0)",
            "a_fault's_running_attempts": "attempts running on the members it struck (every member for a fault "
            "of a service or nats-server) at its start, as their sidecar saw them: started before it, their end "
            "reported after it",
            "a_fault's_lost_attempts": "lost attempts running on a sidecar the fault killed when it struck; its "
            "jobs_retried: their jobs that got another attempt; lost_to_rerun: "
            "fault's end → the start of the last of those attempts",
            "a_fault's_window": "from its start to its end + ENSEMBLE_ACK_WAIT + window_margin_seconds: "
            "duplicate applies and out-of-bounds sizes stored then are counted in its row",
        },
        "recovery_is_measured": {
            "from": "the fault's end: the last killed part started again (each after its own 0.2-1.5 s down; "
            "the whole stack after one such downtime, nats-server first, then the sidecars, then the services), "
            "a hung sidecar resumed (SIGCONT), a slow sidecar's slowness began",
            "to_next_metrics": "the first metrics stored after it, of every affected member still running a "
            "check period after it (one whose terminate was decided sooner owes no more metrics; the "
            "slowest of them): a fault of sidecars only affects their members, any other fault every member but "
            "those whose sidecar was hung at its end (listed in hung_members)",
            "to_next_applied": "the first decision applied after it on an affected member; it includes the time "
            "the algorithm had nothing to decide",
        },
        "faults": kinds,
        "per_run": [{**msgspec.to_builtins(run), "target_met": run.target_met} for run in runs],
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


#: The heading of the fault suite's section of ``docs/benchmarks.md`` (``bench/algorithms.py`` keeps it).
SECTION = "## Fault suite"


def _p50_max(spread: dict[str, Any]) -> str:
    return "–" if not spread["n"] else f"{spread['p50']} / {spread['max']}"


def markdown(report: dict[str, Any]) -> str:
    """The fault suite's section of ``docs/benchmarks.md``, from a :func:`report`."""
    settings = report["settings"]
    jobs = ", ".join(f"{j['count']} × {j['nodes']} node(s) {j['seconds']} s" for j in settings["jobs"])
    kinds = report["faults_injected"]["by_kind"]
    met = report["target_met"]
    pause = settings["pause_between_faults_seconds"]
    lines = [
        f"{SECTION} (`tests/test_chaos.py`)",
        "",
        "Produced by `.venv/bin/python -m tests.chaos`, which runs the suite and writes "
        "`bench/results/chaos.json` and this section (`--doc` writes only the section, from that file). "
        "Do not edit by hand.",
        "",
        f"{report['runs']} runs (seeds {', '.join(map(str, report['seeds']))}), "
        f"{report['faults_injected']['total']} faults injected: each of the {len(kinds)} kinds once per run, from the "
        f"first job's start on, in a seeded order (the hang in the first half, the whole-stack kill before it), "
        f"{pause[0]}–{pause[1]} s apart; {report['wall_seconds']} s "
        "wall for the suite (the runs go on at the same time, each on a stack of its own: nats-server, "
        "services, sidecars, ports and directories). Each run is one real ensemble on the local stack: "
        f"{settings['members']} members of {settings['jobs_per_member']} jobs ({jobs}), sizes "
        f"{settings['size'][0]}–{settings['size'][1]}, `retries` {settings['retries']}, `lostRetries` "
        f"{settings['lostRetries']}. Killed parts stay down {settings['down_seconds'][0]}–"
        f"{settings['down_seconds'][1]} s each and start again on the same port, store or state directory; a hung "
        f"sidecar is stopped {settings['hang_seconds']} s, a slow one answers {settings['slow_delay_seconds']} s late "
        f"for {settings['slow_seconds']} s.",
        "",
        f"Target, {report['target']}. Met in {sum(met.values())} of {len(met)} runs.",
        "",
        "Jobs are counted by identity (member, group, index, attempt): each attempt writes a start line before it "
        "sleeps and an end line after; an attempt *succeeded* when it wrote its end line and its report says "
        "succeeded. The marker lines, the job reports (`ENSEMBLE_JOBS`), the sidecars' `jobinfo` and the ledgers "
        "(`ensemble-jobs`: every job succeeded, nothing outstanding, no extra success) are cross-checked.",
        "",
        "| seed | s | completed | jobs | succeeded exactly once | attempts | lost attempts (ran to end) | retried | "
        "never ran | ran twice | duplicate applies | out-of-bounds sizes | cross-check mismatches | target |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["per_run"]:
        lines.append(
            f"| {run['seed']} | {run['seconds']} | {'yes' if run['completed'] else 'no'} | {run['jobs']} | "
            f"{run['succeeded_exactly_once']} | {run['attempts']} | {run['lost_attempts']} "
            f"({run['lost_ran_to_end']}) | {run['retried']} | {run['never_ran']} | {run['ran_twice']} | "
            f"{run['duplicate_applies']} | {run['out_of_bounds_sizes']} | {run['cross_check_mismatches']} | "
            f"{'met' if run['target_met'] else 'missed'} |"
        )
    lines += [
        "",
        "By kind, each figure the sum (or the p50 / max) of the faults' own: the attempts running on the members "
        "a fault struck (as their sidecar saw them), the attempts it lost (running on a sidecar it killed), the "
        "jobs run again because of it, and seconds from its end to the next metrics, to the next decision "
        "applied (that includes time the algorithm had nothing to decide) and to the start of the last attempt "
        "replacing one it lost.",
        "",
        "| fault | injected | recovered | fault s p50 / max | → metrics s | → applied s | attempts running | "
        "lost (ran to end) | jobs retried | lost → rerun s | duplicate applies in window |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in report["faults"].items():
        lines.append(
            f"| {kind} | {row['injected']} | {row['recovered']} | {_p50_max(row['fault_seconds'])} | "
            f"{_p50_max(row['recovery_to_next_metrics_s'])} | {_p50_max(row['recovery_to_next_applied_s'])} | "
            f"{row['running_attempts']} | {row['lost_attempts']} ({row['lost_ran_to_end']}) | {row['jobs_retried']} | "
            f"{_p50_max(row['lost_to_rerun_s'])} | {row['duplicate_applies_in_window']} |"
        )
    lines += [
        "",
        "Every fault (`overlapped by`: other faults that struck while it lasted or before its members' next metrics).",
        "",
        "| seed | at s | fault | sidecars | s | running | lost | retried | → metrics s | → applied s | → rerun s | "
        "overlapped by |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["per_run"]:
        for f in run["faults"]:
            cells = [run["seed"], f["at"], f["kind"], ", ".join(map(str, f["sidecars"])), f["seconds"],
                     f["running_attempts"], f["lost_attempts"], f["jobs_retried"], f["to_metrics"], f["to_applied"],
                     f["to_rerun"], ", ".join(f["overlapped_by"])]  # fmt: skip
            lines.append("| " + " | ".join("–" if cell in (None, "") else str(cell) for cell in cells) + " |")
    lines += [
        "",
        "A sidecar killed with `kill -9` takes its jobs with it: its reaper (`sidecar/reaper.py`) kills their "
        "process groups when the sidecar goes away; the sidecar started again on its state directory reports each "
        "attempt that was running lost (and kills anything its journal says was left), and the ledger runs the job "
        "again. *Ran to end* counts lost attempts that still got to their end line — a job that ran to its end "
        "twice; before the reaper, 26 of 27 lost attempts did (one-off run of this suite the same day).",
        "",
    ]
    return "\n".join(lines)


def write_section(doc: Path, report: dict[str, Any]) -> None:
    """Replace (or add) the fault suite's section of ``doc``: from its heading to the end of the page."""
    text = doc.read_text() if doc.exists() else ""
    head = text.split(f"\n{SECTION}", 1)[0].rstrip("\n")
    doc.write_text(f"{head}\n\n{markdown(report)}" if head else markdown(report))


#: Seconds a run may take after its last fault for every member to terminate.
COMPLETE_WITHIN = 90


async def run_suite(workdir: Path, seeds: list[int]) -> tuple[list[RunOutcome], float]:
    """One run per seed, each on a stack of its own under ``workdir``, all at the same time: their outcomes
    (each counted even when it timed out, its problems saying so) and the suite's wall seconds."""
    began = time.monotonic()
    runs: list[Run] = []

    async def one(run: Run) -> RunOutcome:
        timed_out = ""
        try:
            await run.run(COMPLETE_WITHIN)
        except TimeoutError as exc:
            timed_out = str(exc)
        outcome = await run.outcome(completed=not timed_out)
        outcome.problems += [timed_out] if timed_out else []
        return outcome

    try:
        # started one after the other (each takes its ports while no other is choosing), then run at once:
        # every run has its own nats-server, services, sidecars, ports and directories
        for seed in seeds:
            path = workdir / f"seed-{seed}"
            path.mkdir()
            run = Run(path, seed)
            runs.append(run)
            await run.start()
        outcomes = list(await asyncio.gather(*(one(run) for run in runs)))
    finally:
        for run in runs:
            await run.stop()
    return outcomes, time.monotonic() - began


def seeds_from(environ: dict[str, str]) -> list[int]:
    """The seeds of the suite: ``ENSEMBLE_CHAOS_SEEDS`` (``4,5,6``), else 1, 2 and 3."""
    return [int(seed) for seed in environ.get("ENSEMBLE_CHAOS_SEEDS", "1,2,3").split(",")]


def main() -> int:
    """The fault suite's benchmark command, the only writer of the committed figures.

    ``python -m tests.chaos``: run the suite (``ENSEMBLE_CHAOS_SEEDS``, default 1,2,3) in a temporary
    directory, write ``bench/results/chaos.json`` and its section of ``docs/benchmarks.md``; exit 1 when a
    run missed the target. ``python -m tests.chaos --doc [REPORT [DOC]]``: only write the section of DOC
    from REPORT (defaults: those two files). The test, ``tests/test_chaos.py``, writes its report into its
    own temporary directory and never these files.
    """
    repo = Path(__file__).resolve().parent.parent
    args = sys.argv[1:]
    if args[:1] == ["--doc"]:
        source = Path(args[1]) if len(args) > 1 else repo / "bench/results/chaos.json"
        doc = Path(args[2]) if len(args) > 2 else repo / "docs/benchmarks.md"
        write_section(doc, json.loads(source.read_text()))
        return 0
    if args:
        print("usage: python -m tests.chaos [--doc [REPORT [DOC]]]", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ensemble-chaos-") as workdir:
        outcomes, seconds = asyncio.run(run_suite(Path(workdir), seeds_from(dict(os.environ))))
    target = repo / "bench/results/chaos.json"
    write_report(target, outcomes, seconds)
    write_section(repo / "docs/benchmarks.md", json.loads(target.read_text()))
    met = sum(outcome.target_met for outcome in outcomes)
    print(f"{met} of {len(outcomes)} runs met the target in {seconds:.0f} s; wrote {target} and docs/benchmarks.md")
    return 0 if met == len(outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
