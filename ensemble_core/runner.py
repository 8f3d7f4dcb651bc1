"""Runs a service's ``run(settings)`` as a process: settings checked first, logs configured, exit codes."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ensemble_core import health, logs
from ensemble_core.settings import Settings, SettingsError, load
from ensemble_core.spec import SpecError

#: Exit code of a service that could not start because of its configuration (do not restart it blindly).
EXIT_CONFIG = 2


def run_service(name: str, run: Callable[[Settings], Coroutine[Any, Any, None]]) -> int:
    """Load and validate the settings, then run the service until it returns; return the exit code."""
    try:
        settings = load()
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level, service=name)
    if settings.health_port:
        health.serve(settings.health_port)
    try:
        asyncio.run(_with_heartbeat(run(settings)))
    except (SettingsError, SpecError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (KeyboardInterrupt, ConnectionAbortedError):
        pass
    logging.getLogger(name).info("stopped")
    return 0


async def _with_heartbeat(service: Coroutine[Any, Any, None]) -> None:
    beat = asyncio.create_task(health.heartbeat())
    try:
        await service
    finally:
        beat.cancel()
