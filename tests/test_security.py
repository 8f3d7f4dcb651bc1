"""Security: authentication on the sidecar, no secret in logs or Kubernetes objects, NATS auth and TLS in
production, least-privilege RBAC measured against what the services really call, and where the sidecar
listens. docs/security.md states the threat model these tests back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import kmock
import msgspec
import nats
import nats.errors
import psutil
import pytest
from grpc import aio
from nats.aio.client import Client

from ensemble_cli.up import Stack
from ensemble_core import minicluster, natsio, subjects
from ensemble_core.messages import Applied, encode
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.rpc import ensemble_service_pb2_grpc as pb_grpc
from ensemble_core.settings import Settings
from ensemble_core.spec import validate
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token
from services.actuator.service import run as run_actuator
from services.creator.service import run as run_creator
from services.poller.service import run as run_poller
from sidecar.server import serve_local
from tests import kmock_support, kubectl_support
from tests.conftest import REPO, service_running, tls_files, wait_for
from tests.test_kubernetes import (
    ENSEMBLE,
    ENSEMBLES,
    EVENTS,
    MINICLUSTERS,
    NS,
    condition,
    create_ensemble,
    k8s_settings,
    live,
    start_lead_pod,
)
from tests.test_manifests import SERVICES, deployment, nats_files, render, rendered_rbac

ENSEMBLE_BIN = str(Path(sys.executable).parent / "ensemble")
SECRET = "operator-secret-for-tests"

# --- the sidecar refuses whoever does not hold its ensemble's token ------------------------------------


@contextlib.contextmanager
def sidecar_process(token: str, *extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``ensemble sidecar`` as a user starts it (token from the environment), with its bound port."""
    process = subprocess.Popen(
        [ENSEMBLE_BIN, "sidecar", "--backend", "local", "--port", "0", "--nodes", "1", "--max-nodes", "3", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ENSEMBLE_SIDECAR_TOKEN": token},
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def listening_addresses(pid: int) -> set[str]:
    """The IPv4 addresses a process listens on (TCP; gRPC binds 127.0.0.1 as its IPv6-mapped form)."""
    found = set()
    for connection in psutil.Process(pid).net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(connection.laddr.ip)
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            found.add(str(mapped or address))
    return found


async def call_every_rpc(stub: Any, metadata: tuple[tuple[str, str], ...]) -> list[grpc.StatusCode]:
    """The status code of each RPC of the service called with ``metadata`` (OK when it was answered)."""
    submit = json.dumps({"jobs": [{"name": "intruder", "command": "touch /tmp/owned", "count": 3}]})
    calls = [
        stub.RequestStatus(pb.StatusRequest(), metadata=metadata, timeout=5),
        stub.RequestAction(pb.ActionRequest(action="submit", payload=submit), metadata=metadata, timeout=5),
        stub.RequestAction(pb.ActionRequest(action="grow", payload='{"size": 3}'), metadata=metadata, timeout=5),
        stub.RequestAction(pb.ActionRequest(action="terminate"), metadata=metadata, timeout=5),
        stub.RequestUpdate(pb.UpdateRequest(payload="{}"), metadata=metadata, timeout=5),
    ]
    codes = []
    for call in calls:
        try:
            await call
            codes.append(grpc.StatusCode.OK)
        except aio.AioRpcError as exc:
            codes.append(exc.code())
    try:
        async for _ in stub.WatchStatus(pb.StatusRequest(), metadata=metadata, timeout=5):
            break
        codes.append(grpc.StatusCode.OK)
    except aio.AioRpcError as exc:
        codes.append(exc.code())
    return codes


async def test_a_sidecar_answers_only_its_own_ensembles_token_and_nothing_gets_queued_without_it() -> None:
    token = ensemble_token(SECRET, "science", "mine")
    wrong = [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", token),),  # the token without the scheme
        (("authorization", f"Bearer {token[:-1]}"),),
        (("authorization", f"Bearer {ensemble_token(SECRET, 'science', 'theirs')}"),),  # another ensemble's
        (("authorization", f"Bearer {ensemble_token(SECRET, 'other', 'mine')}"),),  # same name, other namespace
        (("authorization", f"Bearer {ensemble_token('another-operator', 'science', 'mine')}"),),
        (("authorization", f"Bearer {SECRET}"),),  # the operator secret is not a sidecar token
        (("authorization", f"Bearer {status_token(ensemble_token(SECRET, 'science', 'theirs'))}"),),
    ]
    with sidecar_process(token) as (process, port):
        assert listening_addresses(process.pid) == {"127.0.0.1"}
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EnsembleOperatorStub(channel)
            for metadata in wrong:
                assert await call_every_rpc(stub, metadata) == [grpc.StatusCode.UNAUTHENTICATED] * 6, metadata
            # the status token (what the poller holds) reads the status and nothing else
            readonly = (("authorization", f"Bearer {status_token(token)}"),)
            denied = grpc.StatusCode.PERMISSION_DENIED
            assert await call_every_rpc(stub, readonly) == [grpc.StatusCode.OK, denied, denied, denied, denied,
                                                             grpc.StatusCode.OK]  # fmt: skip
            right = (("authorization", f"Bearer {token}"),)
            status = json.loads((await stub.RequestStatus(pb.StatusRequest(), metadata=right, timeout=5)).payload)
            jobs = await stub.RequestAction(pb.ActionRequest(action="jobinfo"), metadata=right, timeout=5)
    assert json.loads(jobs.payload) == []
    assert sum(status["queue"].values()) == 0 and status["groups"] == {}
    assert (status["size"], status["terminated"]) == (1, False)
    assert process.returncode == 0


def test_the_sidecar_of_a_minicluster_listens_on_every_address_because_the_poller_comes_by_pod_ip() -> None:
    ensemble, errors = validate(ENSEMBLE, NS)
    assert ensemble is not None, errors
    token = ensemble_token(SECRET, NS, ensemble.name)
    secret = minicluster.token_secret_name(ensemble.name, token)
    body = minicluster.build(ensemble, ensemble.members[0], {}, token_secret=secret)
    sidecar = next(c for c in body["spec"]["containers"] if c.get("name") == minicluster.SIDECAR_CONTAINER)
    # every address, IPv4 and IPv6 (gRPC's [::] is dual-stack, and falls back to IPv4 where there is no IPv6)
    assert "--host :: " in sidecar["command"] and "--port 7000" in sidecar["command"]
    assert sidecar["ports"] == [7000]
    # the token reaches it from the Ensemble's Secret, never written into the MiniCluster
    assert token not in json.dumps(body)
    assert sidecar["secrets"]["ENSEMBLE_SIDECAR_TOKEN"]["name"] == secret


# --- no secret in logs, output, Events or status --------------------------------------------------------


def tokens_of(process: psutil.Process) -> set[str]:
    """The ``ENSEMBLE_SIDECAR_TOKEN`` a running process was given (empty set when none, or it is gone)."""
    with contextlib.suppress(psutil.Error):
        value = process.environ().get("ENSEMBLE_SIDECAR_TOKEN")
        return {value} if value else set()
    return set()


def test_ensemble_up_listens_on_loopback_only_and_never_writes_its_secret_or_token_to_a_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        up = psutil.Popen(
            [ENSEMBLE_BIN, "up", str(REPO / "examples" / "hello-world.yaml"), "--logs", str(logs), "--timeout", "120"],
            stdout=out,
            stderr=err,
            cwd=tmp_path,
        )
        # The secret is made inside `ensemble up` and handed to its parts in their environment: read it
        # there while they run (services: the operator secret; the sidecar: its ensemble's token).
        seen: set[str] = set()
        job_environments: list[dict[str, str]] = []
        listening: set[str] = set()
        while up.poll() is None:
            for child in up.children(recursive=True):
                seen |= tokens_of(child)
                with contextlib.suppress(psutil.Error):
                    listening |= listening_addresses(child.pid)
                with contextlib.suppress(psutil.Error):
                    if child.name() in ("sleep", "sh"):
                        job_environments.append(child.environ())
            time.sleep(0.1)
    assert up.returncode == 0, stderr.read_text()
    secret = next(value for value in seen if ensemble_token(value, "default", "hello-world") in seen)
    token = ensemble_token(secret, "default", "hello-world")
    assert seen == {secret, token}
    assert listening == {"127.0.0.1"}  # NATS and the sidecar: nothing of `ensemble up` is reachable from outside
    assert job_environments, "no job was seen running"
    assert all("ENSEMBLE_SIDECAR_TOKEN" not in environment for environment in job_environments)
    files = [stdout, stderr, *(path for path in logs.rglob("*") if path.is_file())]
    assert any(path.suffix == ".log" and path.stat().st_size for path in files)
    for path in files:
        content = path.read_bytes()
        for value in (secret, token):
            assert value.encode() not in content, f"{path.name} contains a secret"


# --- Kubernetes: least privilege, measured -------------------------------------------------------------


@contextlib.asynccontextmanager
async def kube_emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    """kmock's Kubernetes emulator on a real HTTP port, as in tests/test_kubernetes.py's ``api`` fixture."""
    async with kmock.KubernetesEmulator() as emulator, kmock_support.server(emulator) as server:
        for resource in (
            "ensemble.flux-framework.org/v1alpha1/ensembles",
            "flux-framework.org/v1alpha2/miniclusters",
            "v1/pods",
            "v1/events",
            "v1/secrets",
            "coordination.k8s.io/v1/leases",
        ):
            emulator.resources[resource] = {}
        emulator[kmock.action.CREATE] << 201 << (lambda request: request.data)

        def scale(request: kmock.Request) -> dict[str, Any]:
            found = emulator.objects[MINICLUSTERS, request.namespace, request.name]
            found.patch({"spec": {"size": request.data["spec"]["replicas"], "replicas": None}})
            return {"kind": "Scale", "spec": {"replicas": found["spec"]["size"]}}

        emulator["patch", kmock.subresource("scale")] << scale
        yield emulator, str(server.url).rstrip("/")


#: HTTP methods as RBAC verbs (a GET is get, list or watch depending on the URL).
_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def rbac_requests(requests: list[kmock.Request]) -> dict[tuple[str, str], set[str]]:
    """{(API group, resource[/subresource]): verbs} of the requests an API server received."""
    used: dict[tuple[str, str], set[str]] = {}
    for request in requests:
        assert request.resource is not None, request.url
        resource = request.resource.plural or ""
        if request.subresource:
            resource += f"/{request.subresource}"
        method = str(request.method.value).upper()
        if method == "GET":
            verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
        else:
            verb = _VERBS[method]
        used.setdefault((request.resource.group or "", resource), set()).add(verb)
    return used


#: The namespace of the creator's leader-election Lease (its default, ``ENSEMBLE_LEADER_LEASE``).
LEASE_NAMESPACE = "ensemble-system"
#: Granted without an API call behind it: with blockOwnerDeletion in its owner references, the
#: OwnerReferencesPermissionEnforcement admission plugin requires the creator to be allowed this.
GRANTED_FOR_ADMISSION = {"creator": {("ensemble.flux-framework.org", "ensembles/finalizers"): {"update"}}}
#: Granted by deploy/kustomize/base/rbac.yaml but never called: the services poll with list and get (no
#: watch) and scale through a PATCH of /scale. Listed so the test states the surplus exactly; removing
#: these verbs from rbac.yaml, docs/kubernetes.md and tests/test_manifests.py empties this table.
#: Grants no call uses (empty: least privilege holds); kept so that a deliberate surplus is written down.
OVER_GRANTED: dict[str, dict[tuple[str, str], set[str]]] = {}


async def test_each_service_account_is_granted_exactly_the_calls_its_service_makes(
    nc: Client, settings: Settings
) -> None:
    token = ensemble_token(settings.sidecar_token, NS, "acted")
    sidecar = await serve_local(token=token, nodes=2, max_nodes=4)
    try:
        async with kube_emulator() as (emulator, url):
            creator_calls = await exercise_the_creator(emulator, url, settings)
            actuator_calls = await exercise_the_actuator(emulator, url, nc, settings, sidecar.port)
            poller_calls = await exercise_the_poller(emulator, url, nc, settings, sidecar.port)
            # nothing the services wrote into Kubernetes carries the operator secret or a token in the clear
            written = [
                *live(emulator, EVENTS),
                *live(emulator, MINICLUSTERS),
                *(obj.get("status", {}) for obj in live(emulator, ENSEMBLES)),
            ]
            text = json.dumps(written)
            for value in (settings.sidecar_token, ensemble_token(settings.sidecar_token, NS, "demo"), token):
                assert value not in text
    finally:
        await sidecar.stop(grace=0.1)
    granted = rendered_rbac(render("base"))
    leases = [r for r in creator_calls if r.resource is not None and r.resource.plural == "leases"]
    assert leases and {r.namespace for r in leases} == {LEASE_NAMESPACE}
    used = {
        "creator": {
            # the Lease is granted by a Role in its one namespace (rendered_rbac marks it so)
            (
                (group, f"{resource}@{LEASE_NAMESPACE}")
                if (group, resource) == ("coordination.k8s.io", "leases")
                else (group, resource)
            ): verbs
            for (group, resource), verbs in rbac_requests(creator_calls).items()
        },
        "actuator": rbac_requests(actuator_calls),
        "poller": rbac_requests(poller_calls),
    }
    for service, calls in used.items():
        expected = copy.deepcopy(calls)
        for key, verbs in GRANTED_FOR_ADMISSION.get(service, {}).items():
            expected.setdefault(key, set()).update(verbs)
        for key, verbs in OVER_GRANTED.get(service, {}).items():
            expected.setdefault(key, set()).update(verbs)
        assert granted[service] == expected, service
    assert granted["decider"] == {}


async def exercise_the_creator(emulator: kmock.KubernetesEmulator, url: str, settings: Settings) -> list[Any]:
    """Every path of the creator that calls the API; returns the requests it made."""
    broken = copy.deepcopy(ENSEMBLE)
    broken["metadata"].update(name="broken", uid="3f9c2a10-0000-4000-8000-00000000beef")
    broken["spec"]["members"][0]["jobs"][0]["nodes"] = 12
    # its sidecar image cannot be pulled: the creator deletes the MiniCluster
    unpulled = copy.deepcopy(ENSEMBLE)
    unpulled["metadata"].update(name="unpulled", uid="3f9c2a10-0000-4000-8000-0000000000ff")
    await create_ensemble(url, ENSEMBLE)
    await create_ensemble(url, broken)
    await create_ensemble(url, unpulled)
    first = len(list(emulator))
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: len(live(emulator, MINICLUSTERS)) == 2, timeout=10)
        start_lead_pod(emulator, "demo-0", "10.1.2.3")
        pull = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
        start_lead_pod(emulator, "unpulled-0", "10.1.2.4", sidecar=pull, ensemble="unpulled")
        await wait_for(lambda: condition(emulator, "Ready").get("status") == "True", timeout=10)
        emulator.objects[MINICLUSTERS, NS, "demo-0"].delete()  # the member is gone: announced, not recreated
        await asyncio.sleep(1.0)
        failed = emulator.objects[ENSEMBLES, NS, "broken"].raw.get("status") or {}
        assert failed.get("phase") == "Failed"
        await wait_for(lambda: live(emulator, MINICLUSTERS) == [], timeout=10)
    return list(emulator)[first:]


async def exercise_the_actuator(
    emulator: kmock.KubernetesEmulator, url: str, nc: Client, settings: Settings, port: int
) -> list[Any]:
    """Every path of the actuator that calls the API (scale, submit, terminate, a refusal)."""
    document = copy.deepcopy(ENSEMBLE)
    document["metadata"].update(name="acted", uid="3f9c2a10-0000-4000-8000-0000000000ac")
    ensemble, errors = validate(document, NS)
    assert ensemble is not None, errors
    member = ensemble.members[0]
    emulator.objects[ENSEMBLES, NS, "acted"] = document
    emulator.objects[MINICLUSTERS, NS, "acted-0"] = minicluster.build(
        ensemble, member, minicluster_owner(document), token_secret="t"
    )
    address = MemberAddress(NS, "acted", 0)
    record = msgspec.structs.replace(ensemble.member_spec(member, f"127.0.0.1:{port}"), name="acted-0")
    await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).put(address.key, encode(record))
    plan: list[dict[str, Any]] = [
        {"action": "scale", "size": 3},
        {"action": "submit", "jobs": [{"name": "a", "command": "true", "count": 1}]},
        {"action": "scale", "size": 99},
        {"action": "terminate"},
        {"action": "scale", "size": 2},  # after termination: refused, reported as a Warning
    ]
    first = len(list(emulator))
    async with service_running(run_actuator, k8s_settings(settings, url)):
        for seq, fields in enumerate(plan):
            decision = {
                "kind": "decision",
                "namespace": NS,
                "ensemble": "acted",
                "member": 0,
                "id": f"{address.key}:{seq}",
                "time": time.time(),
                "based_on": seq,
                "reason": "exercise",
                **fields,
            }
            await nc.jetstream().publish(
                subjects.decisions(address), json.dumps(decision).encode(), headers={"Nats-Msg-Id": decision["id"]}
            )

        async def all_applied() -> bool:
            js = nc.jetstream()
            try:
                last = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.applied(address))
            except Exception:
                return False
            return msgspec.json.decode(last.data or b"", type=Applied).decision.endswith(f":{len(plan) - 1}")

        await wait_for(all_applied, timeout=20)
    assert live(emulator, MINICLUSTERS) == []
    return list(emulator)[first:]


