"""The sidecar's gRPC server (grpc.aio): the ``EnsembleOperator`` service in front of a backend.

Answers carry JSON payloads. A refused request answers ``ERROR`` (or ``DENIED`` once the queue is
terminated) with ``{"error": "<field>: <why>"}``; a bad request never crashes or blocks the server.

Actions of ``RequestAction``:

* ``submit`` — :class:`~ensemble_core.wire.SubmitPayload` → :class:`~ensemble_core.wire.SubmitResult`.
* ``jobinfo`` — ``{"id": n}`` → one :class:`~ensemble_core.wire.JobInfo`; ``{"offset": k, "limit": m}`` →
  at most ``m`` (≤ :data:`JOBINFO_LIMIT`) jobs in submit order from the ``k``-th, to page through them
  all; no payload → the :data:`JOBINFO_LIMIT` most recently submitted jobs, oldest first. A listing
  carries the last :data:`LIST_OUTPUT` characters of each job's output (its own query, all that is
  kept), so an answer stays a few MB whatever the jobs printed.
* ``grow`` / ``shrink`` — :class:`~ensemble_core.wire.ResizePayload` →
  :class:`~ensemble_core.wire.ResizeResult`. The size is absolute: grow below / shrink above the
  current size is an error, the current size itself a no-op.
* ``cancel`` — ``{"group": name}`` → ``{"cancelled": n}``: the group's jobs that have not finished,
  waiting and running (running ones are killed).
* ``terminate`` — stop placing work; the size goes to 0 as running jobs end → ``ResizeResult``.
* ``resetCounter`` — accepted for compatibility with the original sidecar; no effect → ``{}``.

``RequestUpdate`` is reserved: it accepts anything and answers ``SUCCESS`` with ``{}``.
``WatchStatus`` streams a status snapshot at once, then on every change (at most one per
``min_interval`` seconds) and at least every ``heartbeat`` seconds.

With a token, every call of the service needs the metadata ``authorization: Bearer <token>``, else
it fails ``UNAUTHENTICATED``; the health and reflection services stay open.

While the backend cannot answer (the ``flux`` backend lost Flux and is reconnecting), every call of the
service fails ``UNAVAILABLE`` with the reason, a ``WatchStatus`` stream ends the same way, and the
gRPC health of the service (and of ``""``) is ``NOT_SERVING`` until it can again.

Test hook: ``call_delay`` (``ensemble sidecar --test-delay-file``) makes every call, and every
``WatchStatus`` snapshot, wait that many seconds first, so a fault test can make a sidecar slow.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeAlias, TypeVar

import grpc
import msgspec
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # the stubs lack the aio servicer
from grpc_reflection.v1alpha import reflection

from ensemble_core.messages import decode
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.tokens import status_token
from ensemble_core.wire import EndedRequest, ResizePayload, SubmitPayload
from sidecar.backend import SHRINK_GRACE, Backend
from sidecar.local import LocalBackend
from sidecar.queue import QueueError, QueueTerminated, QueueUnavailable

log = logging.getLogger(__name__)

#: Most jobs one ``jobinfo`` lists (a page, or without one the most recent jobs).
JOBINFO_LIMIT = 1000
#: Characters of each job's output a listing carries (the tail): 1,000 jobs stay about 2.5 MB.
LIST_OUTPUT = 2048

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnsembleOperator"].full_name

#: Services reachable without the token: probes and tooling need no secret.
_OPEN_SERVICES = (
    f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/",
    f"/{reflection.SERVICE_NAME}/",
    "/grpc.reflection.v1.ServerReflection/",
)

_encoder = msgspec.json.Encoder()
_T = TypeVar("_T")
Status: TypeAlias = pb.Response.ResultType.ValueType


class JobInfoRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``jobinfo`` payload: one job by ``id``, a page (``offset``, ``limit``), or (neither) the most recent jobs."""

    id: int | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=JOBINFO_LIMIT)] = JOBINFO_LIMIT


