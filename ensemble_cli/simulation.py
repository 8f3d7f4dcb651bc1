"""Closed-loop what-if runs on a virtual clock: the real algorithms, the ``sim`` queue and the actuator's logic.

Every ``check_seconds`` of virtual time each active member's simulated queue is advanced, its status
becomes a ``Metrics`` snapshot, the member's algorithm decides (the same ``decide`` the decider runs),
and the decisions are applied through :func:`services.actuator.effects.apply` (the same function the
actuator runs) with a driver on the simulated queue. Nothing waits on a wall clock, so a run of hours
of virtual time takes a fraction of a second.

Cost model: a node costs from the moment it is requested until it is released — the integral of
``max(requested size, nodes up)`` over time (nodes still provisioning are requested; nodes draining
after a shrink are up until their job ends). A terminated member costs nothing more.

With a cluster model (``SimulationConfig.cluster``, ``--cluster``; see :mod:`ensemble_cli.cluster`)
the nodes are pods on VMs that every member shares, their delays come from the VMs, and the bill is
the VMs' lives until the autoscaler has brought the pool back to its minimum (``vm_seconds``).
Several ensembles (``SimulationConfig.more``) arrive at their own times on the same cluster, and a
node budget (``budget``) caps the nodes all members hold together, divided among the members that
want nodes by :func:`ensemble_core.budget.fair_share`: a member's scale request is granted up to
its share (as the actuator grants it), and a member above its share is shrunk to it when others want
the nodes.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ensemble_cli.carry import carry
from ensemble_cli.cluster import Cluster, ClusterModel
from ensemble_core import algorithms
from ensemble_core.budget import fair_share, jain_index
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
    #: The VMs under the MiniClusters (None: the model without VMs, a node costs from request to release).
    cluster: ClusterModel | None = None
    #: Nodes all members together may hold (None: the cluster model's budget, if any).
    budget: int | None = None
    #: When ``ensemble`` arrives (virtual seconds), and further ensembles with their arrival times.
    arrival: float = 0.0
    more: Sequence[tuple[Ensemble, float]] = ()
    #: Each member's initial nodes are requested when its ensemble arrives (a MiniCluster created then)
    #: instead of being up already.
    cold_start: bool = False


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
    ensemble: str = ""
    arrival: float = 0.0
    max_size: int = 0
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
    #: The cluster model's VMs (None without one).
    cluster: Cluster | None = None
    #: When the pool was back at its minimum after the run (with a cluster model).
    pool_end: float = 0.0
    budget: int | None = None
    #: Per ensemble: the sum over checks of held / entitled nodes, and the number of such checks.
    entitled: dict[str, tuple[float, int]] = field(default_factory=dict)

    def ensembles(self) -> dict[str, dict[str, Any]]:
        """Per ensemble (in arrival order): arrival, turnaround (arrival → its last job done), node-seconds."""
        rows: dict[str, dict[str, Any]] = {}
        for m in sorted(self.members, key=lambda m: (m.arrival, m.ensemble)):
            row = rows.setdefault(m.ensemble, {"arrival_s": m.arrival, "end": None, "node_seconds": 0.0,
                                               "job_node_seconds": 0.0, "max_size": 0})  # fmt: skip
            row["node_seconds"] += m.node_seconds
            row["job_node_seconds"] += m.job_node_seconds
            row["max_size"] += m.max_size
            if m.last_end is not None:
                row["end"] = max(row["end"] or 0.0, m.last_end)
        for row in rows.values():
            end = row.pop("end")
            row["turnaround_s"] = round(end - row["arrival_s"], 3) if end is not None else None
            row["node_seconds"] = round(row["node_seconds"], 3)
            row["job_node_seconds"] = round(row["job_node_seconds"], 3)
        return rows

    def fairness(self) -> float:
        """Jain's index of the ensembles' node shares: at each check an ensemble is entitled to its
        weighted max-min fair share of the budget (of all nodes wanted, without one) given what every
        ensemble wants; its share is the nodes it holds (at most that) over it, averaged over the checks
        at which it was entitled to any. 1.0: each got its fair share as much as the others did."""
        shares = {name: total / count for name, (total, count) in self.entitled.items() if count}
        return round(jain_index(shares), 4)

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
            **self._cluster_summary(min(starts, default=0.0), max(ends, default=0.0)),
        }

    def _cluster_summary(self, first_submit: float, last_end: float) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if self.cluster is not None:
            figures["cluster"] = self.cluster.model.name
            figures["vm_seconds"] = round(self.cluster.vm_seconds(0.0, self.pool_end), 3)
            figures["vm_seconds_makespan"] = round(self.cluster.vm_seconds(first_submit, last_end), 3)
            figures["vms_added"] = self.cluster.vms_added()
            figures["pool_back_at_minimum_s"] = round(self.pool_end, 3)
        if self.budget is not None:
            figures["budget"] = self.budget
        if len({m.ensemble for m in self.members}) > 1:
            rows = self.ensembles()
            turnarounds = [row["turnaround_s"] for row in rows.values() if row["turnaround_s"] is not None]
            figures["ensembles"] = rows
            figures["mean_turnaround_s"] = round(statistics.fmean(turnarounds), 3) if turnarounds else 0.0
            figures["jain"] = self.fairness()
        return figures


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

    def __init__(self, sim: SimQueue, grant: Callable[[int], int] | None = None) -> None:
        self.sim = sim
        #: Under a node budget: the size a scale to ``target`` is granted (the actuator's enforcement).
        self.grant = grant

    async def size(self, member: MemberSpec) -> int:
        return self.sim.queue.size

    async def scale(self, member: MemberSpec, target: int) -> int:
        if self.grant is not None:
            target = self.grant(target)
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

    def __init__(
        self,
        config: SimulationConfig,
        ensemble: Ensemble,
        spec: Member,
        check_seconds: float,
        *,
        key: int = 0,
        arrival: float = 0.0,
        cluster: Cluster | None = None,
    ) -> None:
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
        self.key = key
        self.arrival = arrival
        self.started = False
        self.initial = initial
        self.cold = config.cold_start
        self.cluster = cluster
        self.sim = SimQueue(
            nodes=0 if self.cold else initial,
            max_nodes=max(spec.max_size, initial),
            provision_delay=config.delay,
            trace=self.trace,
            default_duration=None if self.trace else config.default_duration,
            seed=config.seed + spec.index,
            start=arrival,
            provisioner=None if cluster is None else (lambda now, count: cluster.place(key, now, count)),
        )
        if cluster is not None:
            cluster.join(key, self.sim.node_up_at)
        self.driver = SimDriver(self.sim, grant=self._granted)
        self.budget: _Budget | None = None
        self.state = self.algorithm.initial_state(self.member, self.options)
        self.result = MemberResult(
            index=spec.index, algorithm=algorithm_spec.name, ensemble=ensemble.name, arrival=arrival,
            max_size=max(spec.max_size, initial), peak_size=initial, options=dict(algorithm_spec.options),
        )  # fmt: skip
        self.seq = 0
        self.last_scale = -math.inf
        self.pending: list[Decision] = []
        self.active = True
        self.cost_at = arrival
        #: The size the algorithm last asked for (what it wants under a budget).
        self.want = initial

    def _granted(self, target: int) -> int:
        self.want = target
        return target if self.budget is None else min(target, self.budget.grant(self))

    def start(self, now: float) -> None:
        """The member's ensemble arrives: its initial nodes are up."""
        self.started = True
        if self.cold:
            self.sim.advance(now)
            self.sim.grow(self.initial)
        elif self.cluster is not None:
            self.cluster.start(self.key, self.initial, now)

    def step(self, at: float) -> None:
        """Advance the queue to ``at``, adding the cost of the nodes held on the way."""
        self._charge(at)
        self.sim.advance(at)
        self.sync(at)

    def sync(self, now: float) -> None:
        """Tell the cluster how many pods the member holds now (pods of drained nodes go)."""
        if self.cluster is not None:
            q = self.sim.queue
            self.cluster.hold(self.key, max(q.size, q.nodes_up), now)

    def integrate_to(self, to: float) -> None:
        """Advance the queue to ``to``, adding the cost of the nodes held on the way."""
        while (at := self.sim.next_event_time()) is not None and at <= to:
            self.step(at)
        self.step(to)

    def _charge(self, until: float) -> None:
        if self.active:
            held = max(self.sim.queue.size, self.sim.queue.nodes_up)
            self.result.node_seconds += held * (until - self.cost_at)
        self.cost_at = until


