"""Cluster sizing shared by the algorithms: workload-demand's counters, grow, shrink and the end.

``workload-demand`` is :func:`follow` after one submission; ``random-selection``,
``workload-success`` and the ``select-*`` algorithms size their member with the same function, and
``demand-fit`` and ``rules`` reuse the pieces (:func:`scale_to`, :func:`finish`, :func:`coming`).

Nodes *coming* are nodes requested but not yet up (``metrics.size - node_up_count``): they count as
available when growing and as excess when shrinking, so a member never asks again for nodes that are
still provisioning (the original's mistake).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal, Protocol

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, JobSpec, MemberSpec, Metrics
from ensemble_core.words import plural

from .base import clamp, decision

Order = Literal["random", "ascending", "descending", ""]
ScaleUpStrategy = Literal["nextJob", "smallestJob", "largestJob", "randomJob"]
Checks = Annotated[int, msgspec.Meta(ge=1)]

STRATEGY_WORDS: dict[ScaleUpStrategy, str] = {
    "nextJob": "next job",
    "smallestJob": "smallest waiting job",
    "largestJob": "largest waiting job",
    "randomJob": "randomly chosen waiting job",
}


class Counters(msgspec.Struct, kw_only=True, frozen=True):
    """workload-demand's counters of consecutive checks (the original kept them in its sidecar)."""

    #: Consecutive checks with jobs waiting and their number not falling.
    waiting_periods: int = 0
    #: Consecutive checks with free nodes and their number not falling.
    free_periods: int = 0
    #: Consecutive idle checks (no active job and every submitted job accounted for).
    inactive: int = 0
    last_waiting: int = 0
    last_free: int = 0


class FollowOptions(Protocol):
    """The options :func:`follow` reads; every algorithm that sizes like workload-demand has them."""

    @property
    def scale_checks(self) -> int: ...

    @property
    def scale_up_strategy(self) -> ScaleUpStrategy: ...

    @property
    def terminate_checks(self) -> int: ...

    @property
    def disable_termination(self) -> bool: ...


def waiting_jobs(metrics: Metrics) -> int:
    """Jobs waiting for nodes."""
    return sum(count for count in metrics.waiting.values() if count > 0)


def coming(metrics: Metrics) -> int:
    """Nodes requested but not yet up."""
    return max(0, metrics.size - metrics.nodes.node_up_count)


def finished_jobs(metrics: Metrics) -> int:
    """Jobs that ended, successfully or not.

    The sidecar's ``finished`` counts every inactive job, failed ones included (the poller falls back
    to ``queue.inactive``); the larger of the two is taken so that a sidecar whose ``finished``
    leaves failures out still accounts for them through ``queue.inactive``.
    """
    return max(metrics.finished, metrics.queue.inactive)


def idle(metrics: Metrics, submitted: int) -> bool:
    """No job active and every one of the ``submitted`` jobs finished (or failed).

    The second half keeps an empty queue from counting as idle before the sidecar has even queued a
    submission. A member whose job ledger still counts jobs outstanding (``Metrics.outstanding``: a
    failed or lost attempt about to be queued again) is not idle either; a snapshot that does not say
    (a recording made before the ledger) is judged on the queue alone.
    """
    return metrics.queue.active() == 0 and finished_jobs(metrics) >= submitted and not metrics.outstanding


def visible(metrics: Metrics, submitted: int) -> bool:
    """Every one of the ``submitted`` jobs shows in the queue (active or finished)."""
    return metrics.queue.active() + finished_jobs(metrics) >= submitted


