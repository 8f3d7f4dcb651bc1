"""docker-compose.yml: the stack agrees with the ensemble it runs, hands each sidecar the token the services
will present, and — where a Docker engine answers — runs examples/compose.yaml to completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from ensemble_core import spec, subjects
from ensemble_core.settings import parse_endpoints
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
#: Where the compose file mounts the shared secret volume and the ensemble.
SECRET_DIR = "/run/ensemble"


def mounted_ensemble(service: dict[str, Any]) -> Path:
    """The file of this repository that a compose service mounts as its ENSEMBLE_FILE."""
    target: str = service["environment"]["ENSEMBLE_FILE"]
    (source,) = [str(v).split(":")[0] for v in service["volumes"] if str(v).split(":")[1] == target]
    return ROOT / source


def shell(command: str, tmp_path: Path) -> str:
    """A compose ``sh -c`` command as sh runs it here: ``$$`` unescaped, the secret volume under ``tmp_path``."""
    return command.replace("$$", "$").replace(SECRET_DIR, str(tmp_path))


def test_every_member_has_a_sidecar_sized_like_its_minicluster() -> None:
    creator = SERVICES["creator"]
    ensemble = spec.load(str(mounted_ensemble(creator)), creator["environment"]["ENSEMBLE_NAMESPACE"])
    endpoints = parse_endpoints(creator["environment"]["ENSEMBLE_ENDPOINTS"])
    assert sorted(endpoints) == [m.index for m in ensemble.members]
    for member in ensemble.members:
        host, port = endpoints[member.index].split(":")
        sidecar = SERVICES[host]
        assert f"--port {port}" in sidecar["command"][0]
        assert sidecar["environment"]["NODES"] == str(member.size)
        assert sidecar["environment"]["MAX_NODES"] == str(member.max_size)
        assert mounted_ensemble(sidecar) == mounted_ensemble(creator)
        assert sidecar["environment"]["ENSEMBLE_NAMESPACE"] == creator["environment"]["ENSEMBLE_NAMESPACE"]
    # the services that call sidecars agree on the same ensemble and namespace
    for name in ("poller", "actuator"):
        assert SERVICES[name]["environment"] == creator["environment"]


def test_operator_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    (program,) = SERVICES["operator-secret"]["command"]
    program = program.replace(SECRET_DIR, str(tmp_path))
    subprocess.run([sys.executable, "-c", program], check=True)
    secret_file = tmp_path / "operator-secret"
    first = secret_file.read_text()
    assert len(first) >= 32
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # a restarted stack keeps the secret its running sidecars were given
    subprocess.run([sys.executable, "-c", program], check=True)
    assert secret_file.read_text() == first


def test_each_sidecar_gets_the_token_the_services_present(tmp_path: Path) -> None:
    """The services derive ensemble_token(secret, namespace, name); a sidecar with another token refuses them."""
    secret = "an operator secret for this test"
    (tmp_path / "operator-secret").write_text(secret)
    ensemble = spec.load(str(mounted_ensemble(SERVICES["creator"])), "default")
    expected = ensemble_token(secret, ensemble.namespace, ensemble.name)
    for name in ("sidecar-0", "sidecar-1"):
        sidecar = SERVICES[name]
        script = shell(sidecar["command"][0], tmp_path)
        # run everything up to the server's start, then show the token it would be started with
        prelude = script.split("exec ensemble sidecar")[0] + 'printf %s "$ENSEMBLE_SIDECAR_TOKEN"'
        env = {
            **os.environ,
            **sidecar["environment"],
            "ENSEMBLE_FILE": str(mounted_ensemble(sidecar)),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        out = subprocess.run(["sh", "-c", prelude], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected
    for name in ("creator", "poller", "actuator", "decider"):
        (command,) = SERVICES[name]["command"]
        prelude = shell(command, tmp_path).split("exec ensemble")[0] + 'printf %s "$ENSEMBLE_SIDECAR_TOKEN"'
        out = subprocess.run(["sh", "-c", prelude], capture_output=True, text=True)
        # the poller reads with the status tokens of the member records: it never holds the secret
        assert out.stdout == (secret if name in ("creator", "actuator") else ""), name


def test_sidecar_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    sidecar = SERVICES["sidecar-0"]
    script = shell(sidecar["command"][0], tmp_path).replace("exec ensemble sidecar", "echo started; : ")
    env = {**os.environ, **sidecar["environment"], "ENSEMBLE_FILE": str(mounted_ensemble(sidecar))}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "started" not in out.stdout


def docker_unavailable() -> str | None:
    """Why the stack cannot run here, or None when a Docker engine and `docker compose` answer."""
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}): the compose stack cannot run here"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        return "the docker compose plugin is not installed"
    return None


async def finished_members(url: str, ensemble: spec.Ensemble, timeout: float) -> dict[int, str]:
    """Wait until every member's last event is terminated or completed; return {member: that event}."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last: dict[int, str] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for member in ensemble.members:
                address = MemberAddress(ensemble.namespace, ensemble.name, member.index)
                try:
                    msg = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.events(address))
                except Exception:  # the stream or the subject does not exist yet
                    continue
                last[member.index] = json.loads(msg.data or b"{}").get("event", "")
            if len(last) == len(ensemble.members) and set(last.values()) <= {"terminated", "completed"}:
                return last
            await asyncio.sleep(2)
        return last
    finally:
        await nc.close()


@pytest.mark.timeout(900)
async def test_compose_stack_runs_the_ensemble_to_completion() -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    from testcontainers.compose import DockerCompose

    ensemble = spec.load(str(mounted_ensemble(SERVICES["creator"])), "default")
    with DockerCompose(str(ROOT), compose_file_name="docker-compose.yml", build=True, wait=False) as stack:
        host = stack.get_service_host("nats", 4222) or "127.0.0.1"
        port = stack.get_service_port("nats", 4222)
        last = await finished_members(f"nats://{host}:{port}", ensemble, timeout=300)
        assert last == dict.fromkeys(range(len(ensemble.members)), "terminated"), stack.get_logs("actuator")
        nc = await nats.connect(f"nats://{host}:{port}")
        try:
            js = nc.jetstream()
            for member in ensemble.members:
                address = MemberAddress(ensemble.namespace, ensemble.name, member.index)
                snapshot = await js.get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
                metrics = json.loads(snapshot.data or b"{}")
                assert metrics["finished"] == sum(job.count for job in member.jobs)
                assert metrics["failed"] == 0
        finally:
            await nc.close()
