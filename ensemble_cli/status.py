"""``ensemble status``: what every ensemble on a NATS server is doing now, read without changing anything.

It reads, for each member record in the ``ensemble-members`` bucket, the last message of the member's
subject in each stream — its last ``Metrics``, its last ``Decision``, the actuator's last ``Applied`` and
the member's last event — with JetStream's get-last-message-by-subject (``$JS.API.STREAM.MSG.GET``): no
consumer is created, so nothing lingers on the server and the services are never disturbed. The members
are listed from the bucket's stream info (its subjects), so a user with only stream-info and
message-get rights (the ``reader`` user of ``ensemble up`` and of the compose stack) can run it.

Output: one table per ensemble (``--json``: one JSON document, keys in :data:`JSON_KEYS`), once or, with
``--watch``, every ``--interval`` seconds until Ctrl-C (a live view in a terminal; elsewhere each refresh
printed in turn, one JSON document a line with ``--json``).

Exit codes: 0 shown; 1 NATS holds no ensemble (none matching the filter); 2 a bad flag or setting;
3 NATS cannot be reached or refused a read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ensemble_cli.record import Refused, connect_once, shown_url, unless_refused
from ensemble_core import flags, subjects
from ensemble_core.messages import Applied, Decision, MemberEvent, MemberSpec, Metrics, decode
from ensemble_core.settings import Settings, SettingsError, load
from ensemble_core.subjects import MemberAddress

EXIT_OK, EXIT_NONE, EXIT_USAGE, EXIT_NATS = 0, 1, 2, 3
#: The version of the ``--json`` document; raised only when a key changes meaning or goes away.
JSON_VERSION = 1
#: The keys of each member in ``--json`` (documented in the README; a test holds them to this list).
JSON_KEYS = (
    "member", "name", "phase", "size", "min_size", "max_size", "nodes_up", "waiting", "running", "done",
    "failed", "outstanding", "algorithm", "checked", "seq", "last_decision", "last_event",
)  # fmt: skip
#: Seconds a single read may take before NATS is taken for unreachable.
READ_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ensemble status``."""
    parser.add_argument("ensemble", nargs="?", help="show only the ensemble of this name (default: every one)")
    parser.add_argument("--namespace", "-n", help="show only the ensembles of this namespace")
    parser.add_argument("--nats", metavar="URL", help="NATS server URL(s) (default: ENSEMBLE_NATS_URL)")
    parser.add_argument("--json", action="store_true", help="print one JSON document (keys: see the README)")
    parser.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    parser.add_argument(
        "--interval", type=flags.seconds(positive=True), default=2.0, help="seconds between two refreshes (default 2)"
    )
    parser.epilog = (
        "exit codes: 0 shown; 1 NATS holds no ensemble (or none that matches); 2 a bad flag or setting; "
        "3 NATS unreachable, or it refused a read"
    )


class MemberStatus(msgspec.Struct, kw_only=True):
    """One member as ``ensemble status`` shows it (the ``--json`` form of a member)."""

    member: int
    #: the member's MiniCluster
    name: str
    #: ``starting`` (no metrics yet), ``running``, ``unreachable`` (its sidecar does not answer),
    #: ``completed`` or ``terminated``
    phase: str
    #: the requested size (the last metrics', else the record's)
    size: int
    min_size: int
    max_size: int
    nodes_up: int | None
    waiting: int | None
    running: int | None
    done: int | None
    failed: int | None
    outstanding: int | None
    algorithm: str
    #: unix time of the last metrics (the check's instant), and its seq
    checked: float | None
    seq: int | None
    #: ``{"action", "size", "reason", "time", "id", "applied"}``; ``applied`` is
    #: ``{"ok", "time", "size_before", "size_after", "error"}`` or None while the actuator has not applied it
    last_decision: dict[str, Any] | None
    #: ``{"event", "time", "message"}``
    last_event: dict[str, Any] | None


