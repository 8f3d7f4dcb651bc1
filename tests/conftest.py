"""Shared fixtures: one real nats-server (JetStream, port 0, temporary store) per test session."""

from __future__ import annotations

import os

# before anything loads grpc: the tests fork+exec services and sidecars from a process using gRPC (see
# ensemble_cli/__init__.py)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import trustme
from nats.aio.client import Client
from nats.js.errors import NotFoundError, ServerError

from ensemble_cli.up import run_nats
from ensemble_core import natsio, subjects
from ensemble_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


#: Test files that share one resource beyond their own ports and directories, by the resource: under
#: pytest-xdist (``make test`` runs the suite on several workers) each group runs on one worker, in turn.
#: The Docker tests share the engine's image tag and compose project names.
XDIST_GROUPS = {"test_image.py": "docker", "test_compose.py": "docker"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = XDIST_GROUPS.get(item.path.name)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a nats-server with JetStream started for this test session."""
    workdir = tmp_path_factory.mktemp("nats")
    log = (workdir / "nats.log").open("wb")
    process, url = run_nats(workdir, output=log)
    yield url
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
def settings(nats_url: str) -> Settings:
    """Settings pointing at the session's nats-server, with a short ack wait for redelivery tests."""
    return Settings(nats_url=nats_url, sidecar_token="test-token", ack_wait=5.0)


async def reset_jetstream(nc: Client) -> None:
    """Delete every stream and bucket of the project, so each test starts from nothing."""
    js = nc.jetstream()
    for stream in (subjects.EVENTS_STREAM, subjects.METRICS_STREAM, subjects.DECISIONS_STREAM):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    for bucket in natsio.BUCKETS:
        with contextlib.suppress(NotFoundError):
            await js.delete_key_value(bucket)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A client of the session's nats-server, with empty streams and buckets declared."""
    client = await nats.connect(nats_url)
    await reset_jetstream(client)
    for attempt in range(20):
        try:
            await natsio.declare(client.jetstream())
            break
        except ServerError:
            # nats-server removes an account's store directory once its last stream is deleted, in its own
            # time: a create right after can fail with "could not create storage directory" (seen once in
            # ~600 tests); wait and declare again
            if attempt == 19:
                raise
            await asyncio.sleep(0.1)
    yield client
    await client.drain()


@pytest.fixture
async def publisher(nc: Client) -> AsyncIterator[natsio.Publisher]:
    """A started :class:`natsio.Publisher` on ``nc`` (what the decider writes with)."""
    started = natsio.Publisher(nc)
    await started.start()
    yield started
    await started.stop()


@contextlib.asynccontextmanager
async def service_running(
    run: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]], settings: Settings
) -> AsyncIterator[asyncio.Task[None]]:
    """A service's ``run(settings, stop)`` in-process until the block ends; then stopped, drained and awaited."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def tls_files(directory: Path, *names: str) -> Path:
    """A server certificate for ``names`` from a new test CA, written as ``tls.crt``, ``tls.key`` and
    ``ca.crt`` in ``directory`` (the layout of a ``kubernetes.io/tls`` Secret); returns ``ca.crt``."""
    ca = trustme.CA()
    certificate = ca.issue_cert(*names)
    for blob, name in ((certificate.cert_chain_pems[0], "tls.crt"), (certificate.private_key_pem, "tls.key")):
        blob.write_to_path(str(directory / name))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    return directory / "ca.crt"


async def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Wait until ``predicate()`` (sync or async) is true, or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def stream_messages(nc: Client, stream: str, subject: str) -> list[bytes]:
    """Every message on ``subject`` in ``stream`` (read with an ephemeral ordered consumer)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out: list[bytes] = []
    if not info.state.messages:
        return out
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    with contextlib.suppress(TimeoutError):
        while True:
            msg = await sub.next_msg(timeout=0.5)
            out.append(msg.data)
    await sub.unsubscribe()
    return out


def pytest_report_header() -> list[str]:
    """Say at the top of a run what the kubectl tests will do: run with which kubectl, or skip and why."""
    from tests import kubectl_support

    path, said = kubectl_support.found()
    return [f"kubectl: {path} ({said})" if path else f"kubectl: MISSING, the manifest tests skip: {said}"]
