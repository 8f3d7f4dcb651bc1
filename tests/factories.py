"""Members and metrics snapshots for the algorithm tests (one definition for every test file)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ensemble_core.messages import AlgorithmSpec, GroupStats, JobSpec, MemberSpec, Metrics, NodeCounts, QueueCounts


def make_member(
    algorithm: str = "workload-demand",
    *,
    jobs: Sequence[JobSpec] = (),
    rules: Sequence[dict[str, Any]] = (),
    size: int = 1,
    min_size: int = 1,
    max_size: int = 24,
) -> MemberSpec:
    """Member 0 of ``default/ens`` running ``algorithm``."""
    return MemberSpec(
        namespace="default",
        ensemble="ens",
        member=0,
        name="ens-0",
        size=size,
        min_size=min_size,
        max_size=max_size,
        endpoint="127.0.0.1:50051",
        algorithm=AlgorithmSpec(name=algorithm, rules=list(rules)),
        jobs=list(jobs),
    )


def make_metrics(
    seq: int,
    *,
    size: int = 1,
    up: int | None = None,
    free: int = 0,
    waiting: dict[int, int] | None = None,
    next_jobs: Sequence[int] = (),
    run: int = 0,
    finished: int = 0,
    failed: int = 0,
    inactive: int | None = None,
    groups: dict[str, GroupStats] | None = None,
) -> Metrics:
    """Check ``seq`` (10 s apart) of member 0: ``size`` nodes requested, ``up`` of them up (default all).

    ``finished`` counts every ended job, failed ones included, as the sidecar reports it; ``inactive``
    (the queue's count) defaults to it — give it apart to model a sidecar whose ``finished`` leaves
    failures out.
    """
    waiting = waiting or {}
    up = size if up is None else up
    return Metrics(
        namespace="default",
        ensemble="ens",
        member=0,
        seq=seq,
        time=1000.0 + 10 * seq,
        size=size,
        nodes=NodeCounts(node_up_count=up, node_free_count=free, node_cores_up=up, node_cores_free=free),
        queue=QueueCounts(sched=sum(waiting.values()), run=run, inactive=finished if inactive is None else inactive),
        waiting=waiting,
        next_jobs=list(next_jobs),
        finished=finished,
        failed=failed,
        groups=groups or {},
    )
