"""The job ledger's rules (``ensemble_core.ledger``): indices, retries, losses, replaced queues, reports once."""

from __future__ import annotations

import msgspec
import pytest

from ensemble_core import ledger
from ensemble_core.ledger import Identity, LedgerRecord
from ensemble_core.messages import JobEnded, JobSpec

OLD, NEW, NEWER = "100.0/local/a", "200.0/local/b", "300.0/local/c"


def report(group: str, index: int, attempt: int, result: str, *, instance: str = OLD, seq: int = 1) -> JobEnded:
    return JobEnded(
        namespace="ns", ensemble="e", member=0, instance=instance, seq=seq, id=seq, group=group, index=index,
        attempt=attempt, result=result, time=0.0,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_submit_gets_indices_once_and_a_second_submit_of_the_group_continues() -> None:
    record = LedgerRecord()
    first = ledger.allocate(record, "d-1", [JobSpec(name="a", command="x", count=3), JobSpec(name="b", command="y")])
    assert [(j.name, j.start, j.count, j.attempt) for j in first] == [("a", 0, 3, 1), ("b", 0, 1, 1)]
    assert ledger.allocate(record, "d-1", [JobSpec(name="a", command="x", count=3)]) == first  # redelivered
    again = ledger.allocate(record, "d-2", [JobSpec(name="a", command="x", count=2)])
    assert [(j.start, j.count) for j in again] == [(3, 2)]
    assert record.outstanding == 6 and ledger.counts(record)["open"] == 6
    assert ledger.pending(record) == ["d-1", "d-2"]
    ledger.answered(record, "d-1", OLD)
    assert ledger.pending(record) == ["d-2"]


def test_a_failure_is_retried_up_to_retries_then_the_job_failed() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=1, retries=2)])
    assert ledger.ended(record, report("a", 0, 1, "failed")) == [Identity("a", 0, 2)]
    assert ledger.ended(record, report("a", 0, 1, "failed")) == []  # the same report again: nothing
    assert ledger.ended(record, report("a", 0, 2, "failed", seq=2)) == [Identity("a", 0, 3)]
    assert ledger.ended(record, report("a", 0, 3, "failed", seq=3)) == []
    assert ledger.counts(record)["failed"] == 1 and record.outstanding == 0
    assert record.ended == {"failed": 3}


def test_a_lost_attempt_is_resubmitted_up_to_lost_retries_and_a_success_ends_it() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=2, lost_retries=1)])
    assert ledger.ended(record, report("a", 0, 1, "lost")) == [Identity("a", 0, 2)]
    assert ledger.ended(record, report("a", 0, 2, "lost", seq=2)) == []  # out of lost retries
    assert ledger.ended(record, report("a", 1, 1, "succeeded", seq=3)) == []
    assert ledger.counts(record) == {"open": 0, "succeeded": 1, "failed": 0, "lost": 1, "cancelled": 0}
    # a job that failed by exit code with retries 0 is not retried, a lost one is (default lostRetries 3)
    other = LedgerRecord()
    ledger.allocate(other, "d", [JobSpec(name="b", command="y", count=1)])
    assert ledger.ended(other, report("b", 0, 1, "failed")) == []


def test_a_second_success_of_a_job_is_counted_and_a_repeated_report_is_not() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=1)])
    ledger.ended(record, report("a", 0, 1, "succeeded"))
    ledger.ended(record, report("a", 0, 1, "succeeded"))
    assert record.extra_successes == 0
    ledger.ended(record, report("a", 0, 2, "succeeded", seq=2))
    assert record.extra_successes == 1


def test_a_replaced_queue_loses_what_was_open_in_it_and_only_that() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d-1", [JobSpec(name="a", command="x", count=3)])
    ledger.answered(record, "d-1", OLD)
    assert ledger.instance_seen(record, OLD) == []
    ledger.ended(record, report("a", 0, 1, "succeeded"))
    again = ledger.instance_seen(record, NEW)
    assert again == [Identity("a", 1, 2), Identity("a", 2, 2)]
    key = ledger.resubmit(record, again)
    assert key is not None and ledger.pending(record) == [key]
    assert [(j.start, j.count, j.attempt) for j in ledger.to_send(record, key)] == [(1, 1, 2), (2, 1, 2)]
    # a late snapshot of the old queue changes nothing; the new queue's attempts are not lost by it
    ledger.answered(record, key, NEW)
    assert ledger.instance_seen(record, OLD) == []
    assert ledger.instance_seen(record, NEW) == []
    assert record.outstanding == 2


def test_a_submit_answered_by_a_queue_already_replaced_is_lost_at_once() -> None:
    record = LedgerRecord()
    ledger.instance_seen(record, NEWER)
    ledger.allocate(record, "d-1", [JobSpec(name="a", command="x", count=2)])
    assert ledger.answered(record, "d-1", NEW) == [Identity("a", 0, 2), Identity("a", 1, 2)]


def test_answered_resubmits_are_forgotten_once_closed_but_a_decisions_allocation_stays() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=1)])
    ledger.answered(record, "d", OLD)
    key = ledger.resubmit(record, ledger.ended(record, report("a", 0, 1, "lost")))
    assert key is not None
    ledger.answered(record, key, OLD)
    ledger.ended(record, report("a", 0, 2, "succeeded", seq=2))
    ledger.prune(record)
    assert list(record.sent) == ["d"]


def test_the_record_round_trips_compressed_and_stays_small_for_many_jobs() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="sweep", command="x", count=100_000)])
    data = ledger.encode_record(record)
    assert len(data) < 20_000  # 100,000 jobs
    assert ledger.decode_record(data) == record
    with pytest.raises(ValueError, match="not a job ledger record"):
        ledger.decode_record(b"garbage")
    with pytest.raises(ValueError, match="not a job ledger record"):
        ledger.decode_record(__import__("zlib").compress(msgspec.json.encode({"groups": 3})))


def test_queue_names_order_by_their_start() -> None:
    assert ledger.instance_started(OLD) < ledger.instance_started(NEW)
    assert ledger.instance_started("1796129156.99/flux/local:///tmp/x") == pytest.approx(1796129156.99)
    assert ledger.instance_started("no-time-here") == 0.0


def test_a_report_of_a_job_never_allocated_is_ignored() -> None:
    record = LedgerRecord()
    assert ledger.ended(record, report("ghost", 7, 1, "failed")) == []
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=1)])
    assert ledger.ended(record, report("a", 5, 1, "failed")) == []
    assert record.outstanding == 1


def test_a_refused_submit_is_not_sent_again_nor_lost_when_a_new_queue_is_seen() -> None:
    record = LedgerRecord()
    ledger.allocate(record, "d", [JobSpec(name="a", command="x", count=2)])
    ledger.refused(record, "d")
    assert ledger.pending(record) == []
    assert ledger.instance_seen(record, NEW) == []
    group = record.groups["a"]
    assert (group.states, group.attempts, group.losses, record.outstanding) == ("qq", [1, 1], [0, 0], 2)
