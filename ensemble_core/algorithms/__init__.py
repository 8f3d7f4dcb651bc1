"""Algorithms: pure functions that turn a member's metrics into decisions (see DESIGN.md).

Look an algorithm up by name with ``get``; check a user's options with ``validate_options`` (every
problem, for the creator) or ``parse_options`` (the typed options, for the decider).
"""

from .base import (
    Algorithm,
    OptionsError,
    UnknownAlgorithm,
    clamp,
    decision,
    get,
    names,
    parse_options,
    register,
    validate_options,
)
from .workload_demand import WorkloadDemand, WorkloadDemandOptions, WorkloadDemandState

# Annotated so that mypy checks WorkloadDemand against the Algorithm protocol with its own types.
_workload_demand: Algorithm[WorkloadDemandOptions, WorkloadDemandState] = WorkloadDemand()
register(_workload_demand)

__all__ = [
    "Algorithm",
    "OptionsError",
    "UnknownAlgorithm",
    "WorkloadDemand",
    "WorkloadDemandOptions",
    "WorkloadDemandState",
    "clamp",
    "decision",
    "get",
    "names",
    "parse_options",
    "register",
    "validate_options",
]
