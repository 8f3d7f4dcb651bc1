"""Real Flux instances for the tests: ``flux start --test-size=N`` on this machine, and sidecars on them.

Used wherever ``flux`` is on PATH; :data:`NEEDS_FLUX` skips a test elsewhere, saying what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest

from ensemble_core.sidecar_client import SidecarClient
from tests.conftest import REPO

FLUX = shutil.which("flux")
NEEDS_FLUX = pytest.mark.skipif(
    FLUX is None,
    reason="no 'flux' command on PATH: these tests start real Flux instances (flux start --test-size=N) and need "
    "flux-core >= 0.68 installed with its bin directory on PATH",
)
TOKEN = "flux-test-token"
#: A uid other than this process's, for the owner/guest tests (the machine's nobody).
NOBODY = 65534

#: The Flux Operator's [access] table (controllers/flux/view.go): guests may connect, root is an owner.
OPERATOR_ACCESS = "[access]\nallow-guest-user = true\nallow-root-owner = true\n"
GUESTS_ONLY = "[access]\nallow-guest-user = true\n"


async def _group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process of group ``pgid`` is left; SIGKILL what is after ``timeout`` seconds (and give
    up 5 s later: a zombie nobody reaps would keep the group for ever)."""
    deadline, killed = time.monotonic() + timeout, False
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if killed:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def flux_instance(
    workdir: Path,
    size: int = 4,
    *,
    access: str | None = None,
    local_uri: str | None = None,
    user: int | None = None,
    rc1_delay: float = 0,
) -> AsyncIterator[str]:
    """A running ``flux start --test-size=size`` instance; yields its ``FLUX_URI``.

    ``access``: an ``[access]`` config for it; ``local_uri``: where its socket goes (size 1 only: every
    broker of a test instance would take the same path); ``user``: the uid that owns it. Its socket's
    directory is opened to other users, so a guest can connect where ``access`` allows it. ``rc1_delay``:
    seconds the brokers wait before rc1 loads their modules (their sockets are there meanwhile).
    """
    assert FLUX is not None
    if user is not None:
        # its owner must reach its config and log: a private test directory will not do
        workdir = Path(tempfile.mkdtemp(prefix="ensemble-flux-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o777)
    uri_file = workdir / "uri"
    uri_file.unlink(missing_ok=True)
    argv = [FLUX, "start", f"--test-size={size}"]
    if access is not None:
        config = workdir / "access.toml"
        config.write_text(access)
        config.chmod(0o644)
        argv.append(f"-o,--config-path={config}")
    if rc1_delay:
        argv.append(f"-Sbroker.rc1_path=sleep {rc1_delay:g}; flux modprobe rc1")
    if local_uri is not None:
        assert size == 1, "a test instance's brokers would share one local-uri"
        argv.append(f"-Slocal-uri={local_uri}")
    # the initial program tells the URI, opens the socket's directory to other users, and waits
    script = (
        f'echo "$FLUX_URI" > {uri_file}.tmp && mv {uri_file}.tmp {uri_file}; '
        'chmod 755 "$(dirname "${FLUX_URI#local://}")"; exec sleep 3600'
    )
    log = (workdir / "broker.log").open("ab")
    process = _start_broker([*argv, "sh", "-c", script], workdir, log, user)
    try:
        deadline = time.monotonic() + 30
        while not uri_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flux start did not come up: {(workdir / 'broker.log').read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        yield uri_file.read_text().strip()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
        # `flux start` dies of SIGTERM at once (it has no handler), while its brokers, in its process group,
        # shut down in their own time and unlink their sockets last: wait for the whole group, or a next
        # instance on the same local-uri loses its socket to this one's cleanup
        await _group_gone(process.pid, 20)
        log.close()
        if user is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_broker(argv: list[str], workdir: Path, log: IO[bytes], user: int | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HOME": str(workdir)}
    env.pop("FLUX_URI", None)
    return subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=workdir, start_new_session=True, user=user)


async def flux_cli(uri: str, *args: str) -> str:
    """Run ``flux ARGS`` against the instance at ``uri``; its stdout (fails the test on an error)."""
    assert FLUX is not None
    done = await asyncio.to_thread(
        subprocess.run, [FLUX, *args], env={**os.environ, "FLUX_URI": uri}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"flux {' '.join(args)}: {done.stderr}"
    return done.stdout


async def flux_jobs(uri: str) -> list[dict[str, Any]]:
    """Every job of the instance as ``flux jobs -a --json`` lists it."""
    return list(json.loads(await flux_cli(uri, "jobs", "-a", "--count=0", "--json"))["jobs"])


class FluxSidecar:
    """An ``ensemble sidecar --backend flux`` process, its log and a client of it."""

    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.client = SidecarClient(f"127.0.0.1:{port}", TOKEN, timeout=20)


def python_for(user: int) -> list[str]:
    """A command that runs our code's Python as ``user``: this interpreter, or (where ``user`` cannot
    execute it, e.g. under a private home) the system's Python of the same version with this
    environment's packages on its path. Skips the test when there is none."""
    site = [path for path in sys.path if path.endswith("site-packages")]
    for python in (sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"):
        try:
            probe = subprocess.run(
                [python, "-c", "import grpc, msgspec"],
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *site])},
                capture_output=True, user=user, check=False,
            )  # fmt: skip
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return [python]
    pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that uid {user} may run")


def start_sidecar(uri: str, log: Path, *extra: str, user: int | None = None) -> subprocess.Popen[str]:
    """Start a flux sidecar on ``uri`` without waiting for it (stdout: the port; its log into ``log``);
    ``user``: run it as that uid."""
    env = {**os.environ, "ENSEMBLE_SIDECAR_TOKEN": TOKEN, "FLUX_URI": uri}
    python = [sys.executable]
    if user is not None:
        python = python_for(user)
        site = [path for path in sys.path if path.endswith("site-packages")]
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *site])
    with log.open("a") as err:
        return subprocess.Popen(
            [*python, "-m", "sidecar", "--backend", "flux", "--port", "0", "--heartbeat", "0.5", *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, user=user,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def flux_sidecar(uri: str, log: Path, *extra: str) -> AsyncIterator[FluxSidecar]:
    """A running flux sidecar on ``uri``; stopped with SIGTERM on the way out (killed if it hangs)."""
    process = start_sidecar(uri, log, *extra)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        if not line.strip().isdigit():
            process.kill()
            raise AssertionError(f"the sidecar did not start: {line!r} {log.read_text()[-3000:]}")
        running = FluxSidecar(process, int(line), log)
        try:
            yield running
        finally:
            await running.client.close()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
        await asyncio.to_thread(process.communicate)
