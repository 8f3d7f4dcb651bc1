"""``workload-demand``: the cluster follows the queue.

The original operator's only shipped algorithm, option for option (see
``../shared/reference/algorithms.md``). All jobs are submitted at the start; the member grows while
jobs wait, shrinks while nodes sit idle with nothing waiting, and terminates (or completes) once the
queue has been empty for a while. Rules, checked in this order on every metrics snapshot:

1. nothing submitted yet: submit the whole jobs matrix in ``order`` and stop there;
2. already terminated or completed: nothing, ever again;
3. ``inactive`` ≥ ``terminateChecks``: terminate, or with ``disableTermination`` shrink to the
   minimum size (if above it) and complete;
4. ``waiting_periods`` ≥ ``scaleChecks``: grow so the job chosen by ``scaleUpStrategy`` fits;
5. ``free_periods`` ≥ ``scaleChecks + 2`` and no job waiting: shrink by the excess nodes.

Where the original was buggy this module does what it meant:

- Its waiting counter compared the wrong value, so it grew every ``scaleChecks`` checks for as long
  as any job had ever waited. Here ``waiting_periods`` counts only checks in which jobs wait and
  their number did not fall, and is reset when it falls.
- It counted nodes requested but not yet up as absent and requested more while they provisioned.
  Here ``size - node_up_count`` nodes are *coming* and count as available, both for growing and (as
  excess) for shrinking.
- It dropped a step that would pass ``maxSize`` whole ("outside allowed boundary"). Here every
  target is clamped into ``[max(1, minSize), maxSize]``, so a member grows to its maximum.
- It decided scale-downs but never applied them. Here a shrink is an ordinary ``scale`` decision
  with a smaller absolute size, which the actuator applies.
- It terminated when ``inactive`` *exceeded* ``terminateChecks``. Here ``inactive >=
  terminateChecks``, so ``terminateChecks: 2`` means two idle checks. Idle also requires every
  submitted job to be finished or failed, so a member is never terminated before the sidecar has
  even queued the submission.
- It ignored unknown option names (its examples set ``scaleUpChecks``, which did nothing). Here they
  are rejected by ``parse_options`` / ``validate_options``.

Missed polls: the counters count *consecutive* checks, so when ``metrics.seq`` is not the last
consumed seq + 1 the counters restart from this check (which counts as the first of a new run).
Metrics with a seq at or below the last one consumed change nothing and decide nothing.
"""

from __future__ import annotations

import random
import zlib
from typing import Annotated, Literal

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics

from .base import clamp, decision

Order = Literal["random", "ascending", "descending", ""]
ScaleUpStrategy = Literal["nextJob", "smallestJob", "largestJob", "randomJob"]
ScaleDownStrategy = Literal["excess"]
Checks = Annotated[int, msgspec.Meta(ge=1)]


