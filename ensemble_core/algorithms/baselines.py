"""Baselines to measure algorithms against: ``static`` and ``seed-as-built``. Neither is a recommendation.

``static`` — a fixed size. With ``preprovisioned: yes`` (the default) the member starts at ``size``
nodes already up (``ensemble simulate`` creates it so; live, set the MiniCluster's size to it), the
best case of a static cluster; with ``no`` it starts at its spec size and asks for ``size`` nodes at
the first check, paying the provisioning delay once. It submits everything at once, never scales
again, and terminates after ``terminateChecks`` idle checks.

``seed-as-built`` — a reference model of the original operator *as it really behaved* on GKE (read
from its code and the recorded runs in ``shared/data/seed-gke``), not as it was meant to behave
(that is ``workload-demand``). ``docs/replay.md`` says which source file each fact comes from. It
reproduces its bugs:

- the waiting counter compared nothing: the sidecar added one to ``waiting_periods`` at every status
  call, so once any job has waited it grows every ``scaleChecks`` calls for ever, by the node count of
  the next job (``scaleUpStrategy``), whatever is already coming;
- nodes requested but not yet up are ignored: each step adds to the requested size;
- a step that would pass ``maxSize`` is decided but not applied (the original's controller ignored it
  "outside allowed boundary"): it is decided as :data:`IGNORED_SCALE` with the size the original asked
  for, an action no actuator carries out (this project's actuator answers ``ok: false``, as the
  original did; a ``scale`` would be clamped to maxSize); the counters were reset before the size was
  checked, so they restart all the same;
- no scale-down is ever applied;
- it terminates when the idle counter *exceeds* ``terminateChecks`` (strictly greater), with no
  check that the submitted jobs were ever seen.

**Re-checks.** Its counters lived in the sidecar and moved at every ``RequestStatus`` call, and its
reconcile loop called again at once after every change it made: once after the submission, twice
after an applied scale (not after an ignored one: nothing changed). A recording of the original holds
those calls as metrics lines of their own, at the time of the change; a simulation or a live poller
does not make them. So the model owes the counter those calls: a snapshot within
:data:`RECHECK_SECONDS` of the change is one of them (counted like any call), and the first
periodic snapshot after it adds the ones that never arrived. Both ways the original's cadence comes
out: 30 s from the submission to the first step, 30 s between applied steps, 50 s after an ignored one.
"""

from __future__ import annotations

import zlib
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics
from ensemble_core.words import every, plural

from .base import decision
from .sizing import Order, finish, idle, pick_job, scale_to
from .workload_demand import WorkloadDemandOptions

#: The action of a step the original decided and then ignored (its size was above maxSize): no actuator
#: applies it. ``ensemble replay`` counts it as agreeing with a recorded ``scale`` that was not applied.
IGNORED_SCALE = "scale-ignored"
#: The status calls the original's reconcile loop made at once after it submitted the jobs matrix.
RECHECKS_AFTER_SUBMIT = 1
#: The status calls it made at once after an applied scale (the MiniCluster update re-queued it twice).
RECHECKS_AFTER_SCALE = 2
#: A snapshot this close (s) after a change is one of those re-checks: twice the ±1.5 s error of the
#: recordings' reconstructed times (they put the re-checks at the change's own time), and never more
#: than half the member's ``checkSeconds`` (a periodic check is that much later).
RECHECK_SECONDS = 3.0


def _seed(member: MemberSpec) -> int:
    return zlib.crc32(f"{member.namespace}/{member.ensemble}/{member.member}".encode())


