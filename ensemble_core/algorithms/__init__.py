"""Algorithms: pure functions that turn a member's metrics into decisions (see DESIGN.md).

Look an algorithm up by name with ``get``; check a user's options with ``validate_options`` (every
problem, for the creator) or ``parse_options`` (the typed options, for the decider); check the
``rules`` of the ``rules`` algorithm with ``validate_rules``. ``docs/algorithms.md`` describes each.
"""

from .base import (
    Algorithm,
    OptionsError,
    RawOption,
    UnknownAlgorithm,
    clamp,
    decision,
    get,
    names,
    option_names,
    parse_options,
    register,
    takes_events,
    validate_options,
)
from .baselines import SeedAsBuilt, SeedAsBuiltState, Static, StaticOptions, StaticState
from .demand_fit import DemandFit, DemandFitOptions, DemandFitState
from .hpa import HpaOptions, HpaProportional, HpaState
from .random_selection import RandomSelection, RandomSelectionOptions, RandomSelectionState
from .rules import Rules, RulesOptions, RulesState, validate_rules
from .select_runtime import SelectRuntime, SelectRuntimeOptions, SelectRuntimeState
from .sizing import Counters
from .workload_demand import WorkloadDemand, WorkloadDemandOptions, WorkloadDemandState
from .workload_success import WorkloadSuccess, WorkloadSuccessOptions, WorkloadSuccessState

# Each is annotated so that mypy checks it against the Algorithm protocol with its own types.
_workload_demand: Algorithm[WorkloadDemandOptions, WorkloadDemandState] = WorkloadDemand()
_demand_fit: Algorithm[DemandFitOptions, DemandFitState] = DemandFit()
_random_selection: Algorithm[RandomSelectionOptions, RandomSelectionState] = RandomSelection()
_workload_success: Algorithm[WorkloadSuccessOptions, WorkloadSuccessState] = WorkloadSuccess()
_select_fastest: Algorithm[SelectRuntimeOptions, SelectRuntimeState] = SelectRuntime(longest=False)
_select_longest: Algorithm[SelectRuntimeOptions, SelectRuntimeState] = SelectRuntime(longest=True)
_rules: Algorithm[RulesOptions, RulesState] = Rules()
# Baselines to measure against (ensemble simulate / bench), not recommendations.
_static: Algorithm[StaticOptions, StaticState] = Static()
_seed_as_built: Algorithm[WorkloadDemandOptions, SeedAsBuiltState] = SeedAsBuilt()
_hpa: Algorithm[HpaOptions, HpaState] = HpaProportional()
register(_workload_demand)
register(_demand_fit)
register(_random_selection)
register(_workload_success)
register(_select_fastest)
register(_select_longest)
register(_rules)
register(_static)
register(_seed_as_built)
register(_hpa)

__all__ = [
    "Algorithm",
    "Counters",
    "DemandFit",
    "DemandFitOptions",
    "DemandFitState",
    "HpaOptions",
    "HpaProportional",
    "HpaState",
    "OptionsError",
    "RandomSelection",
    "RandomSelectionOptions",
    "RandomSelectionState",
    "RawOption",
    "Rules",
    "RulesOptions",
    "RulesState",
    "SeedAsBuilt",
    "SeedAsBuiltState",
    "SelectRuntime",
    "SelectRuntimeOptions",
    "SelectRuntimeState",
    "Static",
    "StaticOptions",
    "StaticState",
    "UnknownAlgorithm",
    "WorkloadDemand",
    "WorkloadDemandOptions",
    "WorkloadDemandState",
    "WorkloadSuccess",
    "WorkloadSuccessOptions",
    "WorkloadSuccessState",
    "clamp",
    "decision",
    "get",
    "names",
    "option_names",
    "parse_options",
    "register",
    "takes_events",
    "validate_options",
    "validate_rules",
]
