"""The ledger of a member's jobs: every job's state and attempts, owned by the operator, not the sidecar.

A job is (member, group, index); each time it is queued is an *attempt*, numbered from 1. The ledger
(one record per member in the ``ensemble-jobs`` bucket) knows, per group, each job's state and its
current attempt, and which submits were sent to which queue. The actuator (``services/actuator/ledger.py``)
keeps it: it allocates indices when it applies a submit decision, and from the job reports the poller
publishes (``JobEnded``, ``InstanceChanged`` on ``ensemble.jobs.<member>``) it decides what is queued again:

* an attempt that **failed** (nonzero exit) is retried while the job has had at most ``retries`` failures;
* an attempt that was **lost** — reported lost by the sidecar (it restarted while the job ran, a shrink's
  grace ran out, Flux lost the node) or queued in a queue that is gone (``InstanceChanged``) — is queued
  again while the job has had at most ``lost_retries`` losses;
* a job ends *succeeded*, *failed* (out of retries), *lost* (out of lost retries) or *cancelled*.

Attempts are identified by (group, index, attempt): a sidecar queues an attempt once whatever submits
carry it, so sending a submit again (after a crash) never runs an attempt twice. Queue names
(``instance``) begin with the time the queue began (``<unix time>/<kind>/<id>``), so the ledger can
tell an older queue from a newer one whatever order reports arrive in: when a member's sidecar is seen
answering from a queue that began later, every attempt still open in an older queue is lost.

Everything here is pure: no I/O, no clock. The record is stored as zlib-compressed JSON (per job, one
state character and three small counters): about 20 bytes per job before compression, and a few
bytes after for jobs in the same state, so 100,000 jobs fit in a NATS KV value.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from ensemble_core.messages import JobEnded, JobSpec

#: One character per job: queued (an attempt is open), succeeded, failed for good, lost for good, cancelled.
OPEN, SUCCEEDED, FAILED, LOST, CANCELLED = "q", "s", "f", "x", "c"
FINAL = frozenset({SUCCEEDED, FAILED, LOST, CANCELLED})
STATE_NAMES = {OPEN: "open", SUCCEEDED: "succeeded", FAILED: "failed", LOST: "lost", CANCELLED: "cancelled"}

#: Longest submit key a sidecar accepts (``sidecar.queue.MAX_KEY_LENGTH``).
_MAX_KEY = 256


@dataclass(frozen=True, slots=True)
class Identity:
    """One attempt of one job."""

    group: str
    index: int
    attempt: int


class GroupLedger(msgspec.Struct, kw_only=True):
    """The jobs of one group: the spec they run, and per index its state, attempt, failures and losses."""

    spec: JobSpec
    states: str = ""
    attempts: list[int] = []
    failures: list[int] = []
    losses: list[int] = []


class Sent(msgspec.Struct, kw_only=True, array_like=True):
    """One submit to the member's sidecar: the attempts it carries and the queue that took them."""

    #: (group, first index, count, attempt) runs
    runs: list[tuple[str, int, int, int]]
    #: the queue that answered; empty until it did (then the submit is sent again)
    instance: str = ""
    #: a submit decision's allocation (kept: a redelivered decision must get the same indices)
    decision: bool = False


class LedgerRecord(msgspec.Struct, kw_only=True):
    """A member's entry in the ``ensemble-jobs`` bucket."""

    groups: dict[str, GroupLedger] = {}
    sent: dict[str, Sent] = {}
    #: the newest queue the member's sidecar was seen answering from
    current: str = ""
    #: jobs whose state is open
    outstanding: int = 0
    #: attempts that ended, by result (the ledger's own count: a report counted once)
    ended: dict[str, int] = {}
    #: successful attempts of a job that had already succeeded (must stay 0)
    extra_successes: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LedgerRecord)


def encode_record(record: LedgerRecord) -> bytes:
    """The bytes stored in the bucket (zlib-compressed JSON)."""
    return zlib.compress(_encoder.encode(record), 6)


def decode_record(data: bytes) -> LedgerRecord:
    """Read a stored record; ``ValueError`` naming the problem when it is not one."""
    try:
        return _decoder.decode(zlib.decompress(data))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValueError(f"not a job ledger record: {exc}") from None


