"""The results of a run: one row per attempt of every job, their outputs, and the summary's figures.

Read from what the operator itself keeps, so they hold at any job count and survive restarts of any
part: the job reports on ``ENSEMBLE_JOBS`` (every attempt that ended, as the poller saw it) and each
member's job ledger in ``ensemble-jobs`` (every job, its state and current attempt — also the jobs
whose attempt never ended). :func:`write` makes the results folder:

* ``jobs.jsonl`` and ``jobs.csv`` — one row per attempt: member, group, index, attempt, parameters,
  command, nodes, submit / start / end (unix seconds), exit code, result (``succeeded``, ``failed``,
  ``lost``, ``cancelled``, or ``unfinished`` for an attempt that had not ended when the run did), the
  reason of a loss, and the paths of its stdout and stderr;
* ``outputs/`` — each attempt's stdout and stderr: the files the sidecar wrote (the local backend
  writes them here), else the output tail its report carried (the sidecar keeps the last 4 KiB);
* ``summary.json`` — every figure of the summary table, per member and in all, and the jobs that did
  not succeed.

Beside them :func:`ensemble_cli.report.write_for_up` puts the run's ``recording.jsonl``, its Ensemble
file as ``ensemble.yaml`` and ``report.html``.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ensemble_core import ledger, subjects
from ensemble_core.ledger import LedgerRecord
from ensemble_core.messages import JobEnded, JobReport
from ensemble_core.subjects import MemberAddress

#: Columns of ``jobs.csv`` (and keys of each ``jobs.jsonl`` row), in order.
COLUMNS = (
    "member", "group", "index", "attempt", "result", "exit_code", "nodes", "submit", "start", "end",
    "reason", "params", "command", "stdout", "stderr",
)  # fmt: skip


class Row(msgspec.Struct, kw_only=True):
    """One attempt of one job."""

    member: int
    group: str
    index: int
    attempt: int
    result: str
    exit_code: int | None = None
    nodes: int = 1
    submit: float | None = None
    start: float | None = None
    end: float | None = None
    reason: str = ""
    params: dict[str, str] = {}
    command: str = ""
    stdout: str = ""
    stderr: str = ""
    #: the output tail the report carried (not a column: it goes into outputs/ when the sidecar wrote no file)
    tail: str = ""


@dataclass
class MemberResults:
    """One member's jobs: its ledger and the attempts reported."""

    index: int
    record: LedgerRecord | None = None
    rows: list[Row] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Jobs by final state (``open`` for those not done), from the ledger."""
        return ledger.counts(self.record) if self.record is not None else dict.fromkeys(ledger.STATE_NAMES.values(), 0)

    @property
    def jobs(self) -> int:
        return sum(self.counts().values())

    def makespan(self) -> float:
        """From the first submit to the last end of any attempt (0 when nothing ended)."""
        starts = [row.submit for row in self.rows if row.submit]
        ends = [row.end for row in self.rows if row.end]
        return max(ends) - min(starts) if starts and ends else 0.0

    def retried(self) -> int:
        """Jobs that took more than one attempt."""
        if self.record is None:
            return 0
        return sum(1 for group in self.record.groups.values() for attempt in group.attempts if attempt > 1)


async def read_reports(js: JetStreamContext, namespace: str, ensemble: str) -> dict[int, list[JobEnded]]:
    """Every attempt's end reported for this ensemble, by member, in the order reported (each once)."""
    prefix = f"ensemble.jobs.{subjects.escape(namespace)}.{subjects.escape(ensemble)}"
    reports: dict[int, list[JobEnded]] = {}
    seen: set[tuple[int, str, int]] = set()
    decoder = msgspec.json.Decoder(JobReport)
    seq = 1
    while True:
        try:
            msg = await js.get_msg(subjects.JOBS_STREAM, seq=seq, next=True, subject=f"{prefix}.>")
        except NotFoundError:
            break
        seq = (msg.seq or seq) + 1
        try:
            report = decoder.decode(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if not isinstance(report, JobEnded):
            continue
        identity = (report.member, report.instance, report.seq)
        if identity in seen:
            continue  # published again by a poller after a restart
        seen.add(identity)
        reports.setdefault(report.member, []).append(report)
    return reports


async def read_ledger(bucket: KeyValue, address: MemberAddress) -> LedgerRecord | None:
    """A member's job ledger, or None when it has none (nothing was submitted)."""
    try:
        entry = await bucket.get(address.key)
    except KeyNotFoundError:
        return None
    return ledger.decode_record(entry.value) if entry.value else None


async def collect(
    js: JetStreamContext, bucket: KeyValue, namespace: str, ensemble: str, members: Iterable[int]
) -> list[MemberResults]:
    """The results of every member: its ledger and one row per attempt (reported, or still open)."""
    reports = await read_reports(js, namespace, ensemble)
    results: list[MemberResults] = []
    for index in members:
        record = await read_ledger(bucket, MemberAddress(namespace, ensemble, index))
        rows = [_row(report) for report in reports.get(index, [])]
        ended = {(row.group, row.index, row.attempt) for row in rows}
        if record is not None:
            for name, group in record.groups.items():
                for i, state in enumerate(group.states):
                    if state == ledger.OPEN and (name, i, group.attempts[i]) not in ended:
                        rows.append(
                            Row(member=index, group=name, index=i, attempt=group.attempts[i], result="unfinished",
                                nodes=group.spec.nodes, command=group.spec.command)
                        )  # fmt: skip
        rows.sort(key=lambda row: (row.group, row.index, row.attempt))
        results.append(MemberResults(index=index, record=record, rows=rows))
    return results


def _row(report: JobEnded) -> Row:
    return Row(
        member=report.member,
        group=report.group,
        index=report.index,
        attempt=report.attempt,
        result=report.result,
        exit_code=report.returncode,
        nodes=report.nodes,
        submit=report.t_submit or None,
        start=report.t_run,
        end=report.t_end or None,
        reason=report.reason,
        params=report.params,
        command=report.command,
        stdout=report.stdout,
        stderr=report.stderr,
        tail=report.output,
    )


def settled(results: Iterable[MemberResults]) -> bool:
    """Whether every attempt reported ended is also ended in its member's ledger (the ledger is updated
    from the reports a moment after they are published, so a run that ends on a job's event, as a rule
    can, may be read in between)."""
    for member in results:
        if member.record is None:
            continue
        for row in member.rows:
            group = member.record.groups.get(row.group)
            if row.result == "unfinished" or group is None or row.index >= len(group.states):
                continue
            if group.states[row.index] == ledger.OPEN and group.attempts[row.index] == row.attempt:
                return False
    return True


def not_succeeded(results: Iterable[MemberResults]) -> list[Row]:
    """The last attempt of every job that did not end succeeded, in member, group and index order."""
    failures: list[Row] = []
    for member in results:
        if member.record is None:
            continue
        last: dict[tuple[str, int], Row] = {}
        for row in member.rows:
            last[(row.group, row.index)] = row
        for name, group in member.record.groups.items():
            for i, state in enumerate(group.states):
                if state != ledger.SUCCEEDED:
                    found = last.get((name, i))
                    failures.append(
                        found or Row(member=member.index, group=name, index=i, attempt=0, result="unfinished")
                    )
    return failures


def clear_previous(directory: Path) -> None:
    """Remove a previous run's results from ``directory`` (only a results folder's own files, and only where
    its ``summary.json`` says it is one): the attempts of two runs must never mix."""
    if not (directory / "summary.json").is_file():
        return
    # (not its ensemble.yaml, which may be the file this run reads: the run writes it again)
    for name in ("jobs.csv", "jobs.jsonl", "summary.json", "recording.jsonl", "report.html"):
        (directory / name).unlink(missing_ok=True)
    if (directory / "outputs").is_dir():
        shutil.rmtree(directory / "outputs")


def _safe(name: str) -> str:
    return subjects.escape(name)


def write(directory: Path, results: list[MemberResults], summary: dict[str, Any]) -> None:
    """Write the results folder (see the module docstring); rows whose sidecar wrote no output file get one
    with the tail their report carried."""
    directory.mkdir(parents=True, exist_ok=True)
    outputs = directory / "outputs"
    rows: list[Row] = []
    for member in results:
        for row in member.rows:
            if not row.stdout and row.result != "unfinished":
                folder = outputs / f"member-{row.member}" / _safe(row.group)
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{row.index}.{row.attempt}.out"
                path.write_text(row.tail, encoding="utf-8")
                row.stdout = str(path)
            rows.append(row)
    with (directory / "jobs.jsonl").open("w", encoding="utf-8") as lines:
        for row in rows:
            item = msgspec.structs.asdict(row)
            del item["tail"]
            lines.write(json.dumps(item) + "\n")
    with (directory / "jobs.csv").open("w", encoding="utf-8", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(COLUMNS)
        for row in rows:
            item = msgspec.structs.asdict(row)
            item["params"] = " ".join(f"{k}={v}" for k, v in row.params.items())
            writer.writerow(["" if item[column] is None else item[column] for column in COLUMNS])
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
