"""docker-compose.yml: the stack agrees with the ensemble it runs, hands each sidecar the token the services
will present, and — where a Docker engine answers — runs examples/compose.yaml to completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from ensemble_core import spec, subjects
from ensemble_core.settings import parse_endpoints
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from tests.docker_support import built_image, compose_problem

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
    # the services that call sidecars agree on the same ensemble and namespace
    for name in ("poller", "actuator"):
        assert SERVICES[name]["environment"] == creator["environment"]
        assert mounted_ensemble(SERVICES[name]) == mounted_ensemble(creator)


def volumes_of(service: dict[str, Any]) -> dict[str, str]:
    """The named volumes a compose service mounts, by mount point."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if not source.startswith("."):
            found[target] = source
    return found


def test_each_secret_is_mounted_where_it_is_used_and_nowhere_else() -> None:
    """The operator secret reaches the creator and the actuator only, the sidecar token the sidecars only,
    each NATS password its service only, the NATS users the server only (mounts, not only environments)."""
    holders: dict[str, set[str]] = {}
    for name, service in SERVICES.items():
        for source in volumes_of(service).values():
            holders.setdefault(source, set()).add(name)
    assert holders.pop("operator") == {"secrets", "creator", "actuator"}
    assert holders.pop("sidecar-token") == {"secrets", "sidecar-0", "sidecar-1"}
    assert holders.pop("nats-auth") == {"secrets", "nats"}
    for service in ("creator", "poller", "decider", "actuator"):
        assert holders.pop(f"nats-{service}") == {"secrets", service}
    assert holders.pop("nats-reader") == {"secrets"}
    assert holders == {"nats": {"nats"}}
    for name, service in SERVICES.items():
        assert "ENSEMBLE_SIDECAR_TOKEN" not in (service.get("environment") or {}), name


def run_secrets(tmp_path: Path) -> None:
    (program,) = [SERVICES["secrets"]["entrypoint"][-1]]
    root, ensemble_file, namespace = SERVICES["secrets"]["command"]
    assert (program, root) == ("ensemble_cli.stack_secrets", SECRET_DIR)
    assert f"./examples/compose.yaml:{ensemble_file}:ro" in SERVICES["secrets"]["volumes"]
    subprocess.run(
        [sys.executable, "-m", program, str(tmp_path), str(mounted_ensemble(SERVICES["creator"])), namespace],
        check=True, cwd=ROOT,
    )  # fmt: skip


def test_the_secrets_are_made_once_each_private_and_consistent(tmp_path: Path) -> None:
    run_secrets(tmp_path)
    secret = (tmp_path / "operator" / "operator-secret").read_text()
    assert len(secret) >= 32 and stat.S_IMODE((tmp_path / "operator" / "operator-secret").stat().st_mode) == 0o600
    ensemble = spec.load(str(mounted_ensemble(SERVICES["creator"])), "default")
    assert (tmp_path / "sidecar" / "token").read_text() == ensemble_token(secret, ensemble.namespace, ensemble.name)
    users = (tmp_path / "nats" / "auth.conf").read_text()
    passwords = {
        s: (tmp_path / f"nats-{s}" / "password").read_text() for s in ("creator", "poller", "decider", "actuator")
    }
    assert len(set(passwords.values())) == 4 and all(f'password: "{p}"' in users for p in passwords.values())
    # a restarted stack keeps what its running parts were given
    run_secrets(tmp_path)
    assert (tmp_path / "operator" / "operator-secret").read_text() == secret
    assert (tmp_path / "nats-poller" / "password").read_text() == passwords["poller"]


