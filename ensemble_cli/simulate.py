"""``ensemble simulate FILE``: a closed-loop what-if run of an ensemble on a virtual clock.

Runs the real algorithm code, the ``sim`` queue and the actuator's logic in one process (see
:mod:`ensemble_cli.simulation`), then prints a summary (or ``--json``), optionally draws a plot and
writes the run in the recording format that ``ensemble replay`` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ensemble_cli import plot, report, runview, terminal
from ensemble_cli.carry import carry, dropped_note
from ensemble_cli.simulation import DEFAULT_DELAY, SimulationConfig, SimulationResult, simulate
from ensemble_core import algorithms, flags
from ensemble_core.messages import encode
from ensemble_core.spec import Ensemble, SpecError, load
from sidecar.sim import TraceError, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble simulate``."""
    parser.add_argument("file", help="the Ensemble file (members, sizes, jobs, algorithm and options)")
    parser.add_argument(
        "--trace",
        help='Flux job records (JSON Lines, or the original\'s {"jobs": [...]} dump) whose jobs replace the '
        "file's matrix: nodes from nnodes, run time from t_inactive - t_run",
    )
    parser.add_argument(
        "--algorithm",
        help="use this algorithm for every member instead of the file's (each member keeps its options this one takes)",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="an option of the algorithm (repeatable)"
    )
    parser.add_argument(
        "--delay",
        default=str(DEFAULT_DELAY),
        help=f"seconds for a new node to come up: a number, or a comma-separated list sampled with the seed "
        f"(default {DEFAULT_DELAY:.0f}, the delay measured on GKE in the recorded runs)",
    )
    parser.add_argument(
        "--default-duration",
        type=flags.seconds(),
        default=60.0,
        help="without --trace, a job runs for its `duration`; one without takes this many seconds (default 60)",
    )
    parser.add_argument(
        "--check-seconds",
        type=flags.seconds(positive=True),
        help="seconds between checks (default: the file's, else 10)",
    )
    parser.add_argument(
        "--cooldown",
        type=flags.seconds(),
        default=0.0,
        help="the actuator's seconds between two scale changes (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="draw size, nodes up, jobs waiting and running over time (the format from the name: .png, .svg, .pdf ...)",
    )
    parser.add_argument(
        "--report", metavar="HTML", help="write an HTML report of the run (charts, job attempts, figures)"
    )
    parser.add_argument("--record", metavar="FILE", help="write the run as a recording (JSON Lines) for replay")


def parse_options(pairs: list[str]) -> dict[str, str | int | float | bool]:
    """``key=value`` pairs into an options map (values stay strings; the algorithm converts them)."""
    options: dict[str, str | int | float | bool] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option scaleChecks=3")
        options[key.strip()] = value.strip()
    return options


def parse_delay(text: str) -> float | list[float]:
    """``--delay``: one number or a comma-separated list of numbers, each finite and >= 0."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--delay {text!r}: expected a number of seconds or a list like 30,100,150") from exc
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--delay {text!r}: give one or more numbers of seconds, each finite and >= 0")
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    """Run ``ensemble simulate``; returns the exit code (2 for bad input, 1 if the run did not finish)."""
    console = terminal.console()  # in a pipe: whole tables, never cut at 80 columns
    try:
        ensemble = load(args.file)
        trace = load_trace(args.trace) if args.trace else None
        options = parse_options(args.option)
        delay = parse_delay(args.delay)
        notes: list[str] = []
        if args.algorithm is not None:
            notes = _check_algorithm(ensemble, args.algorithm, options)
        elif options:
            raise ValueError("--option needs --algorithm (the file's algorithms keep the file's options)")
    except SpecError as exc:
        for error in exc.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 2
    except (TraceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in ensemble.notes:  # what reading an ensemble-python file converted or refused
        print(f"{args.file}: note: {note}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    config = SimulationConfig(
        ensemble=ensemble,
        algorithm=args.algorithm,
        options=options,
        trace=trace,
        delay=delay,
        check_seconds=args.check_seconds,
        seed=args.seed,
        cooldown=args.cooldown,
        record=bool(args.record or args.plot or args.report),
        default_duration=args.default_duration,
    )
    result = simulate(config)
    summary = result.summary()
    summary["algorithm"] = args.algorithm or ",".join(sorted({m.algorithm for m in result.members}))
    if args.record:
        Path(args.record).write_bytes(b"".join(encode(record) + b"\n" for record in result.records))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(console, summary, result)
    if args.plot or args.report:
        # after the results are printed: a bad output path loses nothing but that file
        view = runview.from_simulation(result, summary, f"{ensemble.name}: {summary['algorithm']}", args.trace)
        problems = []
        if args.plot:
            try:
                plot.plot(view, args.plot, view.title)
            except plot.PlotError as exc:
                problems.append(str(exc))
        if args.report:
            try:
                report.write(view, Path(args.report))
            except OSError as exc:
                problems.append(f"--report {args.report}: cannot write the report: {exc.strerror or exc}")
        if problems:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 2
    if not result.completed:
        print(f"the run did not finish within {config.limit:.0f} virtual seconds", file=sys.stderr)
        return 1
    return 0


def _check_algorithm(ensemble: Ensemble, name: str, options: dict[str, str | int | float | bool]) -> list[str]:
    """Check ``--algorithm`` and ``--option`` against every member; the notes on the file's options dropped.

    Each member keeps the options of its own algorithm that ``name`` takes (see :mod:`ensemble_cli.carry`).
    Raises ``ValueError`` naming the flag: an unknown algorithm, or each bad option.
    """
    try:
        algorithms.get(name)
    except algorithms.UnknownAlgorithm as exc:
        raise ValueError(f"--algorithm: {exc}") from exc
    problems = algorithms.validate_options(name, options)
    if problems:
        raise ValueError("\n".join(f"--option {problem}" for problem in problems))
    notes = []
    errors = []
    for member in ensemble.members:
        carried, dropped = carry(member.algorithm, name)
        if dropped:
            notes.append(dropped_note(member.index, member.algorithm, name, dropped))
        if name == "rules":
            groups = [job.name for job in member.jobs]
            for problem in algorithms.validate_rules(name, carried.rules, groups):
                errors.append(f"--algorithm rules: spec.members[{member.index}].algorithm.{problem}")
    if errors:
        raise ValueError("\n".join(errors))
    return notes


def print_summary(console: Console, summary: dict[str, Any], result: SimulationResult) -> None:
    """The summary as tables: the whole ensemble, then each member."""
    table = Table(title=f"simulated with {summary['algorithm']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "makespan_s", "node_seconds", "job_node_seconds", "utilization", "scale_events", "peak_size",
        "jobs", "failed_jobs", "mean_wait_s", "p95_wait_s", "wall_s",
    ):  # fmt: skip
        table.add_row(key, str(summary[key]))
    console.print(table)
    if len(result.members) > 1:
        members = Table(title="members")
        for column in ("member", "algorithm", "jobs", "makespan s", "node-seconds", "ups/downs", "peak", "ended"):
            members.add_column(column)
        for m in result.members:
            span = (m.last_end or 0.0) - (m.first_submit or 0.0)
            members.add_row(
                str(m.index), m.algorithm, str(m.jobs), f"{span:.1f}", f"{m.node_seconds:.0f}",
                f"{m.scale_ups}/{m.scale_downs}", str(m.peak_size), m.ended or "-",
            )  # fmt: skip
        console.print(members)
