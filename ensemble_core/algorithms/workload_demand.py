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

import zlib
from typing import Literal

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics
from ensemble_core.words import every

from .base import decision
from .sizing import Checks, Counters, Order, ScaleUpStrategy, follow, idle, waiting_jobs

ScaleDownStrategy = Literal["excess"]


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
    counters: Counters = msgspec.field(default_factory=Counters)
    #: Terminated or completed: no further decisions.
    done: bool = False


def member_seed(member: MemberSpec) -> int:
    """A seed fixed by the member's address: the same member always gets the same seed."""
    return zlib.crc32(f"{member.namespace}/{member.ensemble}/{member.member}".encode())


class WorkloadDemand:
    """The ``workload-demand`` algorithm (see the module docstring for its rules)."""

    name: str = "workload-demand"
    options_type: type[WorkloadDemandOptions] = WorkloadDemandOptions
    state_type: type[WorkloadDemandState] = WorkloadDemandState

    def initial_state(self, member: MemberSpec, options: WorkloadDemandOptions) -> WorkloadDemandState:
        """A fresh state whose seed is derived from the member's address (same member, same seed)."""
        return WorkloadDemandState(seed=member_seed(member))

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
        if not state.submitted:
            return _submit(member, options, state, metrics)
        contiguous = metrics.seq == state.last_seq + 1
        counters, decisions, done = follow(
            member,
            options,
            state.counters,
            metrics,
            contiguous=contiguous,
            is_idle=idle(metrics, state.jobs_submitted),
            seed=state.seed,
            done_words=f"{every(state.jobs_submitted, 'submitted job')} finished or failed",
        )
        return replace(state, last_seq=metrics.seq, counters=counters, done=done), decisions


def _submit(
    member: MemberSpec,
    options: WorkloadDemandOptions,
    state: WorkloadDemandState,
    metrics: Metrics,
) -> tuple[WorkloadDemandState, list[Decision]]:
    jobs = [job for job in member.jobs if job.count > 0]
    total = sum(job.count for job in jobs)
    counters = Counters(last_waiting=waiting_jobs(metrics), last_free=metrics.nodes.node_free_count)
    state = replace(state, last_seq=metrics.seq, counters=counters, submitted=True, jobs_submitted=total)
    if not jobs:
        # An empty matrix has nothing to submit; the member then ends after terminateChecks checks.
        return state, []
    order = f"in {options.order} order" if options.order else "as given"
    groups = "group" if len(jobs) == 1 else "groups"
    reason = f"first check: submit {every(total, 'job')} of {len(jobs)} {groups} {order}"
    submit = decision(member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason)
    return state, [submit]