class StaticOptions(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """Options of ``static``."""

    #: The member's size (0: its maxSize).
    size: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    #: Start with ``size`` nodes already up (yes) or ask for them at the first check (no).
    preprovisioned: bool = True
    order: Order = "random"
    terminate_checks: Annotated[int, msgspec.Meta(ge=1)] = 1


class StaticState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``static`` remembers."""

    seed: int = 0
    last_seq: int = -1
    submitted: bool = False
    jobs_submitted: int = 0
    inactive: int = 0
    done: bool = False


class Static:
    """A member of fixed size (see the module docstring)."""

    name: str = "static"
    options_type: type[StaticOptions] = StaticOptions
    state_type: type[StaticState] = StaticState

    def initial_state(self, member: MemberSpec, options: StaticOptions) -> StaticState:
        """A fresh state seeded by the member's address."""
        return StaticState(seed=_seed(member))

    def decide(
        self, member: MemberSpec, options: StaticOptions, state: StaticState, metrics: Metrics
    ) -> tuple[StaticState, list[Decision]]:
        """Submit and size once; then only wait for the end."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        if not state.submitted:
            jobs = [job for job in member.jobs if job.count > 0]
            total = sum(job.count for job in jobs)
            state = replace(state, last_seq=metrics.seq, submitted=True, jobs_submitted=total)
            decisions = []
            if jobs:
                reason = f"static baseline: submit {every(total, 'job')}"
                decisions.append(
                    decision(
                        member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason
                    )
                )
            size = options.size or member.max_size
            if size != metrics.size:
                decisions += scale_to(member, metrics, 1, size, f"static baseline: a fixed size of {size}")
            return state, decisions
        inactive = state.inactive + 1 if idle(metrics, state.jobs_submitted) else 0
        state = replace(state, last_seq=metrics.seq, inactive=inactive)
        if inactive >= options.terminate_checks:
            why = f"static baseline: idle for {plural(inactive, 'check')}"
            return replace(state, done=True), finish(member, metrics, 0, False, why)
        return state, []


class SeedAsBuiltState(msgspec.Struct, kw_only=True, frozen=True):
    """The original's counters, as its sidecar kept them (one step per status call)."""

    seed: int = 0
    last_seq: int = -1
    submitted: bool = False
    waited: bool = False
    waiting_periods: int = 0
    inactive: int = 0
    #: Re-check calls the original made after its last change that no snapshot has stood for yet.
    rechecks_owed: int = 0
    #: When that change was made (``metrics.time``).
    changed_at: float = 0.0
    done: bool = False


def _is_recheck(member: MemberSpec, state: SeedAsBuiltState, metrics: Metrics) -> bool:
    window = min(RECHECK_SECONDS, member.check_seconds / 2)
    return state.rechecks_owed > 0 and metrics.time - state.changed_at <= window


class SeedAsBuilt:
    """The original operator as it behaved (see the module docstring). Takes workload-demand's options."""

    name: str = "seed-as-built"
    options_type: type[WorkloadDemandOptions] = WorkloadDemandOptions
    state_type: type[SeedAsBuiltState] = SeedAsBuiltState

    def initial_state(self, member: MemberSpec, options: WorkloadDemandOptions) -> SeedAsBuiltState:
        """A fresh state seeded by the member's address."""
        return SeedAsBuiltState(seed=_seed(member))

    def decide(
        self, member: MemberSpec, options: WorkloadDemandOptions, state: SeedAsBuiltState, metrics: Metrics
    ) -> tuple[SeedAsBuiltState, list[Decision]]:
        """One status call of the original and what its reconcile loop made of it."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        state = replace(state, last_seq=metrics.seq)
        if not state.submitted:
            # the call that found the jobs matrix unsubmitted: counted by the sidecar, then the submission
            jobs = [job for job in member.jobs if job.count > 0]
            reason = "original operator: submit the jobs matrix"
            submit = decision(
                member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason
            )
            state = replace(
                state,
                submitted=True,
                waited=True,
                waiting_periods=1,
                rechecks_owed=RECHECKS_AFTER_SUBMIT,
                changed_at=metrics.time,
            )
            return state, [submit]
        calls = 1
        if _is_recheck(member, state, metrics):
            state = replace(state, rechecks_owed=state.rechecks_owed - 1)  # this snapshot is a re-check
        else:
            calls += state.rechecks_owed  # the re-checks no snapshot stood for
            state = replace(state, rechecks_owed=0)
        # the re-checks followed a change made while jobs waited: they never counted as idle
        inactive = state.inactive + 1 if metrics.queue.active() == 0 else 0
        state = replace(state, inactive=inactive)
        if inactive > options.terminate_checks:
            why = "original operator: terminate"
            return replace(state, done=True), finish(member, metrics, 0, options.disable_termination, why)
        waited = state.waited or any(count > 0 for count in metrics.waiting.values())
        periods = state.waiting_periods + calls if waited else 0
        state = replace(state, waited=waited, waiting_periods=periods)
        if periods < options.scale_checks:
            return state, []
        step = pick_job(options.scale_up_strategy, state.seed, metrics)
        if not step:
            return state, []
        target = metrics.size + step
        # resetCounter came before the size was checked: the counter restarts whether or not it applies
        state = replace(state, waiting_periods=0)
        if target > member.max_size:
            why = (
                f"original operator: scale up by {step}: {metrics.size} → {target} is outside maxSize "
                f"{member.max_size}, so the original ignored it"
            )
            return state, [decision(member, metrics, 0, IGNORED_SCALE, size=target, reason=why)]
        why = f"original operator: scale up by {step}"
        state = replace(state, rechecks_owed=RECHECKS_AFTER_SCALE, changed_at=metrics.time)
        return state, scale_to(member, metrics, 0, target, why)