def test_each_part_gets_its_own_credentials_and_nothing_more(tmp_path: Path) -> None:
    run_secrets(tmp_path)
    secret = (tmp_path / "operator" / "operator-secret").read_text()
    token = (tmp_path / "sidecar" / "token").read_text()
    for name in ("sidecar-0", "sidecar-1"):
        sidecar = SERVICES[name]
        prelude = shell(sidecar["command"][0], tmp_path).split("exec ensemble sidecar")[0]
        out = subprocess.run(
            ["sh", "-c", prelude + 'printf %s "$ENSEMBLE_SIDECAR_TOKEN"'], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == token
    for name in ("creator", "poller", "actuator", "decider"):
        (command,) = SERVICES[name]["command"]
        # a service sees its volumes where compose mounts them: its own NATS password at /run/ensemble/nats
        own = shell(command, tmp_path).replace(f"{tmp_path}/nats/", f"{tmp_path}/nats-{name}/")
        prelude = own.split("exec ensemble")[0] + 'printf "%s\\n%s" "$ENSEMBLE_SIDECAR_TOKEN" "$ENSEMBLE_NATS_URL"'
        out = subprocess.run(["sh", "-c", prelude], capture_output=True, text=True)
        held, url = out.stdout.split("\n")
        # the poller reads with the status tokens of the member records: it never holds the secret
        assert held == (secret if name in ("creator", "actuator") else ""), name
        assert url == f"nats://{name}:{(tmp_path / f'nats-{name}' / 'password').read_text()}@nats:4222"


def test_a_sidecar_refuses_to_start_without_its_token(tmp_path: Path) -> None:
    sidecar = SERVICES["sidecar-0"]
    script = shell(sidecar["command"][0], tmp_path).replace("exec ensemble sidecar", "echo started; : ")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert out.returncode != 0 and "started" not in out.stdout


def reader_password() -> str:
    """The stack's ``reader`` NATS password, read from its volume by a one-off container of ``secrets``."""
    return subprocess.run(
        ["docker", "compose", "run", "--rm", "--no-deps", "--entrypoint", "cat", "secrets",
         "/run/ensemble/nats-reader/password"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


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
            await asyncio.sleep(1)
        return last
    finally:
        await nc.close()


async def applied_count(url: str) -> int:
    """How many decisions the actuator has applied so far (0 while the stream does not exist)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.ALL_APPLIED)
        return sum((info.state.subjects or {}).values())
    except Exception:
        return 0
    finally:
        await nc.close()


#: Run in a sidecar container: its jobs as JSON lines, read with its own token (every page of jobinfo).
JOBS_OF_SIDECAR = """
import asyncio, json
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.wire import JobInfo

async def main():
    token = open("/run/ensemble/sidecar/token").read()
    async with SidecarClient("127.0.0.1:50051", token) as client:
        offset = 0
        while True:
            page = await client.action("jobinfo", {"offset": offset, "limit": 500}, list[JobInfo])
            for job in page:
                print(json.dumps({"group": job.group, "state": job.state, "success": job.success}))
            if len(page) < 500:
                break
            offset += len(page)

asyncio.run(main())
"""


def jobs_of(service: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["docker", "compose", "exec", "-T", service, "python", "-c", JOBS_OF_SIDECAR],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def crash(service: str) -> None:
    """SIGKILL the process of ``service``'s container from outside, as a crash would (not `docker kill`,
    which the engine counts as the user's and does not restart)."""
    container = subprocess.run(
        ["docker", "compose", "ps", "-q", service], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    pid = int(subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", container],
                             capture_output=True, text=True, check=True).stdout)  # fmt: skip
    os.kill(pid, signal.SIGKILL)


def restarts(service: str) -> int:
    container = subprocess.run(
        ["docker", "compose", "ps", "-aq", service], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return int(subprocess.run(["docker", "inspect", "--format", "{{.RestartCount}}", container],
                              capture_output=True, text=True, check=True).stdout)  # fmt: skip


@pytest.fixture
def stack_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The compose project of one test: the image built once per session, a project name of its own."""
    problem = compose_problem()
    if problem:
        pytest.skip(problem)
    monkeypatch.setenv("ENSEMBLE_IMAGE", built_image())
    project = f"ensemble-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", project)
    return project


async def run_stack(crash_after_first_decision: str | None = None) -> None:
    """Run docker-compose.yml until both members terminate; check every job ran exactly once and succeeded."""
    from testcontainers.compose import DockerCompose

    ensemble = spec.load(str(mounted_ensemble(SERVICES["creator"])), "default")
    with DockerCompose(str(ROOT), compose_file_name="docker-compose.yml", build=False, wait=False) as stack:
        host = stack.get_service_host("nats", 4222) or "127.0.0.1"
        port = stack.get_service_port("nats", 4222)
        # NATS takes only the stack's users: read with the reader's password, from its volume
        password = await asyncio.to_thread(reader_password)
        url = f"nats://reader:{password}@{host}:{port}"
        if crash_after_first_decision:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while await applied_count(url) < 1:
                assert loop.time() < deadline, stack.get_logs(crash_after_first_decision)
                await asyncio.sleep(0.2)
            crash(crash_after_first_decision)
        last = await finished_members(url, ensemble, timeout=300)
        assert last == dict.fromkeys(range(len(ensemble.members)), "terminated"), stack.get_logs("actuator")
        if crash_after_first_decision:
            assert restarts(crash_after_first_decision) >= 1, "the crashed service was not restarted"
        for member in ensemble.members:
            jobs = await asyncio.to_thread(jobs_of, f"sidecar-{member.index}")
            expected = {job.name: job.count for job in member.jobs}
            ran: dict[str, int] = {}
            for job in jobs:
                assert job["success"] is True, job
                ran[job["group"]] = ran.get(job["group"], 0) + 1
            assert ran == expected, f"member {member.index}: ran {ran}, expected each job once: {expected}"


@pytest.mark.timeout(900)
async def test_compose_stack_runs_the_ensemble_to_completion_each_job_once(stack_env: str) -> None:
    await run_stack()


@pytest.mark.timeout(900)
async def test_compose_stack_completes_when_the_actuator_crashes_mid_run(stack_env: str) -> None:
    await run_stack(crash_after_first_decision="actuator")
