"""The poller: one loop per active member, one ``Metrics`` message per check.

Members come and go while it runs: it watches the ``ensemble-members`` bucket and starts a loop for
each active member, stopping it when the member's record is deleted or leaves the ``active`` phase,
and restarting it when the record changes (a new endpoint).

Each loop follows the sidecar's ``WatchStatus`` stream when the sidecar offers it, keeping the
freshest pushed snapshot, and falls back to calling ``RequestStatus`` once per check when the sidecar
answers ``UNIMPLEMENTED`` (an original sidecar). Either way it publishes exactly one ``Metrics`` per
``check_seconds``: the algorithms count checks (``scaleChecks``, ``terminateChecks``), so a change
pushed between two checks waits for the next one rather than being published early — an early
message would be one more check, and an ensemble whose jobs finish every 200 ms would be checked five
times a second. ``Metrics.time`` is the check's instant on the poller's clock: when it read its copy
of the pushed state (which the sidecar keeps within its 100 ms coalescing interval of the queue), or
when it sent ``RequestStatus``. The lag, published minus ``Metrics.time``, is exported as the
``ensemble_poller_lag_seconds`` histogram (see docs/poller.md).

Several pollers share the members: each polls only the members whose owner record names it
(``shard.py``), and a member moves when a poller joins, stops or dies. The sequence resumes from the
last message in the stream when a member's loop starts (after a restart or a handover), and every check
is published with ``Nats-Msg-Id: <member key>:<seq>`` and the stream's expected last subject sequence
(the member's last check, as read or written by this loop), so a seq is never published twice, skipped
or out of order, even by a poller that has not yet heard that the member moved. An unreachable
sidecar (or one that refuses the token) is retried with exponential backoff from ``check_seconds`` up
to ``MAX_BACKOFF`` (the loop's retries, and its connection's attempts to reconnect), and announced
once with an ``unreachable`` event, then ``reachable`` when it answers again.

``Metrics.size`` is the member's *requested* size: what its sidecar reports locally (the local queue's
size, a Flux partition's undrained ranks), and in Kubernetes mode (``ENSEMBLE_MODE=kubernetes``) its
MiniCluster's ``spec.size``, from a watch of the MiniClusters — never the nodes up, or nodes requested
but still pending would not count as coming. A check made before that size is known is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram

from ensemble_core import algorithms, health, ledger, minicluster, natsio, subjects
from ensemble_core.kube import Kube, api_client
from ensemble_core.kube_watch import Watcher
from ensemble_core.messages import (
    EventKind,
    InstanceChanged,
    JobEnded,
    JobReport,
    MemberEvent,
    MemberSpec,
    Metrics,
    VersionError,
    check_version,
    decode,
    encode,
)
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import (
    ClientTls,
    SidecarClient,
    SidecarError,
    SidecarUnavailable,
    SidecarUnimplemented,
    client_tls,
)
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import MAX_ENDED_PAGE, JobInfo, StatusPayload
from services.poller.shard import Shard

log = logging.getLogger("poller")

#: Longest wait between two attempts to reach an unreachable sidecar (seconds).
MAX_BACKOFF = 30.0
#: A watch stream silent this long is taken for dead: three heartbeats of a sidecar at its default (5 s).
WATCH_SILENCE = 15.0
#: A pushed snapshot older than this is no longer published as the member's state: a stream that
#: stopped (a hung sidecar) must not pass an old view off as fresh. Half of WATCH_SILENCE, so a
#: sidecar's heartbeat must stay below it (the default is 5 s).
PUSH_FRESH = WATCH_SILENCE / 2
#: Longest wait for a gRPC stream or channel to close.
CLOSE_TIMEOUT = 2.0

LAG = Histogram(
    "ensemble_poller_lag_seconds",
    "Seconds from a check (Metrics.time) to its Metrics being stored in the stream",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PUBLISHED = Counter("ensemble_poller_metrics_total", "Metrics published, by how the snapshot was got", ["source"])
UNREACHABLE = Gauge("ensemble_poller_unreachable_members", "Members whose sidecar does not answer")
JOBS_REPORTED = Counter("ensemble_poller_jobs_reported_total", "Ended job attempts reported, by result", ["result"])
_MEMBER = [*health.ENSEMBLE_LABELS, "member"]
NODES_REQUESTED = Gauge("ensemble_member_nodes_requested", "A member's requested size at its last check", _MEMBER)
NODES_UP = Gauge("ensemble_member_nodes_up", "A member's nodes up at its last check", _MEMBER)
MEMBER_JOBS = Gauge(
    "ensemble_member_jobs",
    "A member's jobs at its last check, by state: waiting and running (its queue), finished and failed (so far)",
    [*_MEMBER, "state"],
)


def to_metrics(
    address: MemberAddress,
    seq: int,
    checked: float,
    status: StatusPayload,
    *,
    requested: int | None = None,
    outstanding: int | None = None,
) -> Metrics:
    """The ``Metrics`` of one check made at ``checked`` (works for an original sidecar's payload too).

    ``requested``: the member's requested size where the sidecar is not the one to know it (a
    MiniCluster's ``spec.size``); else the sidecar's ``size``, else (an original sidecar) its nodes up.
    """
    if requested is not None:
        size = requested
    else:
        size = status.size if status.size is not None else status.nodes.node_up_count
    return Metrics(
        namespace=address.namespace,
        ensemble=address.ensemble,
        member=address.member,
        seq=seq,
        time=checked,
        size=size,
        nodes=status.nodes,
        queue=status.queue,
        waiting={nodes: count for nodes, count in status.waiting.items() if count > 0},
        next_jobs=status.next_jobs,
        finished=status.finished if status.finished is not None else status.queue.inactive,
        failed=status.failed or 0,
        groups=status.groups,
        outstanding=outstanding,
    )


_RESULTS = frozenset({"succeeded", "failed", "lost", "cancelled"})


def to_job_ended(address: MemberAddress, instance: str, job: JobInfo, now: float) -> JobEnded:
    """The report of one ended job as the sidecar lists it."""
    result = job.result if job.result in _RESULTS else ("succeeded" if job.success else "failed")
    return JobEnded(
        namespace=address.namespace,
        ensemble=address.ensemble,
        member=address.member,
        instance=instance,
        seq=max(1, job.end_seq),
        id=job.id,
        group=job.group,
        index=max(0, job.index),
        attempt=max(1, job.attempt),
        result=result,  # type: ignore[arg-type]  # one of _RESULTS
        time=now,
        nodes=max(1, job.nodes),
        command=job.command,
        returncode=job.returncode,
        t_submit=job.t_submit,
        t_run=job.t_run,
        t_end=job.t_inactive or 0.0,
        reason=job.reason,
        output=job.output,
        stdout=job.stdout,
        stderr=job.stderr,
        params=job.params,
    )


async def last_report(js: JetStreamContext, address: MemberAddress) -> tuple[str, int]:
    """Where this member's job reports stand in the stream: the queue last reported and how many of its
    ends were reported (``("", 0)`` for a member with none)."""
    try:
        last = await js.get_last_msg(subjects.JOBS_STREAM, subjects.jobs(address))
    except NotFoundError:
        return "", 0
    try:
        report: JobReport = msgspec.json.decode(last.data or b"", type=JobReport)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "", 0
    if isinstance(report, JobEnded):
        return report.instance, report.seq
    return report.instance, 0


async def next_seq(js: JetStreamContext, address: MemberAddress) -> tuple[int, int]:
    """The sequence after the last check of this member in the stream (0 for a new member), and the stream
    sequence of that last check (0: none), which the next publish expects to still be the last."""
    try:
        last = await js.get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
    except NotFoundError:
        return 0, 0
    try:
        return decode(last.data or b"", Metrics).seq + 1, last.seq or 0
    except (msgspec.DecodeError, msgspec.ValidationError):
        # an unreadable last message (dead-lettered by the decider) still used its sequence number
        return (last.seq or 0) + 1, last.seq or 0


class MemberLoop:
    """Publishes one member's checks until cancelled."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        spec: MemberSpec,
        *,
        max_backoff: float = MAX_BACKOFF,
        watch_silence: float = WATCH_SILENCE,
        tls: ClientTls | None = None,
        sizes: RequestedSizes | None = None,
        ledgers: KeyValue | None = None,
    ) -> None:
        """``max_backoff``: longest wait between attempts; ``watch_silence``: a quiet stream's limit;
        ``tls``: reach the sidecar over TLS; ``sizes``: the requested sizes (Kubernetes mode);
        ``ledgers``: the job ledgers (``ensemble-jobs``), for the member's outstanding jobs."""
        self.js = js
        self.ledgers = ledgers
        #: where the member's job reports stand: (queue, ends reported); None: read it from the stream first
        self._reported: tuple[str, int] | None = None
        #: the sidecar lists no ended jobs (an original one): job reports are not made
        self._no_jobs = False
        self._client: SidecarClient | None = None
        self.sizes = sizes
        self.settings = settings
        self.tls = tls
        self.spec = spec
        self.address = MemberAddress(spec.namespace, spec.ensemble, spec.member)
        # the read-only token the creator put in the record; an older record has none: the full token, if
        # this poller has the operator secret
        self.token = spec.status_token or ensemble_token(settings.sidecar_token, spec.namespace, spec.ensemble)
        self.max_backoff = max_backoff
        self.watch_silence = watch_silence
        self.backoff = spec.check_seconds
        self.reachable = True
        #: the next seq to publish; None: read it from the stream first (at start, after a failed publish)
        self.seq: int | None = None
        #: the stream sequence of the member's last check, which the next publish expects (compare-and-set)
        self.last_stored = 0
        self._latest: StatusPayload | None = None
        self._latest_at = 0.0
        #: when the next check is due (monotonic clock); kept across reconnections, so opening a stream
        #: again does not add a check
        self._next_check = time.monotonic()
        #: the member's algorithm decides on event snapshots too: publish one on each pushed change
        self.events = _takes_events(spec)
        #: set by the stream follower on each pushed snapshot
        self._pushed = asyncio.Event()
        #: the last check published by this loop (None: none yet, or its seq is in doubt), the event
        #: snapshots published after it, what the last snapshot published showed, and its outstanding count
        self._check_seq: int | None = None
        self._events_since = 0
        self._shown: object = None
        self._outstanding_at_check: int | None = None
        self._requested_at_check: int | None = None

    async def run(self) -> None:
        """Watch (or poll) and publish; after a failure retry, the waits doubling up to ``max_backoff``."""
        # a connection of the loop's own, whose attempts to reconnect back off like the loop's retries;
        # a retry while it is down fails at once, without another attempt to connect
        client = SidecarClient(
            self.spec.endpoint,
            self.token,
            self.settings.sidecar_timeout,
            reconnect=(self.spec.check_seconds, self.max_backoff),
            tls=self.tls,
        )
        self._client = client
        try:
            async with client:
                while True:
                    try:
                        while await self._watch(client):
                            log.debug("watch stream silent; opening it again", extra={"member": str(self.address)})
                        await self._poll(client)
                    except (SidecarUnavailable, SidecarError) as exc:
                        await self._lost(exc)
                    await asyncio.sleep(self.backoff)
                    _still_running()
                    self.backoff = min(self.backoff * 2, self.max_backoff)
        finally:
            self._unexport()
            if not self.reachable:
                UNREACHABLE.dec()

    async def _watch(self, client: SidecarClient) -> bool:
        """Publish the freshest pushed snapshot every check until the stream fails (raises) or goes
        silent for ``watch_silence`` seconds (True: open it again); False at once if the sidecar has no
        ``WatchStatus``."""
        stream = client.watch()
        try:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
                # comes as the inner call completes, and a cancelled member loop would then run on for ever
                async with asyncio.timeout(self.settings.sidecar_timeout):
                    self._latest = await anext(stream)
                self._latest_at = time.monotonic()
            except SidecarUnimplemented:
                log.info("sidecar has no WatchStatus; polling RequestStatus", extra={"member": str(self.address)})
                return False
            except TimeoutError:
                raise SidecarUnavailable(f"watch: no snapshot in {self.settings.sidecar_timeout:g} s") from None
            await self._answered()
            follower = asyncio.create_task(self._follow(stream))
            try:
                while True:
                    wait = self._next_check - time.monotonic()
                    if wait > 0:
                        waiters: set[asyncio.Future[Any]] = {follower}
                        pushed = asyncio.ensure_future(self._pushed.wait()) if self.events else None
                        if pushed is not None:
                            waiters.add(pushed)
                        try:
                            done, _ = await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if pushed is not None:
                                pushed.cancel()
                        if follower in done:
                            follower.result()  # the stream failed: raise why
                            return True
                        if self.events and self._pushed.is_set():
                            self._pushed.clear()
                            await self._publish_event(self._latest)
                            continue
                    if time.monotonic() - self._latest_at <= PUSH_FRESH:
                        await self._publish(self._latest, time.time(), "watch")
                        _still_running()
                    else:
                        silent = time.monotonic() - self._latest_at
                        log.warning(
                            "no snapshot pushed for %.0fs; check skipped", silent, extra={"member": str(self.address)}
                        )
                    self._next_check = _next_due(self._next_check, self.spec.check_seconds)
            finally:
                follower.cancel()
                # asyncio.wait, not `await` under suppress(CancelledError): that would also swallow the
                # cancellation of this member loop arriving meanwhile, and the loop would run for ever
                await asyncio.wait({follower})
        finally:
            # closing a gRPC stream has been seen to hang on a loaded machine: never wait on it for long
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await stream.aclose()

    async def _follow(self, stream: AsyncIterator[StatusPayload]) -> None:
        """Keep the newest pushed snapshot; return when none came for ``watch_silence`` seconds."""
        # silence is not a failure: a sidecar may be run with a heartbeat longer than the limit, and
        # opening the stream again tells a live sidecar (first snapshot at once) from a dead one
        while True:
            try:
                async with asyncio.timeout(self.watch_silence):  # not wait_for: see _watch
                    self._latest = await anext(stream)
                self._latest_at = time.monotonic()
                self._pushed.set()
            except TimeoutError:
                return

    async def _poll(self, client: SidecarClient) -> None:
        """Ask for a snapshot and publish it, every check, until the sidecar fails."""
        while True:
            await asyncio.sleep(self._next_check - time.monotonic())
            checked = time.time()
            status = await client.status()
            await self._answered()
            await self._publish(status, checked, "poll")
            _still_running()
            self._next_check = _next_due(self._next_check, self.spec.check_seconds)

    async def _publish(self, status: StatusPayload, checked: float, source: str) -> None:
        """Publish one check with the next seq; on any doubt re-read the seq from the stream."""
        requested = None
        if self.sizes is not None:
            requested = self.sizes.size(self.spec)
            if requested is None:
                log.warning(
                    "the size of MiniCluster %s is not known yet; check skipped", self.spec.name,
                    extra={"member": str(self.address)},
                )  # fmt: skip
                return
        await self._report_jobs(status)
        outstanding = await self._outstanding()
        try:
            if self.seq is None:
                self.seq, self.last_stored = await next_seq(self.js, self.address)
            metrics = to_metrics(self.address, self.seq, checked, status, requested=requested, outstanding=outstanding)
            # expected last subject sequence: a check is stored only right after the one this loop read or
            # wrote, so a poller that polls a member it no longer owns (a handover it has not heard of) can
            # never store a seq twice or out of order
            ack = await self.js.publish(
                subjects.metrics(self.address),
                encode(metrics),
                headers={
                    "Nats-Msg-Id": f"{self.address.key}:{self.seq}",
                    "Nats-Expected-Last-Subject-Sequence": str(self.last_stored),
                },
            )
        except Exception as exc:
            # NATS away, the ack lost after the message was stored, or another check stored meanwhile: this
            # check is dropped, and the next one takes whatever seq the stream says comes next
            log.warning("publish failed: %s", exc, extra={"member": str(self.address)})
            self.seq = None
            return
        if ack.duplicate:
            log.warning(
                "seq already published (another poller of this member?); re-reading it",
                extra={"member": str(self.address), "seq": self.seq},
            )
            self.seq = None
            return
        LAG.observe(time.time() - checked)
        PUBLISHED.labels(source).inc()
        self._check_seq, self._events_since, self._outstanding_at_check = self.seq, 0, outstanding
        self._requested_at_check = requested
        # _pushed stays as it is: a push that came while this check was being published is published
        # next (unless it shows nothing the check did not)
        self._shown = _shown(status)
        self._export(metrics)
        self.seq += 1
        self.last_stored = ack.seq

    def _labels(self) -> tuple[str, str, str]:
        return self.address.namespace, self.address.ensemble, str(self.address.member)

    def _export(self, metrics: Metrics) -> None:
        """The member's last published check as Prometheus gauges (the Grafana dashboard's nodes and queue)."""
        labels = self._labels()
        NODES_REQUESTED.labels(*labels).set(metrics.size)
        NODES_UP.labels(*labels).set(metrics.nodes.node_up_count)
        for state, value in (
            ("waiting", sum(metrics.waiting.values())),
            ("running", metrics.queue.run),
            ("finished", metrics.finished),
            ("failed", metrics.failed),
        ):
            MEMBER_JOBS.labels(*labels, state).set(value)

    def _unexport(self) -> None:
        """Remove the member's gauges: a member no longer polled has no current size or queue."""
        labels = self._labels()
        for gauge in (NODES_REQUESTED, NODES_UP):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for state in ("waiting", "running", "finished", "failed"):
            with contextlib.suppress(KeyError):
                MEMBER_JOBS.remove(*labels, state)

    async def _publish_event(self, status: StatusPayload | None) -> None:
        """Publish a pushed change at once as an event snapshot of the last check (``Metrics.event``).

        Only for an algorithm that takes events, after this loop published a check, when the queue or a
        group's counts changed since the last snapshot published; the sidecar's coalescing (100 ms)
        bounds how often. A failed publish drops the event (the next check carries the state anyway).
        """
        if status is None or self._check_seq is None or self.seq is None:
            return
        shown = _shown(status)
        if shown == self._shown:
            return
        checked = time.time()
        # the jobs that ended go out first, as for a check: a rule may end the member on this snapshot
        await self._report_jobs(status)
        self._outstanding_at_check = await self._outstanding()
        event = self._events_since + 1
        metrics = to_metrics(
            self.address,
            self._check_seq,
            checked,
            status,
            requested=self._requested_at_check,  # Kubernetes mode: the MiniCluster's size at the check
            outstanding=self._outstanding_at_check,
        )
        metrics.event = event
        try:
            ack = await self.js.publish(
                subjects.metrics(self.address),
                encode(metrics),
                # stored only right after what this loop last stored, as a check is (a handover it has not
                # heard of cannot interleave its snapshots with another poller's)
                headers={
                    "Nats-Msg-Id": f"{self.address.key}:{self._check_seq}e{event}",
                    "Nats-Expected-Last-Subject-Sequence": str(self.last_stored),
                },
            )
        except Exception as exc:
            log.warning("event publish failed: %s", exc, extra={"member": str(self.address)})
            return
        self._events_since = event
        if ack.duplicate:
            return
        # the next check (or event) is stored after this one: without this its expected last sequence was
        # stale, so the check after every event snapshot was refused and dropped (and events waited for the
        # seq to be read again at the check after it)
        self.last_stored = ack.seq
        self._shown = shown
        LAG.observe(time.time() - checked)
        PUBLISHED.labels("event").inc()
        self._export(metrics)

    async def _report_jobs(self, status: StatusPayload) -> None:
        """Publish a report of each job that ended since the last one reported, and of a replaced queue.

        Reports carry ``Nats-Msg-Id`` (``job:<member>:<queue>:<end>``, ``instance:<member>:<queue>``), and
        where they stand is read back from the stream after a restart or a failed publish, so each is
        published once. A sidecar that lists no ended jobs (an original one) gets none.
        """
        client = self._client
        if self._no_jobs or client is None or not status.instance:
            return
        key = self.address.key
        try:
            if self._reported is None:
                self._reported = await last_report(self.js, self.address)
            instance, after = self._reported
            if instance != status.instance:
                if instance and ledger.instance_started(status.instance) < ledger.instance_started(instance):
                    return  # a snapshot of a queue older than the one reported: stale, nothing to say
                changed = InstanceChanged(
                    namespace=self.address.namespace,
                    ensemble=self.address.ensemble,
                    member=self.address.member,
                    previous=instance,
                    instance=status.instance,
                    time=time.time(),
                )
                await self.js.publish(
                    subjects.jobs(self.address),
                    encode(changed),
                    headers={"Nats-Msg-Id": f"instance:{key}:{status.instance}"},
                )
                if instance:
                    log.warning("sidecar answers from a new queue %s (was %s)", status.instance, instance,
                                extra={"member": str(self.address)})  # fmt: skip
                self._reported = instance, after = status.instance, 0
            while True:
                page = await client.ended(after)
                if page.instance != instance:
                    return  # replaced since the snapshot: the next check reports it
                for job in page.jobs:
                    report = to_job_ended(self.address, instance, job, time.time())
                    await self.js.publish(
                        subjects.jobs(self.address),
                        encode(report),
                        headers={"Nats-Msg-Id": f"job:{key}:{instance}:{report.seq}"},
                    )
                    after = report.seq
                    self._reported = instance, after
                    JOBS_REPORTED.labels(report.result).inc()
                if len(page.jobs) < MAX_ENDED_PAGE:
                    return
        except SidecarUnimplemented:
            log.info("sidecar lists no ended jobs (RequestJobs); no job reports", extra={"member": str(self.address)})
            self._no_jobs = True
        except (SidecarUnavailable, SidecarError) as exc:
            kind = "refused" if isinstance(exc, SidecarError) else "unavailable"
            health.SIDECAR_ERRORS.labels(self.address.namespace, self.address.ensemble, kind).inc()
            log.warning("ended jobs not read: %s", exc, extra={"member": str(self.address)})
        except Exception as exc:
            # NATS away, or an ack lost after the report was stored: read where reports stand again
            log.warning("job report not published: %s", exc, extra={"member": str(self.address)})
            self._reported = None

    async def _outstanding(self) -> int | None:
        """The member's jobs its ledger counts as not done; None when unknown (no ledger, none yet, unreadable)."""
        if self.ledgers is None:
            return None
        try:
            entry = await self.ledgers.get(self.address.key)
            return ledger.decode_record(entry.value).outstanding if entry.value else None
        except Exception:  # no record yet (KeyNotFoundError), NATS away, or an unreadable record
            return None

    async def _answered(self) -> None:
        self.backoff = self.spec.check_seconds
        if not self.reachable and await self._event("reachable", f"sidecar at {self.spec.endpoint} answers again"):
            self.reachable = True
            UNREACHABLE.dec()
            log.info("sidecar reachable", extra={"member": str(self.address)})

    async def _lost(self, exc: Exception) -> None:
        kind = "refused" if isinstance(exc, SidecarError) else "unavailable"
        health.SIDECAR_ERRORS.labels(self.address.namespace, self.address.ensemble, kind).inc()
        if self.reachable and await self._event("unreachable", str(exc)):
            self.reachable = False
            UNREACHABLE.inc()
            level = logging.ERROR if isinstance(exc, SidecarError) else logging.WARNING
            log.log(level, "sidecar unreachable: %s", exc, extra={"member": str(self.address)})

    async def _event(self, kind: EventKind, message: str) -> bool:
        """Publish a lifecycle event about this member; False if NATS did not take it (tried again later)."""
        event = MemberEvent(
            namespace=self.address.namespace,
            ensemble=self.address.ensemble,
            member=self.address.member,
            event=kind,
            time=time.time(),
            message=message,
        )
        try:
            await self.js.publish(subjects.events(self.address), encode(event))
        except Exception as exc:
            log.warning("event %s not published: %s", kind, exc, extra={"member": str(self.address)})
            return False
        return True