async def exercise_the_poller(
    emulator: kmock.KubernetesEmulator, url: str, nc: Client, settings: Settings, port: int
) -> list[Any]:
    """The poller in Kubernetes mode: it watches the MiniClusters for the members' requested sizes."""
    document = copy.deepcopy(ENSEMBLE)
    document["metadata"].update(name="polled", uid="3f9c2a10-0000-4000-8000-0000000000aa")
    ensemble, errors = validate(document, NS)
    assert ensemble is not None, errors
    member = ensemble.members[0]
    owner = {**minicluster_owner(document)}
    emulator.objects[MINICLUSTERS, NS, "polled-0"] = minicluster.build(ensemble, member, owner, token_secret="t")
    address = MemberAddress(NS, "polled", 0)
    # the local sidecar of this test serves the "acted" ensemble's token
    readonly = status_token(ensemble_token(settings.sidecar_token, NS, "acted"))
    record = msgspec.structs.replace(
        ensemble.member_spec(member, f"127.0.0.1:{port}", status_token=readonly),
        name="polled-0",
        owner_uid=document["metadata"]["uid"],
    )
    await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).put(address.key, encode(record))
    first = len(list(emulator))
    async with service_running(run_poller, k8s_settings(settings, url)):

        async def published() -> bool:
            try:
                await nc.jetstream().get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
            except Exception:
                return False
            return True

        await wait_for(published, timeout=20)
    return list(emulator)[first:]


