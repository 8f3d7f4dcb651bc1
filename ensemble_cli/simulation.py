"""Closed-loop what-if runs on a virtual clock: the real algorithms, the ``sim`` queue and the actuator's logic.

Every ``check_seconds`` of virtual time each active member's simulated queue is advanced, its status
becomes a ``Metrics`` snapshot, the member's algorithm decides (the same ``decide`` the decider runs),
and the decisions are applied through :func:`services.actuator.effects.apply` (the same function the
actuator runs) with a driver on the simulated queue. Nothing waits on a wall clock, so a run of hours
of virtual time takes a fraction of a second.

Cost model: a node costs from the moment it is requested until it is released — the integral of
``max(requested size, nodes up)`` over time (nodes still provisioning are requested; nodes draining
after a shrink are up until their job ends). A terminated member costs nothing more.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ensemble_cli.carry import carry
from ensemble_core import algorithms
from ensemble_core.messages import AlgorithmSpec, Applied, Decision, JobSpec, MemberSpec, Metrics
from ensemble_core.spec import Ensemble, Member
from ensemble_core.wire import ResizeResult, SubmitPayload, SubmitResult
from services.actuator.drivers import DriverError
from services.actuator.effects import CooldownPending, InvalidDecision, apply
from sidecar.queue import Job, QueueError
from sidecar.sim import SimQueue, TraceJob
from sidecar.sim import Trace as SimTrace

#: The provisioning delay measured on GKE in the recorded runs (a new VM: about 100 s, 90–150 s).
DEFAULT_DELAY = 100.0
#: Virtual seconds after which a run that has not finished is stopped and reported incomplete.
DEFAULT_LIMIT = 30 * 24 * 3600.0


@dataclass
class SimulationConfig:
    """What to simulate."""

    ensemble: Ensemble
    #: Overrides every member's algorithm (name), with these raw options (validated) over the member's
    #: own options that this algorithm takes (:func:`ensemble_cli.carry.carry`).
    algorithm: str | None = None
    options: dict[str, str | int | float | bool] = field(default_factory=dict)
    #: Recorded jobs: they replace each member's jobs matrix (submitted in the algorithm's order).
    trace: Sequence[TraceJob] | None = None
    #: Provisioning delay of a new node: a constant, or a list sampled with the seed.
    delay: float | Sequence[float] = DEFAULT_DELAY
    #: Seconds between two checks (default: the ensemble's checkSeconds, itself 10 by default).
    check_seconds: float | None = None
    seed: int = 0
    #: The actuator's minimum seconds between two scale changes of a member.
    cooldown: float = 0.0
    limit: float = DEFAULT_LIMIT
    #: Keep every Metrics, Decision and Applied (for ``--record`` and ``--plot``).
    record: bool = False
    #: Run time of a job with no ``duration`` when there is no trace (a job's ``duration`` is its run time).
    default_duration: float = 60.0


@dataclass
class Sample:
    """One member's state at one check (for plots)."""

    time: float
    member: int
    size: int
    nodes_up: int
    waiting: int
    running: int


@dataclass
class MemberResult:
    """What happened to one member."""

    index: int
    algorithm: str
    jobs: int = 0
    failed_jobs: int = 0
    makespan_s: float = 0.0
    node_seconds: float = 0.0
    job_node_seconds: float = 0.0
    scale_ups: int = 0
    scale_downs: int = 0
    peak_size: int = 0
    waits: list[float] = field(default_factory=list)
    first_submit: float | None = None
    last_end: float | None = None
    ended: str = ""
    #: The options of the algorithm as the member ran it.
    options: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass
