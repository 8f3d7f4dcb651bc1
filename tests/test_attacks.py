"""The attacks a security review made on a running stack, replayed: each must fail.

NATS runs with the users and permissions of ``ensemble_core.natsauth`` (what production's
``components/nats-auth/auth.conf`` holds, checked here too, and what ``ensemble up`` runs); the services
run as those users against a real local sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from grpc import aio
from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from ensemble_cli.up import nats_command, nats_url
from ensemble_core import natsauth, natsio, subjects
from ensemble_core.messages import Applied, Decision, JobSpec, MemberSpec, Metrics, NodeCounts, QueueCounts, encode
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.settings import Settings
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token
from ensemble_core.wire import JobInfo, SubmitPayload, SubmitResult
from services.actuator.drivers import DriverError, LocalDriver
from services.actuator.service import run as run_actuator
from services.decider.service import run as run_decider
from services.poller.service import run as run_poller
from sidecar.server import serve_local
from tests.conftest import REPO, service_running, wait_for
from tests.flux_support import NOBODY, python_for
from tests.test_bad_input import dead_letters, stream_bodies

SECRET = "attack-secret"
PASSWORDS = {user: f"{user}-password" for user in (*natsauth.SERVICES, natsauth.MONITOR)}
ADDRESS = MemberAddress("default", "victim", 0)


def test_productions_nats_users_are_the_generated_ones() -> None:
    committed = (REPO / "deploy/kustomize/components/nats-auth/auth.conf").read_text()
    assert committed == natsauth.authorization(), "run: python -c 'from ensemble_core import natsauth; ...'"


@contextlib.contextmanager
def guarded_nats(directory: Path) -> Iterator[str]:
    """A nats-server with the service users (and an ``admin`` with every right, to look at it); its URL."""
    config = directory / "auth.conf"
    block = natsauth.authorization({s: PASSWORDS[s] for s in natsauth.SERVICES}, monitor=PASSWORDS["monitor"])
    config.write_text(block.replace("  users: [\n", '  users: [\n    {user: admin, password: "admin"},\n', 1))
    ports = directory / "ports"
    ports.mkdir()
    process = subprocess.Popen(
        nats_command(directory / "store", ports, config=config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while (url := nats_url(ports)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert url is not None
        yield url
    finally:
        process.terminate()
        process.wait(10)


def as_user(url: str, user: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{'admin' if user == 'admin' else PASSWORDS[user]}@{rest}"


@contextlib.asynccontextmanager
async def users(url: str) -> AsyncIterator[dict[str, Client]]:
    """A client per user, and ``admin``."""
    clients: dict[str, Client] = {}
    try:
        for user in (*natsauth.SERVICES, natsauth.MONITOR, "admin"):
            clients[user] = await nats.connect(as_user(url, user), allow_reconnect=False)
        yield clients
    finally:
        for client in clients.values():
            await client.close()


async def refused(client: Client, subject: str, payload: bytes = b"{}", reply: str = "") -> bool:
    """Whether the server drops a request of ``client`` on ``subject`` (a permissions violation: no answer)."""
    if reply:
        await client.publish(subject, payload, reply=reply)
        await client.flush()
        return True  # fire and forget: what it did is checked by its effect
    try:
        await client.request(subject, payload, timeout=1)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


def record(endpoint: str) -> MemberSpec:
    token = ensemble_token(SECRET, ADDRESS.namespace, ADDRESS.ensemble)
    return MemberSpec(
        namespace=ADDRESS.namespace, ensemble=ADDRESS.ensemble, member=0, name="victim-0", size=1, min_size=1,
        max_size=4, endpoint=endpoint, algorithm={"name": "static"}, jobs=[], check_seconds=1,  # type: ignore[arg-type]
        status_token=status_token(token),
    )  # fmt: skip


def forged_submit(marker: Path) -> Decision:
    return Decision(
        namespace=ADDRESS.namespace, ensemble=ADDRESS.ensemble, member=0, id=f"{ADDRESS.key}:forged", time=time.time(),
        based_on=0, action="submit", jobs=[JobSpec(name="pwn", command=f"touch {marker}")], reason="forged",
    )  # fmt: skip


def _consumer_request(stream: str, name: str, **config: str) -> bytes:
    return json.dumps({"stream_name": stream, "config": {"durable_name": name, **config}}).encode()


async def attempt_everything(client: Client, user: str, forged: bytes) -> None:
    """Every route the review took to get a forged decision applied, as ``user``: each must be refused."""
    decisions, decisions_stream, events_stream = (
        subjects.decisions(ADDRESS),
        subjects.DECISIONS_STREAM,
        subjects.EVENTS_STREAM,
    )
    # 1. publish a decision: not its subject
    assert await refused(client, decisions, forged), user
    if user != "actuator":  # (its own consumer is the actuator's to use)
        # 2. rewrite the actuator's consumer (drop its filter): not its consumer
        rewrite = _consumer_request(decisions_stream, "actuator", ack_policy="explicit", deliver_policy="all")
        assert await refused(client, f"$JS.API.CONSUMER.CREATE.{decisions_stream}.actuator", rewrite), user
        assert await refused(client, f"$JS.API.CONSUMER.DURABLE.CREATE.{decisions_stream}.actuator", rewrite), user
        # 3. pull the actuator's messages
        next_one = f"$JS.API.CONSUMER.MSG.NEXT.{decisions_stream}.actuator"
        assert await refused(client, next_one, b'{"batch": 1}'), user
        # 4. acknowledge or terminate the actuator's messages
        assert await refused(client, f"$JS.ACK.{decisions_stream}.actuator.1.1.1.0.0", b"+TERM"), user
    # 3'. make a consumer of its own, to pull with a decisions subject as the reply
    own = _consumer_request(events_stream, f"evil-{user}", ack_policy="explicit")
    assert await refused(client, f"$JS.API.CONSUMER.CREATE.{events_stream}.evil-{user}", own), user
    assert await refused(client, f"$JS.API.CONSUMER.DURABLE.CREATE.{events_stream}.evil-{user}", own), user
    # 5. have a stored message (its own, on a subject it may write) delivered onto a decisions subject as
    # the reply of a read: only the stream it may read is served, and what comes is a reply envelope
    if user in ("creator", "poller", "actuator"):
        await client.publish(subjects.events(ADDRESS), forged)
    await refused(client, f"$JS.API.STREAM.MSG.GET.{events_stream}", b'{"seq": 1}', reply=decisions)
    await refused(client, f"$JS.API.STREAM.MSG.GET.{subjects.METRICS_STREAM}", b'{"seq": 1}', reply=decisions)
    # 6. a push consumer of a bucket it may watch, delivering onto a decisions subject: nats-server 2.15 creates
    # it, and stores nothing it delivers (were anything stored, it would be a member record, written by the
    # creator or the actuator only, and dead-lettered as the wrong kind)
    push = {"stream_name": f"KV_{subjects.MEMBERS_BUCKET}", "config": {"deliver_subject": decisions,
            "ack_policy": "none", "deliver_policy": "all"}}  # fmt: skip
    await refused(client, f"$JS.API.CONSUMER.CREATE.KV_{subjects.MEMBERS_BUCKET}", json.dumps(push).encode())


async def test_no_user_but_the_decider_gets_a_decision_applied(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    token = ensemble_token(SECRET, ADDRESS.namespace, ADDRESS.ensemble)
    sidecar = await serve_local(token=token, nodes=1, max_nodes=4)
    try:
        with guarded_nats(tmp_path) as url:
            async with users(url) as clients:
                admin = clients["admin"].jetstream()
                await natsio.declare(admin)
                members = await admin.key_value(subjects.MEMBERS_BUCKET)
                await members.put(ADDRESS.key, encode(record(f"127.0.0.1:{sidecar.port}")))
                # something in the metrics stream, for a read to answer
                await clients["poller"].jetstream().publish(subjects.metrics(ADDRESS), encode(snapshot(0)))
                settings = Settings(nats_url=as_user(url, "actuator"), sidecar_token=SECRET, ack_wait=2.0)
                async with service_running(run_actuator, settings):
                    await wait_for(lambda: _consumer(admin, subjects.DECISIONS_STREAM, "actuator"), timeout=10)
                    for user in ("creator", "poller", "actuator", "monitor"):
                        await attempt_everything(clients[user], user, encode(forged_submit(marker)))
                    await asyncio.sleep(3)  # time for anything that got through to be applied
                    info = await admin.consumer_info(subjects.DECISIONS_STREAM, "actuator")
                assert info.config.filter_subject == subjects.ALL_DECISIONS  # never rewritten
                applied = await stream_bodies(clients["admin"], subjects.EVENTS_STREAM, subjects.applied(ADDRESS))
                assert applied == [] and not marker.exists()
                assert [c.name for c in await admin.consumers_info(subjects.EVENTS_STREAM)] == []
                # what reached the decisions stream at all (the reply envelopes of the reads) was dead-lettered
                stored = await stream_bodies(clients["admin"], subjects.DECISIONS_STREAM, subjects.decisions(ADDRESS))
                letters = await dead_letters(clients["admin"], "actuator")
                assert len(letters) == len(stored) and all(b'"type":"io.nats.jetstream.api' in b for b in stored)
                # and the decider's decision is applied: the permissions left it everything it needs
                decision = msgspec.structs.replace(forged_submit(marker), id=f"{ADDRESS.key}:1", reason="real")
                async with service_running(run_actuator, settings):
                    await (
                        clients["decider"]
                        .jetstream()
                        .publish(subjects.decisions(ADDRESS), encode(decision), headers={"Nats-Msg-Id": decision.id})
                    )
                    await wait_for(lambda: marker.exists(), timeout=15)
    finally:
        await sidecar.stop(grace=0.1)


async def _consumer(js: Any, stream: str, name: str) -> bool:
    try:
        await js.consumer_info(stream, name)
    except Exception:
        return False
    return True


async def test_a_decision_on_another_members_subject_or_without_its_id_is_dead_lettered(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "PWNED"
    js = nc.jetstream()
    other = MemberAddress("default", "other", 0)
    sidecar = await serve_local(token=ensemble_token(settings.sidecar_token, "default", "victim"), nodes=1)
    try:
        await (await js.key_value(subjects.MEMBERS_BUCKET)).put(
            ADDRESS.key, encode(record(f"127.0.0.1:{sidecar.port}"))
        )
        decision = forged_submit(marker)
        async with service_running(run_actuator, msgspec.structs.replace(settings, sidecar_token=SECRET)):
            # a body about the victim stored on another member's subject (what a reply-subject trick does)
            await js.publish(subjects.decisions(other), encode(decision), headers={"Nats-Msg-Id": decision.id})
            # on its own subject, but not published by the decider: no Nats-Msg-Id
            await js.publish(subjects.decisions(ADDRESS), encode(decision))
            await wait_for(lambda: _count(dead_letters(nc, "actuator"), 2), timeout=15)
        letters = await dead_letters(nc, "actuator")
        assert "refused as a forgery" in letters[0].error and "Nats-Msg-Id" in letters[1].error
        assert not marker.exists()
    finally:
        await sidecar.stop(grace=0.1)


async def _count(source: Any, count: int) -> bool:
    return len(await source) >= count


async def test_a_consumer_that_was_changed_is_set_back_at_start(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    # the actuator's consumer, rewritten to deliver every subject and redeliver for ever
    await js.add_consumer(
        subjects.DECISIONS_STREAM,
        ConsumerConfig(durable_name="actuator", ack_policy="explicit", deliver_policy="all", max_deliver=-1),
    )
    async with service_running(run_actuator, settings):
        await asyncio.sleep(1)
        info = await js.consumer_info(subjects.DECISIONS_STREAM, "actuator")
    assert info.config.filter_subject == subjects.ALL_DECISIONS
    assert info.config.max_deliver == natsio.MAX_DELIVER + 5


NESTED = "[" * 1000 + "]" * 1000


def poison(valid: bytes) -> bytes:
    """``valid`` with an unknown field nested 1,000 deep: 6 KB that once made the decoder raise RecursionError."""
    return json.dumps({**json.loads(valid), "junk": "@nested@"}).replace('"@nested@"', NESTED).encode()


def snapshot(seq: int) -> Metrics:
    return Metrics(
        namespace=ADDRESS.namespace, ensemble=ADDRESS.ensemble, member=0, seq=seq, time=time.time(), size=1,
        nodes=NodeCounts(node_up_count=1, node_free_count=0, node_cores_up=1, node_cores_free=0),
        queue=QueueCounts(run=1),  # busy: the decider's own algorithm has no reason to terminate it meanwhile
    )  # fmt: skip


async def test_messages_nested_too_deeply_are_dead_lettered_and_more_than_a_batch_of_good_ones_follows(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    small = msgspec.structs.replace(settings, fetch_batch=4, decider_batch=4, sidecar_token=SECRET)
    sidecar = await serve_local(token=ensemble_token(SECRET, "default", "victim"), nodes=1, max_nodes=20)
    try:
        members = await js.key_value(subjects.MEMBERS_BUCKET)
        await members.put(ADDRESS.key, encode(record(f"127.0.0.1:{sidecar.port}")))
        # a member record nested too deeply: the decider's member cache and the poller skip it
        await members.put("default.poison.0", poison(encode(record("127.0.0.1:1"))))
        async with service_running(run_decider, small), service_running(run_actuator, small) as actuator:
            for seq in range(6):
                await js.publish(subjects.metrics(ADDRESS), poison(encode(snapshot(seq))))
                bad = msgspec.structs.replace(forged_submit(Path("/nonexistent")), id=f"{ADDRESS.key}:p{seq}")
                await js.publish(subjects.decisions(ADDRESS), poison(encode(bad)), headers={"Nats-Msg-Id": bad.id})
            for seq in range(10):  # more than two batches of good ones after the poison
                await js.publish(subjects.metrics(ADDRESS), encode(snapshot(seq)))
                good = Decision(
                    namespace=ADDRESS.namespace, ensemble=ADDRESS.ensemble, member=0, id=f"{ADDRESS.key}:g{seq}",
                    time=time.time(), based_on=seq, action="scale", size=seq + 2, reason="good",
                )  # fmt: skip
                await js.publish(subjects.decisions(ADDRESS), encode(good), headers={"Nats-Msg-Id": good.id})
            applied = lambda: stream_bodies(nc, subjects.EVENTS_STREAM, subjects.applied(ADDRESS))  # noqa: E731
            await wait_for(lambda: _count(applied(), 10), timeout=30)  # (the decider adds its own decisions)
            await wait_for(lambda: _count(dead_letters(nc, "decider"), 6), timeout=15)
            decider = await js.key_value(subjects.DECIDER_BUCKET)
            await wait_for(lambda: _last_seq(decider, 9), timeout=15)
            assert not actuator.done()
        assert len(await dead_letters(nc, "actuator")) == 6
        letters = [letter.error for letter in await dead_letters(nc, "decider")]
        assert all("nested too deeply" in error for error in letters), letters
        ours = [a for a in (msgspec.json.decode(b, type=Applied) for b in await applied()) if ":g" in a.decision]
        assert [(a.decision, a.ok) for a in ours] == [(f"{ADDRESS.key}:g{seq}", True) for seq in range(10)], [
            a.error for a in ours if not a.ok
        ]
    finally:
        await sidecar.stop(grace=0.1)


async def _last_seq(bucket: Any, seq: int) -> bool:
    with contextlib.suppress(Exception):
        entry = await bucket.get(ADDRESS.key)
        return bool(json.loads(entry.value)["last_seq"] == seq)
    return False


class HostileSidecar(pb_grpc.EnsembleOperatorServicer):
    """A sidecar (whose image an Ensemble's author chooses) answering with a status nested too deeply."""

    async def RequestStatus(self, request: pb.StatusRequest, context: Any) -> pb.Response:
        return pb.Response(payload='{"nodes": {}, "queue": {}, "junk": ' + NESTED + "}", status=pb.Response.SUCCESS)

    async def WatchStatus(self, request: pb.StatusRequest, context: Any) -> AsyncIterator[pb.Response]:
        while True:
            yield await self.RequestStatus(request, context)
            await asyncio.sleep(0.2)


async def test_two_ensembles_at_one_endpoint_each_get_their_own_client() -> None:
    # ensemble "victim" had a member at a pod IP; its pod went, and another ensemble's sidecar now has that
    # address: the actuator must present that ensemble's token there, never the first one's (a client cached
    # by endpoint alone handed the new sidecar the victim's token and failed the new ensemble's calls for good)
    driver = LocalDriver(SECRET, timeout=5)
    first = await serve_local(token=ensemble_token(SECRET, "default", "victim"), nodes=2)
    port = first.port
    endpoint = f"127.0.0.1:{port}"
    victim = record(endpoint)
    other = msgspec.structs.replace(victim, ensemble="other", name="other-0")
    try:
        assert await driver.size(victim) == 2
    finally:
        await first.stop(grace=0.1)
    second = await serve_local(port=port, token=ensemble_token(SECRET, "default", "other"), nodes=3)
    try:
        assert await driver.size(other) == 3  # its own token, although the victim's client is still cached
        with pytest.raises(DriverError, match="refused our token"):
            await driver.size(victim)  # a stale record of the victim: refused there, and nothing done
        assert await driver.size(other) == 3  # and the other ensemble's calls still work
        assert len({id(driver.client(m)) for m in (victim, other)}) == 2
    finally:
        await driver.close()
        await second.stop(grace=0.1)


async def test_a_hostile_sidecar_cannot_kill_the_poller(nc: Client, settings: Settings) -> None:
    server = aio.server()
    pb_grpc.add_EnsembleOperatorServicer_to_server(HostileSidecar(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    good = await serve_local(token=ensemble_token(SECRET, "default", "victim"), nodes=2)
    js = nc.jetstream()
    try:
        members = await js.key_value(subjects.MEMBERS_BUCKET)
        await members.put(ADDRESS.key, encode(record(f"127.0.0.1:{port}")))
        async with service_running(run_poller, msgspec.structs.replace(settings, sidecar_token=SECRET)) as poller:
            events = lambda: stream_bodies(nc, subjects.EVENTS_STREAM, subjects.events(ADDRESS))  # noqa: E731
            await wait_for(lambda: _count(events(), 1), timeout=15)
            [unreachable] = [json.loads(body) for body in await events()]
            assert unreachable["event"] == "unreachable" and "nested too deeply" in unreachable["message"]
            # the same loop polls the member again once its record points at a real sidecar
            await members.put(ADDRESS.key, encode(record(f"127.0.0.1:{good.port}")))
            metrics = lambda: stream_bodies(nc, subjects.METRICS_STREAM, subjects.metrics(ADDRESS))  # noqa: E731
            await wait_for(lambda: _count(metrics(), 2), timeout=15)
            assert not poller.done()
    finally:
        await good.stop(grace=0.1)
        await server.stop(None)


def start_up(run: Path) -> subprocess.Popen[str]:
    """``ensemble up`` of the example, its state in ``run``."""
    return subprocess.Popen(
        [sys.executable, "-m", "ensemble_cli", "up", "examples/hello-world.yaml", "--quiet", "--logs", str(run),
         "--timeout", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


async def test_ensemble_ups_nats_refuses_a_client_without_the_runs_credentials(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = start_up(run)
    try:
        deadline = time.monotonic() + 30
        while (url := nats_url(run / "ports")) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert url is not None
        # another user of the machine finds the port: without this run's credentials it gets nowhere
        for attempt in (url, url.replace("://", "://decider:guess@"), url.replace("://", "://monitor:@")):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(attempt, allow_reconnect=False, connect_timeout=3)
        # and the files that hold the credentials and the port are this user's only
        assert oct(run.stat().st_mode & 0o777) == "0o700"
        assert oct((run / "nats-auth.conf").stat().st_mode & 0o777) == "0o600"
        assert oct((run / "ports").stat().st_mode & 0o777) == "0o700"
        output, _ = await asyncio.to_thread(process.communicate, None, 150)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "│      0 │   11 │        11 │      0 │" in output


def sidecar_as(user: int, token: str) -> subprocess.Popen[str]:
    """A local sidecar run as ``user`` (on a Python that user may run)."""
    site = os.pathsep.join([str(REPO), *(p for p in sys.path if p.endswith("site-packages"))])
    return subprocess.Popen(
        [*python_for(user), "-m", "sidecar", "--backend", "local", "--port", "0", "--nodes", "1"],
        env={**os.environ, "PYTHONPATH": site, "ENSEMBLE_SIDECAR_TOKEN": token, "HOME": "/"},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, user=user, cwd="/",
    )  # fmt: skip


async def test_a_local_job_cannot_read_the_sidecars_token_from_its_parents_environment(tmp_path: Path) -> None:
    """The job and the sidecar are one user (not root, whom nothing stops): the sidecar is non-dumpable, so
    ``/proc/<sidecar>/environ`` is not the job's to read."""
    token = "a-token-no-job-may-read"
    process = sidecar_as(NOBODY, token)
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30))
        async with SidecarClient(f"127.0.0.1:{port}", token) as client:
            steal = JobSpec(name="steal", command="sh -c 'cat /proc/$PPID/environ; echo status=$?'")
            await client.action("submit", SubmitPayload(jobs=[steal]), SubmitResult)
            await wait_for(lambda: _finished(client), timeout=15)
            [job] = await client.action("jobinfo", {}, list[JobInfo])
    finally:
        process.terminate()
        process.wait(10)
    assert token not in job.output and "ENSEMBLE_SIDECAR_TOKEN" not in job.output
    assert "Permission denied" in job.output and "status=1" in job.output, job.output


async def _finished(client: SidecarClient) -> bool:
    return (await client.status()).finished == 1


async def test_jobinfo_of_many_jobs_with_large_outputs_stays_small_and_pages_through_all() -> None:
    running = await serve_local(token="t", nodes=8, max_nodes=8)
    try:
        async with SidecarClient(f"127.0.0.1:{running.port}", "t", timeout=30) as client:
            loud = JobSpec(name="loud", command="sh -c 'head -c 65536 /dev/zero | tr \\\\000 x'", count=300)
            await client.action("submit", SubmitPayload(jobs=[loud]), SubmitResult)
            await wait_for(lambda: _all_finished(client, 300), timeout=90)
            listed = await client.action("jobinfo", {}, list[JobInfo])
            size = len(msgspec.json.encode(listed))
            pages = [await client.action("jobinfo", {"offset": k, "limit": 128}, list[JobInfo]) for k in (0, 128, 256)]
            one = await client.action("jobinfo", {"id": listed[0].id}, JobInfo)
    finally:
        await running.stop(grace=0.1)
    # 300 × 64 KiB of output once made a 113 MiB answer; a listing carries each output's tail only
    assert len(listed) == 300 and size < 2 * 1024 * 1024, size
    assert all(len(job.output) <= 2048 and job.success for job in listed)
    assert [len(page) for page in pages] == [128, 128, 44]
    assert len({job.id for page in pages for job in page}) == 300
    assert len(one.output) == 65536  # one job's own query: its whole kept output


async def _all_finished(client: SidecarClient, count: int) -> bool:
    return (await client.status()).finished == count