def minicluster_owner(document: dict[str, Any]) -> dict[str, Any]:
    """The owner reference the creator gives an Ensemble's MiniClusters."""
    return {
        "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble",
        "name": document["metadata"]["name"], "uid": document["metadata"]["uid"],
        "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip


# --- NATS in production: authentication and TLS required ------------------------------------------------


@contextlib.contextmanager
def production_nats(directory: Path, passwords: dict[str, str]) -> Iterator[int]:
    """nats-server running the production overlay's rendered configuration, on a free local port.

    One server stands for the three: its cluster block (routes to the StatefulSet's other pods, which do
    not exist here) is left out; tests/test_ha_cluster.py runs a real three-server cluster."""
    for name, text in nats_files("overlays/production").items():
        if name == "cluster.conf":
            text = "# one server: no cluster\n"
        text = text.replace("/data/jetstream", str(directory / "jetstream")).replace("/etc/nats-tls", str(directory))
        text = text.replace("listen: 0.0.0.0:4222", "listen: 127.0.0.1:-1").replace("http: 0.0.0.0:8222", "")
        (directory / name).write_text(text)
    ports = directory / "ports"
    ports.mkdir()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "nats-server"),
            "-c",
            str(directory / "nats.conf"),
            "--ports_file_dir",
            str(ports),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "POD_NAME": "nats-0",
            **{f"NATS_{service.upper()}_PASSWORD": password for service, password in passwords.items()},
        },
    )
    try:
        deadline = time.monotonic() + 10
        while not list(ports.glob("*.ports")) and time.monotonic() < deadline:
            time.sleep(0.05)
        (found,) = ports.glob("*.ports")
        yield int(json.loads(found.read_text())["nats"][0].rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=10)