class WorkloadDemandOptions(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``workload-demand``, named in YAML as their camelCase encode names."""

    #: Order of the initial submission by node count; ``""`` submits the jobs matrix as written.
    order: Order = "random"
    #: Consecutive checks a condition must hold before a scale (a shrink waits two more).
    scale_checks: Checks = 5
    #: Which waiting job the member grows to make room for.
    scale_up_strategy: ScaleUpStrategy = "nextJob"
    #: How much to shrink by: ``excess`` = free nodes plus nodes still coming.
    scale_down_strategy: ScaleDownStrategy = "excess"
    #: Consecutive idle checks (no active job, all submitted jobs accounted for) before the end.
    terminate_checks: Checks = 10
    #: When done, complete (keep the member, shrunk to its minimum) instead of terminating it.
    disable_termination: bool = False


class WorkloadDemandState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``workload-demand`` remembers between checks (every field has a default)."""

    #: Seeds the submission order and ``randomJob``; fixed per member by ``initial_state``.
    seed: int = 0
    #: The seq of the last metrics consumed; -1 before the first.
    last_seq: int = -1
    submitted: bool = False
    jobs_submitted: int = 0
    #: Consecutive checks with jobs waiting and their number not falling.
    waiting_periods: int = 0
    #: Consecutive checks with free nodes and their number not falling.
    free_periods: int = 0
    #: Consecutive idle checks.
    inactive: int = 0
    last_waiting: int = 0
    last_free: int = 0
    #: Terminated or completed: no further decisions.
    done: bool = False


_STRATEGY_WORDS: dict[ScaleUpStrategy, str] = {
    "nextJob": "next job",
    "smallestJob": "smallest waiting job",
    "largestJob": "largest waiting job",
    "randomJob": "randomly chosen waiting job",
}


class WorkloadDemand:
    """The ``workload-demand`` algorithm (see the module docstring for its rules)."""

    name: str = "workload-demand"
    options_type: type[WorkloadDemandOptions] = WorkloadDemandOptions
    state_type: type[WorkloadDemandState] = WorkloadDemandState

    def initial_state(self, member: MemberSpec, options: WorkloadDemandOptions) -> WorkloadDemandState:
        """A fresh state whose seed is derived from the member's address (same member, same seed)."""
        address = f"{member.namespace}/{member.ensemble}/{member.member}"
        return WorkloadDemandState(seed=zlib.crc32(address.encode()))

    def decide(
        self,
        member: MemberSpec,
        options: WorkloadDemandOptions,
        state: WorkloadDemandState,
        metrics: Metrics,
    ) -> tuple[WorkloadDemandState, list[Decision]]:
        """Apply the rules to one snapshot; the returned state is new, the inputs are untouched."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        waiting = sum(count for count in metrics.waiting.values() if count > 0)
        free = metrics.nodes.node_free_count
        if not state.submitted:
            return _submit(member, options, state, metrics, waiting, free)
        state = _count(state, metrics, waiting, free)
        if state.inactive >= options.terminate_checks:
            return _finish(member, options, state, metrics)
        if state.waiting_periods >= options.scale_checks:
            grown = _grow(member, options, state, metrics, waiting)
            if grown:
                return _after_scale(state), grown
        if state.free_periods >= options.scale_checks + 2 and waiting == 0:
            shrunk = _shrink(member, state, metrics)
            if shrunk:
                return _after_scale(state), shrunk
        return state, []


def _submit(
    member: MemberSpec,
    options: WorkloadDemandOptions,
    state: WorkloadDemandState,
    metrics: Metrics,
    waiting: int,
    free: int,
) -> tuple[WorkloadDemandState, list[Decision]]:
    jobs = [job for job in member.jobs if job.count > 0]
    total = sum(job.count for job in jobs)
    state = replace(
        state,
        last_seq=metrics.seq,
        last_waiting=waiting,
        last_free=free,
        submitted=True,
        jobs_submitted=total,
    )
    if not jobs:
        # An empty matrix has nothing to submit; the member then ends after terminateChecks checks.
        return state, []
    order = f"in {options.order} order" if options.order else "as given"
    groups = "group" if len(jobs) == 1 else "groups"
    reason = f"first check: submit all {total} jobs of {len(jobs)} {groups} {order}"
    submit = decision(member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason)
    return state, [submit]


def _count(state: WorkloadDemandState, metrics: Metrics, waiting: int, free: int) -> WorkloadDemandState:
    """The counters updated with one snapshot; a gap in seq restarts them from this check."""
    contiguous = metrics.seq == state.last_seq + 1
    previous_waiting = state.last_waiting if contiguous else waiting
    previous_free = state.last_free if contiguous else free
    waiting_periods = state.waiting_periods if contiguous else 0
    free_periods = state.free_periods if contiguous else 0
    inactive = state.inactive if contiguous else 0
    accounted = metrics.finished + metrics.failed >= state.jobs_submitted
    idle = metrics.queue.active() == 0 and accounted
    return replace(
        state,
        last_seq=metrics.seq,
        last_waiting=waiting,
        last_free=free,
        waiting_periods=waiting_periods + 1 if waiting > 0 and previous_waiting <= waiting else 0,
        free_periods=free_periods + 1 if free > 0 and previous_free <= free else 0,
        inactive=inactive + 1 if idle else 0,
    )


def _after_scale(state: WorkloadDemandState) -> WorkloadDemandState:
    # A scale changes what waiting and free mean, so both conditions must hold anew.
    return replace(state, waiting_periods=0, free_periods=0)


def _finish(
    member: MemberSpec,
    options: WorkloadDemandOptions,
    state: WorkloadDemandState,
    metrics: Metrics,
) -> tuple[WorkloadDemandState, list[Decision]]:
    state = replace(state, done=True)
    idle = f"no job active for {state.inactive} checks and all {state.jobs_submitted} submitted jobs finished or failed"
    if not options.disable_termination:
        return state, [decision(member, metrics, 0, "terminate", reason=f"{idle}: terminate")]
    decisions: list[Decision] = []
    lowest = clamp(member, 1)
    if metrics.size > lowest:
        # The member is kept but has no work: release its nodes before going quiet for good.
        reason = f"{idle}; disableTermination keeps the member: shrink {metrics.size} → {lowest}"
        decisions.append(decision(member, metrics, 0, "scale", size=lowest, reason=reason))
    reason = f"{idle}; disableTermination keeps the member: complete"
    decisions.append(decision(member, metrics, len(decisions), "complete", reason=reason))
    return state, decisions


def _grow(
    member: MemberSpec,
    options: WorkloadDemandOptions,
    state: WorkloadDemandState,
    metrics: Metrics,
    waiting: int,
) -> list[Decision]:
    need = _job_to_fit(options.scale_up_strategy, state, metrics)
    if need is None:
        return []
    free = metrics.nodes.node_free_count
    coming = max(0, metrics.size - metrics.nodes.node_up_count)
    missing = need - (free + coming)
    if missing <= 0:
        return []
    wanted = metrics.size + missing
    target = clamp(member, wanted)
    if target <= metrics.size:
        return []
    capped = f" (capped at maxSize {target})" if target < wanted else ""
    reason = (
        f"{waiting} jobs waiting for {state.waiting_periods} checks; "
        f"{_STRATEGY_WORDS[options.scale_up_strategy]} needs {need} nodes, {free} free, "
        f"{coming} coming: grow {metrics.size} → {target}{capped}"
    )
    return [decision(member, metrics, 0, "scale", size=target, reason=reason)]


def _job_to_fit(strategy: ScaleUpStrategy, state: WorkloadDemandState, metrics: Metrics) -> int | None:
    """The node count of the waiting job to make room for, or None when no job qualifies."""
    if strategy == "nextJob":
        # Without the sidecar's next_jobs there is no "next" job: better no step than a guess.
        return metrics.next_jobs[0] if metrics.next_jobs else None
    sizes = sorted(nodes for nodes, count in metrics.waiting.items() if count > 0)
    if not sizes:
        return None
    if strategy == "smallestJob":
        return sizes[0]
    if strategy == "largestJob":
        return sizes[-1]
    # randomJob: each waiting job equally likely, so sizes are weighted by how many jobs wait.
    rng = random.Random(state.seed + metrics.seq)
    return rng.choices(sizes, weights=[metrics.waiting[nodes] for nodes in sizes])[0]


def _shrink(member: MemberSpec, state: WorkloadDemandState, metrics: Metrics) -> list[Decision]:
    free = metrics.nodes.node_free_count
    coming = max(0, metrics.size - metrics.nodes.node_up_count)
    wanted = metrics.size - (free + coming)
    target = clamp(member, wanted)
    if target >= metrics.size:
        return []
    held = f" (held at minSize {target})" if target > wanted else ""
    reason = (
        f"{free} nodes free for {state.free_periods} checks and no job waiting; {coming} coming: "
        f"shrink {metrics.size} → {target}{held}"
    )
    return [decision(member, metrics, 0, "scale", size=target, reason=reason)]
