"""kmock's server for the Kubernetes tests, stopped without waiting for open watches.

The creator's watches run in the sync client's threads (``asyncio.to_thread``): a watch still open when its
service has stopped keeps a request handler of the emulator alive until the thread's read ends, and aiohttp
waits up to 60 s (its runner's ``shutdown_timeout``) for every handler before it closes the server. The
emulator's watches do not end on their own (kmock has no ``timeoutSeconds``), so a test's teardown could
wait a minute, or past the test's timeout. A real API server ends a watch at its timeout; here the server
gives the open handlers a second and then closes their connections.
"""

from __future__ import annotations

from typing import Any

import aiohttp.test_utils
import aiohttp.web_runner
import aiohttp.web_server
import kmock

#: Seconds the emulator's server waits for open requests (watches) when it stops.
SHUTDOWN_TIMEOUT = 1.0


class _QuickStop(aiohttp.test_utils.RawTestServer):
    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web_runner.ServerRunner:
        server = aiohttp.web_server.Server(self._handler, loop=self._loop, debug=debug, **kwargs)
        return aiohttp.web_runner.ServerRunner(server, debug=debug, shutdown_timeout=SHUTDOWN_TIMEOUT, **kwargs)


def server(emulator: kmock.KubernetesEmulator) -> kmock.Server:
    """A real HTTP server for ``emulator`` (as ``kmock.Server``) that stops within :data:`SHUTDOWN_TIMEOUT`."""
    return kmock.Server(emulator, server_cls=_QuickStop)