def plaintext_handshake(port: int, user: str, password: str) -> tuple[dict[str, Any], bytes, bool]:
    """The server's INFO, its answer to a CONNECT with the right credentials sent without TLS, and
    whether it then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        info = json.loads(conn.makefile("rb").readline().split(b" ", 1)[1])
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False, "tls_required": False}
        conn.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        answer = b""
        try:
            while chunk := conn.recv(4096):
                answer += chunk
        except TimeoutError:
            return info, answer, False
        except OSError:
            pass  # reset by the server: closed
    return info, answer, True


#: Each service's NATS password, as the Secret ensemble-nats-auth holds them.
PASSWORDS = {service: f"{index:x}" * 32 for index, service in enumerate(SERVICES, start=10)}


def service_url(service: str, port: int) -> str:
    """``service``'s NATS URL as its production Deployment builds it, pointed at a local server."""
    (container,) = deployment(render("overlays/production"), service)["spec"]["template"]["spec"]["containers"]
    url: str = next(e["value"] for e in container["env"] if e["name"] == "ENSEMBLE_NATS_URL")
    url = url.replace("$(NATS_PASSWORD)", PASSWORDS[service])
    return f"{url.rsplit('@', 1)[0]}@localhost:{port}"


@pytest.mark.skipif(kubectl_support.kubectl() is None, reason=kubectl_support.missing())
async def test_production_nats_refuses_clients_without_credentials_or_tls_and_the_services_get_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tls_files(tmp_path, "localhost", "127.0.0.1")
    with production_nats(tmp_path, PASSWORDS) as port:
        info, answer, closed = plaintext_handshake(port, "decider", PASSWORDS["decider"])
        assert info["tls_required"] is True and info["auth_required"] is True
        assert closed and b"PONG" not in answer, answer  # the right password in plain text gets nowhere

        trusted = ssl.create_default_context(cafile=str(ca))
        wrongs = (
            f"nats://127.0.0.1:{port}",
            f"nats://decider:nope@127.0.0.1:{port}",
            f"nats://decider:{PASSWORDS['poller']}@127.0.0.1:{port}",  # another service's password
        )
        for wrong in wrongs:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(wrong, tls=trusted, allow_reconnect=False, connect_timeout=3)
        # a client that does not trust the certificate does not talk to the server (no credential leaves)
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(
                f"nats://decider:{PASSWORDS['decider']}@localhost:{port}",
                tls=ssl.create_default_context(),
                allow_reconnect=False,
                connect_timeout=3,
            )

        # the services, configured as the production Deployments are: each its own user and password, the
        # CA from SSL_CERT_FILE; they upgrade to TLS because the server requires it
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        for service in SERVICES:
            client = await natsio.connect(Settings(nats_url=service_url(service, port)), service)
            try:
                await natsio.declare(client.jetstream())
                assert client.connected_url is not None and client.connected_url.hostname == "localhost"
            finally:
                await client.close()