def instance_started(instance: str) -> float:
    """When a queue began, from its name (``<unix time>/...``); 0 for a name that does not say."""
    head = instance.split("/", 1)[0]
    try:
        return float(head)
    except ValueError:
        return 0.0


def allocate(record: LedgerRecord, key: str, jobs: Sequence[JobSpec]) -> list[JobSpec]:
    """The jobs of a submit decision with their indices (``start``) and first attempt, recorded under ``key``.

    Idempotent: a key seen before returns the same jobs again (its indices are not allocated twice).
    """
    found = record.sent.get(key)
    if found is None:
        runs: list[tuple[str, int, int, int]] = []
        for spec in jobs:
            if spec.count <= 0:
                continue
            group = record.groups.get(spec.name)
            if group is None:
                group = record.groups[spec.name] = GroupLedger(spec=_plain(spec))
            else:
                group.spec = _plain(spec)
            start = len(group.states)
            group.states += OPEN * spec.count
            group.attempts.extend([1] * spec.count)
            group.failures.extend([0] * spec.count)
            group.losses.extend([0] * spec.count)
            record.outstanding += spec.count
            runs.append((spec.name, start, spec.count, 1))
        found = record.sent[key] = Sent(runs=runs, decision=True)
    return [_run_spec(record, run) for run in found.runs]


def to_send(record: LedgerRecord, key: str) -> list[JobSpec]:
    """The jobs a recorded submit carries (each run with its indices and attempt)."""
    return [_run_spec(record, run) for run in record.sent[key].runs]


def pending(record: LedgerRecord) -> list[str]:
    """Keys of the submits recorded but not yet answered by a sidecar: to send (again)."""
    return [key for key, sent in record.sent.items() if not sent.instance and sent.runs]


def answered(record: LedgerRecord, key: str, instance: str) -> list[Identity]:
    """A sidecar took submit ``key`` into queue ``instance``. When that queue is older than the member's
    current one, it is gone already: the attempts it took that are still open are lost and returned,
    to be submitted again (:func:`resubmit`)."""
    sent = record.sent.get(key)
    if sent is None:
        return []
    sent.instance = instance
    if record.current and instance_started(instance) < instance_started(record.current):
        return _lose_open(record, [sent], f"its queue {instance} is gone")
    return []


#: What a submit a sidecar refused for good (its queue terminated) records as its queue.
REFUSED = "refused"


def refused(record: LedgerRecord, key: str) -> None:
    """A sidecar refused submit ``key`` for good: nothing is sent again, and its jobs stay open (they show as
    unfinished) — they are not counted lost, since no queue ever took them."""
    sent = record.sent.get(key)
    if sent is not None:
        sent.instance = REFUSED


def instance_seen(record: LedgerRecord, instance: str) -> list[Identity]:
    """The member's sidecar answers from ``instance``: every attempt still open in an older queue is
    lost; return those to submit again. A report of a queue older than the current one changes nothing."""
    if record.current and instance_started(instance) <= instance_started(record.current):
        return []  # the current queue, or an older one (a late report)
    record.current = instance
    older = [
        sent
        for sent in record.sent.values()
        if sent.instance not in ("", REFUSED) and instance_started(sent.instance) < instance_started(instance)
    ]
    return _lose_open(record, older, f"its queue was replaced by {instance}")


