"""``select-fastest-runtime`` and ``select-longest-runtime``: run the group predicted fastest (longest) next.

Planned by the original operator and never built. The jobs are labelled by group (the jobs matrix
``name``). The first check submits one job of every group as a probe and holds the rest (in this
algorithm's state: the ``local`` sidecar has no held jobs, so a release is an ordinary ``submit``).
From then on a runtime model per group is learned online from ``metrics.groups``: between two
snapshots the jobs of a group that newly finished and their total run time give the mean of the new
runs, and the group's prediction moves toward it by ``smoothing`` percent (an exponentially weighted
mean: the state keeps, per group, only the finished count and total run time last seen and the
prediction). Whenever no job is waiting and every released job shows in the queue, the next
``batch`` held jobs of the group with the shortest (``select-fastest-runtime``) or longest
(``select-longest-runtime``) prediction are released, and the cluster is sized to them at once: it
grows so the released jobs fit in the free and coming nodes. A group whose probe has not finished
has no prediction and waits for it. Otherwise the cluster follows the queue as in workload-demand
(shrink idle nodes, grow for jobs that keep waiting, end when idle with nothing held).

Options (YAML names):

=====================  ===========  =======================================================================
option                 default      meaning
=====================  ===========  =======================================================================
``batch``              ``1``        1 to 100000: jobs of the chosen group released at once
``smoothing``          ``50``       1 to 100: percent weight of the newest runs in a group's prediction;
                                    100 predicts the last runs' mean, lower values remember longer
``scaleChecks``        ``5``        as workload-demand: consecutive checks before a scale
``scaleUpStrategy``    ``nextJob``  as workload-demand
``terminateChecks``    ``10``       as workload-demand: idle checks before the end (once nothing is held)
``disableTermination`` ``no``       as workload-demand
=====================  ===========  =======================================================================

Ties between predictions go to the group written first in the jobs matrix.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, GroupStats, JobSpec, MemberSpec, Metrics
from ensemble_core.words import every, plural

from .base import decision
from .sizing import Counters, FollowFields, follow, grow_to_fit, idle, job_groups, visible, waiting_jobs
from .workload_demand import member_seed


class SelectRuntimeOptions(FollowFields, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``select-fastest-runtime`` and ``select-longest-runtime``."""

    batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    smoothing: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50


class GroupModel(msgspec.Struct, kw_only=True, frozen=True):
    """The streaming runtime model of one job group."""

    #: Finished jobs of the group at the last snapshot, and their total run time (seconds).
    seen: int = 0
    run_total: float = 0.0
    #: Predicted run time (seconds); meaningful once ``seen`` > 0.
    predicted: float = 0.0


