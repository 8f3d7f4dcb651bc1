"""Health, readiness and Prometheus metrics over HTTP for every service.

``GET /healthz`` answers 200 while the process's event loop is responsive (it beats at least every
``STALL_SECONDS``); ``GET /readyz`` answers 200 once the service called :func:`mark_ready` (connected
to NATS, streams declared) and while it is healthy; ``GET /metrics`` is the Prometheus exposition of
this process's registry. The server runs in a daemon thread (the standard library's WSGI server),
so a blocked event loop still gets a 503 rather than a hang.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, make_wsgi_app

#: Seconds without an event-loop heartbeat after which /healthz reports the process stuck.
STALL_SECONDS = 30.0

MESSAGES = Counter("ensemble_messages_total", "Messages handled by a consume loop, by outcome", ["service", "outcome"])
DEADLETTERS = Counter("ensemble_deadletters_total", "Messages sent to the dead-letter subject", ["service"])
READY = Gauge("ensemble_ready", "1 when the service is ready")
#: Labels of the per-ensemble metrics. Not ``namespace``: Prometheus gives every series of a scraped pod its
#: own ``namespace`` label (the operator's), which would rename ours to ``exported_namespace``.
ENSEMBLE_LABELS = ("ensemble_namespace", "ensemble")
#: No ``service`` label: each process is one service (Prometheus tells them apart by their target's labels,
#: ``container`` in Kubernetes), and a scraped ``service`` would clash with the target's own.
SIDECAR_ERRORS = Counter(
    "ensemble_sidecar_errors_total",
    "Calls to a member's sidecar that failed (the poller's and the actuator's), by kind (unavailable: no answer "
    "or no connection; refused: the sidecar answered with an error)",
    [*ENSEMBLE_LABELS, "kind"],
)

_state = {"ready": False, "beat": time.monotonic()}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def mark_ready(ready: bool = True) -> None:
    """Declare the service ready (or not) for ``/readyz``."""
    _state["ready"] = ready
    READY.set(1 if ready else 0)


def healthy() -> bool:
    """Whether the event loop beat recently."""
    return time.monotonic() - float(_state["beat"]) < STALL_SECONDS


async def heartbeat(interval: float = 1.0) -> None:
    """Beat for ``/healthz`` until cancelled (run it as a task on the service's event loop)."""
    while True:
        _state["beat"] = time.monotonic()
        await asyncio.sleep(interval)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a log line
        return


def _app() -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok = healthy()
        elif path == "/readyz":
            ok = healthy() and bool(_state["ready"])
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /healthz, /readyz and /metrics are served\n"]
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"not ready\n"]

    return app


def serve(port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve the three endpoints on ``host:port`` (port 0: any free port) in a daemon thread."""
    server = make_server(host, port, _app(), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
