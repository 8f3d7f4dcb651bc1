"""``demand-fit``: ask at once for the nodes the waiting work needs, release idle nodes fast.

Named for what it does: the member's size is fitted to the demand of the queue in one step, where
``workload-demand`` grows one job's w  orth at a time after ``scaleChecks`` checks of waiting. When a
new node takes far longer to provision than a job takes to run (about 100 s against 6 to 15 s on the
recorded GKE runs), every stepwise grow costs a whole provisioning delay; asking once for everything
the queue can use pays that delay once.

Options (YAML names):

=====================  ==============  ========================================================================
option                 default         meaning
=====================  ==============  ========================================================================
``order``              ``descending``  order of the submission by node count: ``random``, ``ascending``,
                                       ``descending`` (widest first: first-come-first-served packs the
                                       nodes), or ``""`` (as written)
``waves``              ``3.5``         a number from 1 to 1000: the waiting work should run in at most this
                                       many rounds on the nodes asked for; 1 asks for every node it can use
                                       at once. Fewer waves: more nodes, sooner done, more VMs billed
``podsPerVm``          ``1``           1 to 1000: MiniCluster pods one VM of the node pool holds; a grow is
                                       rounded up to whole VMs (the VM of the last pod is billed whole,
                                       so its other slots cost nothing). 1: no rounding
``shrinkChecks``       ``1``           1 to 1000: consecutive checks with free (or still coming) nodes and no job
                                       waiting before those nodes are released
``terminateChecks``    ``1``           1 to 1000: consecutive idle checks (no active job and every submitted job
                                       finished or failed) before the end
``disableTermination`` ``no``          ``yes``: when done, shrink to minSize and complete instead of terminating
=====================  ==============  ========================================================================

The algorithm sees no VM: what it knows of the bill is these two options. The default of ``waves`` is
chosen on what users pay (docs/benchmarks.md, *What users pay*): on the three recorded runs under the
``gke-optimize-utilization`` model (calibrated on them), 3.5 is the value where makespan <= 0.7x and
VM-seconds <= 0.8x the recorded both hold on the random run (3 waves: 0.66x / 0.87x with 7 VMs added;
3.5: 0.70x / 0.79x with 6; 4: 0.71x / 0.72x with 5). ``podsPerVm`` is off (1) by default: the pods a VM
holds are a property of the node pool (2 in the calibrated GKE pool, none on a bare Flux instance), and
at ``waves: 3.5`` rounding to 2 changes no figure of the benchmark; with ``waves: 4`` it takes random
from 0.71x to 0.70x of the recorded makespan at the same bill. Set it to the pool's pods per VM there.

Rules, on every metrics snapshot:

1. first check: submit the whole jobs matrix in ``order`` and, in the same step, grow to the size the
   matrix needs (computed from the jobs matrix, since the queue does not show the jobs yet);
2. already terminated or completed: nothing, ever again;
3. idle for ``terminateChecks`` checks: terminate (or complete);
4. jobs waiting: the size wanted is ``max(widest waiting job, ceil((busy + waiting) / waves))`` nodes,
   rounded up to a multiple of ``podsPerVm``,
   where *busy* is the nodes running jobs and *waiting* the nodes the waiting jobs need together.
   The widest waiting job must fit, or first-come-first-served scheduling blocks behind it for good.
   The target is clamped into ``[minSize, maxSize]``; the member grows when it is above the size
   already requested — nodes requested but not yet up are part of that size, so nothing is asked
   for twice while nodes provision;
5. no job waiting, every submitted job visible in the queue, and free or coming nodes for
   ``shrinkChecks`` checks in a row: shrink by the free and coming nodes (running jobs keep theirs).

The accounting guard is workload-demand's: the member is idle only when every submitted job is
finished or failed, so an empty queue before the sidecar has queued the submission is not the end,
and nothing is shrunk before the submission shows. A gap in ``metrics.seq`` restarts the counters;
metrics with a seq at or below the last one consumed change nothing.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics
from ensemble_core.words import every, plural

from .base import decision
from .sizing import Order, coming, finish, idle, scale_to, shrink_excess, visible, waiting_jobs
from .workload_demand import member_seed

Bounded = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Rounds = Annotated[float, msgspec.Meta(ge=1, le=1000)]


class DemandFitOptions(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``demand-fit`` (see the module docstring)."""

    # Widest first: in a random order first-come-first-served scheduling leaves nodes idle behind a
    # wide job (1.14-1.20x the makespan lower bound on bench/cost.py's 1,000-job mixes, 1.01x so).
    order: Order = "descending"
    # Chosen on the recorded runs' bill under gke-optimize-utilization (module docstring).
    waves: Rounds = 3.5
    pods_per_vm: Bounded = 1
    shrink_checks: Bounded = 1
    terminate_checks: Bounded = 1
    disable_termination: bool = False


