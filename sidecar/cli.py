"""``ensemble sidecar``: run the gRPC sidecar in front of a job queue until SIGTERM / SIGINT.

The token comes from the environment variable ``ENSEMBLE_SIDECAR_TOKEN`` (never from the command
line, where other users could read it); unset or empty means no authentication. With ``--port 0``
the bound port is printed as the first line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from sidecar.queue import QueueError
from sidecar.server import serve_local

TOKEN_ENV = "ENSEMBLE_SIDECAR_TOKEN"

#: Backends planned but not built yet: named so the error says so rather than "invalid choice".
_LATER = ("sim", "flux")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble sidecar",
        description="Serve the EnsembleOperator gRPC service in front of a job queue.",
        epilog=f"Authentication: set {TOKEN_ENV}; clients then send 'authorization: Bearer <token>'.",
    )
    parser.add_argument("--backend", choices=("local", *_LATER), default="local", help="queue backend")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one")
    parser.add_argument("--nodes", type=int, default=1, help="nodes up at start (default 1)")
    parser.add_argument("--cores", type=int, default=1, help="cores per node (default 1)")
    parser.add_argument("--max-nodes", type=int, default=None, help="largest size allowed (default --nodes)")
    parser.add_argument(
        "--provision-delay", type=float, default=0.0, help="seconds before grown nodes come up (default 0)"
    )
    parser.add_argument(
        "--heartbeat", type=float, default=5.0, help="WatchStatus heartbeat interval in seconds (default 5)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar until SIGTERM or SIGINT; return the exit status (0 after a clean stop).

    Returns 2 for bad arguments (including a backend not available yet).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend in _LATER:
        print(f"ensemble sidecar: backend {args.backend!r} is not available yet (use --backend local)", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be in 0..65535, got {args.port}")
    if args.heartbeat <= 0:
        parser.error(f"--heartbeat: must be > 0, got {args.heartbeat}")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        print(
            f"ensemble sidecar: warning: {TOKEN_ENV} is not set; anyone who can reach the port can control the queue",
            file=sys.stderr,
        )
    try:
        return asyncio.run(_run(args, token))
    except QueueError as exc:
        print(f"ensemble sidecar: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, token: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await serve_local(
            host=args.host,
            port=args.port,
            token=token,
            nodes=args.nodes,
            cores=args.cores,
            max_nodes=args.max_nodes,
            provision_delay=args.provision_delay,
            heartbeat=args.heartbeat,
        )
    except RuntimeError as exc:
        print(f"ensemble sidecar: {exc}", file=sys.stderr)
        return 1
    print(running.port, flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("stopping: signal received")
    await running.stop()
    return 0
