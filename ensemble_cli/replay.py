"""``ensemble replay RECORDING``: run an algorithm over recorded metrics offline and show its decisions.

A recording is JSON Lines of the wire structs tagged by ``kind`` (``metrics``, ``decision``,
``applied``), as ``ensemble record`` writes it. Each member's metrics are fed, in file order, to the
algorithm exactly as the decider would feed them: a snapshot whose seq is not above the last one
consumed (a duplicate) is skipped, and the state goes through its JSON form between snapshots. The
decider's staleness rule does not apply: a recording is replayed as if the decider had kept up.

The member (sizes, jobs, algorithm and options) comes from an Ensemble file — ``--ensemble FILE``, or
``ensemble.yaml`` beside the recording — and otherwise is reconstructed from the recording with the
gaps named on stderr. ``--algorithm`` and ``--option`` override the file's; options are checked as an
Ensemble's are. ``--compare`` lines the replayed decisions up with the recorded ones: a pair agrees
when both are about the same member with the same action and target size, taken on metrics at most
:data:`WINDOW` seqs or :data:`TIME_ERROR` seconds apart. Each disagreement gets its cause when one is
known (:data:`CAUSES`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from ensemble_cli import terminal
from ensemble_cli.carry import carry, dropped_note
from ensemble_core import algorithms
from ensemble_core.algorithms.baselines import IGNORED_SCALE
from ensemble_core.messages import (
    DEFAULT_ALGORITHM,
    AlgorithmSpec,
    Applied,
    Decision,
    JobSpec,
    MemberSpec,
    Metrics,
    VersionError,
    check_version,
    encode,
)
from ensemble_core.spec import SpecError, load
from ensemble_core.subjects import MemberAddress
from ensemble_core.words import plural

#: Two decisions taken on metrics at most this many seqs apart may agree.
WINDOW = 2
#: ... or at most this many seconds apart: the error of the original's reconstructed times
#: (``shared/data/seed-gke/README.md``); its re-checks share one time but not one seq.
TIME_ERROR = 1.5
#: The same action and size further apart than the agreement allows, but at most this many seqs:
#: a disagreement of timing.
TIMING_WINDOW = 6
#: Why a decision has no agreeing counterpart, when it is known.
CAUSES = {
    "timing": "the same decision on both sides, further apart than the agreement allows",
    "size": "the same action at the same time, with another size",
    "not-applied": "the recorded decision had no effect (the original dropped it, or it failed), and the "
    "replay decided nothing like it",
    "not-needed": "a recorded scale-up the replay does not repeat because, on the metrics it was taken on, the "
    "next waiting job already fits in the nodes free plus the nodes requested but not yet up",
    "submit-not-recorded": "the recording holds no submit: the original's submission of its jobs matrix is "
    "not among its recorded decisions",
}
#: The key counting disagreements of no known cause.
UNEXPLAINED = "unexplained"
#: The Ensemble file looked for beside a recording when ``--ensemble`` is not given.
BESIDE = "ensemble.yaml"
#: Errors shown for a bad recording before the rest are counted only.
MAX_ERRORS = 10

Recorded = Metrics | Decision | Applied


class ReplayError(Exception):
    """Input that cannot be replayed; ``errors`` holds one line each (what is wrong and how to fix it)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class Recording:
    """A recording read from a file: metrics in file order, decisions without repeats, outcomes by id."""

    metrics: list[Metrics] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    applied: dict[str, Applied] = field(default_factory=dict)