class _Budget:
    """A node budget over every member: each member's grant is its fair share of what they want."""

    def __init__(self, nodes: int, members: list[_Member]) -> None:
        self.nodes = nodes
        self.members = members
        for m in members:
            m.budget = self

    def grants(self) -> dict[str, int]:
        wants = {f"{m.key:06d}": m.want if (m.active and m.started) else 0 for m in self.members}
        return fair_share(wants, {}, self.nodes)

    def grant(self, member: _Member) -> int:
        """The member's fair share, less what others still hold beyond theirs (nodes not yet given back)."""
        held = sum(_held(m) for m in self.members if m is not member and m.started)
        return max(0, min(self.grants()[f"{member.key:06d}"], self.nodes - held))

    def rebalance(self, now: float) -> None:
        """Shrink members above their share (others want the nodes), then grow members below what they want
        with the nodes that are free."""
        grants = self.grants()
        running = [m for m in self.members if m.active and m.started]
        for m in running:
            if m.sim.queue.size > grants[f"{m.key:06d}"]:
                m.sim.shrink(grants[f"{m.key:06d}"])
                m.sync(now)
        for m in running:
            target = min(m.want, self.grant(m))
            if m.sim.queue.size < target:
                m.sim.grow(target)
                m.result.peak_size = max(m.result.peak_size, m.sim.queue.size)
                m.sync(now)