class SelectRuntimeState(msgspec.Struct, kw_only=True, frozen=True):
    """What the ``select-*-runtime`` algorithms remember between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    started: bool = False
    #: Jobs not yet released, per group name.
    held: dict[str, int] = {}
    released: int = 0
    models: dict[str, GroupModel] = {}
    counters: Counters = msgspec.field(default_factory=Counters)
    done: bool = False


def learn(model: GroupModel, stats: GroupStats, smoothing: int) -> GroupModel:
    """``model`` updated with the runs that finished since it last saw the group's statistics.

    The sidecar reports the mean over every finished run; the new runs' mean is recovered from the
    change in the total. Statistics that went backwards (a restarted sidecar) restart the model.
    """
    if stats.finished == model.seen:
        return model
    total = stats.run_mean * stats.finished
    if stats.finished < model.seen:
        learned = GroupModel(seen=stats.finished, run_total=total, predicted=stats.run_mean)
    else:
        latest = max(0.0, (total - model.run_total) / (stats.finished - model.seen))
        predicted = latest if model.seen == 0 else model.predicted + smoothing / 100 * (latest - model.predicted)
        learned = GroupModel(seen=stats.finished, run_total=total, predicted=predicted)
    # A mean no run can have (1e308 s from a faulty sidecar) overflows to infinity, which JSON cannot
    # carry: the saved state would never decode again and the member would get no more decisions.
    # Such statistics are ignored.
    if not (math.isfinite(learned.run_total) and math.isfinite(learned.predicted)):
        return model
    return learned


class SelectRuntime:
    """``select-fastest-runtime`` (``longest=False``) or ``select-longest-runtime`` (``longest=True``)."""

    options_type: type[SelectRuntimeOptions] = SelectRuntimeOptions
    state_type: type[SelectRuntimeState] = SelectRuntimeState

    def __init__(self, *, longest: bool) -> None:
        self.longest = longest
        self.name = "select-longest-runtime" if longest else "select-fastest-runtime"

    def initial_state(self, member: MemberSpec, options: SelectRuntimeOptions) -> SelectRuntimeState:
        """Every job held, no model yet, seeded by the member's address."""
        return SelectRuntimeState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: SelectRuntimeOptions, state: SelectRuntimeState, metrics: Metrics
    ) -> tuple[SelectRuntimeState, list[Decision]]:
        """Learn from the snapshot, release the chosen group's jobs, size the cluster."""
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        jobs = [job for job in member.jobs if job.count > 0]
        decisions: list[Decision] = []
        released = state.released
        if not state.started:
            held = {job.name: job.count - 1 for job in jobs if job.count > 1}
            models = {job.name: GroupModel() for job in jobs}
            if jobs:
                probes = job_groups(jobs, {job.name: 1 for job in jobs})
                reason = f"first check: one probe job of each of {plural(len(probes), 'group')} to learn their runtimes"
                decisions.append(decision(member, metrics, 0, "submit", jobs=probes, seed=state.seed, reason=reason))
                released = len(probes)
        else:
            held = state.held
            models = {
                name: learn(model, metrics.groups[name], options.smoothing) if name in metrics.groups else model
                for name, model in state.models.items()
            }
            if held and waiting_jobs(metrics) == 0 and visible(metrics, released):
                chosen = self._choose(jobs, held, models)
                if chosen is not None:
                    decisions = self._release(member, metrics, options, state.seed, held, models, chosen)
                    count = min(options.batch, held[chosen])
                    held = {name: n - (count if name == chosen else 0) for name, n in held.items()}
                    held = {name: n for name, n in held.items() if n > 0}
                    released += count
        counters, sized, done = follow(
            member,
            options,
            state.counters,
            metrics,
            contiguous=metrics.seq == state.last_seq + 1,
            is_idle=not held and not decisions and idle(metrics, released),
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
            models=models,
            counters=counters,
            done=done,
        )
        if decisions:
            # A release sizes the cluster for its jobs; follow's shrink would take the nodes they need.
            sized = [d for d in sized if d.action != "scale"]
        return state, decisions + sized

    def _choose(self, jobs: list[JobSpec], held: dict[str, int], models: dict[str, GroupModel]) -> str | None:
        known = [job.name for job in jobs if held.get(job.name, 0) > 0 and models[job.name].seen > 0]
        if not known:
            return None
        pick = max if self.longest else min
        return pick(known, key=lambda name: models[name].predicted)

    def _release(
        self,
        member: MemberSpec,
        metrics: Metrics,
        options: SelectRuntimeOptions,
        seed: int,
        held: dict[str, int],
        models: dict[str, GroupModel],
        chosen: str,
    ) -> list[Decision]:
        count = min(options.batch, held[chosen])
        kind = "longest" if self.longest else "shortest"
        why = f"group {chosen} has the {kind} predicted runtime ({models[chosen].predicted:.1f} s)"
        batch = job_groups(member.jobs, {chosen: count})
        reason = f"{why}: release {plural(count, 'job')}"
        decisions = [decision(member, metrics, 0, "submit", jobs=batch, seed=seed, reason=reason)]
        need = count * batch[0].nodes
        return decisions + grow_to_fit(
            member, metrics, 1, need, f"released {plural(count, 'job')} of {chosen}", "the release"
        )