class DemandFitState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``demand-fit`` remembers between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    submitted: bool = False
    jobs_submitted: int = 0
    #: Consecutive checks with nodes to spare and no job waiting.
    spare_periods: int = 0
    #: Consecutive idle checks.
    inactive: int = 0
    done: bool = False


class DemandFit:
    """The ``demand-fit`` algorithm (see the module docstring for its rules)."""

    name: str = "demand-fit"
    options_type: type[DemandFitOptions] = DemandFitOptions
    state_type: type[DemandFitState] = DemandFitState

    def initial_state(self, member: MemberSpec, options: DemandFitOptions) -> DemandFitState:
        """A fresh state seeded by the member's address."""
        return DemandFitState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: DemandFitOptions, state: DemandFitState, metrics: Metrics
    ) -> tuple[DemandFitState, list[Decision]]:
        """Apply the rules to one snapshot; the returned state is new, the inputs are untouched."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        if not state.submitted:
            return _submit(member, options, state, metrics)
        contiguous = metrics.seq == state.last_seq + 1
        inactive = (state.inactive if contiguous else 0) + 1 if idle(metrics, state.jobs_submitted) else 0
        state = replace(state, last_seq=metrics.seq, inactive=inactive)
        if inactive >= options.terminate_checks:
            why = (
                f"no job active for {plural(inactive, 'check')} and {every(state.jobs_submitted, 'submitted job')} "
                "finished or failed"
            )
            return replace(state, done=True), finish(member, metrics, 0, options.disable_termination, why)
        waiting = waiting_jobs(metrics)
        if waiting:
            widest = max(nodes for nodes, jobs in metrics.waiting.items() if jobs > 0)
            demand = sum(nodes * jobs for nodes, jobs in metrics.waiting.items() if jobs > 0)
            busy = max(0, metrics.nodes.node_up_count - metrics.nodes.node_free_count)
            wanted, plan = _wanted(widest, busy + demand, options.waves, options.pods_per_vm)
            state = replace(state, spare_periods=0)
            if wanted <= metrics.size:
                return state, []
            why = (
                f"{plural(waiting, 'job')} waiting {'needs' if waiting == 1 else 'need'} {plural(demand, 'node')} "
                f"(widest {widest}); {busy} busy, "
                f"{coming(metrics)} coming; {plan}"
            )
            return state, scale_to(member, metrics, 0, wanted, why)
        spare = metrics.nodes.node_free_count + coming(metrics)
        if not spare or not visible(metrics, state.jobs_submitted):
            return replace(state, spare_periods=0), []
        periods = (state.spare_periods if contiguous else 0) + 1
        if periods < options.shrink_checks:
            return replace(state, spare_periods=periods), []
        free = metrics.nodes.node_free_count
        why = f"{plural(free, 'node')} free for {plural(periods, 'check')} and no job waiting"
        return replace(state, spare_periods=0), shrink_excess(member, metrics, 0, why)


def _wanted(widest: int, nodes: int, waves: float, pods_per_vm: int) -> tuple[int, str]:
    """Nodes to run ``nodes`` worth of work in ``waves`` rounds, never fewer than the widest job, and the plan.

    Rounded up to a whole number of ``pods_per_vm``: the VM that holds the last pod is billed whole.
    """
    planned = max(widest, math.ceil(nodes / waves))
    wanted = -(-planned // pods_per_vm) * pods_per_vm
    plan = "all at once" if waves == 1 else f"in {waves:g} waves"
    if wanted > planned:
        plan += f", {planned} rounded up to whole VMs of {pods_per_vm} pods"
    return wanted, plan


def _submit(
    member: MemberSpec, options: DemandFitOptions, state: DemandFitState, metrics: Metrics
) -> tuple[DemandFitState, list[Decision]]:
    jobs = [job for job in member.jobs if job.count > 0]
    total = sum(job.count for job in jobs)
    state = replace(state, last_seq=metrics.seq, submitted=True, jobs_submitted=total)
    if not jobs:
        return state, []
    order = f"in {options.order} order" if options.order else "as given"
    groups = "group" if len(jobs) == 1 else "groups"
    reason = f"first check: submit {every(total, 'job')} of {len(jobs)} {groups} {order}"
    decisions = [decision(member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason)]
    # The queue does not show the jobs yet: their demand comes from the matrix itself.
    widest = max(job.nodes for job in jobs)
    demand = sum(job.nodes * job.count for job in jobs)
    busy = max(0, metrics.nodes.node_up_count - metrics.nodes.node_free_count)
    wanted, plan = _wanted(widest, busy + demand, options.waves, options.pods_per_vm)
    if wanted > metrics.size:
        why = (
            f"{plural(total, 'job')} submitted {'needs' if total == 1 else 'need'} {plural(demand, 'node')} "
            f"(widest {widest}); {busy} busy; {plan}"
        )
        decisions += scale_to(member, metrics, 1, wanted, why)
    return state, decisions
