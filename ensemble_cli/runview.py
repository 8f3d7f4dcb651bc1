"""What a run looked like, whatever made it: the data the HTML report and the PNG plot draw.

A :class:`RunView` holds, per member, the requested size, nodes up, jobs waiting and running over
time (a step series: each value holds until the next time), every decision with its reason and what
became of it, and every job attempt (nodes, submit, start, end, result); for the whole run the summary
figures, the algorithm and options of each member, the attempts that did not succeed with their output
tails, and — for a simulation on a recorded trace — the recorded run, to overlay. Three sources make
one: a simulation (:func:`from_simulation`), a results folder of ``ensemble up``
(:func:`from_results`) and a recording (:func:`from_recording`). Times are seconds since the run's
start (its first check or first submit, whichever came first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ensemble_core import subjects
from ensemble_core.messages import Applied, Decision, Metrics
from ensemble_core.spec import Ensemble, SpecError, load

if TYPE_CHECKING:
    from ensemble_cli.simulation import SimulationResult

#: Characters of an attempt's output kept in a report (its end: where the error usually is).
TAIL = 1500
#: Attempts that did not succeed listed with their output; the others are counted.
MAX_FAILURES = 200
#: The recording beside a trace (``jobs.jsonl``) that holds the recorded run's sizes, as in ../shared/data.
RECORDING_BESIDE = "recording.jsonl"
#: Files of a results folder the report reads besides jobs.jsonl and summary.json.
RESULTS_RECORDING = "recording.jsonl"
RESULTS_ENSEMBLE = "ensemble.yaml"


class RunViewError(ValueError):
    """A source cannot be read: the message names the file and what is wrong."""


@dataclass
class Series:
    """Values over time as steps; ``size`` and ``up`` are empty when the source did not hold them."""

    t: list[float] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)

    def add(self, t: float, size: int | None, up: int | None, waiting: int, running: int) -> None:
        """Append a sample, dropping it when nothing changed since the last one (the steps stay the same)."""
        values = (size, up, waiting, running)
        if self.t and self._last() == values:
            return
        self.t.append(t)
        if size is not None and up is not None:
            self.size.append(size)
            self.up.append(up)
        self.waiting.append(waiting)
        self.running.append(running)

    def _last(self) -> tuple[int | None, int | None, int, int]:
        size = self.size[-1] if self.size else None
        up = self.up[-1] if self.up else None
        return (size, up, self.waiting[-1], self.running[-1])

    def shifted(self, by: float) -> Series:
        """The same steps with ``by`` subtracted from every time."""
        return Series([round(t - by, 3) for t in self.t], self.size, self.up, self.waiting, self.running)


@dataclass
class Mark:
    """One decision: when, what, the target size of a scale, its reason and what the actuator did with it."""

    t: float
    action: str
    size: int | None
    reason: str
    outcome: str = ""


@dataclass
class Attempt:
    """One attempt of one job (times in seconds since the run's start; None: it did not get there)."""

    group: str
    index: int
    attempt: int
    nodes: int
    submit: float | None
    start: float | None
    end: float | None
    result: str


@dataclass
class Failure:
    """An attempt that did not succeed, with the end of its output."""

    member: int
    group: str
    index: int
    attempt: int
    result: str
    exit_code: int | None
    reason: str
    tail: str


@dataclass
class MemberRun:
    """One member's part of the run."""

    index: int
    algorithm: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    series: Series = field(default_factory=Series)
    decisions: list[Mark] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    recorded: Series | None = None


@dataclass
class RunView:
    """A whole run, ready to draw."""

    title: str
    source: str
    figures: dict[str, Any] = field(default_factory=dict)
    member_figures: list[dict[str, Any]] = field(default_factory=list)
    members: list[MemberRun] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    failures_total: int = 0
    notes: list[str] = field(default_factory=list)
    #: Where the overlaid recorded run comes from ("" when there is none).
    recorded_from: str = ""

    @property
    def has_recorded(self) -> bool:
        return any(member.recorded is not None for member in self.members)


def outcome(applied: Applied | None) -> str:
    """What became of a decision, in a few words."""
    if applied is None:
        return "not applied (no applied event)"
    if not applied.ok:
        return f"not applied: {applied.error}"
    if applied.size_before is not None and applied.size_after is not None and applied.size_before != applied.size_after:
        return f"applied: size {applied.size_before} → {applied.size_after}"
    return "applied"


def _series_from_metrics(metrics: Iterable[Metrics]) -> Series:
    series = Series()
    for m in sorted(metrics, key=lambda m: (m.time, m.seq)):
        series.add(m.time, m.size, m.nodes.node_up_count, sum(m.waiting.values()), m.queue.run)
    return series


def _marks(decisions: Iterable[Decision], applied: dict[str, Applied]) -> list[Mark]:
    return [
        Mark(d.time, d.action, d.size, d.reason, outcome(applied.get(d.id)))
        for d in sorted(decisions, key=lambda d: d.time)
    ]


def _shift_marks(marks: list[Mark], by: float) -> list[Mark]:
    return [Mark(round(m.t - by, 3), m.action, m.size, m.reason, m.outcome) for m in marks]


def _rel(value: float | None, by: float) -> float | None:
    return None if value is None else round(value - by, 3)


def job_figures(attempts: Iterable[Attempt]) -> tuple[float, float]:
    """The makespan (first submit to last end) and the job node-seconds (nodes × run time) of attempts."""
    listed = list(attempts)
    submits = [a.submit for a in listed if a.submit is not None]
    ends = [a.end for a in listed if a.end is not None]
    makespan = max(ends) - min(submits) if submits and ends else 0.0
    used = sum(a.nodes * (a.end - a.start) for a in listed if a.start is not None and a.end is not None)
    return makespan, used


def step_integral(times: Sequence[float], values: Sequence[int], end: float) -> float:
    """The integral of a step series from its first time to ``end``."""
    total = 0.0
    for i, (t, value) in enumerate(zip(times, values, strict=True)):
        following = times[i + 1] if i + 1 < len(times) else end
        total += value * max(0.0, min(following, end) - t)
    return total


# --- the recorded run beside a trace ------------------------------------------------------------------


def _trace_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(document, dict) and isinstance(document.get("jobs"), list):
        return [record for record in document["jobs"] if isinstance(record, dict)]
    return [document] if isinstance(document, dict) else []


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not value:
        return None
    return float(value)


def recorded_run(trace: Path) -> tuple[Series, dict[str, float], str]:
    """The recorded run of a trace, as steps from its start: its jobs waiting and running from the Flux job
    records, and — when a recording of the run lies beside the trace (``recording.jsonl``) — the sizes it
    requested and the nodes it had up, from that recording's metrics. Also the recorded makespan and job
    node-seconds, and a note saying where each came from. Raises :class:`RunViewError` if the trace cannot
    be read (the simulation has read it already, so this is rare)."""
    try:
        records = _trace_records(trace)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunViewError(f"{trace}: cannot read the recorded run: {exc}") from exc
    jobs = []
    for record in records:
        submit, start, end = _number(record, "t_submit"), _number(record, "t_run"), _number(record, "t_inactive")
        nodes = record.get("nnodes")
        if start is None or end is None or not isinstance(nodes, int):
            continue
        jobs.append((submit if submit is not None else start, start, end, nodes))
    if not jobs:
        raise RunViewError(f"{trace}: no job record with t_run, t_inactive and nnodes to overlay")
    beside = trace.parent / RECORDING_BESIDE
    metrics: list[Metrics] = []
    if beside.is_file():
        decoder = msgspec.json.Decoder(Metrics | Decision | Applied)
        for line in beside.read_text(encoding="utf-8").splitlines():
            try:
                message = decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(message, Metrics) and message.member == 0:
                metrics.append(message)
    start0 = min([j[0] for j in jobs] + [m.time for m in metrics])
    # jobs waiting and running from Flux's own job records (the original's metrics counted every submitted
    # job as waiting); sizes and nodes up from the recording's metrics
    events: list[tuple[float, int, int, int, int | None, int | None]] = []
    for submit, start, end, _ in jobs:
        events += [(submit, 0, 1, 0, None, None), (start, 0, -1, 1, None, None), (end, 0, 0, -1, None, None)]
    for m in sorted(metrics, key=lambda m: (m.time, m.seq)):
        events.append((m.time, 1, 0, 0, m.size, m.nodes.node_up_count))
    series = Series()
    waiting = running = 0
    first = min(metrics, key=lambda m: (m.time, m.seq)) if metrics else None
    size = first.size if first is not None else None
    up = first.nodes.node_up_count if first is not None else None
    for t, _, dw, dr, new_size, new_up in sorted(events, key=lambda e: (e[0], e[1])):
        waiting += dw
        running += dr
        if new_size is not None:
            size, up = new_size, new_up
        series.add(t, size, up, waiting, running)
    if metrics:
        note = f"recorded run (dashed): jobs from {trace}, sizes and nodes up from {beside}"
    else:
        note = (
            f"recorded run (dashed): jobs waiting and running from {trace} (no {RECORDING_BESIDE} beside it for sizes)"
        )
    submits = [j[0] for j in jobs]
    figures = {
        "recorded_makespan_s": round(max(j[2] for j in jobs) - min(submits), 3),
        "recorded_job_node_seconds": round(sum(j[3] * (j[2] - j[1]) for j in jobs), 3),
    }
    return series.shifted(start0), figures, note


# --- a simulation --------------------------------------------------------------------------------------


def from_simulation(result: SimulationResult, summary: dict[str, Any], title: str, trace: str | None = None) -> RunView:
    """The view of an ``ensemble simulate`` run (made with ``record=True``), its summary figures, and the
    recorded run of ``trace`` when one was given."""
    view = RunView(title=title, source="simulation (virtual clock)")
    view.figures = {key: value for key, value in summary.items() if not isinstance(value, dict | list)}
    applied = {r.decision: r for r in result.records if isinstance(r, Applied)}
    decisions = [r for r in result.records if isinstance(r, Decision)]
    recorded: Series | None = None
    if trace is not None:
        try:
            recorded, figures, note = recorded_run(Path(trace))
            view.figures.update(figures)
            view.recorded_from = note
        except RunViewError as exc:
            view.notes.append(str(exc))
    for m in result.members:
        member = MemberRun(index=m.index, algorithm=m.algorithm, options=dict(m.options))
        for sample in result.samples:
            if sample.member == m.index:
                member.series.add(sample.time, sample.size, sample.nodes_up, sample.waiting, sample.running)
        member.decisions = _marks((d for d in decisions if d.member == m.index), applied)
        for job in result.jobs.get(m.index, []):
            member.attempts.append(
                Attempt(job.group, job.index, job.attempt, job.nodes, job.t_submit, job.t_run, job.t_inactive,
                        job.result or "unfinished")
            )  # fmt: skip
            if job.result not in ("succeeded", ""):
                view.failures_total += 1
                if len(view.failures) < MAX_FAILURES:
                    view.failures.append(
                        Failure(m.index, job.group, job.index, job.attempt, job.result, job.returncode, job.reason,
                                job.output[-TAIL:])
                    )  # fmt: skip
        member.recorded = recorded  # the trace replaces every member's jobs
        span = (m.last_end or 0.0) - (m.first_submit or 0.0)
        view.member_figures.append(
            {"member": m.index, "algorithm": m.algorithm, "jobs": m.jobs, "failed": m.failed_jobs,
             "makespan_s": round(span, 3), "node_seconds": round(m.node_seconds, 3),
             "scale_ups": m.scale_ups, "scale_downs": m.scale_downs, "peak": m.peak_size}
        )  # fmt: skip
        view.members.append(member)
    return view


# --- a results folder of `ensemble up` -----------------------------------------------------------------


def read_recording(path: Path) -> tuple[list[Metrics], list[Decision], dict[str, Applied]]:
    """A recording's metrics, decisions (each once) and applied events by decision id; raises
    :class:`RunViewError` naming the first bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunViewError(f"{path}: cannot read: {exc}") from exc
    decoder = msgspec.json.Decoder(Metrics | Decision | Applied)
    metrics: list[Metrics] = []
    decisions: dict[str, Decision] = {}
    applied: dict[str, Applied] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            message = decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RunViewError(
                f"{path}:{number}: {exc} (a recording holds metrics, decision and applied lines, as "
                "`ensemble record` and `ensemble simulate --record` write them)"
            ) from exc
        if isinstance(message, Metrics):
            metrics.append(message)
        elif isinstance(message, Decision):
            decisions.setdefault(message.id, message)
        else:
            applied.setdefault(message.decision, message)
    return metrics, list(decisions.values()), applied


def _algorithms(ensemble_file: Path | None, view: RunView) -> dict[int, tuple[str, dict[str, Any]]]:
    if ensemble_file is None or not ensemble_file.is_file():
        view.notes.append("algorithm and options unknown: no Ensemble file (pass --ensemble FILE)")
        return {}
    try:
        ensemble: Ensemble = load(ensemble_file)
    except SpecError as exc:
        view.notes.append(f"{ensemble_file}: not a valid Ensemble file ({exc.errors[0]}): algorithm unknown")
        return {}
    found: dict[int, tuple[str, dict[str, Any]]] = {}
    for member in ensemble.members:
        options: dict[str, Any] = dict(member.algorithm.options)
        if member.algorithm.rules:
            options["rules"] = len(member.algorithm.rules)
        found[member.index] = (member.algorithm.name, options)
    return found


def _output_tail(folder: Path, row: dict[str, Any]) -> str:
    """The end of an attempt's stdout and stderr: the files named in its row, or where the results folder
    keeps them (the row's paths are relative to where ``ensemble up`` ran)."""
    parts = []
    conventional = folder / "outputs" / f"member-{row.get('member')}" / subjects.escape(str(row.get("group")))
    for key, suffix in (("stdout", "out"), ("stderr", "err")):
        named = Path(str(row.get(key) or ""))
        candidates = [named] if row.get(key) else []
        candidates.append(conventional / f"{row.get('index')}.{row.get('attempt')}.{suffix}")
        for candidate in candidates:
            if candidate.is_file():
                with candidate.open("rb") as handle:
                    size = candidate.stat().st_size
                    handle.seek(max(0, size - TAIL))
                    text = handle.read().decode("utf-8", "replace").strip()
                if text:
                    parts.append(text if key == "stdout" else f"[stderr] {text}")
                break
    return "\n".join(parts)[-TAIL:]


def from_results(folder: Path, ensemble_file: Path | None = None) -> RunView:
    """The view of a results folder of ``ensemble up``: its attempts (``jobs.jsonl``), figures
    (``summary.json``), the recording ``ensemble up`` wrote beside them (sizes, queue, decisions) and the
    Ensemble file it copied there (algorithms). Raises :class:`RunViewError` when it is not one."""
    jobs_file = folder / "jobs.jsonl"
    if not jobs_file.is_file():
        raise RunViewError(f"{folder}: not a results folder of `ensemble up` (it has no jobs.jsonl)")
    try:
        rows = [json.loads(line) for line in jobs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunViewError(f"{folder}: cannot read its results: {exc}") from exc
    view = RunView(title=folder.name, source=f"ensemble up, results in {folder}")
    algorithms = _algorithms(ensemble_file or folder / RESULTS_ENSEMBLE, view)
    metrics: list[Metrics] = []
    decisions: list[Decision] = []
    applied: dict[str, Applied] = {}
    if (folder / RESULTS_RECORDING).is_file():
        metrics, decisions, applied = read_recording(folder / RESULTS_RECORDING)
        if metrics:
            view.title = f"{metrics[0].namespace}/{metrics[0].ensemble}"
    else:
        view.notes.append(f"no {RESULTS_RECORDING} in {folder}: sizes, queue and decisions over time are not known")
    times = [m.time for m in metrics] + [float(r["submit"]) for r in rows if r.get("submit")]
    start = min(times) if times else 0.0
    indices = sorted({int(r["member"]) for r in rows} | {m.member for m in metrics} | set(algorithms))
    members = {i: MemberRun(index=i) for i in indices}
    for i, member in members.items():
        member.algorithm, member.options = algorithms.get(i, ("", {}))
        member.series = _series_from_metrics(m for m in metrics if m.member == i).shifted(start)
        member.decisions = _shift_marks(_marks((d for d in decisions if d.member == i), applied), start)
    for row in rows:
        member = members[int(row["member"])]
        member.attempts.append(
            Attempt(str(row["group"]), int(row["index"]), int(row["attempt"]), int(row.get("nodes") or 1),
                    _rel(row.get("submit"), start), _rel(row.get("start"), start), _rel(row.get("end"), start),
                    str(row["result"]))
        )  # fmt: skip
        if row["result"] != "succeeded":
            view.failures_total += 1
            if len(view.failures) < MAX_FAILURES:
                view.failures.append(
                    Failure(int(row["member"]), str(row["group"]), int(row["index"]), int(row["attempt"]),
                            str(row["result"]), row.get("exit_code"), str(row.get("reason") or ""),
                            _output_tail(folder, row))
                )  # fmt: skip
    view.members = list(members.values())
    view.member_figures = [dict(m) for m in summary.get("members", [])]
    makespan, used = job_figures(a for m in view.members for a in m.attempts)
    node_seconds = sum(float(m.get("node_seconds", 0)) for m in view.member_figures)
    view.figures = {
        "makespan_s": round(makespan, 3),
        "node_seconds": round(node_seconds, 3),
        "job_node_seconds": round(used, 3),
        "utilization": round(used / node_seconds, 4) if node_seconds else 0.0,
        "scale_events": sum(int(m.get("scale_ups", 0)) + int(m.get("scale_downs", 0)) for m in view.member_figures),
        "peak_size": max((int(m.get("peak", 0)) for m in view.member_figures), default=0),
        **{key: value for key, value in summary.get("total", {}).items()},
        "seconds": summary.get("seconds"),
        "completed": summary.get("completed"),
    }
    return view


# --- a recording ---------------------------------------------------------------------------------------


def from_recording(path: Path, ensemble_file: Path | None = None) -> RunView:
    """The view of a recording (``ensemble record``, ``simulate --record``): sizes, queue and decisions over
    time, per member; a recording holds no job attempts, so the Gantt chart stays empty."""
    metrics, decisions, applied = read_recording(path)
    if not metrics:
        raise RunViewError(f"{path}: no metrics lines: a report needs a run's metrics (see `ensemble record`)")
    view = RunView(title=f"{metrics[0].namespace}/{metrics[0].ensemble}", source=f"recording {path}")
    ensembles = sorted({(m.namespace, m.ensemble) for m in metrics})
    if len(ensembles) > 1:
        # one ensemble's members only: members of two ensembles share their indices
        shown = (metrics[0].namespace, metrics[0].ensemble)
        others = ", ".join(f"{ns}/{name}" for ns, name in ensembles if (ns, name) != shown)
        view.notes.append(
            f"the recording holds {len(ensembles)} ensembles; this report shows {view.title}, not {others}"
        )
        metrics = [m for m in metrics if (m.namespace, m.ensemble) == shown]
        decisions = [d for d in decisions if (d.namespace, d.ensemble) == shown]
    view.notes.append("a recording holds no job attempts: the report of a results folder of `ensemble up` has them")
    beside = path.parent / "ensemble.yaml"
    algorithms = _algorithms(ensemble_file or (beside if beside.is_file() else None), view)
    start = min(m.time for m in metrics)
    end = max([m.time for m in metrics] + [d.time for d in decisions])
    node_seconds = 0.0
    scale_events = 0
    for i in sorted({m.member for m in metrics}):
        member = MemberRun(index=i)
        member.algorithm, member.options = algorithms.get(i, ("", {}))
        member.series = _series_from_metrics(m for m in metrics if m.member == i).shifted(start)
        member.decisions = _shift_marks(_marks((d for d in decisions if d.member == i), applied), start)
        spent = step_integral(member.series.t, member.series.size, end - start)
        ups = sum(1 for d in decisions if d.member == i and (a := applied.get(d.id)) and _grew(a))
        downs = sum(1 for d in decisions if d.member == i and (a := applied.get(d.id)) and _shrank(a))
        node_seconds += spent
        scale_events += ups + downs
        view.member_figures.append(
            {"member": i, "algorithm": member.algorithm, "span_s": round(end - start, 3),
             "node_seconds": round(spent, 3), "scale_ups": ups, "scale_downs": downs,
             "peak": max(member.series.size, default=0), "decisions": len(member.decisions)}
        )  # fmt: skip
        view.members.append(member)
    view.figures = {
        "span_s": round(end - start, 3),
        "node_seconds": round(node_seconds, 3),
        "scale_events": scale_events,
        "decisions": len(decisions),
        "metrics": len(metrics),
    }
    return view


def _grew(a: Applied) -> bool:
    return a.ok and a.size_before is not None and a.size_after is not None and a.size_after > a.size_before


def _shrank(a: Applied) -> bool:
    return a.ok and a.size_before is not None and a.size_after is not None and a.size_after < a.size_before