class CancelPayload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``cancel`` payload: the job group whose waiting jobs to cancel."""

    group: str


class _Refused(Exception):
    """A request answered with ``ERROR`` and this message."""


def _reply(payload: Any, status: Status = pb.Response.SUCCESS) -> pb.Response:
    return pb.Response(payload=_encoder.encode(payload).decode(), status=status)


def _error(message: str, status: Status = pb.Response.ERROR) -> pb.Response:
    return _reply({"error": message}, status)


def _decode(payload: str, kind: type[_T], action: str, *, optional: bool = False) -> _T:
    """Decode an action's JSON payload; :class:`_Refused` with msgspec's message (which names the field)."""
    if not payload.strip():
        if optional:
            return kind()
        raise _Refused(f"payload: {action} needs a JSON object")
    try:
        return decode(payload, kind)
    except msgspec.ValidationError as exc:
        raise _Refused(f"payload: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _Refused(f"payload: not valid JSON: {exc}") from None


class SidecarServicer(pb_grpc.EnsembleOperatorServicer):
    """The ``EnsembleOperator`` service over a :class:`~sidecar.backend.Backend`."""

    def __init__(
        self,
        backend: Backend,
        *,
        heartbeat: float = 5.0,
        min_interval: float = 0.1,
        call_delay: Callable[[], float] | None = None,
    ) -> None:
        """``heartbeat``: longest gap between WatchStatus snapshots; ``min_interval``: shortest;
        ``call_delay``: the test hook's seconds to wait before each answer (None: none)."""
        self.backend = backend
        self.heartbeat = heartbeat
        self.min_interval = min_interval
        self.call_delay = call_delay
        self._actions: dict[str, Callable[[str], Awaitable[pb.Response]]] = {
            "submit": self._submit,
            "jobinfo": self._jobinfo,
            "grow": self._grow,
            "shrink": self._shrink,
            "cancel": self._cancel,
            "terminate": self._terminate,
            "resetCounter": self._reset_counter,
            "ended": self._ended,
        }

    async def RequestStatus(self, request: pb.StatusRequest, context: Any) -> pb.Response:
        """The status snapshot as JSON (:class:`~ensemble_core.wire.StatusPayload`), ``SUCCESS``."""
        await self._delay()
        try:
            return self._status()
        except QueueUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises

    async def RequestAction(self, request: pb.ActionRequest, context: Any) -> pb.Response:
        """Run one action (see the module docstring); refusals answer ``ERROR`` / ``DENIED``."""
        await self._delay()
        handler = self._actions.get(request.action)
        if handler is None:
            known = ", ".join(sorted(self._actions))
            return _error(f"action: unknown action {request.action!r} (known: {known})")
        try:
            return await handler(request.payload)
        except QueueUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises
        except _Refused as exc:
            return _error(str(exc))
        except QueueTerminated as exc:
            return _error(str(exc), pb.Response.DENIED)
        except QueueError as exc:
            return _error(str(exc))
        except Exception:
            # The server keeps serving; the details go to the log, not to the client.
            log.exception("action %r failed", request.action)
            return _error(f"action: {request.action} failed inside the sidecar (see its log)")

    async def RequestJobs(self, request: pb.ActionRequest, context: Any) -> pb.Response:
        """The jobs that ended after the ``after``-th end (:class:`~ensemble_core.wire.EndedResult`); a read."""
        await self._delay()
        try:
            return await self._ended(request.payload)
        except QueueUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises
        except (_Refused, QueueError) as exc:
            return _error(str(exc))

    async def RequestUpdate(self, request: pb.UpdateRequest, context: Any) -> pb.Response:
        """Reserved: accepts any payload, changes nothing, answers ``SUCCESS`` with ``{}``."""
        await self._delay()
        return _reply({})

    async def WatchStatus(self, request: pb.StatusRequest, context: Any) -> AsyncIterator[pb.Response]:
        """Stream snapshots: one now, one after each change (coalesced), a heartbeat when idle.

        Ends when the client cancels or the server stops.
        """
        changed = asyncio.Event()
        self.backend.add_listener(changed.set)
        try:
            while True:
                await self._delay()
                changed.clear()
                try:
                    snapshot = self._status()
                except QueueUnavailable as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                    raise  # unreachable: abort raises
                yield snapshot
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(self.heartbeat):  # not wait_for: it can swallow a cancel (3.11)
                        await changed.wait()
                except TimeoutError:
                    continue
                # Coalesce a burst of changes into one snapshot.
                await asyncio.sleep(max(0.0, sent + self.min_interval - time.monotonic()))
        finally:
            self.backend.remove_listener(changed.set)

    async def _delay(self) -> None:
        seconds = self.call_delay() if self.call_delay is not None else 0.0
        if seconds > 0:
            await asyncio.sleep(seconds)

    # -- actions ---------------------------------------------------------------------------------

    def _status(self) -> pb.Response:
        return _reply(self.backend.status())

    async def _submit(self, payload: str) -> pb.Response:
        return _reply(await self.backend.submit(_decode(payload, SubmitPayload, "submit")))

    async def _jobinfo(self, payload: str) -> pb.Response:
        wanted = _decode(payload, JobInfoRequest, "jobinfo", optional=True)
        if wanted.id is not None:
            return _reply(await self.backend.job_info(wanted.id))
        if wanted.offset is not None:
            listed = await self.backend.job_page(wanted.offset, wanted.limit)
        else:
            listed = await self.backend.recent_jobs(wanted.limit)
        return _reply([msgspec.structs.replace(job, output=job.output[-LIST_OUTPUT:]) for job in listed])

    async def _ended(self, payload: str) -> pb.Response:
        wanted = _decode(payload, EndedRequest, "ended", optional=True)
        result = await self.backend.ended(wanted.after, wanted.limit)
        result.jobs = [msgspec.structs.replace(job, output=job.output[-LIST_OUTPUT:]) for job in result.jobs]
        return _reply(result)

    async def _grow(self, payload: str) -> pb.Response:
        return _reply(await self.backend.grow(_decode(payload, ResizePayload, "grow").size))

    async def _shrink(self, payload: str) -> pb.Response:
        return _reply(await self.backend.shrink(_decode(payload, ResizePayload, "shrink").size))

    async def _cancel(self, payload: str) -> pb.Response:
        return _reply({"cancelled": await self.backend.cancel(_decode(payload, CancelPayload, "cancel").group)})

    async def _terminate(self, payload: str) -> pb.Response:
        return _reply(await self.backend.terminate())

    async def _reset_counter(self, payload: str) -> pb.Response:
        return _reply({})


class TokenInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]  # one interceptor for every method type
    """Refuses calls without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED``.

    Calls to the health and reflection services pass without the token.
    """

    def __init__(self, token: str) -> None:
        """Accept ``Bearer <token>`` for every call and ``Bearer <status token>`` for the status calls only
        (compared in constant time)."""
        self._expected = f"Bearer {token}".encode()
        self._status = f"Bearer {status_token(token)}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        """Pass authorized and open calls on; answer the others with an aborting handler."""
        method = handler_call_details.method
        granted = self._granted(handler_call_details)
        if method.startswith(_OPEN_SERVICES) or granted == "all" or (granted == "status" and method in _STATUS_METHODS):
            return await continuation(handler_call_details)
        log.warning("call refused method=%s token=%s", method, granted or "missing or wrong")
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        deny, deny_stream = (_deny_readonly, _deny_readonly_stream) if granted == "status" else (_deny, _deny_stream)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)

    def _granted(self, details: grpc.HandlerCallDetails) -> str:
        """``all`` for the token, ``status`` for the status token, ``""`` otherwise."""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value.encode()
                if hmac.compare_digest(presented, self._expected):
                    return "all"
                if hmac.compare_digest(presented, self._status):
                    return "status"
                return ""
        return ""


_DENIED = "missing or wrong token: send metadata 'authorization: Bearer <token>'"
_READONLY = (
    "the status token reads the status and ended jobs only (RequestStatus, WatchStatus, RequestJobs); "
    "actions need the ensemble's token"
)
#: The methods the status token opens.
_STATUS_METHODS = tuple(f"/{SERVICE_NAME}/{name}" for name in ("RequestStatus", "WatchStatus", "RequestJobs"))


async def _deny(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield None  # unreachable: makes this an async generator, the shape of a streaming handler


async def _deny_readonly(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, _READONLY)


async def _deny_readonly_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, _READONLY)
    yield None  # unreachable, as above


@dataclass
class RunningServer:
    """A started sidecar: its bound ``port``, the gRPC server and the backend behind it."""

    server: aio.Server
    port: int
    backend: Backend
    health: Any

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting calls, give open calls ``grace`` seconds, then close the backend (jobs die)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.backend.aclose()

    async def wait(self) -> None:
        """Return when the server has stopped."""
        await self.server.wait_for_termination()


class ServerTls(NamedTuple):
    """The sidecar's TLS certificate chain and private key (PEM)."""

    chain: bytes
    key: bytes


