"""``workload-success``: keep submitting until enough jobs have succeeded.

Planned by the original operator and never built: for work where many runs fail (a stochastic
simulation that diverges, a flaky input), the goal is a number of *successful* runs. The first check
submits the jobs matrix; every later check tops the queue up so that the jobs still in flight,
at the success rate seen so far, are expected to reach the target. New jobs cycle through the jobs
matrix as written (group after group, ``count`` jobs each), so the mix of groups stays the matrix's.
The cluster follows the queue as in workload-demand: it grows while jobs wait, and shrinks as the
target nears and fewer jobs are submitted, leaving nodes free with nothing waiting.

Options (YAML names):

=====================  ===========  =======================================================================
option                 default      meaning
=====================  ===========  =======================================================================
``successes``          ``0``        0 to 1000000: successful jobs wanted; 0 means as many as the jobs matrix
                                    has jobs (every job must succeed, failures are replaced)
``maxJobs``            ``0``        0 to 10000000: most jobs ever submitted, a guard against work that always
                                    fails; 0 means ten times ``successes``
``order``              ``random``   order of the first submission, as workload-demand
``scaleChecks``        ``5``        as workload-demand: consecutive checks before a scale
``scaleUpStrategy``    ``nextJob``  as workload-demand
``terminateChecks``    ``10``       as workload-demand: idle checks before the end
``disableTermination`` ``no``       as workload-demand
=====================  ===========  =======================================================================

Successes are counted from ``metrics.groups`` (``succeeded`` of the member's job groups). The success
rate is ``succeeded / finished`` of the member's groups, 1 before any job has finished and never
below 5 % (so one unlucky start does not flood the queue). When the target is reached no job is
submitted any more; running jobs finish (there is no cancel action) and the member ends after
``terminateChecks`` idle checks. When ``maxJobs`` jobs were submitted without reaching the target,
the member ends the same way and the reason says how many succeeded.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, JobSpec, MemberSpec, Metrics
from ensemble_core.words import plural

from .base import decision
from .sizing import Counters, FollowFields, Order, finished_jobs, follow, idle, job_groups
from .workload_demand import member_seed

#: The lowest success rate assumed when topping up.
MIN_RATE = 0.05


class WorkloadSuccessOptions(FollowFields, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``workload-success`` (see the module docstring)."""

    successes: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    max_jobs: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    order: Order = "random"


class WorkloadSuccessState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``workload-success`` remembers between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    #: Jobs submitted so far; also the position in the cycled jobs matrix of the next job.
    submitted: int = 0
    counters: Counters = msgspec.field(default_factory=Counters)
    done: bool = False


class WorkloadSuccess:
    """The ``workload-success`` algorithm (see the module docstring)."""

    name: str = "workload-success"
    options_type: type[WorkloadSuccessOptions] = WorkloadSuccessOptions
    state_type: type[WorkloadSuccessState] = WorkloadSuccessState

    def initial_state(self, member: MemberSpec, options: WorkloadSuccessOptions) -> WorkloadSuccessState:
        """Nothing submitted yet, seeded by the member's address."""
        return WorkloadSuccessState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: WorkloadSuccessOptions, state: WorkloadSuccessState, metrics: Metrics
    ) -> tuple[WorkloadSuccessState, list[Decision]]:
        """Top the queue up toward the target, then size the cluster; the inputs are untouched."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        jobs = [job for job in member.jobs if job.count > 0]
        matrix = sum(job.count for job in jobs)
        target = options.successes or matrix
        cap = options.max_jobs or 10 * target
        names = {job.name for job in jobs}
        if metrics.groups:
            succeeded = sum(stats.succeeded for name, stats in metrics.groups.items() if name in names)
            finished = sum(stats.finished for name, stats in metrics.groups.items() if name in names)
        else:
            # A sidecar without per-group counts: every job of the member is one of its groups.
            finished = finished_jobs(metrics)
            succeeded = max(0, finished - metrics.failed)
        decisions: list[Decision] = []
        submitted = state.submitted
        if state.last_seq < 0 and jobs:
            count = min(matrix, cap)
            reason = f"first check: submit {plural(count, 'job')} toward {plural(target, 'success', 'successes')}"
            batch = _cycle(jobs, 0, count)
            decisions.append(
                decision(member, metrics, 0, "submit", jobs=batch, order=options.order, seed=state.seed, reason=reason)
            )
            submitted = count
        elif jobs and succeeded < target and submitted < cap:
            in_flight = max(0, submitted - finished)
            rate = max(MIN_RATE, succeeded / finished) if finished else 1.0
            short = math.ceil((target - succeeded) / rate) - in_flight
            count = min(short, cap - submitted)
            if count > 0:
                reason = (
                    f"{succeeded} of {plural(target, 'success', 'successes')}, {plural(in_flight, 'job')} in flight "
                    "at a success rate of "
                    f"{rate:.0%}: submit {count} more"
                )
                batch = _cycle(jobs, submitted, count)
                decisions.append(decision(member, metrics, 0, "submit", jobs=batch, seed=state.seed, reason=reason))
                submitted += count
        if succeeded >= target:
            done_words = f"{succeeded} of {plural(target, 'success', 'successes')} reached"
        else:
            successes = plural(target, "success", "successes")
            done_words = f"the cap of {plural(cap, 'job')} submitted with {succeeded} of {successes}"
        counters, sized, done = follow(
            member,
            options,
            state.counters,
            metrics,
            contiguous=metrics.seq == state.last_seq + 1,
            is_idle=not decisions and idle(metrics, submitted),
            seed=state.seed,
            done_words=done_words,
            index=len(decisions),
        )
        state = replace(state, last_seq=metrics.seq, submitted=submitted, counters=counters, done=done)
        return state, decisions + sized


def _cycle(jobs: list[JobSpec], start: int, count: int) -> list[JobSpec]:
    """The ``count`` jobs from position ``start`` of the jobs matrix repeated end to end, as groups."""
    matrix = sum(job.count for job in jobs)
    full, rest = divmod(count, matrix)
    offset = start % matrix
    end = offset + rest
    counts = {job.name: job.count * full for job in jobs}
    _add(counts, _prefix(jobs, min(end, matrix)), 1)
    _add(counts, _prefix(jobs, offset), -1)
    if end > matrix:
        _add(counts, _prefix(jobs, end - matrix), 1)
    return job_groups(jobs, counts)


def _prefix(jobs: list[JobSpec], length: int) -> dict[str, int]:
    """Jobs per group among the first ``length`` jobs of the matrix."""
    counts: dict[str, int] = {}
    for job in jobs:
        take = min(job.count, length)
        if take <= 0:
            break
        counts[job.name] = take
        length -= take
    return counts


def _add(counts: dict[str, int], other: dict[str, int], sign: int) -> None:
    for name, n in other.items():
        counts[name] = counts.get(name, 0) + sign * n