class EnsembleStatus(msgspec.Struct, kw_only=True):
    """One ensemble and its members, in member order."""

    namespace: str
    name: str
    members: list[MemberStatus]


@dataclass
class Latest:
    """The newest message of each kind about one member (None: there is none)."""

    spec: MemberSpec
    metrics: Metrics | None = None
    decision: Decision | None = None
    applied: Applied | None = None
    event: MemberEvent | None = None


def phase(latest: Latest) -> str:
    """The member's phase: its record's once it ended, else what its last metrics and event say."""
    if latest.spec.phase != "active":
        return latest.spec.phase
    event, metrics = latest.event, latest.metrics
    if event is not None and event.event == "unreachable" and (metrics is None or metrics.time <= event.time):
        return "unreachable"
    return "starting" if latest.metrics is None else "running"


def member_status(latest: Latest) -> MemberStatus:
    """What is shown of one member (pure: the newest messages in, the row out)."""
    spec, metrics, decision = latest.spec, latest.metrics, latest.decision
    last_decision: dict[str, Any] | None = None
    if decision is not None:
        applied = latest.applied if latest.applied is not None and latest.applied.decision == decision.id else None
        last_decision = {
            "action": decision.action,
            "size": decision.size,
            "reason": decision.reason,
            "time": decision.time,
            "id": decision.id,
            "applied": None
            if applied is None
            else {
                "ok": applied.ok,
                "time": applied.time,
                "size_before": applied.size_before,
                "size_after": applied.size_after,
                "error": applied.error,
            },
        }
    event = latest.event
    return MemberStatus(
        member=spec.member,
        name=spec.name,
        phase=phase(latest),
        size=metrics.size if metrics is not None else spec.size,
        min_size=spec.min_size,
        max_size=spec.max_size,
        nodes_up=None if metrics is None else metrics.nodes.node_up_count,
        waiting=None if metrics is None else sum(metrics.waiting.values()),
        running=None if metrics is None else metrics.queue.run,
        done=None if metrics is None else metrics.finished,
        failed=None if metrics is None else metrics.failed,
        outstanding=None if metrics is None else metrics.outstanding,
        algorithm=spec.algorithm.name,
        checked=None if metrics is None else metrics.time,
        seq=None if metrics is None else metrics.seq,
        last_decision=last_decision,
        last_event=None if event is None else {"event": event.event, "time": event.time, "message": event.message},
    )


def group(latest: list[Latest]) -> list[EnsembleStatus]:
    """Members grouped into their ensembles, ensembles by namespace and name, members by index."""
    found: dict[tuple[str, str], list[MemberStatus]] = {}
    for item in sorted(latest, key=lambda x: (x.spec.namespace, x.spec.ensemble, x.spec.member)):
        found.setdefault((item.spec.namespace, item.spec.ensemble), []).append(member_status(item))
    return [EnsembleStatus(namespace=ns, name=name, members=members) for (ns, name), members in found.items()]


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def decision_text(decision: dict[str, Any] | None) -> str:
    """The action of a member's last decision and what became of it, short: ``scale to 3 (applied)``."""
    if decision is None:
        return "-"
    action = str(decision["action"]) + ("" if decision["size"] is None else f" to {decision['size']}")
    applied = decision["applied"]
    if applied is None:
        return f"{action} (pending)"
    return f"{action} ({'applied' if applied['ok'] else 'not applied'})"


def reason_text(decision: dict[str, Any] | None) -> str:
    """The reason of a member's last decision, and why it was not applied if it was not."""
    if decision is None:
        return ""
    applied = decision["applied"]
    if applied is not None and not applied["ok"] and applied["error"]:
        return f"{decision['reason']} — not applied: {applied['error']}"
    return str(decision["reason"])


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


#: Below this many columns the reasons go under each table (a line per member) instead of into a column.
WIDE = 130