@pytest.mark.skipif(kubectl_support.kubectl() is None, reason=kubectl_support.missing())
async def test_production_nats_lets_each_service_write_only_what_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files(tmp_path, "localhost", "127.0.0.1")))
    address = MemberAddress(NS, "acted", 0)
    with production_nats(tmp_path, PASSWORDS) as port:
        clients = {}
        for service in SERVICES:
            clients[service] = await nats.connect(service_url(service, port), allow_reconnect=False)
        try:
            await natsio.declare(clients["creator"].jetstream())
            allowed = [
                ("creator", f"$KV.{subjects.MEMBERS_BUCKET}.{address.key}"),
                ("poller", subjects.metrics(address)),
                ("decider", subjects.decisions(address)),
                ("decider", f"$KV.{subjects.DECIDER_BUCKET}.{address.key}"),
                ("actuator", subjects.applied(address)),
                ("actuator", f"$KV.{subjects.MEMBERS_BUCKET}.{address.key}"),
            ]
            for service, subject in allowed:
                assert (await clients[service].jetstream().publish(subject, b"{}", timeout=3)).seq > 0
            forged = [
                ("decider", f"$KV.{subjects.MEMBERS_BUCKET}.{address.key}"),  # point the poller elsewhere
                ("poller", subjects.decisions(address)),  # scale or submit to any member
                ("decider", subjects.metrics(address)),
                ("creator", subjects.decisions(address)),
                ("actuator", f"$KV.{subjects.DECIDER_BUCKET}.{address.key}"),
                ("decider", subjects.deadletter("actuator")),
            ]
            for service, subject in forged:
                with pytest.raises(nats.errors.TimeoutError):  # the server drops it: no acknowledgement
                    await clients[service].jetstream().publish(subject, b"{}", timeout=1)
            for service in SERVICES:  # and nobody deletes or purges what the others rely on
                with pytest.raises(nats.errors.TimeoutError):
                    await clients[service].jetstream(timeout=1).purge_stream(subjects.METRICS_STREAM)
            info = await clients["creator"].jetstream().stream_info(subjects.METRICS_STREAM)
            assert info.state.messages == 1
        finally:
            for client in clients.values():
                await client.close()


