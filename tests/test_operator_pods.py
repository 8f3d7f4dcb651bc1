"""The MiniClusters the Flux Operator really builds, seen through kmock's API emulator over real HTTP: pods
named and labelled as the Job controller and the operator make them (its ``job-index`` label included,
wrong where names extend each other), owners by uid, sidecars that cannot run, Events kubectl shows,
the status printer columns, and the watches under the creator and the poller."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import kmock
import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from ensemble_core import minicluster, subjects
from ensemble_core.algorithms import get as algorithm
from ensemble_core.algorithms import parse_options
from ensemble_core.messages import Metrics, NodeCounts, QueueCounts, encode
from ensemble_core.settings import Settings
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from ensemble_core.wire import StatusPayload
from services.creator.service import run as run_creator
from services.poller.service import run as run_poller
from services.poller.service import to_metrics
from sidecar.server import serve_local
from tests.conftest import service_running, wait_for
from tests.test_kubernetes import (
    ENSEMBLE,
    ENSEMBLES,
    EVENTS,
    MINICLUSTERS,
    NS,
    PODS,
    api,
    applied,
    condition,
    create_ensemble,
    decide,
    ensemble_status,
    k8s_settings,
    live,
    member_record,
    member_sidecar,
    put_member,
    start_lead_pod,
)
from tests.test_minicluster import operator_pod

__all__ = ["api"]  # the fixture, shared with test_kubernetes

UID = ENSEMBLE["metadata"]["uid"]


def ensemble(name: str, uid: str, members: int = 1) -> dict[str, Any]:
    document = copy.deepcopy(ENSEMBLE)
    document["metadata"].update(name=name, uid=uid)
    document["spec"]["members"] = [copy.deepcopy(ENSEMBLE["spec"]["members"][0]) for _ in range(members)]
    return document


def pod_of(
    emulator: kmock.KubernetesEmulator, mc: str, index: int, ip: str, ensemble_name: str, job_index: str
) -> None:
    pod = operator_pod(mc, index, job_index=job_index, ip=ip)
    pod["metadata"]["namespace"] = NS
    pod["metadata"]["labels"][minicluster.ENSEMBLE_LABEL] = ensemble_name
    emulator.objects[PODS, NS, pod["metadata"]["name"]] = pod


async def record_of(nc: Client, address: MemberAddress) -> Any:
    try:
        entry = await (await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)).get(address.key)
    except KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value or b"")


async def test_members_of_miniclusters_whose_names_extend_each_other_find_their_own_lead_pods(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    # Ensemble "lammps" (MiniClusters lammps-0, lammps-1) and Ensemble "lammps-1" (MiniCluster lammps-1-0)
    await create_ensemble(url, ensemble("lammps", "11111111-0000-4000-8000-000000000001", members=2))
    await create_ensemble(url, ensemble("lammps-1", "11111111-0000-4000-8000-000000000002"))
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: len(live(emulator, MINICLUSTERS)) == 3, timeout=10)
        # job-index as the operator's controllers compute it from names across the namespace (labels.go):
        # lammps' controller strips "lammps-" from "lammps-1-0-…", so the lead pod of lammps-1 says 1, and
        # the pods of lammps-1-0 say 0 whatever their index
        pod_of(emulator, "lammps-0", 0, "10.0.0.1", "lammps", job_index="0")
        pod_of(emulator, "lammps-1", 0, "10.0.0.2", "lammps", job_index="1")
        pod_of(emulator, "lammps-1", 1, "10.0.0.3", "lammps", job_index="1")
        pod_of(emulator, "lammps-1-0", 0, "10.0.0.4", "lammps-1", job_index="0")
        pod_of(emulator, "lammps-1-0", 1, "10.0.0.5", "lammps-1", job_index="0")
        endpoints = {}
        for name, member in (("lammps", 0), ("lammps", 1), ("lammps-1", 0)):
            address = MemberAddress(NS, name, member)
            await wait_for(lambda address=address: record_of(nc, address), timeout=10)
            endpoints[str(address)] = (await record_of(nc, address))["endpoint"]
    assert endpoints == {
        f"{NS}/lammps/0": "10.0.0.1:7000",
        f"{NS}/lammps/1": "10.0.0.2:7000",  # not the pod the operator labelled job-index=0
        f"{NS}/lammps-1/0": "10.0.0.4:7000",
    }


async def test_an_ensemble_created_again_at_once_waits_for_the_dying_minicluster_and_starts_afresh(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    old_uid, new_uid = "22222222-0000-4000-8000-00000000000a", "22222222-0000-4000-8000-00000000000b"
    # what the first life left: its terminated member's record, and its MiniCluster being garbage-collected
    await put_member(emulator, nc)
    records = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
    address = MemberAddress(NS, "demo", 0)
    old = msgspec.json.decode((await records.get(address.key)).value or b"")
    await records.put(address.key, msgspec.json.encode({**old, "owner_uid": old_uid, "phase": "terminated"}))
    dying = emulator.objects[MINICLUSTERS, NS, "demo-0"]
    dying.patch(
        {"metadata": {"deletionTimestamp": "2026-12-01T10:00:00Z", "ownerReferences": [{
            "apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "name": "demo",
            "uid": old_uid, "controller": True}]}}
    )  # fmt: skip
    del emulator.objects[ENSEMBLES, NS, "demo"]
    await create_ensemble(url, ensemble("demo", new_uid))
    async with service_running(run_creator, k8s_settings(settings, url)):
        await asyncio.sleep(1.0)
        # the old life's record is forgotten; the dying MiniCluster is neither adopted nor replaced yet
        assert await member_record(nc) is None
        [mc] = live(emulator, MINICLUSTERS)
        assert mc["metadata"]["ownerReferences"][0]["uid"] == old_uid
        assert ensemble_status(emulator)["phase"] == "Pending"
        dying.delete()  # the garbage collector is done
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
        [mc] = live(emulator, MINICLUSTERS)
        assert mc["metadata"]["ownerReferences"][0]["uid"] == new_uid
        start_lead_pod(emulator, "demo-0", "10.3.3.3")
        await wait_for(lambda: member_record(nc), timeout=10)
    record = await member_record(nc)
    assert record is not None and (record.phase, record.owner_uid, record.endpoint) == (
        "active",
        new_uid,
        "10.3.3.3:7000",
    )


async def test_a_minicluster_of_that_name_that_is_not_ours_fails_the_ensemble_and_is_never_touched(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    users = {
        "apiVersion": "flux-framework.org/v1alpha2",
        "kind": "MiniCluster",
        "metadata": {"name": "demo-0", "namespace": NS},
        "spec": {"size": 2, "containers": [{"image": "x"}]},
    }
    emulator.objects[MINICLUSTERS, NS, "demo-0"] = copy.deepcopy(users)
    await create_ensemble(url, ENSEMBLE)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: condition(emulator, "Failed").get("status") == "True", timeout=10)
    failed = condition(emulator, "Failed")
    assert (
        failed["reason"] == "NameTaken"
        and "MiniCluster science/demo-0 exists and is not this Ensemble's" in failed["message"]
    )
    assert live(emulator, MINICLUSTERS) == [users]
    assert [r for r in emulator if r.resource == MINICLUSTERS and str(r.method.value).upper() != "GET"] == []
    assert await member_record(nc) is None


async def test_the_actuator_scales_and_deletes_only_a_minicluster_its_member_owns(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    from services.actuator.service import run as run_actuator

    emulator, url = api
    await put_member(emulator, nc)  # the record names the Ensemble's uid
    emulator.objects[MINICLUSTERS, NS, "demo-0"].patch(
        {
            "metadata": {
                "ownerReferences": [{"kind": "Ensemble", "name": "demo", "uid": "someone-else", "controller": True}]
            }
        }
    )
    async with service_running(run_actuator, k8s_settings(settings, url)):
        await decide(nc, 1, "scale", 3)
        await decide(nc, 2, "terminate")
        await wait_for(lambda: _has(applied(nc), 2), timeout=10)
    results = await applied(nc)
    assert [result.ok for result in results] == [False, False]
    assert all("is not this member's" in (result.error or "") for result in results)
    assert emulator.objects[MINICLUSTERS, NS, "demo-0"]["spec"]["size"] == 2 and live(emulator, MINICLUSTERS)
    assert list(emulator["patch", kmock.subresource("scale")]) == []


async def _has(source: Any, count: int) -> bool:
    return len(await source) >= count


async def test_a_sidecar_that_cannot_run_fails_the_ensemble_at_once_and_its_minicluster_is_deleted(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    await create_ensemble(url, ENSEMBLE)
    async with service_running(run_creator, k8s_settings(settings, url)):
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
        # the original's image has no `ensemble` command: the container exits 127 and restarts
        crashed = {"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                   "lastState": {"terminated": {"exitCode": 127, "reason": "Error"}}}  # fmt: skip
        start_lead_pod(emulator, "demo-0", "10.1.2.3", sidecar=crashed)
        await wait_for(lambda: condition(emulator, "Failed").get("status") == "True", timeout=10)
        await wait_for(lambda: live(emulator, MINICLUSTERS) == [], timeout=10)
    failed = condition(emulator, "Failed")
    assert failed["reason"] == "SidecarFailed"
    assert "exit 127, the command was not found" in failed["message"]
    assert "spec.members[0].sidecar.image" in failed["message"]
    [warning] = [e for e in live(emulator, EVENTS) if e["reason"] == "SidecarFailed"]
    assert warning["type"] == "Warning" and warning["involvedObject"]["uid"] == UID
    assert ensemble_status(emulator)["phase"] == "Failed"
    assert await member_record(nc) is None  # never registered: nothing polls a sidecar that cannot run


def describe_events(emulator: kmock.KubernetesEmulator, name: str, uid: str) -> list[dict[str, Any]]:
    """The Events ``kubectl describe ensemble NAME`` shows: its field selector
    ``involvedObject.name=NAME,involvedObject.namespace=NS,involvedObject.kind=Ensemble,involvedObject.uid=UID``
    (kmock has no field selectors, so it is applied here, field by field as the API server does)."""
    wanted = {"name": name, "namespace": NS, "kind": "Ensemble", "uid": uid}
    return [e for e in live(emulator, EVENTS) if all(e["involvedObject"].get(k) == v for k, v in wanted.items())]


async def test_the_actuators_events_name_the_ensembles_uid_so_kubectl_describe_shows_them(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    from services.actuator.service import run as run_actuator

    emulator, url = api
    async with member_sidecar(settings) as sidecar, service_running(run_actuator, k8s_settings(settings, url)):
        await put_member(emulator, nc, sidecar.endpoint)
        await decide(nc, 1, "scale", 3, reason="jobs waiting")
        await wait_for(lambda: _has(applied(nc), 1), timeout=10)
        await wait_for(lambda: describe_events(emulator, "demo", UID), timeout=5)
    [scaled] = describe_events(emulator, "demo", UID)
    assert scaled["reason"] == "Scaled" and "(2 -> 3)" in scaled["message"]
    assert describe_events(emulator, "demo", "another-life") == []


async def test_the_status_shows_nodes_up_and_jobs_from_the_last_metrics_and_unreachable_when_they_stop(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    await create_ensemble(url, ENSEMBLE)
    fast = msgspec.structs.replace(k8s_settings(settings, url), status_seconds=0.2)
    async with service_running(run_creator, fast):
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=10)
        start_lead_pod(emulator, "demo-0", "10.1.2.3")
        await wait_for(lambda: member_record(nc), timeout=10)
        address = MemberAddress(NS, "demo", 0)
        status = StatusPayload(
            nodes=NodeCounts(node_up_count=3, node_free_count=1, node_cores_up=3, node_cores_free=1),
            queue=QueueCounts(run=2, sched=1, inactive=5),
            finished=5,
            failed=1,
        )
        metrics = to_metrics(address, 0, time.time(), status, requested=4)
        await nc.jetstream().publish(subjects.metrics(address), encode(metrics))

        def shown() -> bool:
            member = (ensemble_status(emulator).get("members") or [{}])[0]
            return member.get("nodesUp") == 3

        await wait_for(shown, timeout=10)
        member = ensemble_status(emulator)["members"][0]
        assert (member["jobsRunning"], member["jobsFinished"], member["jobsFailed"]) == (2, 4, 1)
        assert ensemble_status(emulator)["jobsDone"] == 5 and member["phase"] == "Running"
        # no metrics for three checks (checkSeconds 1) and a few seconds: the poller lost the sidecar
        stale = msgspec.structs.replace(metrics, seq=1, time=time.time() - 30)
        await nc.jetstream().publish(subjects.metrics(address), encode(stale))
        await wait_for(lambda: ensemble_status(emulator)["members"][0]["phase"] == "Unreachable", timeout=10)
        fresh = msgspec.structs.replace(metrics, seq=2, time=time.time())
        await nc.jetstream().publish(subjects.metrics(address), encode(fresh))
        await wait_for(lambda: ensemble_status(emulator)["members"][0]["phase"] == "Running", timeout=10)


def ensemble_lists(emulator: kmock.KubernetesEmulator) -> int:
    """How many times the Ensembles were listed (a GET of the collection that is not a watch)."""
    return len([r for r in emulator if r.resource == ENSEMBLES and r.name is None and r.params.get("watch") is None
                and str(r.method.value).upper() == "GET"])  # fmt: skip


async def test_the_creator_reacts_to_a_new_ensemble_through_its_watch_not_its_resync(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    slow = msgspec.structs.replace(k8s_settings(settings, url), resync_seconds=300)
    async with service_running(run_creator, slow):
        await asyncio.sleep(1.0)  # listed (nothing) and watching
        lists_before = ensemble_lists(emulator)
        started = time.monotonic()
        await create_ensemble(url, ENSEMBLE)
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=5)
        took = time.monotonic() - started
        lists_after = ensemble_lists(emulator)
    assert took < 2.0, took
    assert lists_after == lists_before  # seen through the watch: no relist


async def test_a_410_gone_relists_and_a_429_waits_for_its_retry_after(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    seen: list[float] = []

    def listed(request: kmock.Request) -> None:
        seen.append(time.monotonic())  # no answer of its own: the emulator's list answers

    def throttled(request: kmock.Request) -> dict[str, Any]:
        seen.append(time.monotonic())
        return {"kind": "Status", "apiVersion": "v1", "code": 429, "reason": "TooManyRequests"}

    emulator[kmock.action.LIST, ENSEMBLES] << listed
    (emulator**1)[kmock.action.LIST, ENSEMBLES][:1] << 429 << kmock.headers({"Retry-After": "2"}) << throttled
    expired = {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired", "message": "too old"}
    gone = {"type": "ERROR", "object": expired}
    (emulator**1)[kmock.action.WATCH, ENSEMBLES][:1] << (gone,)
    await create_ensemble(url, ENSEMBLE)
    slow = msgspec.structs.replace(k8s_settings(settings, url), resync_seconds=300)
    started = time.monotonic()
    async with service_running(run_creator, slow):
        await wait_for(lambda: live(emulator, MINICLUSTERS), timeout=15)
        await wait_for(lambda: calls(emulator)[:5] == ["list", "list", "watch", "list", "watch"], timeout=10)
    assert seen[1] - seen[0] >= 2.0  # the throttled list was not retried before its Retry-After
    # the watch that expired (410) was followed by a relist and a new watch, well before any resync
    assert time.monotonic() - started < 15


def calls(emulator: kmock.KubernetesEmulator) -> list[str]:
    """The lists and watches of the Ensembles, in order."""
    return [
        "watch" if r.params.get("watch") else "list"
        for r in emulator
        if r.resource == ENSEMBLES and r.name is None and str(r.method.value).upper() == "GET"
    ]


async def test_in_kubernetes_mode_the_metrics_size_is_the_miniclusters_requested_size(
    api: tuple[kmock.KubernetesEmulator, str], nc: Client, settings: Settings
) -> None:
    emulator, url = api
    record = await put_member(emulator, nc)
    # the MiniCluster asks for 4; two pods are up, two Pending: its sidecar sees 2 nodes
    emulator.objects[MINICLUSTERS, NS, "demo-0"].patch({"spec": {"size": 4}})
    sidecar = await serve_local(token=ensemble_token(settings.sidecar_token, NS, "demo"), nodes=2, max_nodes=4)
    try:
        records = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
        here = msgspec.structs.replace(record, endpoint=f"127.0.0.1:{sidecar.port}")
        await records.put(MemberAddress(NS, "demo", 0).key, encode(here))
        async with service_running(run_poller, k8s_settings(settings, url)):
            address = MemberAddress(NS, "demo", 0)

            async def published() -> Metrics | None:
                try:
                    found = await nc.jetstream().get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
                except Exception:
                    return None
                return msgspec.json.decode(found.data or b"", type=Metrics)

            await wait_for(published, timeout=15)
            metrics = await published()
    finally:
        await sidecar.stop(grace=0.1)
    assert metrics is not None and (metrics.size, metrics.nodes.node_up_count) == (4, 2)
    # what the algorithms then decide with a 3-node job waiting: nothing that lowers spec.size below 4
    waiting = msgspec.structs.replace(metrics, waiting={3: 1}, next_jobs=[3], queue=QueueCounts(sched=1))
    for name, options in (("demand-fit", {}), ("workload-demand", {"scaleChecks": 1})):
        spec = msgspec.structs.replace(record, algorithm=msgspec.structs.replace(record.algorithm, name=name))
        parsed = parse_options(name, options)
        state = algorithm(name).initial_state(spec, parsed)
        for seq in range(3):
            state, decisions = algorithm(name).decide(spec, parsed, state, msgspec.structs.replace(waiting, seq=seq))
            for decision in decisions:
                assert not (decision.action == "scale" and (decision.size or 0) < 4), (name, decision)
