"""The sidecar's pure queue model: scheduling, resizing, statistics, ordering, idempotent submit."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble_core.messages import JobSpec
from ensemble_core.wire import MAX_SUBMIT_JOBS
from sidecar.queue import JobState, Queue, QueueError, QueueTerminated, order_jobs


def spec(name: str, nodes: int = 1, count: int = 1, command: str = "true") -> JobSpec:
    return JobSpec(name=name, command=command, nodes=nodes, count=count)


def started_groups(queue: Queue, now: float = 0.0) -> list[str]:
    return [job.group for job in queue.schedule(now)]


def test_fcfs_head_of_line_blocks_smaller_jobs_behind_it() -> None:
    queue = Queue(nodes=4)
    queue.submit([spec("a", nodes=3), spec("b", nodes=2), spec("c", nodes=1)], 0.0)
    assert started_groups(queue) == ["a"]
    status = queue.status(1.0)
    # c would fit in the free node, but b is at the head and does not: no backfill.
    assert status.nodes.node_free_count == 1
    assert status.waiting == {1: 1, 2: 1}
    assert status.next_jobs == [2, 1]
    assert status.counts == {"waiting": 2, "running": 1}
    queue.finish(1, 2.0, 0)
    assert started_groups(queue, 2.0) == ["b", "c"]
    assert queue.status(2.0).queue.run == 2


def test_job_wider_than_size_waits_for_a_grow() -> None:
    queue = Queue(nodes=1, max_nodes=3)
    queue.submit([spec("wide", nodes=3), spec("small")], 0.0)
    assert started_groups(queue) == []
    assert queue.grow(3) == 2
    assert started_groups(queue) == []  # requested, not up yet
    assert queue.nodes_ready(2) == 2
    assert started_groups(queue) == ["wide"]


def test_shrink_removes_free_nodes_and_never_kills_running_work() -> None:
    queue = Queue(nodes=4)
    queue.submit([spec("a", nodes=2), spec("b", nodes=1)], 0.0)
    queue.schedule(0.0)
    queue.shrink(1)
    # The one free node goes now; three busy nodes stay up (draining) with their jobs running.
    assert (queue.size, queue.nodes_up, queue.nodes_free, queue.running) == (1, 3, 0, 2)
    assert queue.draining == 2
    queue.finish(1, 1.0, 0)  # a's two nodes are removed
    assert (queue.nodes_up, queue.nodes_free, queue.running) == (1, 0, 1)
    queue.finish(2, 2.0, 0)  # b's node is within the size: it becomes free
    assert (queue.nodes_up, queue.nodes_free, queue.draining) == (1, 1, 0)


def test_draining_nodes_get_no_new_work() -> None:
    queue = Queue(nodes=4)
    queue.submit([spec("x", nodes=2), spec("y", nodes=2)], 0.0)
    queue.schedule(0.0)
    queue.shrink(2)
    queue.submit([spec("z")], 1.0)
    assert started_groups(queue, 1.0) == []
    queue.finish(1, 2.0, 0)  # x's nodes are drained away, not reused
    assert started_groups(queue, 2.0) == []
    assert queue.nodes_up == 2
    queue.finish(2, 3.0, 0)  # y's nodes are within the size
    assert started_groups(queue, 3.0) == ["z"]


def test_grow_and_shrink_directions_and_bounds() -> None:
    queue = Queue(nodes=2, max_nodes=5)
    with pytest.raises(QueueError, match=r"^size: grow to 1 is below"):
        queue.grow(1)
    with pytest.raises(QueueError, match=r"^size: shrink to 3 is above"):
        queue.shrink(3)
    with pytest.raises(QueueError, match=r"^size: 6 is outside 0\.\.5"):
        queue.grow(6)
    assert queue.grow(2) == 0
    assert queue.shrink(2) == 0
    assert (queue.size, queue.nodes_up) == (2, 2)


def test_provisioning_never_exceeds_the_size_requested_when_nodes_arrive() -> None:
    queue = Queue(nodes=2, max_nodes=10)
    to_add = queue.grow(8)
    assert (to_add, queue.size, queue.nodes_up) == (6, 8, 2)
    queue.shrink(4)  # before the nodes came up
    assert queue.nodes_ready(to_add) == 2
    assert queue.nodes_up == 4
    # Growing while nodes drain reuses them before provisioning new ones.
    queue.submit([spec("a", nodes=4)], 0.0)
    queue.schedule(0.0)
    queue.shrink(1)
    assert queue.grow(6) == 2


def test_group_statistics_are_kept_incrementally() -> None:
    queue = Queue(nodes=1)
    queue.submit([spec("g", count=3)], 0.0)
    queue.schedule(1.0)
    queue.finish(1, 3.0, 0)  # waited 1, ran 2
    queue.schedule(3.0)
    queue.finish(2, 7.0, 1)  # waited 3, ran 4
    stats = queue.status(7.0).groups["g"]
    assert (stats.submitted, stats.finished, stats.succeeded, stats.failed) == (3, 2, 1, 1)
    assert (stats.run_min, stats.run_mean, stats.run_max) == (2.0, 3.0, 4.0)
    assert (stats.wait_min, stats.wait_mean, stats.wait_max) == (1.0, 2.0, 3.0)
    status = queue.status(7.0)
    assert (status.finished, status.failed, status.queue.inactive, status.queue.sched) == (2, 1, 2, 1)


def test_order_keeps_groups_consecutive_or_sorts_stably_by_nodes() -> None:
    specs = [spec("a", nodes=2, count=2), spec("b", nodes=1), spec("c", nodes=2), spec("d", nodes=3)]
    assert [s.name for s in order_jobs(specs, "", 0)] == ["a", "a", "b", "c", "d"]
    assert [s.name for s in order_jobs(specs, "ascending", 0)] == ["b", "a", "a", "c", "d"]
    assert [s.name for s in order_jobs(specs, "descending", 0)] == ["d", "a", "a", "c", "b"]
    shuffled = [s.name for s in order_jobs(specs, "random", 7)]
    assert shuffled == [s.name for s in order_jobs(specs, "random", 7)]
    assert sorted(shuffled) == ["a", "a", "b", "c", "d"]


def test_submit_with_a_seen_key_queues_nothing_and_says_duplicate() -> None:
    queue = Queue(nodes=1)
    first = queue.submit([spec("g", count=3)], 0.0, key="k1")
    again = queue.submit([spec("g", count=3)], 1.0, key="k1")
    assert (first.submitted, first.duplicate) == (3, False)
    assert (again.submitted, again.duplicate) == (3, True)
    assert queue.status(1.0).groups["g"].submitted == 3
    assert queue.submit([spec("g")], 2.0, key="k2").duplicate is False
    assert queue.submit([spec("g")], 2.0).submitted == 1  # no key: never deduplicated
    assert queue.waiting == 5


@pytest.mark.parametrize(
    ("jobs", "field"),
    [
        ([spec("g", nodes=3)], "jobs[0].nodes"),
        ([spec("g"), spec("h", command="  ")], "jobs[1].command"),
        ([spec("")], "jobs[0].name"),
        ([spec("g", count=MAX_SUBMIT_JOBS), spec("h")], "jobs:"),
    ],
)
def test_invalid_submit_names_the_field_and_queues_nothing(jobs: list[JobSpec], field: str) -> None:
    queue = Queue(nodes=1, max_nodes=2)
    with pytest.raises(QueueError) as raised:
        queue.submit(jobs, 0.0, key="k")
    assert str(raised.value).startswith(field)
    assert queue.waiting == 0
    assert queue.submit([spec("g")], 0.0, key="k").duplicate is False  # a refused key is not remembered


def test_cancel_removes_only_the_groups_waiting_jobs() -> None:
    queue = Queue(nodes=1)
    queue.submit([spec("a", count=2), spec("b", count=2)], 0.0)
    queue.schedule(0.0)
    assert queue.cancel("a", 1.0) == 1  # a's running job is left alone
    assert queue.cancel("zzz", 1.0) == 0
    status = queue.status(1.0)
    assert status.next_jobs == [1, 1]
    assert (status.queue.sched, status.queue.run, status.queue.inactive) == (2, 1, 1)
    assert (status.groups["a"].finished, status.groups["a"].failed) == (1, 1)
    cancelled = queue.job(2)
    assert cancelled is not None and cancelled.state is JobState.INACTIVE


def test_terminate_stops_placing_work_and_sizes_to_zero_as_jobs_end() -> None:
    queue = Queue(nodes=3)
    queue.submit([spec("a", nodes=2), spec("b", nodes=2)], 0.0)
    queue.schedule(0.0)
    queue.terminate()
    status = queue.status(1.0)
    assert (status.terminated, status.size, status.nodes.node_up_count, status.queue.run) == (True, 0, 2, 1)
    with pytest.raises(QueueTerminated):
        queue.submit([spec("c")], 1.0)
    with pytest.raises(QueueTerminated):
        queue.grow(3)
    queue.finish(1, 2.0, 0)
    assert started_groups(queue, 2.0) == []
    assert (queue.nodes_up, queue.waiting) == (0, 1)


def test_recent_lists_the_newest_jobs_oldest_first() -> None:
    queue = Queue(nodes=1)
    queue.submit([spec("g", count=5)], 0.0)
    assert [job.id for job in queue.recent(3)] == [3, 4, 5]
    assert [job.id for job in queue.recent(10)] == [1, 2, 3, 4, 5]


def test_status_stays_cheap_with_100k_waiting_jobs() -> None:
    queue = Queue(nodes=1, max_nodes=4)
    queue.submit([spec("wide", nodes=2), spec("g", count=MAX_SUBMIT_JOBS - 1)], 0.0)
    started = time.perf_counter()
    for _ in range(100):
        status = queue.status(1.0)
        queue.schedule(1.0)
    elapsed = time.perf_counter() - started
    assert status.counts["waiting"] == MAX_SUBMIT_JOBS
    assert len(status.next_jobs) == 20
    assert elapsed < 0.5, f"100 status+schedule calls took {elapsed:.3f} s"


operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 4), st.integers(0, 3)),
        st.tuples(st.just("finish"), st.integers(0, 50), st.integers(0, 1)),
        st.tuples(st.just("resize"), st.integers(0, 6), st.just(0)),
        st.tuples(st.just("ready"), st.integers(0, 6), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_node_accounting_invariants_hold_under_any_sequence(ops: list[tuple[str, int, int]]) -> None:
    queue = Queue(nodes=2, max_nodes=6)
    running: list[int] = []
    for step, (op, a, b) in enumerate(ops):
        now = float(step)
        if op == "submit":
            queue.submit([spec("g", nodes=a, count=b)], now)
        elif op == "finish" and running:
            queue.finish(running.pop(a % len(running)), now, b)
        elif op == "resize":
            queue.resize(a)
        elif op == "ready":
            queue.nodes_ready(a)
        running += [job.id for job in queue.schedule(now)]
        busy = sum(job.nodes for job in map(queue.job, running) if job is not None)
        assert 0 <= queue.nodes_free == queue.nodes_up - busy
        assert queue.nodes_up <= max(queue.size, busy)
        if queue.nodes_up > queue.size:
            assert queue.nodes_free == 0
        status = queue.status(now)
        assert status.queue.run == len(running)
        assert status.counts["waiting"] == sum(status.waiting.values()) == queue.waiting


def test_outputs_are_kept_for_the_most_recent_finished_jobs_only() -> None:
    queue = Queue(nodes=1, keep_outputs=2)
    queue.submit([spec("g", count=3)], 0.0)
    for job_id in (1, 2, 3):
        queue.schedule(float(job_id))
        queue.finish(job_id, float(job_id), 1, f"output of job {job_id}")
    assert [queue.job(i).output for i in (1, 2, 3)] == ["", "output of job 2", "output of job 3"]  # type: ignore[union-attr]


def test_idempotency_keys_are_remembered_for_the_most_recent_submits_and_are_bounded_in_length() -> None:
    queue = Queue(nodes=1, keep_keys=2)
    for key in ("k1", "k2", "k3"):
        queue.submit([spec(key)], 0.0, key=key)
    assert queue.submit([spec("k3")], 0.0, key="k3").duplicate
    assert queue.submit([spec("k2")], 0.0, key="k2").duplicate
    assert not queue.submit([spec("k1")], 0.0, key="k1").duplicate  # forgotten: the oldest of three
    with pytest.raises(QueueError, match="key: 257 characters exceeds the limit of 256"):
        queue.submit([spec("g")], 0.0, key="x" * 257)
