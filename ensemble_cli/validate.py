"""``ensemble validate FILE``: check Ensemble files and print every error with its field path."""

from __future__ import annotations

import argparse

from ensemble_core.spec import Ensemble, SpecError, load, warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble validate``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="Ensemble files (YAML)")


def summary(ensemble: Ensemble) -> str:
    """``1 member, 30 jobs: member 0: lj 30``: the jobs each group runs (a matrix group: its combinations)."""
    members = len(ensemble.members)
    jobs = sum(job.count for member in ensemble.members for job in member.jobs)
    groups = "; ".join(
        f"member {member.index}: " + (", ".join(f"{job.name} {job.count}" for job in member.jobs) or "no jobs")
        for member in ensemble.members
    )
    return f"{members} member{'s' if members != 1 else ''}, {jobs} job{'s' if jobs != 1 else ''}: {groups}"


def run(args: argparse.Namespace) -> int:
    """Print ``FILE: valid (<summary>)`` or each error as ``FILE: <path>: <problem>``; exit 1 if any is invalid.

    A valid file's warnings (:func:`ensemble_core.spec.warnings`) come first, as ``FILE: warning: <path>:
    <problem>``; they do not make it invalid.
    """
    invalid = 0
    for path in args.files:
        try:
            ensemble = load(path)
        except SpecError as exc:
            invalid += 1
            for error in exc.errors:
                print(f"{path}: {error}")
        else:
            for warning in warnings(ensemble):
                print(f"{path}: warning: {warning}")
            print(f"{path}: valid ({summary(ensemble)})")
    return 1 if invalid else 0
