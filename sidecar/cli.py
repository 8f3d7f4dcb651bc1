"""``ensemble sidecar``: run the gRPC sidecar in front of a job queue until SIGTERM / SIGINT.

Backends: ``local`` (real subprocess jobs on virtual nodes), ``sim`` (the same queue on a virtual
clock following wall time times ``--speed``) and ``flux`` (the Flux instance at ``FLUX_URI``, reached
through a helper run by ``flux python``; see :mod:`sidecar.flux`).
The token comes from the environment variable ``ENSEMBLE_SIDECAR_TOKEN`` (never from the command
line, where other users could read it); unset or empty means no authentication. With ``--port 0``
the bound port is printed as the first line of stdout. ``--state-dir`` (local backend) journals the
queue there and replays it on start, so a restarted sidecar keeps its jobs (see ``sidecar.local``).
``--tls-cert`` and ``--tls-key`` serve TLS only (the poller and actuator then need ``ENSEMBLE_SIDECAR_CA``).
``--shrink-grace`` (local and flux backends) is how long a job may keep running on a node a shrink gave
up before it is killed and reported lost (default 600 s; 0: never).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ensemble_core import flags
from ensemble_core.hardening import make_private
from sidecar.backend import SHRINK_GRACE, Backend
from sidecar.local import JournalBusy, LocalBackend
from sidecar.queue import QueueError
from sidecar.server import ServerTls, delay_from_file, serve
from sidecar.sim import SimBackend, SimQueue, TraceError, load_trace

TOKEN_ENV = "ENSEMBLE_SIDECAR_TOKEN"
#: Set by Kubernetes in every container of an Indexed Job's pod: the pod's completion index (Flux rank).
INDEX_ENV = "JOB_COMPLETION_INDEX"
#: Where a container leaves its termination message (Kubernetes' default terminationMessagePath).
TERMINATION_LOG = Path("/dev/termination-log")


class BackendUnavailable(Exception):
    """The chosen backend cannot run in this environment; the message says why and what to do."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble sidecar",
        description="Serve the EnsembleOperator gRPC service in front of a job queue.",
        epilog=f"Authentication: set {TOKEN_ENV}; clients then send 'authorization: Bearer <token>'.",
    )
    parser.add_argument("--backend", choices=("local", "sim", "flux"), default="local", help="queue backend")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=flags.integer(0, 65535), required=True, help="port to listen on; 0 picks a free one"
    )
    parser.add_argument(
        "--nodes",
        type=flags.integer(0),
        default=None,
        help="nodes up at start (default 1); flux: the ranks the member may use at start (default: keep "
        "what Flux has — the partition's ranks this member has not drained)",
    )
    parser.add_argument("--cores", type=flags.integer(1), default=1, help="cores per node (default 1)")
    parser.add_argument(
        "--max-nodes", type=flags.integer(1), default=None, help="largest size allowed (default --nodes)"
    )
    parser.add_argument(
        "--shrink-grace",
        type=flags.seconds(),
        default=None,
        metavar="SECONDS",
        help=f"local and flux: seconds a job may go on running on a node a shrink gave up; then it is killed and "
        f"reported lost (default {SHRINK_GRACE:g}; 0: never)",
    )
    parser.add_argument(
        "--provision-delay",
        type=flags.seconds_list,
        default=[0.0],
        help="seconds before grown nodes come up (default 0); sim: a comma-separated list to draw from",
    )
    parser.add_argument(
        "--output-dir",
        default="",
        help="write each attempt's stdout and stderr to <dir>/<group>/<index>.<attempt>.out and .err (local and "
        "flux; flux: a directory the job's first node writes to); default: the last 64 KiB kept in memory "
        "(local) or Flux's KVS (flux)",
    )
    local = parser.add_argument_group("local backend")
    local.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="journal the queue in this directory and replay it on start: a restarted sidecar keeps its jobs",
    )
    flux = parser.add_argument_group("flux backend")
    flux.add_argument(
        "--flux", default="flux", help="the flux command whose Python runs the helper (default: flux from PATH)"
    )
    flux.add_argument("--flux-uri", default=None, help="the broker to use (default: FLUX_URI)")
    flux.add_argument(
        "--ranks", default=None, help="the member's partition: an idset of ranks it may use (default: every rank)"
    )
    flux.add_argument("--member", default="", help="tag of the member's jobs and drains (members sharing an instance)")
    flux.add_argument(
        "--job-workdir", default="", help="working directory of jobs that name none (default: the broker's)"
    )
    flux.add_argument(
        "--wait-for-broker",
        type=flags.seconds(forever=True),
        default=0.0,
        help="seconds to wait at start for a broker whose socket is not there yet (default 0)",
    )
    flux.add_argument(
        "--release-on-exit", action="store_true", help="undrain the ranks this member drained when the sidecar stops"
    )
    parser.add_argument(
        "--serve-on-index",
        type=flags.integer(0),
        default=None,
        help="serve only in the pod whose JOB_COMPLETION_INDEX is this (a MiniCluster's lead broker: 0); in the "
        "others wait idle until stopped. Without JOB_COMPLETION_INDEX in the environment: serve",
    )
    sim = parser.add_argument_group("sim backend")
    sim.add_argument(
        "--speed", type=flags.positive_number(), default=1.0, help="virtual seconds per wall second (default 1)"
    )
    sim.add_argument("--trace", default=None, help="Flux job records (JSON Lines or a jobs dump) giving run times")
    sim.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    sim.add_argument(
        "--default-duration",
        type=flags.seconds(),
        default=None,
        help="run time of jobs without a duration and no trace",
    )
    parser.add_argument(
        "--heartbeat",
        type=flags.seconds(positive=True),
        default=5.0,
        help="WatchStatus heartbeat interval in seconds (default 5)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="serve TLS with this PEM certificate (chain); needs --tls-key"
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="the PEM private key of --tls-cert")
    parser.add_argument(
        "--test-delay-file",
        type=Path,
        default=None,
        help="test hook: every call first waits the seconds written in this file (none or empty: no wait)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar until SIGTERM or SIGINT; return the exit status (0 after a clean stop).

    Returns 2 for bad arguments (a bad trace file included) and 1 when the backend or the address is
    unavailable (e.g. ``--backend flux`` without Flux's Python bindings).
    """
    # the token is in this process's environment, and the local backend's jobs run as the same user:
    # they must not read it from /proc/<this pid>/environ
    make_private()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.backend == "local" and len(args.provision_delay) != 1:
        parser.error("--provision-delay: the local backend takes one delay; a list is for --backend sim")
    if args.backend != "local" and args.state_dir is not None:
        parser.error("--state-dir: only the local backend keeps its queue in a state directory")
    if args.backend == "flux" and args.max_nodes is not None:
        parser.error("--max-nodes: the flux backend's largest size is its partition (--ranks)")
    if args.backend != "flux" and (args.ranks is not None or args.member or args.flux_uri or args.release_on_exit):
        parser.error("--ranks, --member, --flux-uri and --release-on-exit are options of the flux backend")
    if args.nodes is not None and args.nodes < 0:
        parser.error(f"--nodes: must be >= 0, got {args.nodes}")
    if args.shrink_grace is not None and not 0 <= args.shrink_grace < float("inf"):
        parser.error(f"--shrink-grace: must be a number of seconds >= 0, got {args.shrink_grace}")
    if args.backend == "sim" and args.shrink_grace is not None:
        parser.error("--shrink-grace: the sim backend never kills a job (its shrinks only drain)")
    if args.shrink_grace is None:
        args.shrink_grace = SHRINK_GRACE
    if args.wait_for_broker < 0:
        parser.error(f"--wait-for-broker: must be >= 0, got {args.wait_for_broker}")
    if not (args.speed > 0 and args.speed < float("inf")):
        parser.error(f"--speed: must be a number > 0, got {args.speed}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: must be in 0..65535, got {args.port}")
    if args.heartbeat <= 0:
        parser.error(f"--heartbeat: must be > 0, got {args.heartbeat}")
    nodes = 1 if args.nodes is None else args.nodes
    if args.max_nodes is not None and args.max_nodes < nodes:
        parser.error(f"argument --max-nodes: must be >= --nodes ({nodes}), got {args.max_nodes}")
    tls = _tls(parser, args.tls_cert, args.tls_key)
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
        return asyncio.run(_run(args, token, tls))
    except (QueueError, TraceError) as exc:
        print(f"ensemble sidecar: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"ensemble sidecar: {exc}", file=sys.stderr)
        _termination_message(str(exc))
        return 1


def _termination_message(text: str) -> None:
    """Leave why the sidecar could not start where Kubernetes reads a container's last words
    (``terminated.message`` in its status, which the creator quotes in the Ensemble's Failed condition)."""
    with contextlib.suppress(OSError):
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(text[:4000])


async def _backend(args: argparse.Namespace) -> Backend:
    """The backend the arguments describe (inside the running loop: backends start timers and tasks)."""
    if args.backend == "flux":
        from sidecar.flux import FluxBackend, FluxOptions, FluxUnavailable

        options = FluxOptions(
            flux=args.flux,
            uri=args.flux_uri,
            ranks=args.ranks,
            size=args.nodes,
            member=args.member,
            workdir=args.job_workdir,
            wait=args.wait_for_broker,
            release_on_exit=args.release_on_exit,
            output_dir=args.output_dir,
            shrink_grace=args.shrink_grace,
        )
        try:
            return await FluxBackend.connect(options)
        except FluxUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
    nodes = 1 if args.nodes is None else args.nodes
    if args.backend == "sim":
        sim = SimQueue(
            nodes=nodes,
            cores=args.cores,
            max_nodes=args.max_nodes,
            provision_delay=args.provision_delay,
            trace=load_trace(args.trace) if args.trace else None,
            default_duration=args.default_duration,
            seed=args.seed,
            start=time.time(),
        )
        return SimBackend(sim, speed=args.speed)
    try:
        return LocalBackend(
            nodes=nodes,
            cores=args.cores,
            max_nodes=args.max_nodes,
            provision_delay=args.provision_delay[0],
            state_dir=args.state_dir,
            output_dir=Path(args.output_dir) if args.output_dir else None,
            shrink_grace=args.shrink_grace,
        )
    except JournalBusy as exc:
        raise BackendUnavailable(str(exc)) from None
    except OSError as exc:
        raise BackendUnavailable(f"--state-dir: {exc}") from None


def _tls(parser: argparse.ArgumentParser, cert: Path | None, key: Path | None) -> ServerTls | None:
    """The certificate and key the flags name (both or neither); exits with the problem otherwise."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        parser.error("--tls-cert and --tls-key go together: give both, or neither for plaintext")
    pems = []
    for flag, path, marker in (("--tls-cert", cert, b"CERTIFICATE-----"), ("--tls-key", key, b"PRIVATE KEY-----")):
        try:
            pem = path.read_bytes()
        except OSError as exc:
            parser.error(f"{flag}: cannot read {path}: {exc.strerror}")
        if marker not in pem:
            parser.error(f"{flag}: {path} is not a PEM {'certificate' if flag == '--tls-cert' else 'private key'}")
        pems.append(pem)
    return ServerTls(chain=pems[0], key=pems[1])


async def _run(args: argparse.Namespace, token: str | None, tls: ServerTls | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    index = os.environ.get(INDEX_ENV)
    if args.serve_on_index is not None and index is not None and index.strip() != str(args.serve_on_index):
        logging.getLogger(__name__).info(
            "%s=%s: not the pod of index %d (the lead broker's), so nothing to serve here; idle until stopped",
            INDEX_ENV, index, args.serve_on_index,
        )  # fmt: skip
        await stop.wait()
        return 0
    connecting = asyncio.create_task(_backend(args))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():  # stopped while waiting for the backend (e.g. for a Flux broker)
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, BackendUnavailable):
            await connecting
        return 0
    stopping.cancel()
    backend = connecting.result()
    try:
        running = await serve(
            backend,
            host=args.host,
            port=args.port,
            token=token,
            heartbeat=args.heartbeat,
            call_delay=delay_from_file(args.test_delay_file) if args.test_delay_file else None,
            tls=tls,
        )
    except RuntimeError as exc:
        await backend.aclose()
        print(f"ensemble sidecar: {exc}", file=sys.stderr)
        return 1
    print(running.port, flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("stopping: signal received")
    await running.stop()
    return 0