def render(ensembles: list[EnsembleStatus], now: float, width: int = WIDE) -> RenderableType:
    """One table per ensemble. The decision's action comes before its reason, and only the reason is ever
    folded: at ``width`` below :data:`WIDE` the reasons go under the table, one line a member, and the
    table loses its borders and its headers shorten (``wait``, ``run``, ``fail``), so that an 80-column
    terminal still shows every count and action whole."""
    wide = width >= WIDE
    parts: list[RenderableType] = []
    for ensemble in ensembles:
        algorithms = sorted({m.algorithm for m in ensemble.members})
        table = Table(
            title=f"{ensemble.namespace}/{ensemble.name} ({', '.join(algorithms)})",
            title_justify="left",
            box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD,
            show_edge=wide,
            padding=(0, 1) if wide else 0,
        )
        counts = ("waiting", "running", "done", "failed") if wide else ("wait", "run", "done", "fail")
        for column in ("member", "phase", "size", "up", *counts):
            table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
        table.add_column("checked", no_wrap=True)
        table.add_column("last decision", no_wrap=True)
        if wide:
            table.add_column("reason", overflow="fold", ratio=1, min_width=12)
        reasons: list[RenderableType] = []
        for m in ensemble.members:
            cells: list[RenderableType] = [
                str(m.member),
                m.phase,
                str(m.size),
                _count(m.nodes_up),
                _count(m.waiting),
                _count(m.running),
                _count(m.done),
                _count(m.failed),
                _ago(m.checked, now),
                decision_text(m.last_decision),
            ]
            reason = reason_text(m.last_decision)
            if wide:
                cells.append(Text(reason))
            elif reason:
                reasons.append(Text.assemble((f"member {m.member}: ", "bold"), reason))
            table.add_row(*cells)
        parts += [table, *reasons]
    return Group(*parts)


def document(ensembles: list[EnsembleStatus], now: float) -> dict[str, Any]:
    """The ``--json`` document: ``{"version", "time", "ensembles": [{"namespace", "name", "members": [...]}]}``."""
    return {"version": JSON_VERSION, "time": now, "ensembles": msgspec.to_builtins(ensembles)}


class ReadRefused(RuntimeError):
    """NATS did not answer a read (unreachable, or the user may not read it); the message says which."""


async def _last(js: JetStreamContext, stream: str, subject: str) -> bytes | None:
    """The data of the last message on ``subject`` in ``stream``; None when there is none."""
    try:
        return (await js.get_last_msg(stream, subject)).data
    except nats.js.errors.NotFoundError:
        return None


def _decoded(data: bytes | None, kind: type[Any]) -> Any:
    if data is None:
        return None
    try:
        return decode(data, kind)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a message the services would dead-letter: as good as none


async def member_keys(js: JetStreamContext) -> list[str]:
    """The keys of the member records (from the bucket's stream info: no consumer); [] without the bucket."""
    stream = f"KV_{subjects.MEMBERS_BUCKET}"
    prefix = f"$KV.{subjects.MEMBERS_BUCKET}."
    try:
        info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
    except nats.js.errors.NotFoundError:
        return []
    return sorted(subject[len(prefix) :] for subject in (info.state.subjects or {}))


async def read(js: JetStreamContext, namespace: str | None = None, name: str | None = None) -> list[Latest]:
    """The newest messages of every member (of ``namespace`` / ensemble ``name`` when given)."""
    found: list[Latest] = []
    stream = f"KV_{subjects.MEMBERS_BUCKET}"
    for key in await member_keys(js):
        try:
            address = MemberAddress.from_key(key)
        except ValueError:
            continue  # not a member record
        if namespace not in (None, address.namespace) or name not in (None, address.ensemble):
            continue
        spec = _decoded(await _last(js, stream, f"$KV.{subjects.MEMBERS_BUCKET}.{key}"), MemberSpec)
        if spec is None:
            continue  # deleted (its last message is a delete marker) or unreadable
        metrics, decision, applied, event = await asyncio.gather(
            _last(js, subjects.METRICS_STREAM, subjects.metrics(address)),
            _last(js, subjects.DECISIONS_STREAM, subjects.decisions(address)),
            _last(js, subjects.EVENTS_STREAM, subjects.applied(address)),
            _last(js, subjects.EVENTS_STREAM, subjects.events(address)),
        )
        found.append(
            Latest(
                spec,
                _decoded(metrics, Metrics),
                _decoded(decision, Decision),
                _decoded(applied, Applied),
                _decoded(event, MemberEvent),
            )
        )
    return found


