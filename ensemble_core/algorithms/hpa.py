"""``hpa-proportional``: a baseline — what a HorizontalPodAutoscaler on the MiniCluster's ``/scale`` would do.

Not a recommendation: the benchmark's stand-in for the Kubernetes answer. A HorizontalPodAutoscaler
scales a ``/scale`` subresource proportionally to a metric against a target, ``desired = ceil(current ×
metric / target)``, skips changes within a tolerance of the target, limits a scale-up to the larger of
doubling and +4 pods per period (its default policy), and takes the highest desired size of the last
``stabilizationSeconds`` (default 300: its default scale-down stabilisation window) before it shrinks.
The metric here is the utilisation of the nodes up by the queue's demand — busy nodes plus the nodes
the waiting jobs need, over the nodes up — as an HPA on an external queue metric would see it (plain
CPU utilisation cannot exceed 100 % while jobs wait, and would never grow the member for a job wider
than it). The member submits every job on the first check and ends after ``terminateChecks`` idle checks.

Options: ``targetUtilization`` (default 0.8), ``tolerance`` (0.1), ``stabilizationSeconds`` (300),
``order`` (``random``), ``terminateChecks`` (1).
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics
from ensemble_core.words import every, plural

from .base import clamp, decision
from .sizing import Order, finish, idle, scale_to
from .workload_demand import member_seed


class HpaOptions(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``hpa-proportional`` (see the module docstring)."""

    target_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    tolerance: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    stabilization_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    order: Order = "random"
    terminate_checks: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class HpaState(msgspec.Struct, kw_only=True, frozen=True):
    """The submission, the idle count and the recent desired sizes ``(time, size)`` of the window."""

    seed: int = 0
    last_seq: int = -1
    submitted: bool = False
    jobs_submitted: int = 0
    inactive: int = 0
    done: bool = False
    recent: tuple[tuple[float, int], ...] = ()


class HpaProportional:
    """The ``hpa-proportional`` baseline (see the module docstring)."""

    name: str = "hpa-proportional"
    options_type: type[HpaOptions] = HpaOptions
    state_type: type[HpaState] = HpaState

    def initial_state(self, member: MemberSpec, options: HpaOptions) -> HpaState:
        """A fresh state seeded by the member's address."""
        return HpaState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: HpaOptions, state: HpaState, metrics: Metrics
    ) -> tuple[HpaState, list[Decision]]:
        """One HPA sync period on one snapshot."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        if not state.submitted:
            jobs = [job for job in member.jobs if job.count > 0]
            total = sum(job.count for job in jobs)
            state = replace(state, last_seq=metrics.seq, submitted=True, jobs_submitted=total)
            if not jobs:
                return state, []
            why = f"hpa baseline: submit {every(total, 'job')}"
            return state, [decision(member, metrics, 0, "submit", jobs=jobs, order=options.order, seed=state.seed,
                                    reason=why)]  # fmt: skip
        inactive = state.inactive + 1 if idle(metrics, state.jobs_submitted) else 0
        state = replace(state, last_seq=metrics.seq, inactive=inactive)
        if inactive >= options.terminate_checks:
            return replace(state, done=True), finish(
                member, metrics, 0, False, f"hpa baseline: idle {plural(inactive, 'check')}"
            )
        up = max(1, metrics.nodes.node_up_count)
        busy = max(0, metrics.nodes.node_up_count - metrics.nodes.node_free_count)
        demand = busy + sum(nodes * jobs for nodes, jobs in metrics.waiting.items() if jobs > 0)
        ratio = demand / up / options.target_utilization
        current = metrics.size
        desired = current if abs(ratio - 1.0) <= options.tolerance else math.ceil(up * ratio)
        desired = clamp(member, min(desired, max(2 * current, current + 4)))
        window = tuple((t, size) for t, size in state.recent if t > metrics.time - options.stabilization_seconds)
        window += ((metrics.time, desired),)
        state = replace(state, recent=window)
        target = desired if desired >= current else min(current, max(size for _, size in window))
        if target == current:
            return state, []
        why = (
            f"hpa baseline: demand {plural(demand, 'node')} on {up} up, target utilisation {options.target_utilization}"
        )
        return state, scale_to(member, metrics, 0, target, why)
