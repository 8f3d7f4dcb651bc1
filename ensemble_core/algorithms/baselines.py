"""Baselines to measure algorithms against: ``static`` and ``seed-as-built``. Neither is a recommendation.

``static`` — a fixed size. With ``preprovisioned: yes`` (the default) the member starts at ``size``
nodes already up (``ensemble simulate`` creates it so; live, set the MiniCluster's size to it), the
best case of a static cluster; with ``no`` it starts at its spec size and asks for ``size`` nodes at
the first check, paying the provisioning delay once. It submits everything at once, never scales
again, and terminates after ``terminateChecks`` idle checks.

``seed-as-built`` — a reference model of the original operator *as it really behaved* on GKE (read
from its code and the recorded runs in ``shared/data/seed-gke``), not as it was meant to behave
(that is ``workload-demand``). It reproduces its bugs:

- the waiting counter compared nothing: once any job has waited, it grows every ``scaleChecks``
  checks for ever, by the node count of the next job (``scaleUpStrategy``), whatever is already coming;
- nodes requested but not yet up are ignored: each step adds to the requested size;
- a step that would pass ``maxSize`` is dropped whole (and the counter restarts), not clamped;
- no scale-down is ever applied;
- it terminates when the idle counter *exceeds* ``terminateChecks`` (strictly greater), with no
  check that the submitted jobs were ever seen.

Its reconcile loop re-ran at once after every change it made — twice after a scale, once after the
submission — and each of those extra checks counted toward ``scaleChecks``. A snapshot here is one
periodic check, so the counter starts at 2 after a submission or an applied scale instead; this is
what makes the model grow at the recorded moments (30 s, then every 30 s, and 50 s after a dropped step).
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

#: The extra checks the original's reconcile loop ran at once after it changed something.
IMMEDIATE_RECHECKS = 2


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
    """The original's counters, as it kept them."""

    seed: int = 0
    last_seq: int = -1
    submitted: bool = False
    waited: bool = False
    waiting_periods: int = 0
    inactive: int = 0
    done: bool = False


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
        """One check of the original's reconcile loop."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        state = replace(state, last_seq=metrics.seq)
        if not state.submitted:
            jobs = [job for job in member.jobs if job.count > 0]
            reason = "original operator: submit the jobs matrix"
            submit = decision(
                member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed, reason=reason
            )
            return replace(state, submitted=True, waited=True, waiting_periods=IMMEDIATE_RECHECKS), [submit]
        inactive = state.inactive + 1 if metrics.queue.active() == 0 else 0
        state = replace(state, inactive=inactive)
        if inactive > options.terminate_checks:
            why = "original operator: terminate"
            return replace(state, done=True), finish(member, metrics, 0, options.disable_termination, why)
        waited = state.waited or any(count > 0 for count in metrics.waiting.values())
        periods = state.waiting_periods + 1 if waited else 0
        state = replace(state, waited=waited, waiting_periods=periods)
        if periods < options.scale_checks:
            return state, []
        step = pick_job(options.scale_up_strategy, state.seed, metrics)
        if not step:
            return state, []
        target = metrics.size + step
        if target > member.max_size:
            # the original dropped the whole step ("outside allowed boundary") and counted afresh
            return replace(state, waiting_periods=0), []
        why = f"original operator: scale up by {step}"
        return replace(state, waiting_periods=IMMEDIATE_RECHECKS), scale_to(member, metrics, 0, target, why)
