"""The sidecar's gRPC over TLS: served with a certificate, trusted through ENSEMBLE_SIDECAR_CA, refused otherwise."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trustme
from nats.aio.client import Client

from ensemble_core.settings import Settings, SettingsError
from ensemble_core.sidecar_client import (
    TLS_NAME,
    ClientTls,
    SidecarClient,
    SidecarError,
    SidecarUnavailable,
    client_tls,
)
from services.actuator.drivers import LocalDriver
from services.poller.service import run as run_poller
from sidecar.local import LocalBackend
from sidecar.server import RunningServer, ServerTls, serve
from tests.conftest import service_running, wait_for
from tests.test_poller import member_spec, register, stored, token

TOKEN = "tls-test-token"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_sidecar(ca: trustme.CA) -> AsyncIterator[RunningServer]:
    cert = ca.issue_cert(TLS_NAME)  # the fixed name: the sidecar is reached by a pod IP that changes
    tls = ServerTls(chain=cert.private_key_and_cert_chain_pem.bytes(), key=cert.private_key_pem.bytes())
    running = await serve(LocalBackend(nodes=2, max_nodes=4), port=0, token=TOKEN, tls=tls)
    yield running
    await running.stop()


async def test_a_client_trusting_the_ca_gets_the_status_over_tls(tls_sidecar: RunningServer, ca: trustme.CA) -> None:
    async with SidecarClient(f"127.0.0.1:{tls_sidecar.port}", TOKEN, tls=ClientTls(ca.cert_pem.bytes())) as client:
        status = await client.status()
    assert status.size == 2


async def test_plaintext_another_ca_or_another_name_is_refused(tls_sidecar: RunningServer, ca: trustme.CA) -> None:
    endpoint = f"127.0.0.1:{tls_sidecar.port}"
    others = [
        None,  # plaintext to a TLS port
        ClientTls(trustme.CA().cert_pem.bytes()),  # a certificate the client's CA did not sign
        ClientTls(ca.cert_pem.bytes(), name="someone-else"),  # signed, but for another name
    ]
    for tls in others:
        async with SidecarClient(endpoint, TOKEN, timeout=2.0, tls=tls) as client:
            with pytest.raises(SidecarUnavailable):
                await client.status()


async def test_tls_does_not_replace_the_token(tls_sidecar: RunningServer, ca: trustme.CA) -> None:
    async with SidecarClient(f"127.0.0.1:{tls_sidecar.port}", "wrong", tls=ClientTls(ca.cert_pem.bytes())) as client:
        with pytest.raises(SidecarError, match="refused our token"):
            await client.status()


def test_the_ca_setting_names_the_variable_when_the_file_is_missing_or_not_a_certificate(tmp_path: Path) -> None:
    assert client_tls(Settings()) is None
    with pytest.raises(SettingsError, match=r"ENSEMBLE_SIDECAR_CA: cannot read .*missing\.pem"):
        client_tls(Settings(sidecar_ca=str(tmp_path / "missing.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SettingsError, match=r"ENSEMBLE_SIDECAR_CA: .*junk\.pem holds no PEM certificate"):
        client_tls(Settings(sidecar_ca=str(junk)))


async def test_the_sidecar_command_serves_tls_and_explains_bad_flags(tmp_path: Path, ca: trustme.CA) -> None:
    cert = ca.issue_cert(TLS_NAME)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    command = [sys.executable, "-m", "sidecar", "--port", "0"]

    async def fails(*flags: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *command, *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 2
        return err.decode()

    assert "--tls-cert and --tls-key go together" in await fails("--tls-cert", str(cert_file))
    assert f"--tls-key: cannot read {tmp_path / 'nope'}" in await fails(
        "--tls-cert", str(cert_file), "--tls-key", str(tmp_path / "nope")
    )
    assert "--tls-key: " in await fails("--tls-cert", str(cert_file), "--tls-key", str(cert_file))

    process = await asyncio.create_subprocess_exec(
        *command, "--tls-cert", str(cert_file), "--tls-key", str(key_file), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        async with SidecarClient(f"127.0.0.1:{port}", tls=ClientTls(ca.cert_pem.bytes())) as client:
            assert (await client.status()).size == 1
    finally:
        process.terminate()
        await process.wait()


async def test_the_poller_and_the_actuator_reach_a_tls_sidecar_with_the_ca_setting(
    nc: Client, settings: Settings, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert(TLS_NAME)
    tls = ServerTls(chain=cert.private_key_and_cert_chain_pem.bytes(), key=cert.private_key_pem.bytes())
    sidecar = await serve(LocalBackend(nodes=1, max_nodes=3), port=0, token=token(settings), tls=tls)
    with_ca = msgspec.structs.replace(settings, sidecar_ca=str(ca_file))
    spec = member_spec(0, f"127.0.0.1:{sidecar.port}")
    try:
        await register(nc, spec)
        async with stored(nc) as found, service_running(run_poller, with_ca):
            await wait_for(lambda: len(found.of(0)) >= 2, timeout=10)
        assert found.of(0)[0].size == 1
        driver = LocalDriver(settings.sidecar_token, 5.0, client_tls(with_ca))
        try:
            assert await driver.size(spec) == 1
        finally:
            await driver.close()
    finally:
        await sidecar.stop()
