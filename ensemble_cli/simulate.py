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

from ensemble_cli import cluster as cluster_models
from ensemble_cli import plot, report, runview, terminal
from ensemble_cli.carry import carry, dropped_note
from ensemble_cli.simulation import DEFAULT_DELAY, SimulationConfig, SimulationResult, simulate
from ensemble_core import algorithms, flags
from ensemble_core.messages import encode
from ensemble_core.spec import Ensemble, SpecError, load
from sidecar.sim import TraceError, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble simulate``."""
    parser.add_argument(
        "file",
        nargs="+",
        metavar="FILE[@SECONDS]",
        help="the Ensemble file (members, sizes, jobs, algorithm and options); several share one cluster, "
        "each arriving at its @SECONDS of virtual time (default @0), e.g. a.yaml b.yaml@600",
    )
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
    parser.add_argument(
        "--cluster",
        default="none",
        metavar="NAME|FILE",
        help=f"the VMs under the MiniClusters: {', '.join(cluster_models.NAMES)}, or a YAML file of the model's "
        "fields (default none: a node costs from its request to its release, no VMs); adds vm_seconds, "
        "vm_seconds_makespan and vms_added",
    )
    parser.add_argument(
        "--budget",
        type=flags.integer(0),
        help="nodes all members of all files may hold together, divided by weighted max-min fair share "
        "among the members that want nodes (default: the cluster model's, else none)",
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


def parse_arrival(text: str) -> tuple[str, float]:
    """``FILE[@SECONDS]``: the file and its arrival time (0 without ``@``)."""
    path, sep, when = text.rpartition("@")
    if not sep or not path:
        return text, 0.0
    try:
        arrival = float(when)
    except ValueError:
        raise ValueError(f"{text!r}: the arrival after @ must be seconds of virtual time, e.g. b.yaml@600") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise ValueError(f"{text!r}: the arrival after @ must be a finite number of seconds >= 0")
    return path, arrival


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
    current = args.file[0]
    try:
        arrivals = [parse_arrival(text) for text in args.file]
        ensembles = []
        for path, arrival in arrivals:
            current = path
            ensembles.append((load(path), arrival))
        current = args.file[0]
        names = [ensemble.name for ensemble, _ in ensembles]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"ensemble name {repeated[0]!r} is used by more than one file; give each a metadata.name")
        ensemble, arrival = ensembles[0]
        model = cluster_models.load_model(args.cluster)
        trace = load_trace(args.trace) if args.trace else None
        options = parse_options(args.option)
        delay = parse_delay(args.delay)
        notes: list[str] = []
        if args.algorithm is not None:
            for each, _ in ensembles:
                notes += _check_algorithm(each, args.algorithm, options)
        elif options:
            raise ValueError("--option needs --algorithm (the file's algorithms keep the file's options)")
    except SpecError as exc:
        for error in exc.errors:
            print(f"{current}: {error}", file=sys.stderr)
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
        cluster=model,
        budget=args.budget,
        arrival=arrival,
        more=ensembles[1:],
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
                if result.cluster is not None:
                    bill = str(Path(args.plot).with_suffix("")) + "-vms" + (Path(args.plot).suffix or ".png")
                    plot_bill(result, bill, title=f"{ensemble.name}: the VMs")
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
    for key in ("cluster", "vm_seconds", "vm_seconds_makespan", "vms_added", "budget", "mean_turnaround_s", "jain"):
        if key in summary:
            table.add_row(key, str(summary[key]))
    console.print(table)
    if "ensembles" in summary:
        ensembles = Table(title="ensembles")
        for column in ("ensemble", "arrival s", "turnaround s", "node-seconds"):
            ensembles.add_column(column)
        for name, row in summary["ensembles"].items():
            ensembles.add_row(name, f"{row['arrival_s']:.0f}", str(row["turnaround_s"]), f"{row['node_seconds']:.0f}")
        console.print(ensembles)
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


def plot_bill(result: SimulationResult, path: str, title: str) -> None:
    """The cluster model's VMs alive and the running bill (VM-seconds) over time, until the pool is back
    at its minimum (a second figure beside ``--plot``'s, so each can change on its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert result.cluster is not None
    rows = result.cluster.timeline(result.pool_end)
    figure, axis = plt.subplots(figsize=(10, 3.2))
    axis.step([t for t, _, _ in rows], [n for _, n, _ in rows], where="post", label="VMs alive")
    axis.set_ylabel("VMs")
    axis.set_xlabel("virtual seconds")
    bill = axis.twinx()
    bill.plot([t for t, _, _ in rows], [b for _, _, b in rows], color="tab:red", label="VM-seconds billed")
    bill.set_ylabel("VM-seconds")
    figure.legend(loc="upper left", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
