"""A small gRPC client of the sidecar, shared by the poller and the actuator.

It speaks the original's wire contract (so it also talks to an original sidecar) and presents the
per-ensemble token as ``authorization: Bearer <token>`` metadata when one is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
import msgspec

from ensemble_core.messages import decode
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.settings import Settings, SettingsError
from ensemble_core.wire import MAX_ENDED_PAGE, EndedRequest, EndedResult, StatusPayload, decode_status

T = TypeVar("T")

#: Longest wait for a channel to close: shutdown must not hang on a peer that stopped answering.
CLOSE_TIMEOUT = 2.0
#: Largest gRPC message accepted from a sidecar (a status with many groups, a long jobinfo).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: The name sidecar certificates are issued for. Sidecars are reached by pod IP, which changes, so the
#: client checks the certificate against this fixed name (``grpc.ssl_target_name_override``) instead.
TLS_NAME = "ensemble-sidecar"


class ClientTls(NamedTuple):
    """TLS to sidecars: the CA (PEM) that signed their certificates and the name they were issued for."""

    ca: bytes
    name: str = TLS_NAME


def client_tls(settings: Settings) -> ClientTls | None:
    """The TLS the settings ask for (``ENSEMBLE_SIDECAR_CA``), or None for plaintext.

    Raises :class:`SettingsError` naming the variable when the CA file cannot be read or holds no
    certificate (checked at start, so a service never runs half-configured).
    """
    if not settings.sidecar_ca:
        return None
    path = Path(settings.sidecar_ca)
    try:
        ca = path.read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"ENSEMBLE_SIDECAR_CA: cannot read {path}: {exc.strerror}; mount the CA certificate there "
            "or unset the variable for plaintext"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise SettingsError(f"ENSEMBLE_SIDECAR_CA: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return ClientTls(ca, settings.sidecar_tls_name)


class SidecarError(Exception):
    """The sidecar answered with an error result (``ERROR``, ``DENIED``); the message is its reason."""

    def __init__(self, action: str, status: int, message: str) -> None:
        super().__init__(f"{action}: {message}")
        self.action = action
        self.status = status


class SidecarUnimplemented(SidecarError):
    """The sidecar does not offer the RPC: an original sidecar asked for ``WatchStatus``."""


class SidecarUnavailable(Exception):
    """The sidecar could not be reached or did not answer in time (worth retrying later)."""


class SidecarClient:
    """Calls one sidecar. Use as an async context manager, or call :meth:`close`."""

    def __init__(
        self,
        endpoint: str,
        token: str = "",
        timeout: float = 5.0,
        member: str = "minicluster",
        *,
        reconnect: tuple[float, float] | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """``reconnect``: the first and the longest wait (seconds) between two attempts to connect after
        the endpoint failed, for a connection of this client's own (not shared with other clients of the
        endpoint, whose waits would apply); None: a shared connection with gRPC's waits (1 s to 2 min).
        ``tls``: speak TLS and accept only a certificate of ``tls.name`` signed by ``tls.ca``."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.member = member
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if reconnect is not None:
            first, longest = reconnect
            options += [
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", max(1, round(first * 1000))),
                ("grpc.min_reconnect_backoff_ms", max(1, round(first * 1000))),
                ("grpc.max_reconnect_backoff_ms", max(1, round(longest * 1000))),
            ]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", tls.name))
            credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca)
            self._channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        self._stub = pb_grpc.EnsembleOperatorStub(self._channel)

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (cancelling calls in flight); never waits more than ``CLOSE_TIMEOUT`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):  # not wait_for, which can swallow a cancellation (3.11)
                await self._channel.close(grace=None)

    async def status(self) -> StatusPayload:
        """One status snapshot. Raises :class:`SidecarUnavailable` or :class:`SidecarError`."""
        request = pb.StatusRequest(member=self.member)
        return await self._unary("status", self._stub.RequestStatus, request, (pb.Response.SUCCESS,), decode_status)

    async def watch(self) -> AsyncGenerator[StatusPayload, None]:
        """Status snapshots pushed by the sidecar's ``WatchStatus``: one at once, then one per change.

        Raises :class:`SidecarUnimplemented` when the sidecar has no ``WatchStatus`` (an original
        sidecar: poll :meth:`status` instead), :class:`SidecarError` when it refuses the token or sends
        an unreadable snapshot, and :class:`SidecarUnavailable` when the stream breaks or ends. The
        stream is cancelled when the generator is closed. A sidecar also sends a snapshot when idle for
        its heartbeat interval, so a caller can time out a silent stream.
        """
        call = self._stub.WatchStatus(pb.StatusRequest(member=self.member), metadata=self._metadata)
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise _translate("watch", exc) from exc
                if not isinstance(response, pb.Response):
                    raise SidecarUnavailable("watch: the sidecar ended the stream")
                if response.status != pb.Response.SUCCESS:
                    raise SidecarError("watch", response.status, _error_text(response.payload))
                try:
                    status = decode_status(response.payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise SidecarError("watch", pb.Response.ERROR, f"unreadable status payload: {exc}") from exc
                yield status
        finally:
            call.cancel()

    async def action(self, action: str, payload: msgspec.Struct | dict[str, object], result: type[T]) -> T:
        """Run an action with a JSON payload and decode its answer as ``result``."""
        request = pb.ActionRequest(member=self.member, action=action, payload=msgspec.json.encode(payload).decode())
        accepted = (pb.Response.SUCCESS, pb.Response.EXISTS)
        return await self._unary(
            action, self._stub.RequestAction, request, accepted, lambda answer: decode(answer or "{}", result)
        )

    async def ended(self, after: int, limit: int = MAX_ENDED_PAGE) -> EndedResult:
        """The jobs that ended after the ``after``-th end (``RequestJobs``; the status token may call it).

        Raises :class:`SidecarUnimplemented` on a sidecar without it (an original one).
        """
        payload = msgspec.json.encode(EndedRequest(after=after, limit=limit)).decode()
        request = pb.ActionRequest(member=self.member, action="ended", payload=payload)
        return await self._unary(
            "ended", self._stub.RequestJobs, request, (pb.Response.SUCCESS,), lambda answer: decode(answer, EndedResult)
        )

    async def _unary(
        self, name: str, method: Any, request: Any, accepted: tuple[int, ...], read: Callable[[str], T]
    ) -> T:
        """Call one unary RPC; its failures as :func:`_translate` says, a refusal or an unreadable answer as
        :class:`SidecarError` naming ``name``."""
        try:
            response = await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(name, exc) from exc
        if response.status not in accepted:
            raise SidecarError(name, response.status, _error_text(response.payload))
        try:
            return read(response.payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SidecarError(name, pb.Response.ERROR, f"unreadable answer: {exc}") from exc


def _translate(action: str, exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return SidecarError(action, pb.Response.DENIED, f"the sidecar refused our token ({code.name})")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return SidecarUnimplemented(action, pb.Response.ERROR, f"{code.name}: {exc.details()}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return SidecarError(action, pb.Response.ERROR, f"{code.name}: {exc.details()}")
    return SidecarUnavailable(f"{action}: {code.name}: {exc.details()}")


def _error_text(payload: str) -> str:
    try:
        decoded = decode(payload or "{}", object)
    except msgspec.DecodeError:
        return payload or "(no reason given)"
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    return payload or "(no reason given)"
