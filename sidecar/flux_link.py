"""The sidecar's end of the pipe to :mod:`sidecar.flux_helper`, which Flux's own Python runs.

:class:`FluxLink` starts the helper (``flux python flux_helper.py`` by default), sends it requests and
awaits their answers without blocking the event loop, and hands every push (journal records, resource
changes, the helper's fatal error) to a callback. When the helper exits, every call in flight fails
with :class:`FluxLinkClosed` carrying the reason (the helper's last words, else its stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ensemble_core.messages import decode
from sidecar.queue import job_environment

log = logging.getLogger(__name__)

HELPER = Path(__file__).with_name("flux_helper.py")

#: Longest line the helper may write (a submit's answer for 100,000 jobs is a few MB).
LINE_LIMIT = 256 * 1024 * 1024
#: Seconds the helper gets to exit after its stdin is closed, before it is killed.
CLOSE_GRACE = 2.0

Push = Callable[[Mapping[str, Any]], None]


class FluxLinkError(Exception):
    """A request the helper answered with an error: Flux's ``errno`` and message."""

    def __init__(self, op: str, errno: int, message: str) -> None:
        super().__init__(f"{op}: {message}" + (f" (errno {errno})" if errno else ""))
        self.op = op
        self.errno = errno
        self.message = message


class FluxLinkClosed(Exception):
    """The helper is gone (or never started); the message says why, ``errno`` is Flux's when it gave one."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def helper_command(flux: str) -> list[str]:
    """The command that runs the helper with the Python of the ``flux`` command given (a path or a name
    on PATH); :class:`FluxLinkClosed` when there is no such command."""
    found = shutil.which(flux)
    if found is None:
        raise FluxLinkClosed(
            f"no flux command {flux!r} found (PATH={os.environ.get('PATH', '')}); put flux-core's bin directory "
            "on PATH, or name the command with --flux (in a Flux Operator MiniCluster: /mnt/flux/view/bin/flux)"
        )
    return [found, "python", str(HELPER)]


class FluxLink:
    """One helper process: :meth:`call` an operation, receive pushes through ``on_push``."""

    def __init__(self, process: asyncio.subprocess.Process, on_push: Push) -> None:
        self._process = process
        self._on_push = on_push
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._last_words = ""
        self.last_errno = 0
        self._stderr: list[str] = []
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(cls, command: list[str], on_push: Push, *, uri: str | None = None) -> FluxLink:
        """Start the helper with ``command`` (see :func:`helper_command`); ``uri`` sets its ``FLUX_URI``."""
        # nothing of the sidecar's own (its token among them): the helper is an ordinary process of the user
        # whose jobs Flux runs, and they could read its environment
        env = job_environment(os.environ)
        if uri:
            env["FLUX_URI"] = uri
        # the helper's Python is Flux's: nothing of our interpreter's environment may leak into it
        for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(name, None)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise FluxLinkClosed(f"cannot run {command[0]}: {exc.strerror or exc}") from None
        return cls(process, on_push)

    @property
    def pid(self) -> int:
        """The helper's process id."""
        return self._process.pid

    async def call(self, op: str, **arguments: Any) -> Any:
        """Send one request and await its result; :class:`FluxLinkError` or :class:`FluxLinkClosed`."""
        if self.closed.done():
            raise FluxLinkClosed(self.closed.result(), self.last_errno)
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (op, future)
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(msgspec.json.encode({"id": request_id, "op": op, **arguments}) + b"\n")
            await stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(request_id, None)
            raise FluxLinkClosed(f"the flux helper is gone ({exc})") from None
        return await future

    async def close(self) -> None:
        """Close its stdin (it exits), kill it after :data:`CLOSE_GRACE` seconds, and wait for it."""
        stdin = self._process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        await self._reap()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reap(self) -> int:
        """Wait for the helper to exit, killing it after :data:`CLOSE_GRACE` seconds; its exit code."""
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                return await self._process.wait()
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            return await self._process.wait()

    # -- internals -------------------------------------------------------------------------------

    async def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        reason = ""
        try:
            while True:
                try:
                    line = await stdout.readline()
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    reason = f"the flux helper wrote an unreadable line ({exc})"
                    break
                if not line:
                    break
                try:
                    message = decode(line, object)
                except msgspec.DecodeError:
                    log.warning("flux helper: not a JSON line: %r", line[:200])
                    continue
                if not isinstance(message, dict):
                    continue
                self._dispatch(message)
        finally:
            code = await self._reap()
            await asyncio.sleep(0)  # let the stderr reader take the last lines
            detail = self._last_words or reason or " / ".join(self._stderr[-3:])
            ended = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            text = f"the flux helper {ended}" + (f": {detail}" if detail else "")
            for op, future in self._pending.values():
                if not future.done():
                    future.set_exception(FluxLinkClosed(f"{op}: {text}", self.last_errno))
            self._pending.clear()
            if not self.closed.done():
                self.closed.set_result(text)

    def _dispatch(self, message: dict[str, Any]) -> None:
        push = message.get("push")
        if push is not None:
            if push == "fatal":
                self._last_words = str(message.get("error", ""))
                self.last_errno = int(message.get("errno") or 0)
            try:
                self._on_push(message)
            except Exception:
                log.exception("flux helper: handling a %s push failed", push)
            return
        entry = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
        if entry is None:
            return
        op, future = entry
        if future.done():
            return
        if message.get("ok"):
            future.set_result(message.get("result"))
        else:
            future.set_exception(FluxLinkError(op, int(message.get("errno") or 0), str(message.get("error", ""))))

    async def _read_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        async for raw in stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                log.warning("flux helper: %s", line)
                self._stderr = [*self._stderr[-9:], line]