def ended(record: LedgerRecord, report: JobEnded) -> list[Identity]:
    """Apply one attempt's end; return the attempts to submit again (a retry, or the lost job again).

    Reports are applied once: the same report again (a redelivery, a poller republishing after a
    restart) changes nothing. A success of another attempt of a job that already succeeded is counted
    in ``extra_successes`` (it must never happen: it means a job ran to success twice). The end of an
    attempt that a newer one superseded changes nothing, unless it succeeded: then the job did.
    """
    group = record.groups.get(report.group)
    if group is None or report.index >= len(group.states):
        return []  # a job the ledger never allocated (submitted by hand, or by an older operator)
    i = report.index
    state, current = group.states[i], group.attempts[i]
    if report.result == "succeeded":
        if state == SUCCEEDED:
            if report.attempt != current:
                record.extra_successes += 1
                _count(record, report.result)
            return []
        if state != OPEN and report.attempt == current:
            return []  # this very attempt already ended otherwise: not a report of this world
        _count(record, report.result)
        group.attempts[i] = report.attempt  # the attempt that succeeded
        _set(record, group, i, SUCCEEDED)
        return []
    if state != OPEN or report.attempt != current:
        return []  # a report seen before, or of an attempt already superseded
    _count(record, report.result)
    if report.result == "cancelled":
        _set(record, group, i, CANCELLED)
        return []
    if report.result == "lost":
        group.losses[i] += 1
        if group.losses[i] > group.spec.lost_retries:
            _set(record, group, i, LOST)
            return []
    else:
        group.failures[i] += 1
        if group.failures[i] > group.spec.retries:
            _set(record, group, i, FAILED)
            return []
    group.attempts[i] += 1
    return [Identity(report.group, i, group.attempts[i])]


def _count(record: LedgerRecord, result: str) -> None:
    record.ended[result] = record.ended.get(result, 0) + 1


def resubmit(record: LedgerRecord, attempts: Iterable[Identity]) -> str | None:
    """Record a submit of these attempts (each the job's current one) to send; return its key (None: none)."""
    runs = [(attempt.group, attempt.index, 1, attempt.attempt) for attempt in attempts]
    if not runs:
        return None
    digest = hashlib.sha256(repr(runs).encode()).hexdigest()[:24]
    key = f"attempts:{runs[0][0][:100]}:{runs[0][1]}:{runs[0][3]}:{len(runs)}:{digest}"[:_MAX_KEY]
    record.sent[key] = Sent(runs=runs)
    return key


def prune(record: LedgerRecord) -> None:
    """Forget answered resubmits none of whose attempts is still open (a decision's allocation stays)."""
    for key in [key for key, sent in record.sent.items() if not sent.decision and sent.instance]:
        if not any(_open(record, run) for run in record.sent[key].runs):
            del record.sent[key]


def counts(record: LedgerRecord) -> dict[str, int]:
    """Jobs by state name (``open``, ``succeeded``, ``failed``, ``lost``, ``cancelled``)."""
    totals = dict.fromkeys(STATE_NAMES.values(), 0)
    for group in record.groups.values():
        for char, name in STATE_NAMES.items():
            totals[name] += group.states.count(char)
    return totals


def _set(record: LedgerRecord, group: GroupLedger, index: int, state: str) -> None:
    if group.states[index] == OPEN and state != OPEN:
        record.outstanding -= 1
    group.states = group.states[:index] + state + group.states[index + 1 :]


def _open(record: LedgerRecord, run: tuple[str, int, int, int]) -> list[int]:
    """The indices of a run whose job is open with the run's attempt as its current one."""
    name, start, count, attempt = run
    group = record.groups.get(name)
    if group is None:
        return []
    return [i for i in range(start, start + count) if group.states[i] == OPEN and group.attempts[i] == attempt]


def _lose_open(record: LedgerRecord, sents: Iterable[Sent], why: str) -> list[Identity]:
    """Count every open attempt of these submits lost; return the attempts that replace them."""
    again: list[Identity] = []
    for sent in sents:
        for run in sent.runs:
            name = run[0]
            group = record.groups[name]
            for i in _open(record, run):
                _count(record, "lost")
                group.losses[i] += 1
                if group.losses[i] > group.spec.lost_retries:
                    _set(record, group, i, LOST)
                    continue
                group.attempts[i] += 1
                again.append(Identity(name, i, group.attempts[i]))
    return again


def _plain(spec: JobSpec) -> JobSpec:
    """A group's spec as the ledger keeps it: what its jobs run, without a submit's count or numbering."""
    return msgspec.structs.replace(spec, count=1, start=None, attempt=1)


def _run_spec(record: LedgerRecord, run: tuple[str, int, int, int]) -> JobSpec:
    name, start, count, attempt = run
    return msgspec.structs.replace(record.groups[name].spec, count=count, start=start, attempt=attempt)
