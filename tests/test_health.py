"""Every service serves /healthz, /readyz and /metrics when ENSEMBLE_HEALTH_PORT is set."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request

from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def test_ready_once_connected_and_metrics_exposed(nats_url: str) -> None:
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220  (the service as a real process)
        [sys.executable, "-m", "ensemble_cli", "decider"],
        env={"ENSEMBLE_NATS_URL": nats_url, "ENSEMBLE_HEALTH_PORT": str(port), "PATH": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=20)
        assert get(port, "/healthz") == (200, "ok\n")
        status, text = get(port, "/metrics")
        assert status == 200 and "ensemble_ready 1.0" in text and "ensemble_messages_total" in text
        assert get(port, "/nope")[0] == 404
    finally:
        process.terminate()
        process.wait(timeout=15)


async def test_not_ready_while_nats_is_unreachable() -> None:
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220  (the service as a real process)
        [sys.executable, "-m", "ensemble_cli", "decider"],
        env={"ENSEMBLE_NATS_URL": f"nats://127.0.0.1:{free_port()}", "ENSEMBLE_HEALTH_PORT": str(port), "PATH": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=20)
        assert get(port, "/readyz")[0] == 503
    finally:
        process.kill()
        process.wait(timeout=15)