async def serve(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    heartbeat: float = 5.0,
    call_delay: Callable[[], float] | None = None,
    tls: ServerTls | None = None,
) -> RunningServer:
    """Start the sidecar service (plus health and reflection) for ``backend`` on ``host:port``.

    ``port`` 0 binds a free port (see ``RunningServer.port``). ``token`` (None or empty: no
    authentication) is required from every caller of the service. ``tls``: serve TLS only, with this
    certificate chain and key. ``call_delay`` is the test hook (see the module docstring). Raises
    ``RuntimeError`` when the address cannot be bound.
    """
    interceptors = [TokenInterceptor(token)] if token else []
    server = aio.server(interceptors=interceptors)
    servicer = SidecarServicer(backend, heartbeat=heartbeat, call_delay=call_delay)
    pb_grpc.add_EnsembleOperatorServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.chain)]))
    if bound == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    await _set_serving(health, True)  # a backend is given connected and able to answer
    health_updates: set[asyncio.Task[None]] = set()

    def on_health(problem: str | None) -> None:
        if problem is not None:
            log.error("not serving: %s", problem)
        task = asyncio.create_task(_set_serving(health, problem is None))
        health_updates.add(task)
        task.add_done_callback(health_updates.discard)

    backend.add_health_listener(on_health)
    log.info(
        "sidecar listening address=%s port=%d auth=%s tls=%s",
        host, bound, "token" if token else "none", "on" if tls else "off",
    )  # fmt: skip
    return RunningServer(server=server, port=bound, backend=backend, health=health)


async def _set_serving(health: Any, serving: bool) -> None:
    state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set("", state)
    await health.set(SERVICE_NAME, state)


def delay_from_file(path: Path) -> Callable[[], float]:
    """The test hook's delay, read from ``path`` at each call: its seconds (missing, empty, not a number: 0)."""

    def delay() -> float:
        try:
            return float(path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    return delay


async def serve_local(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    nodes: int = 1,
    cores: int = 1,
    max_nodes: int | None = None,
    provision_delay: float = 0.0,
    heartbeat: float = 5.0,
    shrink_grace: float = SHRINK_GRACE,
) -> RunningServer:
    """Start a sidecar with a :class:`~sidecar.local.LocalBackend` (see :func:`serve`)."""
    backend = LocalBackend(
        nodes=nodes, cores=cores, max_nodes=max_nodes, provision_delay=provision_delay, shrink_grace=shrink_grace
    )
    return await serve(backend, host=host, port=port, token=token, heartbeat=heartbeat)