def _held(m: _Member) -> int:
    """Nodes a member holds: requested, or up and draining after a shrink."""
    return max(m.sim.queue.size, m.sim.queue.nodes_up)


def _count_shares(members: list[_Member], budget: int | None, entitled: dict[str, tuple[float, int]]) -> None:
    """Add one check to each ensemble's held / entitled nodes (for Jain's index, see ``fairness``)."""
    wants: dict[str, int] = {}
    held: dict[str, int] = {}
    for m in members:
        name = m.result.ensemble
        running = m.active and m.started
        wants[name] = wants.get(name, 0) + (m.want if running else 0)
        held[name] = held.get(name, 0) + (_held(m) if running else 0)
    shares = fair_share(wants, {}, budget if budget is not None else sum(wants.values()))
    for name, share in shares.items():
        if share > 0:
            total, count = entitled.get(name, (0.0, 0))
            entitled[name] = (total + min(held[name], share) / share, count + 1)


def _advance_all(members: list[_Member], to: float, shared: bool) -> None:
    """Advance every started member to ``to``; members that share a cluster, all their events in one
    time order (members that share nothing one after the other, which is faster)."""
    if not shared:
        for m in members:
            if m.started:
                m.integrate_to(to)
        return
    while True:
        due = [(at, m.key) for m in members if m.started and (at := m.sim.next_event_time()) is not None and at <= to]
        if not due:
            break
        at, key = min(due)
        members[key].step(at)
    for m in members:
        if m.started:
            m.step(to)


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
    cluster = Cluster(config.cluster, config.seed) if config.cluster is not None else None
    members: list[_Member] = []
    for ensemble, arrival in [(config.ensemble, config.arrival), *config.more]:
        for spec in ensemble.members:
            members.append(_Member(config, ensemble, spec, check, key=len(members), arrival=arrival, cluster=cluster))
    budget_nodes = config.budget if config.budget is not None else (config.cluster.budget if config.cluster else None)
    budget = _Budget(budget_nodes, members) if budget_nodes is not None else None
    records: list[msgspec.Struct] = []
    samples: list[Sample] = []
    attempts: dict[int, list[Job]] = {}
    entitled: dict[str, tuple[float, int]] = {}
    now = 0.0
    shared = cluster is not None or budget is not None
    while now <= config.limit and any(m.active for m in members):
        _advance_all(members, now, shared)
        for m in members:
            if m.active and not m.started and m.arrival <= now:
                m.start(now)
        for m in members:
            if not (m.active and m.started):
                continue
            await _check(m, now, config, records)
            m.sync(now)
            if config.record:
                q = m.sim.queue
                samples.append(Sample(now, m.key, q.size, q.nodes_up, q.waiting, q.running))
        if budget is not None:
            budget.rebalance(now)
        if config.more:
            _count_shares(members, budget_nodes, entitled)
        now += check
    _advance_all(members, now, shared)
    for m in members:
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
        cluster=cluster,
        pool_end=cluster.finish(now) if cluster is not None else now,
        budget=budget_nodes,
        entitled=entitled,
    )


def simulate(config: SimulationConfig) -> SimulationResult:
    """Run a simulation to its end (every member terminated or completed) or to ``config.limit``."""
    return asyncio.run(_run(config))
