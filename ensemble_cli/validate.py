"""``ensemble validate FILE``: check Ensemble files and print every error with its field path."""

from __future__ import annotations

import argparse

from ensemble_core.spec import SpecError, load, warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble validate``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="Ensemble files (YAML)")


def run(args: argparse.Namespace) -> int:
    """Print ``FILE: valid`` or each error as ``FILE: <path>: <problem>``; exit 1 if any file is invalid.

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
            print(f"{path}: valid")
    return 1 if invalid else 0