class SimulationResult:
    """The outcome of a run: the summary figures, and the full record when asked for."""

    members: list[MemberResult]
    completed: bool
    virtual_end: float
    wall_seconds: float
    records: list[msgspec.Struct] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    #: Every job attempt of each member, by member index (when recording).
    jobs: dict[int, list[Job]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The figures of the whole ensemble (``--json``)."""
        starts = [m.first_submit for m in self.members if m.first_submit is not None]
        ends = [m.last_end for m in self.members if m.last_end is not None]
        node_seconds = sum(m.node_seconds for m in self.members)
        job_node_seconds = sum(m.job_node_seconds for m in self.members)
        waits = sorted(w for m in self.members for w in m.waits)
        return {
            "makespan_s": round(max(ends) - min(starts), 3) if starts and ends else 0.0,
            "node_seconds": round(node_seconds, 3),
            "job_node_seconds": round(job_node_seconds, 3),
            "utilization": round(job_node_seconds / node_seconds, 4) if node_seconds else 0.0,
            "scale_events": sum(m.scale_ups + m.scale_downs for m in self.members),
            "scale_ups": sum(m.scale_ups for m in self.members),
            "scale_downs": sum(m.scale_downs for m in self.members),
            "peak_size": max((m.peak_size for m in self.members), default=0),
            "jobs": sum(m.jobs for m in self.members),
            "failed_jobs": sum(m.failed_jobs for m in self.members),
            "mean_wait_s": round(statistics.fmean(waits), 3) if waits else 0.0,
            "p95_wait_s": round(waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)], 3) if waits else 0.0,
            "completed": self.completed,
            "virtual_end_s": round(self.virtual_end, 3),
            "wall_s": round(self.wall_seconds, 4),
        }


def trace_groups(trace: Sequence[TraceJob]) -> list[JobSpec]:
    """A trace's jobs as job groups, one per (name, width), in order of first appearance.

    A name used with several widths becomes ``<name>-<nodes>`` per width, so group names stay unique
    (as in an Ensemble); each submitted job still takes its run time from the trace's records of its
    width, in trace order (see :class:`sidecar.sim.Trace`).
    """
    widths: dict[str, set[int]] = {}
    for job in trace:
        widths.setdefault(job.name or "job", set()).add(job.nodes)
    groups: dict[tuple[str, int], JobSpec] = {}
    for job in trace:
        name = job.name or "job"
        label = name if len(widths[name]) == 1 else f"{name}-{job.nodes}"
        group = groups.get((name, job.nodes))
        if group is None:
            groups[(name, job.nodes)] = JobSpec(name=label, command="true", nodes=job.nodes, count=1)
        else:
            group.count += 1
    return list(groups.values())


class SimDriver:
    """The actuator's ``Driver`` on a simulated queue (every call is immediate on the virtual clock)."""

    def __init__(self, sim: SimQueue) -> None:
        self.sim = sim

    async def size(self, member: MemberSpec) -> int:
        return self.sim.queue.size

    async def scale(self, member: MemberSpec, target: int) -> int:
        current = self.sim.queue.size
        if target == current:
            return current
        result: ResizeResult = self.sim.grow(target) if target > current else self.sim.shrink(target)
        return result.size

    async def drain(self, member: MemberSpec, target: int) -> int | None:
        return None  # the simulated queue's shrink drains by itself, as a local sidecar's does

    async def submit(self, member: MemberSpec, decision: Decision) -> SubmitResult:
        payload = SubmitPayload(jobs=decision.jobs, order=decision.order, seed=decision.seed, key=decision.id)  # type: ignore[arg-type]
        try:
            return self.sim.submit(payload)
        except QueueError as exc:
            raise DriverError(str(exc), transient=False) from exc

    async def terminate(self, member: MemberSpec) -> None:
        self.sim.terminate()

    async def complete(self, member: MemberSpec) -> int:
        return self.sim.queue.size

    async def report(self, decision: Decision, applied: Applied) -> None:
        return None

    async def close(self) -> None:
        return None


class _Member:
    """One simulated member: its queue, algorithm and bookkeeping."""

    def __init__(self, config: SimulationConfig, spec: Member, check_seconds: float) -> None:
        ensemble = config.ensemble
        algorithm_spec = spec.algorithm
        if config.algorithm is not None:
            # the member keeps the options of its own algorithm that this one takes; config.options win
            carried, _ = carry(spec.algorithm, config.algorithm)
            algorithm_spec = AlgorithmSpec(
                name=config.algorithm, options={**carried.options, **config.options}, rules=carried.rules
            )
        jobs = list(spec.jobs)
        self.trace = SimTrace(config.trace, config.seed) if config.trace else None
        if config.trace:
            jobs = trace_groups(config.trace)
        self.member = msgspec.structs.replace(
            ensemble.member_spec(spec, endpoint="simulated"),
            algorithm=algorithm_spec,
            jobs=jobs,
            check_seconds=check_seconds,
        )
        self.algorithm = algorithms.get(algorithm_spec.name)
        self.options = algorithms.parse_options(algorithm_spec.name, algorithm_spec.options)
        initial = spec.size
        preprovisioned = getattr(self.options, "preprovisioned", False)
        if preprovisioned:
            initial = getattr(self.options, "size", 0) or spec.max_size
        self.sim = SimQueue(
            nodes=initial,
            max_nodes=max(spec.max_size, initial),
            provision_delay=config.delay,
            trace=self.trace,
            default_duration=None if self.trace else config.default_duration,
            seed=config.seed + spec.index,
        )
        self.driver = SimDriver(self.sim)
        self.state = self.algorithm.initial_state(self.member, self.options)
        self.result = MemberResult(
            index=spec.index, algorithm=algorithm_spec.name, peak_size=initial, options=dict(algorithm_spec.options)
        )
        self.seq = 0
        self.last_scale = -math.inf
        self.pending: list[Decision] = []
        self.active = True
        self.cost_at = 0.0

    def integrate_to(self, to: float) -> None:
        """Advance the queue to ``to``, adding the cost of the nodes held on the way."""
        while (at := self.sim.next_event_time()) is not None and at <= to:
            self._charge(at)
            self.sim.advance(at)
        self._charge(to)
        self.sim.advance(to)

    def _charge(self, until: float) -> None:
        if self.active:
            held = max(self.sim.queue.size, self.sim.queue.nodes_up)
            self.result.node_seconds += held * (until - self.cost_at)
        self.cost_at = until


async def _check(m: _Member, now: float, config: SimulationConfig, records: list[msgspec.Struct]) -> None:
    status = m.sim.status()
    metrics = Metrics(
        namespace=m.member.namespace,
        ensemble=m.member.ensemble,
        member=m.member.member,
        seq=m.seq,
        time=now,
        size=status.size if status.size is not None else status.nodes.node_up_count,
        nodes=status.nodes,
        queue=status.queue,
        waiting={nodes: count for nodes, count in status.waiting.items() if count > 0},
        next_jobs=status.next_jobs,
        finished=status.finished or 0,
        failed=status.failed or 0,
        groups=status.groups,
    )
    m.seq += 1
    if config.record:
        records.append(metrics)
    m.state, decisions = m.algorithm.decide(m.member, m.options, m.state, metrics)
    for decision in [*m.pending, *decisions]:
        if config.record and decision not in m.pending:
            records.append(decision)
        await _apply(m, decision, now, config, records)


async def _apply(
    m: _Member, decision: Decision, now: float, config: SimulationConfig, records: list[msgspec.Struct]
) -> None:
    if decision in m.pending:
        m.pending.remove(decision)
    if not m.active:
        return
    try:
        effect = await apply(decision, m.member, m.driver, since_scale=now - m.last_scale, cooldown=config.cooldown)
    except CooldownPending:
        m.pending.append(decision)
        return
    except (InvalidDecision, DriverError) as exc:
        applied = Applied(
            namespace=decision.namespace, ensemble=decision.ensemble, member=decision.member,
            decision=decision.id, time=now, ok=False, action=decision.action, error=str(exc),
        )  # fmt: skip
        if config.record:
            records.append(applied)
        return
    if decision.action == "submit" and m.result.first_submit is None:
        m.result.first_submit = now
    if effect.scaled and effect.before is not None and effect.after is not None and effect.after != effect.before:
        m.last_scale = now
        if effect.after > effect.before:
            m.result.scale_ups += 1
        else:
            m.result.scale_downs += 1
        m.result.peak_size = max(m.result.peak_size, effect.after)
    if effect.phase is not None:
        m.active = False
        m.result.ended = effect.phase
    if config.record:
        records.append(
            Applied(
                namespace=decision.namespace, ensemble=decision.ensemble, member=decision.member,
                decision=decision.id, time=now, ok=effect.ok, action=decision.action,
                size_before=effect.before, size_after=effect.after, error=effect.error,
            )
        )  # fmt: skip


async def _run(config: SimulationConfig) -> SimulationResult:
    started = time.perf_counter()
    check = float(config.check_seconds or config.ensemble.check_seconds)
    members = [_Member(config, spec, check) for spec in config.ensemble.members]
    records: list[msgspec.Struct] = []
    samples: list[Sample] = []
    attempts: dict[int, list[Job]] = {}
    now = 0.0
    while now <= config.limit and any(m.active for m in members):
        for m in members:
            if not m.active:
                continue
            m.integrate_to(now)
            await _check(m, now, config, records)
            if config.record:
                q = m.sim.queue
                samples.append(Sample(now, m.result.index, q.size, q.nodes_up, q.waiting, q.running))
        now += check
    for m in members:
        m.integrate_to(now)
        jobs = m.sim.queue.recent(sys.maxsize)
        if config.record:
            attempts[m.result.index] = jobs
        m.result.jobs = len(jobs)
        m.result.failed_jobs = sum(1 for job in jobs if job.success is False)
        for job in jobs:
            if job.t_run is not None:
                m.result.waits.append(job.t_run - job.t_submit)
                if job.t_inactive is not None:
                    m.result.job_node_seconds += job.nodes * (job.t_inactive - job.t_run)
            if job.t_inactive is not None:
                m.result.last_end = max(m.result.last_end or 0.0, job.t_inactive)
        if m.result.first_submit is None and jobs:
            m.result.first_submit = min(job.t_submit for job in jobs)
    return SimulationResult(
        members=[m.result for m in members],
        completed=not any(m.active for m in members),
        virtual_end=now,
        wall_seconds=time.perf_counter() - started,
        records=records,
        samples=samples,
        jobs=attempts,
    )


def simulate(config: SimulationConfig) -> SimulationResult:
    """Run a simulation to its end (every member terminated or completed) or to ``config.limit``."""
    return asyncio.run(_run(config))