def count(counters: Counters, metrics: Metrics, *, contiguous: bool, is_idle: bool) -> Counters:
    """The counters updated with one snapshot; a gap in seq (not ``contiguous``) restarts them."""
    waiting = waiting_jobs(metrics)
    free = metrics.nodes.node_free_count
    previous_waiting = counters.last_waiting if contiguous else waiting
    previous_free = counters.last_free if contiguous else free
    waiting_periods = counters.waiting_periods if contiguous else 0
    free_periods = counters.free_periods if contiguous else 0
    inactive = counters.inactive if contiguous else 0
    return Counters(
        last_waiting=waiting,
        last_free=free,
        waiting_periods=waiting_periods + 1 if waiting > 0 and previous_waiting <= waiting else 0,
        free_periods=free_periods + 1 if free > 0 and previous_free <= free else 0,
        inactive=inactive + 1 if is_idle else 0,
    )


def follow(
    member: MemberSpec,
    options: FollowOptions,
    counters: Counters,
    metrics: Metrics,
    *,
    contiguous: bool,
    is_idle: bool,
    seed: int,
    done_words: str,
    index: int = 0,
) -> tuple[Counters, list[Decision], bool]:
    """workload-demand's rules 3 to 5 on one snapshot: end, grow, or shrink (the first that applies).

    ``is_idle`` says whether this check counts as idle (the caller knows what else must be done
    before the member may end); ``done_words`` completes the sentence "no job active for N checks
    and ..." in the reason. Decisions are numbered from ``index``. Returns the new counters, the
    decisions, and whether the member ended (terminate or complete was decided).
    """
    counters = count(counters, metrics, contiguous=contiguous, is_idle=is_idle)
    if counters.inactive >= options.terminate_checks:
        why = f"no job active for {plural(counters.inactive, 'check')} and {done_words}"
        return counters, finish(member, metrics, index, options.disable_termination, why), True
    if counters.waiting_periods >= options.scale_checks:
        need = pick_job(options.scale_up_strategy, seed, metrics)
        if need is not None:
            why = f"{plural(counters.last_waiting, 'job')} waiting for {plural(counters.waiting_periods, 'check')}"
            grown = grow_to_fit(member, metrics, index, need, why, STRATEGY_WORDS[options.scale_up_strategy])
            if grown:
                return _after_scale(counters), grown, False
    if counters.free_periods >= options.scale_checks + 2 and counters.last_waiting == 0:
        why = (
            f"{plural(counters.last_free, 'node')} free for {plural(counters.free_periods, 'check')} and no job waiting"
        )
        shrunk = shrink_excess(member, metrics, index, why)
        if shrunk:
            return _after_scale(counters), shrunk, False
    return counters, [], False


def _after_scale(counters: Counters) -> Counters:
    # A scale changes what waiting and free mean, so both conditions must hold anew.
    return replace(counters, waiting_periods=0, free_periods=0)


def pick_job(strategy: ScaleUpStrategy, seed: int, metrics: Metrics) -> int | None:
    """The node count of the waiting job to make room for, or None when no job qualifies."""
    if strategy == "nextJob":
        # Without the sidecar's next_jobs there is no "next" job: better no step than a guess.
        return metrics.next_jobs[0] if metrics.next_jobs else None
    sizes = sorted(nodes for nodes, jobs in metrics.waiting.items() if jobs > 0)
    if not sizes:
        return None
    if strategy == "smallestJob":
        return sizes[0]
    if strategy == "largestJob":
        return sizes[-1]
    # randomJob: each waiting job equally likely, so sizes are weighted by how many jobs wait.
    rng = random.Random(seed + metrics.seq)
    return rng.choices(sizes, weights=[metrics.waiting[nodes] for nodes in sizes])[0]


def scale_to(member: MemberSpec, metrics: Metrics, index: int, wanted: int, why: str) -> list[Decision]:
    """A ``scale`` decision to ``wanted`` clamped to the member's bounds; none when that is the size now.

    The reason is ``why`` followed by ``grow a → b`` or ``shrink a → b``, noting when the target was
    capped at maxSize or held at minSize.
    """
    target = clamp(member, wanted)
    if target == metrics.size:
        return []
    verb = "grow" if target > metrics.size else "shrink"
    note = ""
    if target < wanted:
        note = f" (capped at maxSize {target})"
    elif target > wanted:
        note = f" (held at minSize {target})"
    reason = f"{why}: {verb} {metrics.size} → {target}{note}"
    return [decision(member, metrics, index, "scale", size=target, reason=reason)]


