"""``random-selection``: release a random few of the member's jobs at every check.

Planned by the original operator and never built: jobs are queued *held* and the algorithm releases
a random ``batch`` of them at each check, while the cluster follows the queue as in workload-demand.
The ``local`` sidecar (like a Flux queue without an urgency of 0) has no held state, so the jobs are
held here instead: the state keeps how many jobs of each group are not yet released, and each
release is an ordinary ``submit`` of the drawn jobs (its decision id is the idempotency key, so a
redelivered decision never submits twice). Every unreleased job is equally likely to be drawn; the
draw is seeded by the member's seed and the metrics seq, so a replay draws the same jobs.

Options (YAML names):

=====================  ===========  =======================================================================
option                 default      meaning
=====================  ===========  =======================================================================
``batch``              ``1``        1 to 100000: jobs released at each check
``scaleChecks``        ``5``        as workload-demand: consecutive checks before a scale
``scaleUpStrategy``    ``nextJob``  as workload-demand: which waiting job to grow for
``terminateChecks``    ``10``       as workload-demand: idle checks before the end (only once every job
                                    has been released)
``disableTermination`` ``no``       as workload-demand: complete instead of terminate
=====================  ===========  =======================================================================

Rules, on every metrics snapshot: release ``batch`` random held jobs (if any are left), then size
the cluster as workload-demand does (:func:`~ensemble_core.algorithms.sizing.follow`: end, grow or
shrink). A check that released jobs is never idle, so the member cannot end while jobs are held.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, MemberSpec, Metrics
from ensemble_core.words import every

from .base import decision
from .sizing import Counters, FollowFields, draw, follow, idle, job_groups
from .workload_demand import member_seed


class RandomSelectionOptions(FollowFields, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``random-selection`` (see the module docstring)."""

    batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1


class RandomSelectionState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``random-selection`` remembers between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    started: bool = False
    #: Jobs not yet released, per group name.
    held: dict[str, int] = {}
    released: int = 0
    counters: Counters = msgspec.field(default_factory=Counters)
    done: bool = False


class RandomSelection:
    """The ``random-selection`` algorithm (see the module docstring)."""

    name: str = "random-selection"
    options_type: type[RandomSelectionOptions] = RandomSelectionOptions
    state_type: type[RandomSelectionState] = RandomSelectionState

    def initial_state(self, member: MemberSpec, options: RandomSelectionOptions) -> RandomSelectionState:
        """Every job held, seeded by the member's address."""
        return RandomSelectionState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: RandomSelectionOptions, state: RandomSelectionState, metrics: Metrics
    ) -> tuple[RandomSelectionState, list[Decision]]:
        """Release a random batch, then size the cluster; the inputs are untouched."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        contiguous = metrics.seq == state.last_seq + 1
        held = state.held if state.started else {job.name: job.count for job in member.jobs if job.count > 0}
        decisions: list[Decision] = []
        drawn = draw(held, options.batch, random.Random(state.seed + metrics.seq)) if held else {}
        released = state.released
        if drawn:
            held = {name: n - drawn.get(name, 0) for name, n in held.items() if n > drawn.get(name, 0)}
            count = sum(drawn.values())
            released += count
            left = sum(held.values())
            reason = f"released {count} randomly chosen held jobs; {left} still held"
            jobs = job_groups(member.jobs, drawn)
            decisions.append(
                decision(
                    member,
                    metrics,
                    0,
                    "submit",
                    jobs=jobs,
                    order="random",
                    seed=state.seed + metrics.seq,
                    reason=reason,
                )
            )
        counters, sized, done = follow(
            member,
            options,
            state.counters,
            metrics,
            contiguous=contiguous,
            is_idle=not held and not drawn and idle(metrics, released),
            seed=state.seed,
            done_words=f"{every(released, 'job')} released and finished",
            index=len(decisions),
        )
        state = replace(
            state,
            last_seq=metrics.seq,
            started=True,
            held=held,
            released=released,
            counters=counters,
            done=done,
        )
        return state, decisions + sized