def _takes_events(spec: MemberSpec) -> bool:
    try:
        return algorithms.takes_events(algorithms.get(spec.algorithm.name))
    except algorithms.UnknownAlgorithm:
        return False


def _shown(status: StatusPayload) -> object:
    """What an event snapshot must change to be published: the queue's counts and every group's counts."""
    return (
        msgspec.structs.astuple(status.queue),
        {
            name: (g.submitted, g.started, g.cancelled, g.waiting, g.finished, g.succeeded, g.failed)
            for name, g in status.groups.items()
        },
    )


def _still_running() -> None:
    """Raise ``CancelledError`` if this task was asked to stop.

    A library call can swallow a cancellation that arrives as it completes (``asyncio.wait_for`` on
    Python 3.11 does, and nats-py uses it): a loop that only relied on ``cancel()`` then ran on for
    ever — seen as a poller that never stopped after SIGTERM. The loops check after each such call.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _next_due(due: float, period: float) -> float:
    """When the check after the one due at ``due`` (and made now) is due.

    One period later, so checks keep their schedule through small delays; but at least half a period
    from now: a check that came late by more than that starts the schedule again rather than being
    followed by a burst.
    """
    return max(due + period, time.monotonic() + period / 2)


class RequestedSizes:
    """Kubernetes mode: each member's requested size, its MiniCluster's ``spec.size`` (listed and watched)."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        if settings.watch_namespace:
            call: tuple[Any, ...] = (
                kube.custom.list_namespaced_custom_object, minicluster.GROUP, minicluster.VERSION,
                settings.watch_namespace, minicluster.PLURAL,
            )  # fmt: skip
        else:
            call = (kube.custom.list_cluster_custom_object, minicluster.GROUP, minicluster.VERSION, minicluster.PLURAL)
        self.watcher = Watcher(
            kube, "miniclusters", *call, resync=settings.resync_seconds, label_selector=minicluster.ENSEMBLE_LABEL
        )

    def size(self, spec: MemberSpec) -> int | None:
        """The member's MiniCluster's ``spec.size``; None while it is not known (or not the member's)."""
        found = self.watcher.get(spec.namespace, spec.name)
        if found is None or (spec.owner_uid and not minicluster.owned_by(found, spec.owner_uid)):
            return None
        size = (found.get("spec") or {}).get("size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


class Members:
    """The running loops, one per active member, kept in step with the member records."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        tls: ClientTls | None = None,
        sizes: RequestedSizes | None = None,
        ledgers: KeyValue | None = None,
    ) -> None:
        """Loops publish through ``js`` with ``settings``, reach sidecars with ``tls``, take requested sizes
        from ``sizes`` (Kubernetes mode) and outstanding jobs from ``ledgers``."""
        self.js = js
        self.settings = settings
        self.tls = tls
        self.sizes = sizes
        self.ledgers = ledgers
        self.loops: dict[str, tuple[MemberSpec, asyncio.Task[None]]] = {}

    async def update(self, key: str, spec: MemberSpec | None) -> None:
        """Apply one record: start, restart (any change, e.g. the endpoint) or stop (gone, not active)."""
        current = self.loops.get(key)
        wanted = spec if spec is not None and spec.phase == "active" else None
        if current is not None and current[0] == wanted:
            return
        if current is not None:
            await self.stop(key)
            log.info("stopped polling", extra={"member": key})
        if wanted is not None:
            # started only once the old loop is gone, so two loops of a member never publish at once
            loop = MemberLoop(self.js, self.settings, wanted, tls=self.tls, sizes=self.sizes, ledgers=self.ledgers)
            self.loops[key] = (wanted, asyncio.create_task(loop.run()))
            log.info("polling", extra={"member": key, "endpoint": wanted.endpoint})

    async def stop(self, key: str) -> None:
        """Stop one member's loop and wait until it has ended."""
        _, task = self.loops.pop(key)
        task.cancel()
        await asyncio.wait({task})  # see _watch: never suppress a CancelledError that may be ours

    async def close(self) -> None:
        """Stop every loop, waiting for them to end."""
        tasks = [task for _, task in self.loops.values()]
        self.loops.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _follow_records(members: Members | Shard, bucket: KeyValue, stop: asyncio.Event) -> None:
    watcher = await bucket.watchall()
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            update = asyncio.create_task(watcher.updates(timeout=3600))  # type: ignore[no-untyped-call]
            done, _ = await asyncio.wait({update, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if update not in done:
                update.cancel()
                break
            try:
                entry = update.result()
            except Exception:  # the watcher timed out or the connection is being re-established
                continue
            if entry is None:  # marks the end of the initial values
                continue
            spec = None
            if entry.operation is None and entry.value:
                try:
                    spec = decode(entry.value, MemberSpec)
                    check_version(spec)
                except (msgspec.DecodeError, msgspec.ValidationError, VersionError) as exc:
                    spec = None
                    log.error("unreadable member record %s: %s", entry.key, exc)
            await members.update(entry.key, spec)
    finally:
        stopping.cancel()
        await watcher.stop()  # type: ignore[no-untyped-call]


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Publish the checks of every active member of ``ensemble-members`` until ``stop`` (or SIGTERM)."""
    stop = stop or asyncio.Event()
    tls = client_tls(settings)  # a bad CA file stops the service here, naming the variable
    natsio.stop_on_signals(stop)
    kube = Kube(api_client(settings.kube_api)) if settings.mode == "kubernetes" else None
    sizes = RequestedSizes(kube, settings) if kube is not None else None
    watching = asyncio.create_task(sizes.watcher.run(stop)) if sizes is not None else None
    nc = await natsio.connect(settings, "poller")
    js = nc.jetstream()
    members = Members(js, settings, tls, sizes)
    sharding: asyncio.Task[None] | None = None
    try:
        await natsio.declare(js, settings)
        members.ledgers = await natsio.bucket(js, subjects.JOBS_BUCKET)
        shard = Shard(
            await natsio.bucket(js, subjects.POLLERS_BUCKET),
            await natsio.bucket(js, subjects.OWNERS_BUCKET),
            members,
            settings,
        )
        log.info("joined the pollers", extra={"poller": shard.name})
        sharding = asyncio.create_task(shard.run(stop))
        sharding.add_done_callback(lambda _: stop.set())  # a shard that failed stops the poller (see below)
        await _follow_records(shard, await natsio.bucket(js, subjects.MEMBERS_BUCKET), stop)
    finally:
        if sharding is not None:
            stop.set()
            await asyncio.wait({sharding})
        await members.close()
        if sharding is not None and not sharding.cancelled() and sharding.exception() is not None:
            raise sharding.exception()  # type: ignore[misc]
        if watching is not None:
            watching.cancel()
            await asyncio.wait({watching})
        if kube is not None:
            await kube.close()
        await nc.drain()