def _filters(args: argparse.Namespace) -> str:
    parts = [f"named {args.ensemble}"] if args.ensemble else []
    parts += [f"in namespace {args.namespace}"] if args.namespace else []
    return " ".join(parts)


async def _snapshot(nc: Client, args: argparse.Namespace, errors: list[str]) -> list[EnsembleStatus]:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            reading = read(nc.jetstream(timeout=READ_TIMEOUT), args.namespace, args.ensemble)
            found = await unless_refused(reading, errors)
        return group(found)
    except Refused as exc:
        raise ReadRefused(
            f"{exc}; ensemble status needs stream info and single-message reads of the streams and of the "
            "ensemble-members bucket: the permissions of the reader user (ensemble_core/natsauth.py)"
        ) from None
    except (TimeoutError, nats.errors.Error) as exc:
        why = errors[-1] if errors else (str(exc) or type(exc).__name__)
        raise ReadRefused(why) from None


async def show(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Read and print (once, or until Ctrl-C with ``--watch``); returns the exit code."""
    errors: list[str] = []
    url = shown_url(settings.nats_url)
    try:
        nc = await connect_once(settings, "status", errors)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"ensemble status: cannot reach NATS at {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_NATS
    try:
        first = True
        live: Live | None = None
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    ensembles = await _snapshot(nc, args, errors)
                except ReadRefused as exc:
                    print(f"ensemble status: NATS at {url} did not answer a read: {exc}", file=sys.stderr)
                    return EXIT_NATS
                now = time.time()
                if first and not ensembles and not args.watch:
                    which = _filters(args)
                    print(
                        f"ensemble status: no ensemble {which + ' ' if which else ''}on NATS at {url} (no member "
                        "record in the ensemble-members bucket): is this the NATS of a running system, and has its "
                        "creator registered an ensemble?",
                        file=sys.stderr,
                    )
                    return EXIT_NONE
                first = False
                if args.json:
                    # one document a line: a --watch makes JSON Lines
                    console.out(msgspec.json.encode(document(ensembles, now)).decode(), highlight=False)
                else:
                    waiting = Text(f"no ensemble on NATS at {url} yet")
                    view = render(ensembles, now, console.width) if ensembles else waiting
                    heading = Text(f"{time.strftime('%H:%M:%S', time.localtime(now))}  {url}", style="dim")
                    screen = Group(heading, view)
                    if args.watch and console.is_terminal:
                        if live is None:
                            live = stack.enter_context(Live(screen, console=console, auto_refresh=False))
                        live.update(screen, refresh=True)
                    else:
                        console.print(screen)
                if not args.watch:
                    return EXIT_OK
                await asyncio.sleep(args.interval)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def run(args: argparse.Namespace) -> int:
    """``ensemble status``: see the module docstring for what is shown and the exit codes."""
    try:
        settings = load(nats_url=args.nats) if args.nats else load()
    except SettingsError as exc:
        print(f"ensemble status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    console = Console(soft_wrap=args.json)
    if not console.is_terminal and not args.json:
        console.width = max(console.width, 160)  # a pipe or a log: whole rows, not 80 columns of them
    try:
        return asyncio.run(show(settings, args, console))
    except KeyboardInterrupt:
        return EXIT_OK  # the way a --watch ends
