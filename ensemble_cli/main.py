"""The ``ensemble`` command: one subcommand per service, plus ``up``, ``validate`` and ``sidecar``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ensemble_cli.parsing import Parser
from ensemble_core.hardening import make_private
from ensemble_core.runner import run_service
from ensemble_core.settings import Settings
from ensemble_core.version import VERSION


def _service(name: str) -> Callable[[Settings], Coroutine[Any, Any, None]]:
    # imported on demand so that `ensemble validate` does not load every service
    if name == "creator":
        from services.creator.service import run as creator

        return creator
    if name == "poller":
        from services.poller.service import run as poller

        return poller
    if name == "decider":
        from services.decider.service import run as decider

        return decider
    from services.actuator.service import run as actuator

    return actuator


def _parser() -> argparse.ArgumentParser:
    from ensemble_cli import nats_replicas, record, replay, report, simulate, status, up, validate

    # a misspelt subcommand, choice or flag is answered with the close match and the subcommand's usage
    parser = Parser(
        prog="ensemble",
        description="Run ensembles of HPC jobs on Flux MiniClusters that grow, shrink and stop with the work.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.add_arguments(commands.add_parser("up", help="run an ensemble to completion on this machine"))
    validate.add_arguments(commands.add_parser("validate", help="check an Ensemble file and print every error"))
    replay.add_arguments(commands.add_parser("replay", help="run an algorithm over a recording offline"))
    record.add_arguments(commands.add_parser("record", help="export the metrics and decisions streams to a recording"))
    simulate.add_arguments(commands.add_parser("simulate", help="what-if run of an ensemble on a virtual clock"))
    report.add_arguments(commands.add_parser("report", help="write an HTML report of a recording or a results folder"))
    status.add_arguments(commands.add_parser("status", help="what the running ensembles are doing (read from NATS)"))
    nats_replicas.add_arguments(
        commands.add_parser("nats-replicas", help="change the replica count of every stream and bucket")
    )
    commands.add_parser("sidecar", help="serve a queue over gRPC (see `ensemble sidecar --help`)", add_help=False)
    for name, text in (
        ("creator", "register members and announce them (settings from ENSEMBLE_* variables)"),
        ("poller", "poll each member's sidecar and publish metrics"),
        ("decider", "run each member's algorithm over its metrics and publish decisions"),
        ("actuator", "apply decisions to members"),
    ):
        commands.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ensemble`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("creator", "poller", "decider", "actuator", "up"):
        # secrets in the environment (tokens, NATS passwords): no other process of the user may read them
        make_private()
    if argv and argv[0] == "sidecar":
        from sidecar.cli import main as sidecar_main

        return sidecar_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "validate":
        from ensemble_cli import validate

        return validate.run(args)
    if args.command == "replay":
        from ensemble_cli import replay

        return replay.run(args)
    if args.command == "record":
        from ensemble_cli import record

        return record.run(args)
    if args.command == "report":
        from ensemble_cli import report

        return report.run(args)
    if args.command == "status":
        from ensemble_cli import status

        return status.run(args)
    if args.command == "simulate":
        from ensemble_cli import simulate

        return simulate.run(args)
    if args.command == "nats-replicas":
        from ensemble_cli import nats_replicas

        return nats_replicas.run(args)
    if args.command == "up":
        from ensemble_cli import up

        try:
            return asyncio.run(up.run(args))
        except KeyboardInterrupt:
            print("interrupted; everything stopped", file=sys.stderr)
            return up.EXIT_INTERRUPTED
    return run_service(args.command, _service(args.command))
