"""Kubernetes mode: the creator and actuator through the official client against kmock's API emulator + real NATS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import kmock
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from ensemble_core import minicluster, subjects
from ensemble_core.kube import Kube, api_client
from ensemble_core.messages import Applied, Decision, JobSpec, MemberEvent, MemberSpec, encode
from ensemble_core.settings import Settings, SettingsError
from ensemble_core.sidecar_client import SidecarClient
from ensemble_core.spec import validate
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token
from ensemble_core.wire import JobInfo, SubmitPayload, SubmitResult
from services.actuator.service import run as run_actuator
from services.creator.service import run as run_creator
from sidecar.server import serve_local
from tests import kmock_support
from tests.conftest import service_running, wait_for
from tests.test_minicluster import assert_valid_minicluster, operator_pod

NS = "science"
ENSEMBLES = kmock.resource("ensemble.flux-framework.org/v1alpha1/ensembles")
MINICLUSTERS = kmock.resource("flux-framework.org/v1alpha2/miniclusters")
PODS = kmock.resource("v1/pods")
EVENTS = kmock.resource("v1/events")
SECRETS = kmock.resource("v1/secrets")
ADDRESS = MemberAddress(NS, "demo", 0)

ENSEMBLE: dict[str, Any] = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "metadata": {"name": "demo", "namespace": NS, "uid": "3f9c2a10-0000-4000-8000-00000000d3e0", "generation": 1},
    "spec": {
        "checkSeconds": 1,
        "members": [
            {
                "minicluster": {
                    "spec": {
                        "size": 2,
                        "minSize": 1,
                        "maxSize": 4,
                        "containers": [{"image": "ghcr.io/converged-computing/metric-lammps:latest"}],
                    }
                },
                "sidecar": {"port": 7000},
                "jobs": [{"name": "lmp", "command": "lmp -in in.reaxc", "count": 4, "nodes": 2}],
            }
        ],
    },
}


@pytest.fixture
async def api() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    """kmock's Kubernetes emulator on a real HTTP port, with the resources of the operator declared.

    It answers create with 201 (the real API's code) and serves the MiniCluster's ``/scale`` subresource
    as the CRD declares it (``.spec.replicas`` of the Scale is the MiniCluster's ``.spec.size``).
    """
    async with kmock.KubernetesEmulator() as emulator, kmock_support.server(emulator) as server:
        for resource in ("ensemble.flux-framework.org/v1alpha1/ensembles", "flux-framework.org/v1alpha2/miniclusters"):
            emulator.resources[resource] = {}
        for resource in ("v1/pods", "v1/events", "v1/secrets", "coordination.k8s.io/v1/leases"):
            emulator.resources[resource] = {}
        emulator[kmock.action.CREATE] << 201 << (lambda request: request.data)

        def scale(request: kmock.Request) -> dict[str, Any]:
            found = emulator.objects[MINICLUSTERS, request.namespace, request.name]
            found.patch({"spec": {"size": request.data["spec"]["replicas"], "replicas": None}})
            return {"kind": "Scale", "spec": {"replicas": found["spec"]["size"]}}

        emulator["patch", kmock.subresource("scale")] << scale
        yield emulator, str(server.url).rstrip("/")


def k8s_settings(settings: Settings, url: str) -> Settings:
    return msgspec.structs.replace(settings, mode="kubernetes", kube_api=url, resync_seconds=0.2)


async def create_ensemble(url: str, document: dict[str, Any]) -> None:
    kube = Kube(api_client(url))
    assert await kube.create("ensemble.flux-framework.org", "v1alpha1", "ensembles", copy.deepcopy(document))
    await kube.close()


def start_lead_pod(
    emulator: kmock.KubernetesEmulator,
    minicluster_name: str,
    ip: str,
    *,
    sidecar: dict[str, Any] | None = None,
    ensemble: str = "demo",
) -> None:
    """What the Flux Operator and the Job controller do: the lead broker's pod (completion index 0), named and
    labelled as they make it, with the MiniCluster's pod labels, running with an IP and its sidecar up (or
    with the sidecar container status fields ``sidecar``)."""
    pod = operator_pod(minicluster_name, 0, job_index="0", ip=ip, sidecar=sidecar)
    pod["metadata"]["namespace"] = NS
    pod["metadata"]["labels"].update({minicluster.ENSEMBLE_LABEL: ensemble, minicluster.MEMBER_LABEL: "0"})
    emulator.objects[PODS, NS, pod["metadata"]["name"]] = pod


def live(emulator: kmock.KubernetesEmulator, resource: kmock.resource) -> list[dict[str, Any]]:
    return [dict(obj.raw) for key, obj in emulator.objects.items() if key[0] == resource and not obj.deleted]


def ensemble_status(emulator: kmock.KubernetesEmulator) -> dict[str, Any]:
    return dict(emulator.objects[ENSEMBLES, NS, "demo"].raw.get("status") or {})


def condition(emulator: kmock.KubernetesEmulator, kind: str) -> dict[str, Any]:
    return next((c for c in ensemble_status(emulator).get("conditions", []) if c["type"] == kind), {})


async def messages(nc: Client, subject: str, kind: type[Any]) -> list[Any]:
    """Every message on ``subject`` in the events stream, decoded."""
    js = nc.jetstream()
    if not (await js.stream_info(subjects.EVENTS_STREAM)).state.messages:
        return []
    sub = await js.subscribe(subject, stream=subjects.EVENTS_STREAM, ordered_consumer=True)
    found = []
    with contextlib.suppress(TimeoutError):
        while True:
            found.append(msgspec.json.decode((await sub.next_msg(timeout=0.3)).data, type=kind))
    await sub.unsubscribe()
    return found


async def member_record(nc: Client) -> MemberSpec | None:
    try:
        entry = await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).get(ADDRESS.key)
    except KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value or b"", type=MemberSpec)


async def test_an_ensemble_becomes_a_minicluster_with_the_sidecar_and_its_member_is_ready_once_the_lead_pod_is_up(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    await create_ensemble(url, ENSEMBLE)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
        [created] = live(emulator, MINICLUSTERS)
        assert_valid_minicluster(created)
        assert created["metadata"]["name"] == "demo-0"
        assert created["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "ensemble.flux-framework.org/v1alpha1",
                "kind": "Ensemble",
                "name": "demo",
                "uid": ENSEMBLE["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert created["spec"]["containers"][-1]["name"] == minicluster.SIDECAR_CONTAINER
        # the sidecar kills what is left on given-up ranks when the actuator stops waiting for them
        assert " --wait-for-broker inf --shrink-grace 600" in created["spec"]["containers"][-1]["command"]
        [secret] = live(emulator, SECRETS)
        assert secret["stringData"]["token"] == ensemble_token(settings.sidecar_token, NS, "demo")
        assert secret["metadata"]["ownerReferences"][0]["uid"] == ENSEMBLE["metadata"]["uid"]
        await wait_for(lambda: ensemble_status(emulator).get("phase") == "Pending", timeout=5)
        assert await member_record(nc) is None  # not before its sidecar has an address

        start_lead_pod(emulator, "demo-0", "10.1.2.3")
        await wait_for(lambda: member_record(nc), timeout=10)
        record = await member_record(nc)
        assert record is not None
        assert (record.endpoint, record.name, record.size, record.max_size) == ("10.1.2.3:7000", "demo-0", 2, 4)
        assert record.status_token == status_token(ensemble_token(settings.sidecar_token, NS, "demo"))
        await wait_for(lambda: condition(emulator, "Ready").get("status") == "True", timeout=5)
        status = ensemble_status(emulator)
        assert status["members"] == [{"index": 0, "phase": "Running", "minicluster": "demo-0", "requestedSize": 2}]
        assert (status["phase"], status["memberCount"], status["jobsTotal"], status["size"]) == ("Running", 1, 4, 2)
        events = await messages(nc, subjects.events(ADDRESS), MemberEvent)
        assert [e.event for e in events] == ["created", "ready"]
        assert any(e["reason"] == "Created" and e["type"] == "Normal" for e in live(emulator, EVENTS))

        # the MiniCluster disappears (deleted by hand): the member is announced gone and no longer active
        emulator.objects[MINICLUSTERS, NS, "demo-0"].delete()

        async def gone() -> bool:
            found = await messages(nc, subjects.events(ADDRESS), MemberEvent)
            return [e.event for e in found][-1:] == ["gone"]

        await wait_for(gone, timeout=10)
        record = await member_record(nc)
        assert record is not None and record.phase == "terminated"
        await asyncio.sleep(0.5)
        assert live(emulator, MINICLUSTERS) == []  # a terminated member is never created again


async def test_a_member_follows_its_lead_broker_pod_to_a_new_ip(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    await create_ensemble(url, ENSEMBLE)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
        start_lead_pod(emulator, "demo-0", "10.1.2.3")
        await wait_for(lambda: member_record(nc), timeout=10)

        # the pod is rescheduled: gone for a while (the record keeps its endpoint), then back elsewhere
        [pod] = [key for key in emulator.objects if key[0] == PODS]
        emulator.objects[pod].delete()
        await asyncio.sleep(0.6)  # three passes
        record = await member_record(nc)
        assert record is not None and record.endpoint == "10.1.2.3:7000"
        start_lead_pod(emulator, "demo-0", "10.9.8.7")

        async def moved() -> bool:
            found = await member_record(nc)
            return found is not None and found.endpoint == "10.9.8.7:7000"

        await wait_for(moved, timeout=10)
        record = await member_record(nc)
        assert record is not None and (record.phase, record.size, record.name) == ("active", 2, "demo-0")
        await asyncio.sleep(0.6)
        [event] = [e for e in live(emulator, EVENTS) if e["reason"] == "SidecarMoved"]
        assert "10.9.8.7:7000 (was 10.1.2.3:7000)" in event["message"]


async def test_with_sidecar_tls_the_creator_waits_for_the_secret_then_mounts_a_copy_into_the_sidecar(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    await create_ensemble(url, ENSEMBLE)
    tls_settings = msgspec.structs.replace(
        k8s_settings(settings, url), sidecar_tls_secret="ensemble-system/ensemble-sidecar-tls"
    )
    chain, key = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", b"-----BEGIN PRIVATE KEY-----\nx\n"
    async with service_running(run_creator, tls_settings):
        # no Secret yet: a Warning, and no MiniCluster whose sidecar nobody could reach
        await wait_for(lambda: [e for e in live(emulator, EVENTS) if e["reason"] == "SidecarTLSMissing"], timeout=10)
        assert live(emulator, MINICLUSTERS) == []
        emulator.objects[SECRETS, "ensemble-system", "ensemble-sidecar-tls"] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "ensemble-sidecar-tls", "namespace": "ensemble-system"},
            "data": {"tls.crt": base64.b64encode(chain).decode(), "tls.key": base64.b64encode(key).decode()},
        }
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
    [created] = live(emulator, MINICLUSTERS)
    assert_valid_minicluster(created)
    sidecar = created["spec"]["containers"][-1]
    assert sidecar["command"].endswith(
        f"--tls-cert {minicluster.TLS_DIR}/tls.crt --tls-key {minicluster.TLS_DIR}/tls.key"
    )
    copy_name = minicluster.tls_secret_name("demo", chain)
    assert sidecar["volumes"] == {
        minicluster.TLS_VOLUME: {"secretName": copy_name, "path": minicluster.TLS_DIR, "readOnly": True}
    }
    [copy_] = [secret for secret in live(emulator, SECRETS) if secret["metadata"]["name"] == copy_name]
    assert copy_["metadata"]["namespace"] == NS and copy_["type"] == "kubernetes.io/tls"
    assert copy_["stringData"] == {"tls.crt": chain.decode(), "tls.key": key.decode()}
    assert copy_["metadata"]["ownerReferences"][0]["uid"] == ENSEMBLE["metadata"]["uid"]


async def test_an_invalid_ensemble_gets_a_failed_condition_and_one_warning_event_naming_the_field(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    document = copy.deepcopy(ENSEMBLE)
    document["spec"]["members"][0]["jobs"][0]["nodes"] = 12
    document["spec"]["members"][0]["algorithm"] = {"name": "workload-demand", "options": {"scaleUpChecks": 4}}
    await create_ensemble(url, document)
    async with service_running(run_creator, k8s_settings(settings, url)) as task:
        await wait_for(lambda: condition(emulator, "Failed").get("status") == "True", timeout=10)
        failed = condition(emulator, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.members[0].jobs[0].nodes: 12 exceeds maxSize 4" in failed["message"]
        assert "did you mean scaleChecks?" in failed["message"]
        assert ensemble_status(emulator)["phase"] == "Failed"
        await asyncio.sleep(1.0)  # five more passes: nothing is retried hot, nothing crashes
        assert not task.done()
        warnings = [e for e in live(emulator, EVENTS) if e["type"] == "Warning"]
        assert len(warnings) == 1
        assert "spec.members[0].jobs[0].nodes" in warnings[0]["message"]
        assert warnings[0]["involvedObject"]["name"] == "demo"
        assert live(emulator, MINICLUSTERS) == []
        assert await member_record(nc) is None


async def test_a_creator_restarted_mid_creation_creates_nothing_twice(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    # the first create is stored but its answer is lost (409 when the creator retries): already there
    (emulator**1)["post", MINICLUSTERS][:1] << 409 << {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
    await create_ensemble(url, ENSEMBLE)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: ensemble_status(emulator).get("phase") == "Pending", timeout=10)
    both = k8s_settings(settings, url)
    async with service_running(run_creator, both), service_running(run_creator, both):
        start_lead_pod(emulator, "demo-0", "10.1.2.3")
        await wait_for(lambda: condition(emulator, "Ready").get("status") == "True", timeout=10)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await asyncio.sleep(0.5)
    assert len(live(emulator, MINICLUSTERS)) == 1
    assert len(list(emulator["post", MINICLUSTERS])) == 1  # get-before-create: one attempt in all
    assert len(live(emulator, SECRETS)) == 1
    events = await messages(nc, subjects.events(ADDRESS), MemberEvent)
    assert [e.event for e in events] == ["ready"]  # the lost create's answer left no "created" event
    revisions = await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).history(ADDRESS.key)
    assert len(revisions) == 1


async def put_member(emulator: kmock.KubernetesEmulator, nc: Client, endpoint: str = "10.1.2.3:7000") -> MemberSpec:
    """An Ensemble, its member's MiniCluster (as the creator makes it) and its record, as after creation,
    its sidecar at ``endpoint``."""
    ensemble, errors = validate(ENSEMBLE, NS)
    assert ensemble is not None, errors
    member = ensemble.members[0]
    emulator.objects[ENSEMBLES, NS, "demo"] = copy.deepcopy(ENSEMBLE)
    uid = ENSEMBLE["metadata"]["uid"]
    owner = {"apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "name": "demo", "uid": uid,
             "controller": True}  # fmt: skip
    emulator.objects[MINICLUSTERS, NS, "demo-0"] = minicluster.build(
        ensemble, member, owner, token_secret=minicluster.token_secret_name("demo", "t")
    )
    record = msgspec.structs.replace(ensemble.member_spec(member, endpoint), name="demo-0", owner_uid=uid)
    await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).put(ADDRESS.key, encode(record))
    return record


async def decide(nc: Client, seq: int, action: str, size: int | None = None, reason: str = "") -> Decision:
    decision = Decision(
        namespace=NS,
        ensemble="demo",
        member=0,
        id=f"{ADDRESS.key}:{seq}",
        time=100.0 + seq,
        based_on=seq,
        action=action,
        size=size,
        reason=reason,
    )
    await nc.jetstream().publish(subjects.decisions(ADDRESS), encode(decision), headers={"Nats-Msg-Id": decision.id})
    return decision


async def applied(nc: Client) -> list[Applied]:
    return await messages(nc, subjects.applied(ADDRESS), Applied)


async def test_scale_decisions_patch_the_scale_subresource_within_bounds_and_terminate_deletes_the_minicluster(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    async with member_sidecar(settings) as sidecar, service_running(run_actuator, k8s_settings(settings, url)):
        await put_member(emulator, nc, sidecar.endpoint)
        await decide(nc, 1, "scale", 9, reason="11 jobs waiting")
        await wait_for(lambda: _count(applied(nc), 1), timeout=10)
        [grow] = await applied(nc)
        assert (grow.ok, grow.size_before, grow.size_after) == (True, 2, 4)  # clamped to maxSize, read back
        assert emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 4
        [patch] = list(emulator["patch", kmock.subresource("scale")])
        assert patch.data == {"spec": {"replicas": 4}}
        member = ensemble_status(emulator)["members"][0]
        assert (member["requestedSize"], member["lastDecision"], member["lastReason"]) == (
            4,
            "scale 4",
            "11 jobs waiting",
        )
        assert condition(emulator, "Scaling")["status"] == "True"
        [scaled] = [e for e in live(emulator, EVENTS) if e["reason"] == "Scaled"]
        assert scaled["type"] == "Normal" and "(2 -> 4)" in scaled["message"]
        assert (await sidecar.status()).size == 4  # grown first: no rank of the pods that come is left drained

        await decide(nc, 2, "scale", 0)
        await wait_for(lambda: _count(applied(nc), 2), timeout=10)
        assert (await applied(nc))[1].size_after == 1  # clamped up to minSize
        assert emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 1
        assert (await sidecar.status()).size == 1  # nothing ran on the pods that left: no wait

        await decide(nc, 3, "terminate", reason="all jobs done")
        await wait_for(lambda: _count(applied(nc), 3), timeout=10)
        assert (await applied(nc))[2].ok
        assert live(emulator, MINICLUSTERS) == []
        record = await member_record(nc)
        assert record is not None and record.phase == "terminated"
        assert ensemble_status(emulator)["members"][0]["phase"] == "Terminated"
        assert any(e["reason"] == "Terminated" for e in live(emulator, EVENTS))


async def test_bursts_of_409_and_500_from_the_api_are_retried_and_the_decision_is_applied_once(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    (emulator**1)["get", MINICLUSTERS][:2] << 503 << {"kind": "Status", "code": 503, "message": "etcd leader changed"}
    (emulator**1)["patch", kmock.subresource("scale")][:3] << 500 << {"kind": "Status", "code": 500, "message": "boom"}
    (
        (emulator**1)["patch", kmock.subresource("status")][:2]
        << 409
        << {"kind": "Status", "code": 409, "reason": "Conflict"}
    )
    (emulator**1)["post", EVENTS][:2] << 500 << {"kind": "Status", "code": 500, "message": "boom"}
    async with member_sidecar(settings) as sidecar, service_running(run_actuator, k8s_settings(settings, url)):
        await put_member(emulator, nc, sidecar.endpoint)
        decision = await decide(nc, 1, "scale", 3, reason="grow")
        await wait_for(lambda: _count(applied(nc), 1), timeout=20)
        await asyncio.sleep(0.5)
    [result] = await applied(nc)
    assert (result.ok, result.size_before, result.size_after) == (True, 2, 3)
    assert emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 3
    assert len(list(emulator["patch", kmock.subresource("scale")])) == 4  # three refused, one accepted
    assert ensemble_status(emulator)["members"][0]["lastReason"] == decision.reason
    assert len([e for e in live(emulator, EVENTS) if e["reason"] == "Scaled"]) == 1
    records = await nc.jetstream().key_value(subjects.ACTUATOR_BUCKET)
    assert list(msgspec.json.decode((await records.get(ADDRESS.key)).value or b"")["applied"]) == [decision.id]


async def _count(source: Coroutine[Any, Any, list[Any]], count: int) -> bool:
    return len(await source) >= count


@pytest.mark.parametrize("value", ["no-slash", "a/b/c", "/name", "namespace/"])
async def test_a_malformed_sidecar_tls_secret_setting_stops_the_creator_naming_it(
    settings: Settings, value: str
) -> None:
    bad = msgspec.structs.replace(settings, mode="kubernetes", kube_api="http://127.0.0.1:9", sidecar_tls_secret=value)
    with pytest.raises(SettingsError, match="ENSEMBLE_SIDECAR_TLS_SECRET: expected <namespace>/<name>"):
        await run_creator(bad, asyncio.Event())


async def test_a_secret_is_created_once_and_never_read_changed_or_overwritten(
    api: tuple[kmock.KubernetesEmulator, str],
) -> None:
    emulator, url = api
    kube = Kube(api_client(url))
    body = {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s", "namespace": NS}, "stringData": {"token": "one"},
    }  # fmt: skip
    try:
        assert await kube.create_secret(copy.deepcopy(body)) is True
        # a Secret of that name (someone else's, or ours) is there: left exactly as it is
        assert await kube.create_secret({**body, "stringData": {"token": "two"}}) is False
        assert len(list(emulator["post", SECRETS])) == 2
        assert list(emulator["patch", SECRETS]) == [] and list(emulator["get", SECRETS]) == []
        assert live(emulator, SECRETS)[0]["stringData"] == {"token": "one"}
        emulator.objects[SECRETS, "ensemble-system", "tls"] = {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls", "namespace": "ensemble-system"},
            "data": {"tls.crt": "b25l"},
        }  # fmt: skip
        assert await kube.secret_data("ensemble-system", "tls") == {"tls.crt": b"one"}
        assert await kube.secret_data(NS, "missing") is None
    finally:
        await kube.close()


@contextlib.asynccontextmanager
async def member_sidecar(settings: Settings, *, grace: float = 600.0) -> AsyncIterator[SidecarClient]:
    """A real sidecar on the local backend for :func:`put_member`'s member (its ensemble's token, 2 nodes up to
    the MiniCluster's maxSize of 4, jobs killed ``grace`` seconds after a shrink gave their node up), and a
    client of it; the member's endpoint is ``client.endpoint``."""
    token = ensemble_token(settings.sidecar_token, NS, "demo")
    running = await serve_local(token=token, nodes=2, max_nodes=4, shrink_grace=grace)
    client = SidecarClient(f"127.0.0.1:{running.port}", token, timeout=5)
    try:
        yield client
    finally:
        await client.close()
        await running.stop(grace=0.1)


async def run_jobs(sidecar: SidecarClient, *commands: str) -> None:
    """Start one one-node job per command on the sidecar and wait until they all run."""
    jobs = [JobSpec(name=f"job-{i}", command=command) for i, command in enumerate(commands)]
    await sidecar.action("submit", SubmitPayload(jobs=jobs), SubmitResult)

    async def running() -> bool:
        return (await sidecar.status()).queue.run == len(commands)

    await wait_for(running, timeout=10)


def scale_patches(emulator: kmock.KubernetesEmulator) -> list[Any]:
    return [request.data for request in emulator["patch", kmock.subresource("scale")]]


async def actuator_record(nc: Client) -> dict[str, Any]:
    """The member's ``ensemble-actuator`` record as JSON (empty before it has one)."""
    try:
        entry = await (await nc.jetstream().key_value(subjects.ACTUATOR_BUCKET)).get(ADDRESS.key)
    except KeyNotFoundError:
        return {}
    record: dict[str, Any] = msgspec.json.decode(entry.value or b"")
    return record


async def decisions_settled(nc: Client) -> tuple[int, int]:
    """The actuator consumer's (unacknowledged, redelivered) message counts."""
    info = await nc.jetstream().consumer_info(subjects.DECISIONS_STREAM, "actuator")
    return info.num_ack_pending, info.num_redelivered


async def test_a_shrink_waits_for_the_pods_that_leave_to_be_idle_and_then_patches_the_scale(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings, tmp_path: Path
) -> None:
    emulator, url = api
    done = tmp_path / "done"
    async with member_sidecar(settings) as sidecar:
        await put_member(emulator, nc, sidecar.endpoint)
        await run_jobs(sidecar, "sleep 30", f"sh -c 'until [ -e {done} ]; do sleep 0.05; done'")
        async with service_running(run_actuator, k8s_settings(settings, url)):
            shrink = await decide(nc, 1, "scale", 1, reason="one node is enough")

            async def drained() -> bool:
                return (await sidecar.status()).size == 1

            await wait_for(drained, timeout=10)  # the sidecar is told first: the pod that leaves takes no work
            await asyncio.sleep(2.5)
            status = await sidecar.status()
            assert (status.draining, status.queue.run) == (1, 2)
            assert scale_patches(emulator) == [] and emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 2
            assert await applied(nc) == []
            assert (await actuator_record(nc))["drain"]["decision"]["id"] == shrink.id
            assert await decisions_settled(nc) == (0, 0)  # acknowledged once: its effect, the drain, is stored

            done.touch()  # the job on the node that leaves ends
            await wait_for(lambda: _count(applied(nc), 1), timeout=10)
            [result] = await applied(nc)
            assert (result.ok, result.size_before, result.size_after) == (True, 2, 1)
            assert scale_patches(emulator) == [{"spec": {"replicas": 1}}]
            assert emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 1
            assert (await sidecar.status()).queue.run == 1  # the other job goes on: nothing was killed
            assert (await actuator_record(nc)).get("drain") is None
            events = await messages(nc, subjects.events(ADDRESS), MemberEvent)
            assert [(e.event, e.size) for e in events] == [("scaled", 1)]


async def test_after_the_shrink_grace_the_scale_is_patched_anyway_and_the_job_there_is_killed_as_lost(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    async with member_sidecar(settings, grace=4.0) as sidecar:
        await put_member(emulator, nc, sidecar.endpoint)
        await run_jobs(sidecar, "sleep 30", "sleep 30")
        impatient = msgspec.structs.replace(k8s_settings(settings, url), shrink_grace=1.0)
        async with service_running(run_actuator, impatient):
            started = time.monotonic()
            await decide(nc, 1, "scale", 1)
            await wait_for(lambda: _count(applied(nc), 1), timeout=10)
            waited = time.monotonic() - started
            [result] = await applied(nc)
            assert (result.ok, result.size_before, result.size_after) == (True, 2, 1)
            assert scale_patches(emulator) == [{"spec": {"replicas": 1}}]
            assert 1.0 <= waited < 4.0 and (await sidecar.status()).queue.run == 2  # patched while the job ran

            async def lost() -> bool:
                return (await sidecar.action("jobinfo", {"id": 2}, JobInfo)).lost

            await wait_for(lost, timeout=10)  # the sidecar's own grace: the younger job is killed, lost
            info = await sidecar.action("jobinfo", {"id": 2}, JobInfo)
            assert info.reason == "lost: killed after the shrink grace of 4 s (its node was given up)"
            status = await sidecar.status()
            assert (status.queue.run, status.draining, status.counts["lost"]) == (1, 0, 1)


async def test_a_grow_while_a_shrink_drains_undrains_and_the_shrink_is_reported_superseded(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    async with member_sidecar(settings) as sidecar:
        await put_member(emulator, nc, sidecar.endpoint)
        await run_jobs(sidecar, "sleep 30", "sleep 30")
        async with service_running(run_actuator, k8s_settings(settings, url)):
            shrink = await decide(nc, 1, "scale", 1)

            async def pending() -> bool:
                return ((await actuator_record(nc)).get("drain") or {}).get("decision", {}).get("id") == shrink.id

            await wait_for(pending, timeout=10)
            grow = await decide(nc, 2, "scale", 2, reason="more work came")
            await wait_for(lambda: _count(applied(nc), 2), timeout=10)
            results = {result.decision: result for result in await applied(nc)}
            assert (results[grow.id].ok, results[grow.id].size_after) == (True, 2)
            assert not results[shrink.id].ok and "superseded by decision" in results[shrink.id].error
            status = await sidecar.status()
            assert (status.size, status.draining, status.nodes.node_up_count, status.queue.run) == (2, 0, 2, 2)
            await asyncio.sleep(1.5)  # the drain is over: nothing patches the scale later
            assert scale_patches(emulator) == [] and emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 2
            assert (await actuator_record(nc)).get("drain") is None


async def test_an_actuator_restarted_mid_drain_goes_on_with_the_same_drain_and_grace(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    grace = msgspec.structs.replace(k8s_settings(settings, url), shrink_grace=4.0)
    async with member_sidecar(settings) as sidecar:
        await put_member(emulator, nc, sidecar.endpoint)
        await run_jobs(sidecar, "sleep 30", "sleep 30")
        async with service_running(run_actuator, grace):
            await decide(nc, 1, "scale", 1)
            await wait_for(lambda: _count_drain(nc), timeout=10)
            since = (await actuator_record(nc))["drain"]["since"]
            await asyncio.sleep(2.5)
        assert await applied(nc) == [] and scale_patches(emulator) == []
        restarted = time.time()
        async with service_running(run_actuator, grace):
            await wait_for(lambda: _count(applied(nc), 1), timeout=10)
        [result] = await applied(nc)
        assert result.ok and result.size_after == 1 and scale_patches(emulator) == [{"spec": {"replicas": 1}}]
        # the grace ran from the first actuator's start of the drain, not from the restart
        assert since + 4.0 <= result.time < restarted + 4.0
        assert await decisions_settled(nc) == (0, 0)  # the decision was never delivered again


async def _count_drain(nc: Client) -> bool:
    return bool((await actuator_record(nc)).get("drain"))


async def test_with_a_node_budget_a_held_back_scale_shows_wanted_and_granted_in_the_status_with_an_event(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    budgeted = msgspec.structs.replace(k8s_settings(settings, url), node_budget=3)
    async with member_sidecar(settings) as sidecar:
        await put_member(emulator, nc, sidecar.endpoint)
        # another ensemble's member holds 1 node of the 3 (its record only: it has decided nothing yet)
        other = msgspec.structs.replace(await put_member(emulator, nc, sidecar.endpoint), ensemble="other", size=1)
        members = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
        await members.put(MemberAddress(NS, "other", 0).key, encode(other))
        async with service_running(run_actuator, budgeted):
            await decide(nc, 1, "scale", 4, reason="11 jobs waiting")
            await decide(nc, 2, "scale", 4, reason="11 jobs waiting")  # asked again at the next check
            await wait_for(lambda: _count(applied(nc), 2), timeout=10)
    result = (await applied(nc))[0]
    assert (result.ok, result.size_before, result.size_after, result.size_wanted) == (True, 2, 2, 4)
    assert scale_patches(emulator) == []  # held at the 2 it has: nothing to patch
    member = ensemble_status(emulator)["members"][0]
    assert (member["nodesWanted"], member["nodesGranted"], member["requestedSize"]) == (4, 2, 2)
    [held] = [e for e in live(emulator, EVENTS) if e["reason"] == "BudgetHeld"]  # one for the same hold
    assert held["type"] == "Normal" and "holds it at 2 of the 4 nodes it wants" in held["message"]
    assert held["involvedObject"]["uid"] == ENSEMBLE["metadata"]["uid"]