@pytest.mark.skipif(kubectl_support.kubectl() is None, reason=kubectl_support.missing())
async def test_the_four_services_run_an_ensemble_each_as_its_own_restricted_nats_user(tmp_path: Path) -> None:
    """Everything the services do on NATS (declare, consume, watch and read buckets, acknowledge, dead
    letters, write) fits the permissions of production's auth.conf: the example runs to its end."""
    ca = tls_files(tmp_path, "localhost", "127.0.0.1")
    stack = Stack(tmp_path / "stack")
    (tmp_path / "stack").mkdir()
    secret = "permissions-test"
    with production_nats(tmp_path, PASSWORDS) as port:
        try:
            sidecar = stack.start(
                "sidecar",
                [sys.executable, "-m", "ensemble_cli", "sidecar", "--port", "0", "--max-nodes", "4",
                 "--provision-delay", "1"],
                env={"ENSEMBLE_SIDECAR_TOKEN": ensemble_token(secret, "default", "hello-world")},
            )  # fmt: skip
            await wait_for(lambda: "\n" in sidecar.log.read_text(), timeout=20)
            endpoint = f"127.0.0.1:{sidecar.log.read_text().splitlines()[0]}"
            for service in SERVICES:
                env = {
                    "ENSEMBLE_NATS_URL": service_url(service, port),
                    "SSL_CERT_FILE": str(ca),
                    "ENSEMBLE_SIDECAR_TOKEN": secret,
                    "ENSEMBLE_FILE": str(REPO / "examples/hello-world.yaml"),
                    "ENSEMBLE_ENDPOINTS": f"0={endpoint}",
                }
                stack.start(service, [sys.executable, "-m", "ensemble_cli", service], env=env)
            reader = await nats.connect(
                service_url("creator", port), tls=ssl.create_default_context(cafile=str(ca)), allow_reconnect=False
            )
            try:

                async def terminated() -> bool:
                    assert stack.died() is None, f"{stack.died()} died"
                    try:  # the bucket too may not be declared yet
                        members = await reader.jetstream().key_value(subjects.MEMBERS_BUCKET)
                        entry = await members.get(MemberAddress("default", "hello-world", 0).key)
                    except Exception:
                        return False
                    return b'"phase":"terminated"' in (entry.value or b"")

                await wait_for(terminated, timeout=90, interval=0.5)
            finally:
                await reader.close()
        finally:
            await stack.stop()
    logs = "\n".join(path.read_text() for pattern in ("*.log", "*.err") for path in (tmp_path / "stack").glob(pattern))
    assert "nats error" not in logs and "ermissions violation" not in logs.lower()
