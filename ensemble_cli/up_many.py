"""``ensemble up A.yaml B.yaml [--budget N]``: several ensembles at once on this machine, sharing one budget.

The same stack as :mod:`ensemble_cli.up` — a private nats-server, a sidecar per member on the ``local``
queue — with one creator per file (each registers its ensemble's members) and one poller, decider and
actuator for all of them, as in a cluster. With ``--budget N`` the actuator holds every member of every
ensemble to ``N`` nodes in all, divided by weighted max-min fair share (``spec.weight``; docs/budget.md):
a grow the budget holds back is applied to the grant, shown in the live view (``size 2 of 4``) and the
log (``the budget holds it at 2 of 4 nodes wanted``), and raised when another member releases nodes.

Results: one results folder per ensemble, ``<folder>/<name>/`` (one file alone: the folder itself), and a
summary per ensemble, then the budget's figures (the largest size each member wanted, and how often the
budget held it back). Exit codes as ``ensemble up``'s; the worst of the ensembles' wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ensemble_cli import record, results, terminal
from ensemble_cli.up import (
    EXIT_INCOMPLETE,
    EXIT_INVALID,
    EXIT_OK,
    START_TIMEOUT,
    Monitor,
    NatsAccess,
    Stack,
    _first_line,
    _sidecar_command,
    _tail,
    collect_results,
    run_on_stack,
    start_nats,
    summary,
)
from ensemble_core import natsauth
from ensemble_core.settings import env_name
from ensemble_core.spec import Ensemble, SpecError, load, warnings
from ensemble_core.tokens import ensemble_token
from ensemble_core.words import plural


class NamedMonitor(Monitor):
    """A :class:`Monitor` of one of several ensembles: its log lines name the ensemble."""

    def note(self, line: str) -> None:
        super().note(f"{self.ensemble.name}: {line}")


def _load(files: list[str], console: Console) -> list[Ensemble] | None:
    """Every file's Ensemble, or None after printing each file's errors (and a name used twice)."""
    ensembles: list[Ensemble] = []
    failed = False
    for path in files:
        try:
            ensembles.append(load(path))
        except SpecError as exc:
            console.print(f"[red]{path} is not a valid Ensemble:[/red]")
            for error in exc.errors:
                console.print(f"  {error}", markup=False)
            failed = True
    seen: dict[tuple[str, str], str] = {}
    for path, ensemble in zip(files, ensembles, strict=False):
        key = (ensemble.namespace, ensemble.name)
        if key in seen and not failed:
            console.print(
                f"[red]{path}: metadata.name {ensemble.name!r} is also {seen[key]}'s; give each ensemble its own name"
                "[/red]",
                highlight=False,
            )
            failed = True
        seen[key] = path
    return None if failed else ensembles


def _wider_than_budget(files: list[str], ensembles: list[Ensemble], budget: int | None) -> list[str]:
    """Each member whose start size, ``minSize`` or a job needs more nodes than the whole budget: it could never
    run, and the run would wait for ever."""
    if budget is None:
        return []
    problems = []
    for path, ensemble in zip(files, ensembles, strict=True):
        for member in ensemble.members:
            where = f"{path}: spec.members[{member.index}]"
            if member.min_size > budget or member.size > budget:
                problems.append(
                    f"{where}.minicluster.spec: size {member.size} / minSize {member.min_size} is above --budget "
                    f"{budget}; lower them or raise the budget"
                )
            for j, job in enumerate(member.jobs):
                if job.nodes > budget and job.count:
                    problems.append(
                        f"{where}.jobs[{j}].nodes: {job.nodes} is above --budget {budget}, so this job could never "
                        "run; raise the budget or make the job narrower"
                    )
    return problems


def _folder(args: argparse.Namespace, ensembles: list[Ensemble]) -> Path:
    if args.results:
        return Path(args.results)
    if args.logs:
        return Path(args.logs) / "results"
    names = "+".join(ensemble.name for ensemble in ensembles)
    return Path("ensemble-results") / f"{names}-{time.strftime('%Y%m%d-%H%M%S')}"


async def run(args: argparse.Namespace) -> int:
    """Run several ensembles (or one with ``--budget``); returns the exit code."""
    console = terminal.console()
    if args.backend != "local":
        console.print("[red]--backend flux runs one Ensemble file, without --budget; run the files one by one[/red]")
        return EXIT_INVALID
    ensembles = _load(list(args.file), console)
    if ensembles is None:
        return EXIT_INVALID
    too_wide = _wider_than_budget(list(args.file), ensembles, args.budget)
    if too_wide:
        for problem in too_wide:
            console.print(f"[red]{problem}[/red]", highlight=False)
        return EXIT_INVALID
    for ensemble in ensembles:
        for warning in warnings(ensemble):
            console.print(Text.assemble(("warning: ", "yellow"), f"{ensemble.name}: {warning}"), soft_wrap=True)
    return await run_on_stack(args, console, lambda stack: _run_stack(args, ensembles, stack, console))


async def _run_stack(args: argparse.Namespace, ensembles: list[Ensemble], stack: Stack, console: Console) -> int:
    token = secrets.token_urlsafe(32)  # the run's operator secret
    access = await start_nats(stack)
    console.print(f"NATS: {access.url_for(natsauth.READER)}", highlight=False, soft_wrap=True)  # for ensemble status
    base = _folder(args, ensembles)
    folders = {e.name: base if len(ensembles) == 1 else base / e.name for e in ensembles}
    for folder in folders.values():
        results.clear_previous(folder)
    cli = [sys.executable, "-m", "ensemble_cli"]
    endpoints: dict[str, dict[int, str]] = {}
    for e in ensembles:
        endpoints[e.name] = {}
        for member in e.members:
            argv = _sidecar_command(
                args,
                e,
                member,
                stack,
                "",
                folders[e.name] / "outputs",
                stack.workdir / f"sidecar-{e.name}-{member.index}",
            )
            part = stack.start(
                f"sidecar-{e.name}-{member.index}",
                [*cli, *argv],
                env={"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(token, e.namespace, e.name)},
            )
            endpoints[e.name][member.index] = f"127.0.0.1:{await _first_line(part, START_TIMEOUT)}"
    monitors = [NamedMonitor(e) for e in ensembles]
    if args.budget is not None:
        console.print(
            f"node budget: {plural(args.budget, 'node')} for {plural(len(ensembles), 'ensemble')}", highlight=False
        )
    nc = await nats.connect(access.url_for(natsauth.MONITOR))
    incomplete = False
    try:

        async def on_message(msg: Msg) -> None:
            for monitor in monitors:
                await monitor.on_message(msg)

        await nc.subscribe("ensemble.>", cb=on_message)
        _start_services(args, ensembles, stack, access, token, endpoints, cli)
        incomplete = await _follow(args, monitors, stack, console)
        await nc.flush()
    finally:
        await nc.drain()
    return await _finish(args, ensembles, monitors, access, folders, incomplete, console)


def _start_services(
    args: argparse.Namespace,
    ensembles: list[Ensemble],
    stack: Stack,
    access: NatsAccess,
    token: str,
    endpoints: dict[str, dict[int, str]],
    cli: list[str],
) -> None:
    """One creator per ensemble (each registers its members), then one poller, decider and actuator for all."""
    for path, e in zip(args.file, ensembles, strict=True):
        stack.start(
            f"creator-{e.name}",
            [*cli, "creator"],
            env={
                "ENSEMBLE_SIDECAR_TOKEN": token,
                "ENSEMBLE_FILE": str(Path(path).resolve()),
                "ENSEMBLE_ENDPOINTS": ",".join(f"{i}={ep}" for i, ep in endpoints[e.name].items()),
                "ENSEMBLE_NAMESPACE": e.namespace,
                "ENSEMBLE_NATS_URL": access.url_for("creator"),
            },
        )
    budget = {env_name("node_budget"): str(args.budget)} if args.budget is not None else {}
    stack.start("poller", [*cli, "poller"], env={"ENSEMBLE_NATS_URL": access.url_for("poller")})
    stack.start("decider", [*cli, "decider"], env={"ENSEMBLE_NATS_URL": access.url_for("decider")})
    stack.start(
        "actuator",
        [*cli, "actuator"],
        env={"ENSEMBLE_NATS_URL": access.url_for("actuator"), "ENSEMBLE_SIDECAR_TOKEN": token, **budget},
    )


async def _follow(args: argparse.Namespace, monitors: list[NamedMonitor], stack: Stack, console: Console) -> bool:
    """Show the run until every ensemble is done; True when it stopped before (a part died, the timeout)."""
    deadline = time.monotonic() + args.timeout if args.timeout else None

    def render() -> Group:
        return Group(*(monitor.render() for monitor in monitors))

    view = (
        Live(render(), console=console, refresh_per_second=4, redirect_stdout=False)
        if not args.quiet and console.is_terminal
        else contextlib.nullcontext()
    )
    printed = 0

    def lines() -> list[str]:
        return sorted(
            (line for monitor in monitors for line in monitor.log), key=lambda line: float(line.split("s")[0])
        )

    with view as live:
        while not all(monitor.done() for monitor in monitors):
            await asyncio.sleep(0.25)
            if live is not None:
                live.update(render())
            elif not args.quiet:
                found = lines()
                for line in found[printed:]:
                    console.print(line, markup=False, highlight=False)
                printed = len(found)
            dead = stack.died()
            if dead is not None:
                console.print(f"[red]{dead.name} exited with code {dead.process.returncode}[/red]; its log:")
                console.print(_tail(dead.log), markup=False, highlight=False)
                return True
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"[red]gave up after {args.timeout:g}s[/red]")
                return True
        if live is not None:
            live.update(render())
        elif not args.quiet:
            for line in lines()[printed:]:
                console.print(line, markup=False, highlight=False)
    return False


async def _finish(
    args: argparse.Namespace,
    ensembles: list[Ensemble],
    monitors: list[NamedMonitor],
    access: NatsAccess,
    folders: dict[str, Path],
    incomplete: bool,
    console: Console,
) -> int:
    """Each ensemble's summary and results folder, then the budget's figures; the exit code."""
    code = EXIT_OK
    started = min(monitor.started for monitor in monitors)
    budget: dict[str, Any] = {"budget": args.budget, "members": []}
    if args.record:  # every ensemble's messages: the recording of the whole run
        written, line = await record.record_run(access.url_for(natsauth.READER), Path(args.record))
        console.print(line, style=None if written else "red", highlight=False, soft_wrap=True)
    for ensemble, monitor in zip(ensembles, monitors, strict=True):
        try:
            async with asyncio.timeout(60):
                found = await collect_results(access, ensemble)
        except Exception as exc:
            console.print(f"[red]no results: the job reports cannot be read from NATS ({exc!r})[/red]", highlight=False)
            return EXIT_INCOMPLETE
        console.print(f"ensemble {ensemble.namespace}/{ensemble.name} (weight {ensemble.weight}):", highlight=False)
        own, figures = summary(monitor, found, console, folder=folders[ensemble.name])
        code = max(code, own)
        for view in monitor.members.values():
            budget["members"].append(
                {"ensemble": ensemble.name, "member": view.index, "peak_wanted": view.peak_wanted,
                 "peak_granted": view.peak, "held_back": view.held}
            )  # fmt: skip
        figures["budget"] = budget if args.budget is not None else None
        figures["seconds"] = round(time.time() - started, 3)
        figures["completed"] = not incomplete
        results.write(folders[ensemble.name], found, figures)
    if args.budget is not None:
        shown = "; ".join(
            f"{m['ensemble']}/{m['member']} wanted up to {m['peak_wanted']}, held {m['peak_granted']} at most, "
            f"held back {m['held_back']} times"
            for m in budget["members"]
        )
        console.print(f"budget {plural(args.budget, 'node')}: {shown}", highlight=False, soft_wrap=True)
    where = ", ".join(str(folder) for folder in folders.values())
    seconds = time.time() - started
    if incomplete:
        console.print(f"stopped after {seconds:.1f}s, before every ensemble completed; results so far in {where}")
        return EXIT_INCOMPLETE
    console.print(f"finished in {seconds:.1f}s; results in {where}", highlight=False)
    return code
