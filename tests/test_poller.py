"""The poller on a real nats-server against real sidecars on loopback (ours, and an original-shaped one)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ensemble_core import subjects
from ensemble_core.messages import AlgorithmSpec, JobSpec, MemberEvent, MemberSpec, Metrics, encode
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token
from ensemble_core.wire import JobInfo, StatusPayload, SubmitPayload, SubmitResult
from services.poller import service as poller_service
from services.poller.service import MemberLoop
from services.poller.service import run as run_poller
from sidecar.local import LocalBackend
from sidecar.server import RunningServer, serve, serve_local
from tests.conftest import service_running, wait_for

NAMESPACE = "default"
ENSEMBLE = "poll.test"
CHECK = 0.2


def address(member: int = 0) -> MemberAddress:
    return MemberAddress(NAMESPACE, ENSEMBLE, member)


def token(settings: Settings) -> str:
    return ensemble_token(settings.sidecar_token, NAMESPACE, ENSEMBLE)


def member_spec(member: int, endpoint: str, check_seconds: float = CHECK) -> MemberSpec:
    return MemberSpec(
        namespace=NAMESPACE,
        ensemble=ENSEMBLE,
        member=member,
        name=f"poll-{member}",
        size=1,
        min_size=1,
        max_size=4,
        endpoint=endpoint,
        algorithm=AlgorithmSpec(),
        jobs=[JobSpec(name="a", command="true")],
        check_seconds=check_seconds,
    )


async def register(nc: Client, spec: MemberSpec) -> None:
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    await members.put(MemberAddress(spec.namespace, spec.ensemble, spec.member).key, encode(spec))


class Stored:
    """Every message stored in a stream under a subject, in stream order, as it arrives."""

    def __init__(self) -> None:
        self.metrics: list[Metrics] = []
        self.events: list[MemberEvent] = []

    async def metrics_cb(self, msg: Msg) -> None:
        self.metrics.append(msgspec.json.decode(msg.data, type=Metrics))

    async def events_cb(self, msg: Msg) -> None:
        self.events.append(msgspec.json.decode(msg.data, type=MemberEvent))

    def of(self, member: int) -> list[Metrics]:
        return [m for m in self.metrics if m.member == member]

    def kinds(self, member: int = 0) -> list[str]:
        return [e.event for e in self.events if e.member == member]


@contextlib.asynccontextmanager
async def stored(nc: Client) -> AsyncIterator[Stored]:
    js = nc.jetstream()
    found = Stored()
    metrics = await js.subscribe(subjects.ALL_METRICS, ordered_consumer=True, cb=found.metrics_cb)
    events = await js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True, cb=found.events_cb)
    try:
        yield found
    finally:
        await metrics.unsubscribe()
        await events.unsubscribe()


class CountingBackend(LocalBackend):
    """The local queue, counting how often a status snapshot is built (once per RequestStatus)."""

    def __init__(self, nodes: int = 1) -> None:
        super().__init__(nodes=nodes)
        self.snapshots = 0

    def status(self) -> StatusPayload:
        self.snapshots += 1
        return super().status()


def assert_contiguous(found: list[Metrics]) -> None:
    assert [m.seq for m in found] == list(range(len(found)))
    assert all(a.time < b.time for a, b in itertools.pairwise(found))


async def test_a_watched_member_publishes_one_check_per_period_with_pushed_changes(
    nc: Client, settings: Settings
) -> None:
    backend = CountingBackend()
    # a heartbeat far beyond the test: the only snapshots the sidecar sends are the first and the changes
    sidecar = await serve(backend, token=token(settings), heartbeat=60)
    try:
        async with stored(nc) as found, service_running(run_poller, settings):
            await register(nc, member_spec(0, f"127.0.0.1:{sidecar.port}"))
            await wait_for(lambda: len(found.of(0)) >= 2)
            async with SidecarClient(f"127.0.0.1:{sidecar.port}", token(settings)) as client:
                await client.action(
                    "submit", SubmitPayload(jobs=[JobSpec(name="j", command="sleep 0.5")]), SubmitResult
                )
                await wait_for(lambda: any(m.finished == 1 for m in found.of(0)))
                job = await client.action("jobinfo", {"id": 1}, JobInfo)
            await wait_for(lambda: len(found.of(0)) >= 12)
        checks = found.of(0)
        assert_contiguous(checks)
        assert any(m.queue.run == 1 for m in checks)
        first_done = next(m for m in checks if m.finished == 1)
        assert job.t_inactive is not None
        # the next check after the job ended already carries it: nobody asked the sidecar for it
        assert first_done.time - job.t_inactive < CHECK + 0.15
        gaps = [b.time - a.time for a, b in itertools.pairwise(checks)]
        assert all(0.5 * CHECK < gap < 1.6 * CHECK for gap in gaps), gaps
        # snapshots built: the first, submit, start and end of the job (coalesced) — not one per check
        assert backend.snapshots <= 5 < len(checks)
    finally:
        await sidecar.stop()


class OriginalSidecar:
    """A sidecar of the original's shape: only ``RequestStatus``, answering the original's payload keys."""

    PAYLOAD = msgspec.json.encode(
        {
            "nodes": {"node_cores_free": 8, "node_cores_up": 16, "node_up_count": 4, "node_free_count": 2},
            "queue": {"new": 0, "depend": 0, "priority": 0, "sched": 3, "run": 2, "cleanup": 0, "inactive": 7},
            "waiting": {"2": 1, "4": 2, "8": 0},
            "nextJobs": [4, 2, 4],
            "counts": {"inactive": 7},
            "metrics": {},
        }
    ).decode()

    def __init__(self) -> None:
        self.calls = 0
        self.authorization: set[str] = set()
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self.status,
            request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.Response.SerializeToString,
        )
        service = pb.DESCRIPTOR.services_by_name["EnsembleOperator"].full_name
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {"RequestStatus": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[object, object]) -> pb.Response:
        self.calls += 1
        self.authorization.update(
            str(value) for key, value in context.invocation_metadata() or () if key == "authorization"
        )
        return pb.Response(payload=self.PAYLOAD, status=pb.Response.SUCCESS)


async def test_an_original_sidecar_is_polled_once_per_check(nc: Client, settings: Settings) -> None:
    original = OriginalSidecar()
    await original.server.start()
    try:
        async with stored(nc) as found, service_running(run_poller, settings):
            await register(nc, member_spec(0, f"127.0.0.1:{original.port}"))
            await wait_for(lambda: len(found.of(0)) >= 6)
        checks = found.of(0)
        assert_contiguous(checks)
        # one RequestStatus a check (the last may have been answered while the poller stopped)
        assert len(checks) <= original.calls <= len(checks) + 1
        assert original.authorization == {f"Bearer {token(settings)}"}
        last = checks[-1]
        assert (last.size, last.finished, last.queue.sched) == (4, 7, 3)  # size and finished from the old keys
        assert last.waiting == {2: 1, 4: 2}
        assert last.next_jobs == [4, 2, 4]
    finally:
        await original.server.stop(None)


async def test_an_unreachable_sidecar_is_retried_with_backoff_and_announced_once(
    nc: Client, settings: Settings
) -> None:
    attempts: list[float] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writer.close()

    # something listens on the port but is no sidecar: each attempt is seen, and fails
    listener = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    sidecar: RunningServer | None = None
    try:
        async with stored(nc) as found, service_running(run_poller, settings) as task:
            await register(nc, member_spec(0, f"127.0.0.1:{port}", check_seconds=0.1))
            await asyncio.sleep(3.2)
            listener.close()
            await listener.wait_closed()
            sidecar = await serve_local(port=port, token=token(settings))
            await wait_for(lambda: len(found.of(0)) >= 2, timeout=15)
            assert not task.done()
        # waits growing from 0.1 s (x1.6 to x2 each time): about seven attempts in 3.2 s, not thirty
        assert 3 <= len(attempts) <= 9, attempts
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert max(gaps) > 4 * min(gaps), gaps
        assert found.kinds() == ["unreachable", "reachable"]
        assert_contiguous(found.of(0))
    finally:
        listener.close()
        if sidecar is not None:
            await sidecar.stop()


async def test_members_added_changed_and_removed_while_it_runs(nc: Client, settings: Settings) -> None:
    small = await serve_local(token=token(settings), nodes=1)
    large = await serve_local(token=token(settings), nodes=3, max_nodes=3)
    members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    try:
        async with stored(nc) as found, service_running(run_poller, settings):
            await register(nc, member_spec(0, f"127.0.0.1:{small.port}"))
            await wait_for(lambda: len(found.of(0)) >= 2)
            await register(nc, member_spec(1, f"127.0.0.1:{small.port}"))
            await wait_for(lambda: len(found.of(1)) >= 2)

            await members.delete(address(0).key)
            await asyncio.sleep(CHECK)  # a check already on its way may still land
            stopped_at = len(found.of(0))
            await register(nc, member_spec(1, f"127.0.0.1:{large.port}"))  # a new endpoint
            await wait_for(lambda: found.of(1)[-1].nodes.node_up_count == 3)
            await wait_for(lambda: len(found.of(1)) >= 8)
            assert len(found.of(0)) == stopped_at

            finished = msgspec.structs.replace(member_spec(1, f"127.0.0.1:{large.port}"), phase="completed")
            await register(nc, finished)
            await asyncio.sleep(CHECK)
            count = len(found.of(1))
            await asyncio.sleep(3 * CHECK)
            assert len(found.of(1)) == count
        assert_contiguous(found.of(1))  # the restarted loop went on from the stream's seq
    finally:
        await small.stop()
        await large.stop()


async def test_a_restarted_poller_resumes_the_sequence_without_duplicates(nc: Client, settings: Settings) -> None:
    sidecar = await serve_local(token=token(settings))
    try:
        async with stored(nc) as found:
            await register(nc, member_spec(0, f"127.0.0.1:{sidecar.port}"))
            async with service_running(run_poller, settings):
                await wait_for(lambda: len(found.of(0)) >= 3)
            first_run = len(found.of(0))
            async with service_running(run_poller, settings):
                await wait_for(lambda: len(found.of(0)) >= first_run + 3)
            # two at once, as when a new poller starts before the old one has stopped
            async with service_running(run_poller, settings), service_running(run_poller, settings):
                await asyncio.sleep(5 * CHECK)
            await asyncio.sleep(0.2)
        checks = found.of(0)
        assert [m.seq for m in checks] == list(range(len(checks)))
        assert all(a.time < b.time for a, b in itertools.pairwise(checks[: first_run + 3]))
    finally:
        await sidecar.stop()


async def test_a_wrong_token_is_reported_and_other_members_keep_being_polled(nc: Client, settings: Settings) -> None:
    stranger = await serve_local(token="another ensemble's token")
    ours = await serve_local(token=token(settings))
    try:
        async with stored(nc) as found, service_running(run_poller, settings) as task:
            await register(nc, member_spec(0, f"127.0.0.1:{stranger.port}"))
            await register(nc, member_spec(1, f"127.0.0.1:{ours.port}"))
            await wait_for(lambda: "unreachable" in found.kinds(0) and len(found.of(1)) >= 4)
            assert not task.done()
        assert found.of(0) == []
        assert found.kinds(0) == ["unreachable"]
        assert "token" in next(e.message for e in found.events if e.member == 0)
        assert found.kinds(1) == []
    finally:
        await stranger.stop()
        await ours.stop()


async def test_a_watched_sidecar_that_stops_and_comes_back_is_announced_both_ways(
    nc: Client, settings: Settings
) -> None:
    sidecar = await serve_local(token=token(settings))
    port = sidecar.port
    try:
        async with stored(nc) as found, service_running(run_poller, settings):
            await register(nc, member_spec(0, f"127.0.0.1:{port}"))
            await wait_for(lambda: len(found.of(0)) >= 2)
            await sidecar.stop(grace=0)
            await wait_for(lambda: found.kinds() == ["unreachable"])
            stopped_at = len(found.of(0))
            await asyncio.sleep(3 * CHECK)
            assert len(found.of(0)) <= stopped_at + 1  # no check while nobody answers
            sidecar = await serve_local(port=port, token=token(settings), nodes=2, max_nodes=2)
            await wait_for(lambda: found.kinds() == ["unreachable", "reachable"], timeout=15)
            await wait_for(lambda: found.of(0)[-1].nodes.node_up_count == 2)
        assert_contiguous(found.of(0))
    finally:
        await sidecar.stop()


async def test_a_silent_watch_stream_is_opened_again_without_an_alarm(nc: Client, settings: Settings) -> None:
    backend = CountingBackend()
    sidecar = await serve(backend, token=token(settings), heartbeat=60)  # far longer than the silence limit
    spec = member_spec(0, f"127.0.0.1:{sidecar.port}")
    loop = MemberLoop(nc.jetstream(), settings, spec, watch_silence=0.5)
    try:
        async with stored(nc) as found:
            task = asyncio.create_task(loop.run())
            await asyncio.sleep(2.2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)
        assert found.events == []
        assert backend.snapshots >= 4  # the stream was opened again about every 0.5 s
        checks = found.of(0)
        assert 9 <= len(checks) <= 13  # one per 0.2 s: opening the stream again adds no check
        assert_contiguous(checks)
    finally:
        await sidecar.stop()


async def test_a_hung_sidecar_s_last_pushed_view_is_not_published_as_fresh(
    nc: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(poller_service, "PUSH_FRESH", 1.5)
    log = (tmp_path / "sidecar.out").open("w")
    process = subprocess.Popen(  # noqa: ASYNC220  (a real sidecar process, to be frozen with SIGSTOP)
        [sys.executable, "-m", "ensemble_cli", "sidecar", "--backend", "local", "--port", "0", "--heartbeat", "0.5"],
        env={**os.environ, "ENSEMBLE_SIDECAR_TOKEN": token(settings)},
        stdout=log,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: (tmp_path / "sidecar.out").read_text().strip() != "", timeout=20)
        port = int((tmp_path / "sidecar.out").read_text().split()[0])
        await register(nc, member_spec(0, f"127.0.0.1:{port}"))
        async with stored(nc) as found, service_running(run_poller, settings):
            await wait_for(lambda: len(found.of(0)) >= 3, timeout=15)
            process.send_signal(signal.SIGSTOP)
            frozen = time.time()
            await asyncio.sleep(4.0)
            during = [m for m in found.of(0) if m.time > frozen + 1.5 + 2 * CHECK]
            process.send_signal(signal.SIGCONT)
            resumed = time.time()
            await wait_for(lambda: any(m.time > resumed for m in found.of(0)), timeout=30)
        assert during == [], "checks were published from a snapshot the frozen sidecar pushed long before"
        assert_contiguous(found.of(0))
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=10)
        log.close()


async def test_the_poller_reads_with_the_records_status_token_and_needs_no_secret(
    nc: Client, settings: Settings
) -> None:
    sidecar = await serve_local(token=token(settings))
    no_secret = msgspec.structs.replace(settings, sidecar_token="")
    try:
        async with stored(nc) as found, service_running(run_poller, no_secret):
            # a record without a status token, and a poller without the operator secret: refused
            await register(nc, member_spec(0, f"127.0.0.1:{sidecar.port}"))
            await wait_for(lambda: "unreachable" in found.kinds(0), timeout=10)
            assert found.of(0) == []
            # the record as the creator writes it: the read-only token is enough to poll
            readonly = msgspec.structs.replace(
                member_spec(0, f"127.0.0.1:{sidecar.port}"), status_token=status_token(token(settings))
            )
            await register(nc, readonly)
            await wait_for(lambda: len(found.of(0)) >= 2, timeout=10)
    finally:
        await sidecar.stop()