def grow_to_fit(member: MemberSpec, metrics: Metrics, index: int, need: int, why: str, what: str) -> list[Decision]:
    """Grow so that ``need`` nodes are free or coming; none when they already are or at maxSize.

    ``what`` names what needs the nodes (``next job``); the reason reads
    ``"<why>; <what> needs N nodes, F free, C coming: grow a → b"``.
    """
    free = metrics.nodes.node_free_count
    arriving = coming(metrics)
    missing = need - (free + arriving)
    if missing <= 0 or clamp(member, metrics.size + missing) <= metrics.size:
        return []
    why = f"{why}; {what} needs {plural(need, 'node')}, {free} free, {arriving} coming"
    return scale_to(member, metrics, index, metrics.size + missing, why)


def shrink_excess(member: MemberSpec, metrics: Metrics, index: int, why: str) -> list[Decision]:
    """Shrink by the free nodes and the nodes still coming; none when nothing is in excess."""
    excess = metrics.nodes.node_free_count + coming(metrics)
    if clamp(member, metrics.size - excess) >= metrics.size:
        return []
    return scale_to(member, metrics, index, metrics.size - excess, f"{why}; {coming(metrics)} coming")


def finish(member: MemberSpec, metrics: Metrics, index: int, disable_termination: bool, why: str) -> list[Decision]:
    """Terminate, or with ``disable_termination`` shrink to the minimum (if above it) and complete."""
    if not disable_termination:
        return [decision(member, metrics, index, "terminate", reason=f"{why}: terminate")]
    decisions: list[Decision] = []
    lowest = clamp(member, 1)
    if metrics.size > lowest:
        # The member is kept but has no work: release its nodes before going quiet for good.
        reason = f"{why}; disableTermination keeps the member: shrink {metrics.size} → {lowest}"
        decisions.append(decision(member, metrics, index, "scale", size=lowest, reason=reason))
    reason = f"{why}; disableTermination keeps the member: complete"
    decisions.append(decision(member, metrics, index + len(decisions), "complete", reason=reason))
    return decisions


def job_groups(jobs: Iterable[JobSpec], counts: Mapping[str, int]) -> list[JobSpec]:
    """The member's job groups with ``count`` replaced by ``counts[name]``, groups with none left out."""
    return [replace(job, count=counts[job.name]) for job in jobs if counts.get(job.name, 0) > 0]


class FollowFields(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The workload-demand sizing options, for algorithms whose cluster follows the queue the same way.

    Defaults are workload-demand's, so a member switching algorithm keeps its sizing behaviour.
    """

    #: Consecutive checks a condition must hold before a scale (a shrink waits two more).
    scale_checks: Checks = 5
    #: Which waiting job the member grows to make room for.
    scale_up_strategy: ScaleUpStrategy = "nextJob"
    #: Consecutive idle checks before the end.
    terminate_checks: Checks = 10
    #: When done, complete (keep the member, shrunk to its minimum) instead of terminating it.
    disable_termination: bool = False


def draw(counts: Mapping[str, int], k: int, rng: random.Random) -> dict[str, int]:
    """``k`` jobs drawn at random without replacement from ``counts`` (jobs per group).

    Every job is equally likely, so groups are drawn in proportion to their jobs. O(k log groups).
    """
    names = [name for name, n in counts.items() if n > 0]
    bounds = list(itertools.accumulate(counts[name] for name in names))
    total = bounds[-1] if bounds else 0
    drawn: dict[str, int] = {}
    for position in rng.sample(range(total), min(k, total)):
        name = names[bisect.bisect_right(bounds, position)]
        drawn[name] = drawn.get(name, 0) + 1
    return drawn