def option(text: str) -> tuple[str, str]:
    """An ``--option key=value`` argument as its key and value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value (for example scaleChecks=5), got {text!r}")
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble replay``."""
    parser.add_argument("recording", metavar="RECORDING", help="a recording (JSON Lines, as `ensemble record` writes)")
    parser.add_argument(
        "--algorithm",
        metavar="NAME",
        help=f"the algorithm to replay (default: the member's, else {DEFAULT_ALGORITHM}); "
        "the file's options it takes are kept",
    )
    parser.add_argument(
        "--option",
        type=option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an algorithm option, as in an Ensemble file (repeatable; overrides the file's)",
    )
    parser.add_argument(
        "--ensemble", metavar="FILE", help=f"the Ensemble file of the recorded run (default: {BESIDE} beside RECORDING)"
    )
    parser.add_argument("--compare", action="store_true", help="line the decisions up with the recorded ones")
    parser.add_argument("--json", action="store_true", help="print JSON Lines instead of a table")


def read_recording(path: Path) -> Recording:
    """Read a recording; raises :class:`ReplayError` naming each bad line, or an unreadable file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError([f"{path}: cannot read: {exc}"]) from exc
    decoder = msgspec.json.Decoder(Recorded)
    recording = Recording()
    seen: set[str] = set()
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            message = decoder.decode(line)
            check_version(message)
        except (msgspec.DecodeError, msgspec.ValidationError, VersionError) as exc:
            errors.append(f"{path}:{number}: {_line_problem(exc)}")
            continue
        if isinstance(message, Metrics):
            recording.metrics.append(message)
        elif isinstance(message, Decision):
            # the same decision may be recorded twice (a redelivery published again): keep one
            if message.id not in seen:
                seen.add(message.id)
                recording.decisions.append(message)
        else:
            recording.applied.setdefault(message.decision, message)
    if len(errors) > MAX_ERRORS:
        errors = [*errors[:MAX_ERRORS], f"... and {len(errors) - MAX_ERRORS} more bad lines"]
    if not errors and not recording.metrics:
        errors.append(f"{path}: no metrics lines; a recording needs the metrics to replay (see `ensemble record`)")
    if errors:
        raise ReplayError(errors)
    return recording


def _line_problem(exc: Exception) -> str:
    message = str(exc)
    if "Invalid value" in message and "$.kind" in message:
        return f"{message} (a recording holds metrics, decision and applied lines)"
    return message


def addresses(recording: Recording) -> list[MemberAddress]:
    """The members the recording has metrics of, in order of first appearance."""
    found = dict.fromkeys(MemberAddress(m.namespace, m.ensemble, m.member) for m in recording.metrics)
    return list(found)


def members_from_file(path: Path, wanted: Sequence[MemberAddress]) -> dict[MemberAddress, MemberSpec]:
    """Each recorded member's spec from an Ensemble file, matched by member index.

    The recording's namespace and ensemble name are kept (decision ids then match the recorded ones).
    Raises :class:`ReplayError` when the file is invalid or lacks a member.
    """
    try:
        ensemble = load(path)
    except SpecError as exc:
        raise ReplayError([f"{path}: {error}" for error in exc.errors]) from exc
    specs: dict[MemberAddress, MemberSpec] = {}
    errors: list[str] = []
    for address in wanted:
        if address.member >= len(ensemble.members):
            errors.append(
                f"{path}: has no member {address.member} (it has {len(ensemble.members)}); "
                "pass the Ensemble file of the recorded run with --ensemble"
            )
            continue
        spec = ensemble.member_spec(ensemble.members[address.member], endpoint="")
        specs[address] = msgspec.structs.replace(spec, namespace=address.namespace, ensemble=address.ensemble)
    if errors:
        raise ReplayError(errors)
    return specs


def member_from_recording(recording: Recording, address: MemberAddress) -> tuple[MemberSpec, list[str]]:
    """The member as far as the recording tells, and a note for each thing it cannot tell."""
    own = [m for m in recording.metrics if (m.namespace, m.ensemble, m.member) == address]
    first = own[0]
    # sizes the member had or was given (a step the original dropped never says what maxSize was)
    sizes = [m.size for m in own] + [a.size_after for a in recording.applied.values() if a.ok and a.size_after]
    with_jobs = next((m for m in own if m.waiting), None)
    jobs = []
    if with_jobs is not None:
        jobs = [
            JobSpec(name=f"nodes-{nodes}", command="(unknown: from the recording)", count=count, nodes=nodes)
            for nodes, count in sorted(with_jobs.waiting.items())
        ]
    spec = MemberSpec(
        namespace=address.namespace,
        ensemble=address.ensemble,
        member=address.member,
        name=f"{address.ensemble}-{address.member}",
        size=max(1, first.size),
        min_size=1,
        max_size=max([1, *sizes]),
        endpoint="",
        algorithm=AlgorithmSpec(),
        jobs=jobs,
    )
    where = f"seq {with_jobs.seq}" if with_jobs is not None else "nowhere (no job ever waited)"
    notes = [
        f"member {address}: no Ensemble file, so it is reconstructed from the recording: size {spec.size} "
        f"(the first snapshot), jobs from the waiting counts at {where} ({plural(sum(j.count for j in jobs), 'job')}); "
        f"minSize unknown, taken as 1; maxSize unknown, taken as {spec.max_size} (the largest size the member had); "
        f"the algorithm and its options unknown, so {DEFAULT_ALGORITHM} with defaults unless --algorithm/--option. "
        f"Pass --ensemble FILE (or put {BESIDE} beside the recording) to set them."
    ]
    return spec, notes


def choose_algorithm(
    member: MemberSpec, name: str | None, overrides: Iterable[tuple[str, str]], notes: list[str] | None = None
) -> tuple[algorithms.Algorithm[Any, Any], msgspec.Struct, AlgorithmSpec]:
    """The algorithm to replay with its parsed options, and the member's algorithm spec as replayed.

    The member's own options apply; under another algorithm, those it takes are kept and the others
    dropped, each named in ``notes``. ``overrides`` win. The member's ``rules`` are kept. Raises
    :class:`ReplayError` naming the unknown algorithm or each bad option, with the nearest valid name.
    """
    name = name or member.algorithm.name
    try:
        algorithm = algorithms.get(name)
        spec, dropped = carry(member.algorithm, name)
    except algorithms.UnknownAlgorithm as exc:
        raise ReplayError([f"--algorithm: {exc}"]) from exc
    if dropped and notes is not None:
        notes.append(dropped_note(member.member, member.algorithm, name, dropped))
    raw: dict[str, algorithms.RawOption] = dict(spec.options)
    raw.update(dict(overrides))
    problems = algorithms.validate_options(name, raw)
    if problems:
        raise ReplayError([f"--option {problem}" for problem in problems])
    if name == "rules":
        groups = [job.name for job in member.jobs]
        rule_problems = algorithms.validate_rules(name, spec.rules, groups)
        if rule_problems:
            raise ReplayError([f"member {member.member}: {problem}" for problem in rule_problems])
    used = AlgorithmSpec(name=name, options=raw, rules=spec.rules)
    return algorithm, algorithms.parse_options(name, raw), used


def replay_member(
    member: MemberSpec, algorithm: algorithms.Algorithm[Any, Any], options: msgspec.Struct, metrics: Iterable[Metrics]
) -> list[Decision]:
    """The decisions ``algorithm`` takes on ``metrics`` of ``member``, fed as the decider feeds them."""
    state = algorithm.initial_state(member, options)
    last_seq = -1
    decisions: list[Decision] = []
    for snapshot in metrics:
        if snapshot.seq <= last_seq:
            continue
        last_seq = snapshot.seq
        state, made = algorithm.decide(member, options, state, snapshot)
        # the decider stores the state as JSON between snapshots: replay does the same
        state = msgspec.json.decode(msgspec.json.encode(state), type=algorithm.state_type)
        decisions.extend(made)
    return decisions


class Pair(msgspec.Struct, kw_only=True, tag="comparison", tag_field="kind"):
    """A recorded decision and the replayed one that agrees with it; either may be missing."""

    replayed: Decision | None
    recorded: Decision | None
    agree: bool
    #: What the actuator (or the original operator) did with the recorded decision, when recorded.
    outcome: str = ""
    #: Why the two disagree, a key of :data:`CAUSES`; empty when they agree or the cause is unknown.
    cause: str = ""
    #: The cause said for this pair.
    detail: str = ""

    def sort_key(self) -> tuple[int, int]:
        """Member, then the seq of the recorded decision (else of the replayed one)."""
        side = self.recorded or self.replayed
        assert side is not None
        return side.member, side.based_on


def _same_member(a: Decision, b: Decision) -> bool:
    return (a.namespace, a.ensemble, a.member) == (b.namespace, b.ensemble, b.member)


def _close(a: Decision, b: Decision) -> bool:
    return abs(a.based_on - b.based_on) <= WINDOW or abs(a.time - b.time) <= TIME_ERROR


def _same_action(replayed: Decision, recorded: Decision, recording: Recording) -> bool:
    """The same action; a step the model of the original ignores is the recorded scale that did not apply."""
    if replayed.action == IGNORED_SCALE and recorded.action == "scale":
        return _outcome(recording, recorded).startswith("failed")
    return replayed.action == recorded.action


def _agree(replayed: Decision, recorded: Decision, recording: Recording) -> bool:
    return (
        _same_member(replayed, recorded)
        and _same_action(replayed, recorded, recording)
        and replayed.size == recorded.size
        and _close(replayed, recorded)
    )


def compare(replayed: Sequence[Decision], recording: Recording) -> list[Pair]:
    """Pair each recorded decision with the earliest unpaired replayed decision it agrees with.

    Then each recorded decision left alone is paired, where it can be, with the replayed decision that
    explains the disagreement (the same decision a little later or sooner: ``timing``; the same action
    at the same time with another size: ``size``), or given the cause the recording shows
    (``not-applied``). Unpaired decisions of either side appear on their own; the result is ordered by seq.
    """
    pairs: list[Pair] = []
    unpaired = list(replayed)
    alone: list[Decision] = []
    for recorded in sorted(recording.decisions, key=lambda d: (d.member, d.based_on)):
        match = next((candidate for candidate in unpaired if _agree(candidate, recorded, recording)), None)
        if match is None:
            alone.append(recorded)
            continue
        unpaired.remove(match)
        pairs.append(Pair(replayed=match, recorded=recorded, agree=True, outcome=_outcome(recording, recorded)))
    for recorded in alone:
        pair = _explain(recorded, unpaired, recording)
        if pair.replayed is not None:
            unpaired.remove(pair.replayed)
        pairs.append(pair)
    any_submit = any(d.action == "submit" for d in recording.decisions)
    for decision in unpaired:
        if decision.action == "submit" and not any_submit:
            pairs.append(
                Pair(
                    replayed=decision,
                    recorded=None,
                    agree=False,
                    cause="submit-not-recorded",
                    detail=CAUSES["submit-not-recorded"],
                )
            )
        else:
            pairs.append(Pair(replayed=decision, recorded=None, agree=False))
    pairs.sort(key=Pair.sort_key)
    return pairs


def _explain(recorded: Decision, unpaired: Sequence[Decision], recording: Recording) -> Pair:
    """A recorded decision no replayed one agrees with, with its cause when one is known."""
    outcome = _outcome(recording, recorded)
    same = [d for d in unpaired if _same_member(d, recorded) and _same_action(d, recorded, recording)]
    timed = [d for d in same if d.size == recorded.size and abs(d.based_on - recorded.based_on) <= TIMING_WINDOW]
    if timed:
        match = min(timed, key=lambda d: abs(d.based_on - recorded.based_on))
        checks = match.based_on - recorded.based_on
        detail = (
            f"the replay takes the same decision {abs(checks)} metrics {'later' if checks > 0 else 'sooner'} "
            f"({match.time - recorded.time:+.1f} s)"
        )
        return Pair(replayed=match, recorded=recorded, agree=False, outcome=outcome, cause="timing", detail=detail)
    sized = [d for d in same if _close(d, recorded)]
    if sized:
        match = min(sized, key=lambda d: abs(d.based_on - recorded.based_on))
        detail = f"the replay asks for size {match.size} where the recording asks for {recorded.size}"
        return Pair(replayed=match, recorded=recorded, agree=False, outcome=outcome, cause="size", detail=detail)
    fits = _fits(recorded, recording)
    if fits:
        return Pair(replayed=None, recorded=recorded, agree=False, outcome=outcome, cause="not-needed", detail=fits)
    if outcome.startswith("failed"):
        detail = f"the original did not apply it ({outcome}), and the replay decided nothing like it"
        return Pair(replayed=None, recorded=recorded, agree=False, outcome=outcome, cause="not-applied", detail=detail)
    return Pair(replayed=None, recorded=recorded, agree=False, outcome=outcome)


def _fits(recorded: Decision, recording: Recording) -> str:
    """Why a recorded scale-up was not needed, from the metrics it was taken on; empty when it was."""
    if recorded.action != "scale" or recorded.size is None:
        return ""
    address = (recorded.namespace, recorded.ensemble, recorded.member)
    at = next(
        (m for m in recording.metrics if (m.namespace, m.ensemble, m.member) == address and m.seq == recorded.based_on),
        None,
    )
    if at is None or recorded.size <= at.size or not at.next_jobs:
        return ""
    free = at.nodes.node_free_count
    coming = max(0, at.size - at.nodes.node_up_count)
    if at.next_jobs[0] > free + coming:
        return ""
    return (
        f"at seq {at.seq} the next waiting job needs {at.next_jobs[0]} nodes and {free} are free + {coming} "
        f"requested but not yet up"
    )


def _outcome(recording: Recording, recorded: Decision) -> str:
    applied = recording.applied.get(recorded.id)
    if applied is None:
        return ""
    if applied.ok:
        return "applied"
    return f"failed: {applied.error}" if applied.error else "failed"


def _describe(decision: Decision | None) -> str:
    if decision is None:
        return "—"
    return f"{decision.action} {decision.size}" if decision.size is not None else decision.action


class Summary(msgspec.Struct, kw_only=True, tag="summary", tag_field="kind"):
    """How many decisions each side has, how many agree, and the disagreements by cause."""

    recorded: int
    replayed: int
    agree: int
    #: Disagreeing pairs and lone decisions of either side, by cause (:data:`CAUSES`, or :data:`UNEXPLAINED`).
    causes: dict[str, int] = {}


def summarise(pairs: Sequence[Pair]) -> Summary:
    """Counts of a comparison."""
    causes: dict[str, int] = {}
    for pair in pairs:
        if not pair.agree:
            key = pair.cause or UNEXPLAINED
            causes[key] = causes.get(key, 0) + 1
    return Summary(
        recorded=sum(pair.recorded is not None for pair in pairs),
        replayed=sum(pair.replayed is not None for pair in pairs),
        agree=sum(pair.agree for pair in pairs),
        causes=dict(sorted(causes.items())),
    )


def replay(args: argparse.Namespace, notes: list[str]) -> tuple[Recording, list[Decision]]:
    """Read the recording and the members, run the algorithm; ``notes`` receives what had to be assumed."""
    path = Path(args.recording)
    recording = read_recording(path)
    wanted = addresses(recording)
    beside = path.parent / BESIDE
    ensemble_file = Path(args.ensemble) if args.ensemble else (beside if beside.is_file() else None)
    if ensemble_file is not None:
        specs = members_from_file(ensemble_file, wanted)
    else:
        specs = {}
        for address in wanted:
            specs[address], found = member_from_recording(recording, address)
            notes.extend(found)
    decisions: list[Decision] = []
    for address in wanted:
        member = specs[address]
        algorithm, options, used = choose_algorithm(member, args.algorithm, args.option, notes)
        member = msgspec.structs.replace(member, algorithm=used)
        own = (m for m in recording.metrics if (m.namespace, m.ensemble, m.member) == address)
        decisions.extend(replay_member(member, algorithm, options, own))
    return recording, decisions


def _print_decisions(console: Console, recording: Recording, decisions: Sequence[Decision]) -> None:
    start = recording.metrics[0].time
    table = Table(title=f"{plural(len(decisions), 'decision')} replayed on {len(recording.metrics)} metrics")
    for column in ("member", "seq", "t s", "action", "size", "reason"):
        table.add_column(column, justify="right" if column in ("member", "seq", "t s", "size") else "left")
    for decision in decisions:
        table.add_row(
            str(decision.member),
            str(decision.based_on),
            f"{decision.time - start:.0f}",
            decision.action,
            "" if decision.size is None else str(decision.size),
            decision.reason,
        )
    console.print(table)


def _print_comparison(console: Console, pairs: Sequence[Pair]) -> None:
    summary = summarise(pairs)
    table = Table(title="replayed vs recorded decisions")
    columns = ("member", "replayed seq", "replayed", "recorded seq", "recorded", "recorded outcome", "agree", "cause")
    for column in columns:
        table.add_column(column, justify="right" if "seq" in column or column == "member" else "left")
    for pair in pairs:
        side = pair.recorded or pair.replayed
        assert side is not None
        cause = "" if pair.agree else (f"{pair.cause}: {pair.detail}" if pair.cause else "unknown")
        table.add_row(
            str(side.member),
            "" if pair.replayed is None else str(pair.replayed.based_on),
            _describe(pair.replayed),
            "" if pair.recorded is None else str(pair.recorded.based_on),
            _describe(pair.recorded),
            pair.outcome,
            "yes" if pair.agree else "no",
            cause,
        )
    console.print(table)
    console.print(
        f"agree on {summary.agree} of {summary.recorded} recorded decisions "
        f"({summary.replayed} replayed; same action and size within ±{WINDOW} metrics or ±{TIME_ERROR} s)"
    )
    if summary.causes:
        counts = ", ".join(f"{cause} {count}" for cause, count in summary.causes.items())
        console.print(f"disagreements by cause: {counts}")


def run(args: argparse.Namespace) -> int:
    """Replay and print; exit 0 when done, 2 when the recording, the Ensemble file or an option is bad."""
    notes: list[str] = []
    try:
        recording, decisions = replay(args, notes)
    except ReplayError as exc:
        for error in exc.errors:
            print(f"ensemble replay: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"ensemble replay: note: {note}", file=sys.stderr)
    out = sys.stdout
    if args.json:
        if args.compare:
            pairs = compare(decisions, recording)
            for pair in pairs:
                out.write(encode(pair).decode() + "\n")
            out.write(encode(summarise(pairs)).decode() + "\n")
        else:
            for decision in decisions:
                out.write(encode(decision).decode() + "\n")
        return 0
    console = terminal.console()  # in a pipe: whole tables, never cut at 80 columns
    if args.compare:
        _print_comparison(console, compare(decisions, recording))
    else:
        _print_decisions(console, recording, decisions)
    return 0
