"""The creator in Kubernetes mode: Ensemble resources become MiniClusters and registered members.

Ensembles and the pods of their MiniClusters are listed and then watched (:class:`ensemble_core.kube_watch.Watcher`:
resourceVersion, relist on 410 Gone, back off on 429 with its Retry-After, a full relist every
``ENSEMBLE_RESYNC_SECONDS`` as a safety net). A change to an Ensemble, or to a pod of one of its MiniClusters,
reconciles that Ensemble at once; the relist reconciles every one.

1. it is validated (:func:`ensemble_core.spec.validate` and :func:`ensemble_core.minicluster.check`); an
   invalid one gets a ``Failed`` condition and one Warning Event listing every error by field path, and
   is not looked at again until its ``metadata.generation`` changes (no hot retries, no crash);
2. its Secret with the sidecar token (derived from ``ENSEMBLE_SIDECAR_TOKEN``), named after the Ensemble and
   the token, is created (never read nor changed: the creator may create Secrets, nothing more);
3. each member without a record of *this* Ensemble (same uid) in ``ensemble-members`` gets its MiniCluster
   (get before create; 409 AlreadyExists counts as created). A MiniCluster of that name is adopted only
   when its controller owner reference is this Ensemble's uid: one of an earlier Ensemble of the same name
   is waited for (the garbage collector is deleting it), anyone else's fails the Ensemble and is left alone.
   Once the lead broker's pod (completion index 0, not terminating) runs with its sidecar container up,
   the member's ``MemberSpec`` (endpoint ``<pod IP>:<sidecar port>``, IPv6 in brackets, ``owner_uid``) is
   written with KV ``create`` and its ``ready`` event published (deduplicated by ``Nats-Msg-Id``). A member
   with a record is never created again, so a terminated member stays terminated; an active member's
   record follows its lead broker's pod to a new IP (compare-and-set);
4. a sidecar container that cannot run (image not pulled, command not found, restarting) fails the Ensemble
   with a Warning Event saying why, and its MiniCluster is deleted before its restarts exhaust the Job's
   backoffLimit;
5. the Ensemble's status (phase, members, conditions) is updated, and every ``ENSEMBLE_STATUS_SECONDS`` each
   member's nodes up and job counts from its last metrics (``Unreachable`` when none came for three checks).

Only one creator acts at a time: replicas elect a leader with a Kubernetes Lease
(``ENSEMBLE_LEADER_LEASE``, :mod:`ensemble_core.leader`); the others stand by and take over within
``ENSEMBLE_LEADER_LEASE_SECONDS`` of the leader's last renewal.

Then the records are swept: an active member whose MiniCluster is gone gets a ``gone`` event and its
record moves to ``terminated``; the records of an Ensemble that no longer exists (or exists with another
uid) are deleted. Every step can be repeated: a restart at any point creates nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from ensemble_core import leader, minicluster, natsio, subjects
from ensemble_core.kube import (
    ENSEMBLE_GROUP,
    ENSEMBLE_PLURAL,
    ENSEMBLE_VERSION,
    Kube,
    KubeError,
    api_client,
    member_status,
    owner_reference,
    set_condition,
)
from ensemble_core.kube_watch import Watcher
from ensemble_core.messages import EventKind, MemberEvent, MemberSpec, Metrics, decode, encode
from ensemble_core.settings import Settings, SettingsError, env_name
from ensemble_core.spec import Ensemble, Member, validate
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token, status_token

log = logging.getLogger("creator")

Obj = dict[str, Any]
#: The MiniCluster resource as (group, version, plural).
MC = (minicluster.GROUP, minicluster.VERSION, minicluster.PLURAL)

#: The member phases shown in ``status.members[].phase``, by the phase of the member's record.
_PHASES = {"active": "Running", "completed": "Completed", "terminated": "Terminated"}
#: Checks without metrics after which a registered member is shown ``Unreachable``.
_SILENT_CHECKS = 3


class NotOurs(Exception):
    """An object the member needs exists under our name but belongs to someone else; the message says whose."""


class Creator:
    """Reconciles Ensembles into MiniClusters and member records (see the module docstring)."""

    def __init__(self, kube: Kube, js: JetStreamContext, members: KeyValue, settings: Settings) -> None:
        self.kube = kube
        self.js = js
        self.members = members
        self.settings = settings
        self.image = settings.sidecar_image or minicluster.DEFAULT_IMAGE
        self._dirty: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        namespace = settings.watch_namespace
        custom, core = kube.custom, kube.core
        ensembles: tuple[Any, ...]
        if namespace:
            ensembles = (
                custom.list_namespaced_custom_object,
                ENSEMBLE_GROUP,
                ENSEMBLE_VERSION,
                namespace,
                ENSEMBLE_PLURAL,
            )
            pods: tuple[Any, ...] = (core.list_namespaced_pod, namespace)
        else:
            ensembles = (custom.list_cluster_custom_object, ENSEMBLE_GROUP, ENSEMBLE_VERSION, ENSEMBLE_PLURAL)
            pods = (core.list_pod_for_all_namespaces,)
        self.ensembles = Watcher(
            kube, "ensembles", *ensembles, on_change=self._ensemble_changed, resync=settings.resync_seconds
        )
        self.pods = Watcher(
            kube,
            "pods",
            *pods,
            on_change=self._pod_changed,
            resync=settings.resync_seconds,
            label_selector=minicluster.ENSEMBLE_LABEL,
        )

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Watch Ensembles and pods, reconcile what changed, refresh member statuses, until ``stop``."""
        watchers = [asyncio.create_task(w.run(stop)) for w in (self.ensembles, self.pods)]
        try:
            await self.ensembles.synced.wait()
            next_status = 0.0
            next_sweep = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if self._dirty:
                    await self.reconcile_dirty()
                if now >= next_status:
                    await self.refresh_statuses()
                    next_status = now + self.settings.status_seconds
                if now >= next_sweep:
                    await self.sweep_all()
                    next_sweep = now + self.settings.resync_seconds
                self._wake.clear()
                if self._dirty:
                    continue
                wait = max(0.0, min(next_status, next_sweep) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # not wait_for (3.11 cancellation)
                        await self._wake.wait()
                if stop.is_set():
                    break
        finally:
            for task in watchers:
                task.cancel()
            for task in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _ensemble_changed(self, obj: Obj) -> None:
        metadata = obj.get("metadata") or {}
        self._mark(str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))

    def _pod_changed(self, pod: Obj) -> None:
        metadata = pod.get("metadata") or {}
        label = (metadata.get("labels") or {}).get(minicluster.ENSEMBLE_LABEL)
        namespace = str(metadata.get("namespace") or "")
        if not label:
            return
        for ns, name in list(self.ensembles.cache):
            if ns == namespace and minicluster.label_value(name) == label:
                self._mark(ns, name)

    def _mark(self, namespace: str, name: str) -> None:
        self._dirty.add((namespace, name))
        self._wake.set()

    async def reconcile_dirty(self) -> None:
        """Reconcile every Ensemble marked changed since the last pass (a deleted one: sweep its records)."""
        dirty, self._dirty = self._dirty, set()
        for namespace, name in sorted(dirty):
            document = self.ensembles.get(namespace, name)
            if document is None:
                continue  # deleted: the sweep forgets its records
            try:
                await self.reconcile(document)
            except KubeError as exc:
                # one Ensemble the API will not serve now must not hold up the others: retried at the next
                # change or relist
                log.warning("reconcile failed: %s", exc, extra={"ensemble": name})
            except Exception:
                log.exception("reconcile failed; retrying at the next change or relist", extra={"ensemble": name})

    async def reconcile_all(self) -> None:
        """Reconcile every Ensemble of the cache, then sweep (what a relist amounts to)."""
        for namespace, name in list(self.ensembles.cache):
            self._mark(namespace, name)
        await self.reconcile_dirty()
        await self.sweep_all()

    async def sweep_all(self) -> None:
        """Sweep the records of gone members and Ensembles against the cached Ensembles."""
        existing = {
            (ns, name): str((obj.get("metadata") or {}).get("uid") or "")
            for (ns, name), obj in self.ensembles.cache.items()
        }
        try:
            await self.sweep(existing)
        except KubeError as exc:
            log.warning("sweep failed: %s", exc)

    # -- one Ensemble ------------------------------------------------------------------------------

    async def reconcile(self, document: Obj) -> None:
        """Bring one Ensemble's MiniClusters, Secret, records and status up to date."""
        metadata = document.get("metadata") or {}
        namespace, name = metadata.get("namespace", "default"), metadata.get("name", "")
        if metadata.get("deletionTimestamp"):
            return
        generation = metadata.get("generation")
        if _failed_at(document, generation):
            return
        ensemble, errors = validate(document, namespace)
        if ensemble is not None:
            errors = [error for member in ensemble.members for error in minicluster.check(member)]
        if ensemble is None or errors:
            await self.fail(document, "InvalidSpec", "the Ensemble is invalid: " + "; ".join(errors))
            return
        owner = owner_reference(document)
        token = ensemble_token(self.settings.sidecar_token, namespace, name)
        secrets = [minicluster.token_secret(ensemble, token, owner)]
        if self.settings.sidecar_tls_secret:
            pair = await self.sidecar_tls(document)
            if pair is None:
                return  # told in an Event; retried at the next relist, once the Secret is there
            secrets.append(minicluster.tls_secret(ensemble, *pair, owner))
        for secret in secrets:
            # named after their content: created once, never read or changed
            await self.kube.create_secret(secret)
        names = [secret["metadata"]["name"] for secret in secrets]
        try:
            phases: dict[int, str] = {}
            for member in ensemble.members:
                try:
                    phases[member.index] = await self.member(document, ensemble, member, owner, names)
                except KubeError as exc:
                    if exc.status not in (400, 422):
                        raise
                    path = f"spec.members[{member.index}].minicluster"
                    await self.fail(document, "MiniClusterRefused", f"{path}: the API refused the MiniCluster: {exc}")
                    return
        except NotOurs as exc:
            await self.fail(document, "NameTaken", str(exc))
            return
        if "Failed" in phases.values():
            return
        await self.kube.update_status(namespace, name, lambda status, _: _summary(status, ensemble, phases, generation))

    async def member(self, document: Obj, ensemble: Ensemble, member: Member, owner: Obj, secrets: list[str]) -> str:
        """Create one member's MiniCluster and register it once its lead broker is up; return its phase.

        ``secrets``: the names of the token Secret and (with TLS) of the TLS Secret its sidecar mounts.
        """
        address = MemberAddress(ensemble.namespace, ensemble.name, member.index)
        uid = metadata_uid(document)
        with contextlib.suppress(KeyNotFoundError):
            entry = await self.members.get(address.key)
            if entry.value:
                spec = decode(entry.value, MemberSpec)
                if spec.owner_uid and spec.owner_uid != uid:
                    # the record of an earlier Ensemble of this name: a new owner starts afresh
                    with contextlib.suppress(KeyNotFoundError, KeyWrongLastSequenceError):
                        await self.members.delete(address.key, last=entry.revision)
                    log.info("forgot the record of an earlier Ensemble", extra={"member": str(address)})
                else:
                    if spec.phase == "active":
                        await self.follow_lead(document, address, member, spec, entry.revision or 0)
                    return _PHASES[spec.phase]
        name = minicluster.minicluster_name(ensemble.name, member)
        found = await self.kube.get(*MC, ensemble.namespace, name)
        if found is not None and not minicluster.owned_by(found, uid):
            return self._not_ours(ensemble, member, name, found)
        if found is not None and (found.get("metadata") or {}).get("deletionTimestamp"):
            return "Creating"  # ours, being deleted (a sidecar that failed): created again once gone
        if found is None:
            body = minicluster.build(
                ensemble,
                member,
                owner,
                token_secret=secrets[0],
                tls_secret=secrets[1] if len(secrets) > 1 else "",
                image=self.image,
                shrink_grace=self.settings.shrink_grace,
            )
            if await self.kube.create(*MC, body):
                log.info("created MiniCluster", extra={"member": str(address), "minicluster": name})
                await self.kube.event(
                    document,
                    "Normal",
                    "Created",
                    f"member {member.index}: created MiniCluster {name} (size {member.size}, max {member.max_size})",
                    key=f"created:{name}:{uid}",
                )
                await self.publish(address, "created", member.size, f"MiniCluster {name}")
            return "Creating"  # its pods come later: a change to them reconciles again
        # pods of an earlier MiniCluster of this name (one deleted for a failed sidecar) may linger a moment
        since = str((found.get("metadata") or {}).get("creationTimestamp") or "")
        pods = [
            pod
            for pod in self.pods_of(ensemble.namespace)
            if str((pod.get("metadata") or {}).get("creationTimestamp") or since) >= since
        ]
        problem = minicluster.sidecar_problem(pods, name)
        if problem is not None:
            await self.sidecar_failed(document, member, name, problem)
            return "Failed"
        lead = minicluster.lead_pod(pods, name)
        ip = minicluster.pod_ip(lead) if lead is not None and minicluster.sidecar_ready(lead) else ""
        if not ip:
            return "Creating"
        endpoint = minicluster.endpoint(ip, member.sidecar.port)
        readonly = status_token(ensemble_token(self.settings.sidecar_token, ensemble.namespace, ensemble.name))
        record = ensemble.member_spec(member, endpoint, created=time.time(), status_token=readonly)
        record = msgspec.structs.replace(record, name=name, owner_uid=uid)
        try:
            await self.members.create(address.key, encode(record))
            log.info("registered member", extra={"member": str(address), "endpoint": endpoint})
        except KeyWrongLastSequenceError:
            log.info("member already registered", extra={"member": str(address)})
        await self.publish(address, "ready", member.size, f"sidecar at {endpoint}")
        return "Running"

    def _not_ours(self, ensemble: Ensemble, member: Member, name: str, found: Obj) -> str:
        """A MiniCluster of the member's name that this Ensemble does not own: wait for an earlier Ensemble's
        to be deleted; anything else is someone else's (:class:`NotOurs`)."""
        references = (found.get("metadata") or {}).get("ownerReferences") or []
        earlier = [ref for ref in references if ref.get("kind") == "Ensemble" and ref.get("name") == ensemble.name]
        if earlier:
            log.info(
                "waiting for the MiniCluster of an earlier Ensemble of this name to be deleted",
                extra={"minicluster": name, "owner": earlier[0].get("uid")},
            )
            return "Creating"
        owners = ", ".join(f"{ref.get('kind')} {ref.get('name')}" for ref in references) or "no owner"
        raise NotOurs(
            f"spec.members[{member.index}]: MiniCluster {ensemble.namespace}/{name} exists and is not this "
            f"Ensemble's ({owners}); it is left alone: rename the Ensemble, or delete that MiniCluster"
        )

    def pods_of(self, namespace: str) -> list[Obj]:
        """The watched pods (of every MiniCluster of ours) in ``namespace``."""
        return [pod for (ns, _), pod in self.pods.cache.items() if ns == namespace]

    async def sidecar_failed(self, document: Obj, member: Member, name: str, problem: str) -> None:
        """Fail the Ensemble for a sidecar container that cannot run, and delete its MiniCluster at once
        (its restarts would otherwise count toward the Job's backoffLimit until the operator tears it down)."""
        image = member.sidecar.image or self.image
        message = (
            f"member {member.index}: the sidecar container of MiniCluster {name} cannot run ({problem}); its "
            f"MiniCluster is deleted. Set spec.members[{member.index}].sidecar.image to an image with the "
            f"'ensemble' command (was {image}; unset, the operator's own image is used) and the member is "
            "created again"
        )
        await self.fail(document, "SidecarFailed", message)
        await self.kube.delete(*MC, (document.get("metadata") or {}).get("namespace", "default"), name)

    async def sidecar_tls(self, document: Obj) -> tuple[bytes, bytes] | None:
        """The certificate chain and key of ``ENSEMBLE_SIDECAR_TLS_SECRET``, or None (with a Warning Event).

        The poller and actuator accept sidecars only over TLS then, so no MiniCluster is created without it.
        """
        namespace, name = self.settings.sidecar_tls_secret.split("/", 1)
        data = await self.kube.secret_data(namespace, name)
        chain, key = (data or {}).get("tls.crt", b""), (data or {}).get("tls.key", b"")
        if b"CERTIFICATE-----" in chain and b"PRIVATE KEY-----" in key:
            return chain, key
        problem = "does not exist" if data is None else "lacks a PEM tls.crt and tls.key"
        message = (
            f"the sidecar TLS Secret {namespace}/{name} ({env_name('sidecar_tls_secret')}) {problem}; "
            "no MiniCluster is created until it does (cert-manager: the sidecar-tls component)"
        )
        log.warning(message, extra={"ensemble": (document.get("metadata") or {}).get("name")})
        await self.kube.event(
            document, "Warning", "SidecarTLSMissing", message, key=f"tls:{metadata_uid(document)}:{problem}"
        )
        return None

    async def follow_lead(
        self, document: Obj, address: MemberAddress, member: Member, spec: MemberSpec, revision: int
    ) -> None:
        """Point an active member's record at its lead broker pod's current IP, if that pod came back with another.

        A rescheduled or restarted lead broker pod gets a new IP; the record is updated (compare-and-set:
        a record changed meanwhile is left to the next pass), the poller then follows the new endpoint and
        the actuator reads it with the next decision. While no lead pod runs, the record is left alone.
        """
        lead = minicluster.lead_pod(self.pods_of(address.namespace), spec.name)
        ip = minicluster.pod_ip(lead) if lead is not None else ""
        endpoint = minicluster.endpoint(ip, member.sidecar.port)
        if not ip or endpoint == spec.endpoint:
            return
        try:
            await self.members.update(
                address.key, encode(msgspec.structs.replace(spec, endpoint=endpoint)), last=revision
            )
        except KeyWrongLastSequenceError:
            return
        log.info("lead broker moved", extra={"member": str(address), "endpoint": endpoint, "was": spec.endpoint})
        await self.kube.event(
            document,
            "Normal",
            "SidecarMoved",
            f"member {member.index}: the lead broker pod of {spec.name} is now at {endpoint} (was {spec.endpoint})",
            key=f"moved:{spec.name}:{endpoint}:{metadata_uid(document)}",
        )

    async def fail(self, document: Obj, reason: str, message: str) -> None:
        """Mark the Ensemble Failed (condition, phase) and post one Warning Event with ``message``."""
        metadata = document.get("metadata") or {}
        generation = metadata.get("generation")
        log.warning("ensemble failed: %s", message, extra={"ensemble": metadata.get("name"), "reason": reason})

        def change(status: Obj, _: Obj) -> None:
            status["phase"] = "Failed"
            if generation is not None:
                status["observedGeneration"] = generation
            set_condition(status, "Failed", True, reason, message, generation)
            set_condition(status, "Ready", False, reason, "see the Failed condition", generation)

        await self.kube.update_status(metadata.get("namespace", "default"), metadata.get("name", ""), change)
        await self.kube.event(
            document, "Warning", reason, message, key=f"failed:{metadata_uid(document)}:{generation}:{message}"
        )

    async def publish(self, address: MemberAddress, event: EventKind, size: int | None, message: str) -> None:
        """Publish a member event, deduplicated per member and kind."""
        body = MemberEvent(
            namespace=address.namespace,
            ensemble=address.ensemble,
            member=address.member,
            event=event,
            time=time.time(),
            size=size,
            message=message,
        )
        await self.js.publish(subjects.events(address), encode(body), headers={"Nats-Msg-Id": f"{address.key}:{event}"})

    # -- what the members report -------------------------------------------------------------------

    async def refresh_statuses(self) -> None:
        """Write each registered member's nodes up, job counts and reachability (its last metrics) into
        its Ensemble's status; an Ensemble whose figures did not change is not written."""
        try:
            keys = await self.members.keys()
        except NoKeysError:
            return
        latest: dict[tuple[str, str], dict[int, tuple[MemberSpec, Metrics | None]]] = {}
        for key in keys:
            try:
                address = MemberAddress.from_key(key)
                entry = await self.members.get(key)
            except (ValueError, KeyNotFoundError):
                continue
            if not entry.value or (address.namespace, address.ensemble) not in self.ensembles.cache:
                continue
            record = decode(entry.value, MemberSpec)
            latest.setdefault((address.namespace, address.ensemble), {})[address.member] = (
                record,
                await self.last_metrics(address),
            )
        now = time.time()
        for (namespace, name), reports in latest.items():
            try:
                await self.kube.update_status(namespace, name, functools.partial(_reports, reports=reports, now=now))
            except KubeError as exc:
                log.warning("status of %s/%s not written: %s", namespace, name, exc)

    async def last_metrics(self, address: MemberAddress) -> Metrics | None:
        """The member's last metrics on NATS, or None."""
        try:
            found = await self.js.get_last_msg(subjects.METRICS_STREAM, subjects.metrics(address))
        except NotFoundError:
            return None
        try:
            return decode(found.data or b"", Metrics)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def sweep(self, existing: dict[tuple[str, str], str]) -> None:
        """Announce members whose MiniCluster vanished; forget the records of deleted Ensembles
        (``existing``: the Ensembles there are, with their uids)."""
        try:
            keys = await self.members.keys()
        except NoKeysError:
            return
        for key in keys:
            try:
                address = MemberAddress.from_key(key)
                entry = await self.members.get(key)
            except (ValueError, KeyNotFoundError):
                continue
            if self.settings.watch_namespace and address.namespace != self.settings.watch_namespace:
                continue
            if not entry.value:
                continue
            record = decode(entry.value, MemberSpec)
            uid = existing.get((address.namespace, address.ensemble))
            if uid is None or (record.owner_uid and uid and record.owner_uid != uid):
                if record.phase == "active":
                    await self.publish(address, "gone", None, "the Ensemble was deleted")
                with contextlib.suppress(KeyNotFoundError, KeyWrongLastSequenceError):
                    await self.members.delete(key, last=entry.revision)
                log.info("forgot the member of a deleted Ensemble", extra={"member": str(address)})
                continue
            if record.phase != "active":
                continue
            found = await self.kube.get(*MC, address.namespace, record.name)
            if found is not None and (not record.owner_uid or minicluster.owned_by(found, record.owner_uid)):
                continue
            try:
                gone = msgspec.structs.replace(record, phase="terminated")
                await self.members.update(key, encode(gone), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # the actuator changed it meanwhile: look again next pass
            await self.publish(address, "gone", 0, f"MiniCluster {record.name} disappeared")
            log.warning("member gone: its MiniCluster disappeared", extra={"member": str(address)})


def metadata_uid(document: Obj) -> str:
    """The Ensemble's uid (distinguishes two lives of Ensembles with the same name)."""
    return str((document.get("metadata") or {}).get("uid", ""))


def _failed_at(document: Obj, generation: object) -> bool:
    """Whether this generation of the Ensemble was already reported Failed (and must not be retried)."""
    for condition in (document.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return bool(condition.get("observedGeneration") == generation)
    return False


def _reports(status: Obj, _: Obj, *, reports: dict[int, tuple[MemberSpec, Metrics | None]], now: float) -> None:
    """Write what the members' last metrics say into ``status`` (docs/kubernetes.md has the shape)."""
    for index, (record, metrics) in reports.items():
        entry = member_status(status, index)
        if metrics is not None:
            entry["nodesUp"] = metrics.nodes.node_up_count
            entry["jobsSubmitted"] = sum(group.submitted for group in metrics.groups.values())
            entry["jobsRunning"] = metrics.queue.run
            entry["jobsFinished"] = metrics.finished - metrics.failed
            entry["jobsFailed"] = metrics.failed
        if record.phase == "active" and entry.get("phase") in ("Running", "Unreachable"):
            window = _SILENT_CHECKS * record.check_seconds + 5
            last = metrics.time if metrics is not None else record.created
            entry["phase"] = "Unreachable" if now - last > window else "Running"
    status["jobsDone"] = sum(
        int(entry.get("jobsFinished") or 0) + int(entry.get("jobsFailed") or 0) for entry in status.get("members") or []
    )


def _summary(status: Obj, ensemble: Ensemble, phases: dict[int, str], generation: object) -> None:
    """Write the creator's view into ``status`` (shape: docs/kubernetes.md): members, totals, phase, conditions."""
    for member in ensemble.members:
        entry = member_status(status, member.index)
        phase = phases[member.index]
        # a registered member the poller cannot reach stays Unreachable until its metrics come again
        if not (phase == "Running" and entry.get("phase") == "Unreachable"):
            entry["phase"] = phase
        entry["minicluster"] = minicluster.minicluster_name(ensemble.name, member)
        entry.setdefault("requestedSize", member.size)
    status["memberCount"] = len(ensemble.members)
    status["jobsTotal"] = sum(job.count for member in ensemble.members for job in member.jobs)
    status["size"] = sum(int(entry.get("requestedSize") or 0) for entry in status["members"])
    if isinstance(generation, int):
        status["observedGeneration"] = generation
    gen = generation if isinstance(generation, int) else None
    values = set(phases.values())
    if "Creating" in values:
        status["phase"] = "Pending"
        waiting = sorted(index for index, phase in phases.items() if phase == "Creating")
        set_condition(
            status, "Ready", False, "MembersCreating", f"waiting for the lead broker of member(s) {waiting}", gen
        )
    elif values <= {"Completed", "Terminated"}:
        status["phase"] = "Completed"
        set_condition(status, "Ready", False, "MembersFinished", "every member has completed or terminated", gen)
        set_condition(status, "Completed", True, "MembersFinished", "every member has completed or terminated", gen)
    else:
        status["phase"] = "Running"
        set_condition(status, "Ready", True, "MembersRunning", "every member's sidecar is registered", gen)
    if any(c.get("type") == "Failed" for c in status.get("conditions") or []):
        set_condition(status, "Failed", False, "NoFailure", "the Ensemble is valid", gen)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Reconcile Ensembles until ``stop`` is set."""
    if not settings.sidecar_token:
        raise SettingsError(
            f"{env_name('sidecar_token')}: required in Kubernetes mode (the secret each Ensemble's sidecar "
            "token is derived from); a sidecar must never accept jobs without one"
        )
    secret = settings.sidecar_tls_secret
    if secret and (secret.count("/") != 1 or not all(secret.split("/"))):
        raise SettingsError(
            f"{env_name('sidecar_tls_secret')}: expected <namespace>/<name> of a kubernetes.io/tls Secret, "
            f"got {secret!r}"
        )
    lease = settings.leader_lease
    if lease.count("/") != 1 or not all(lease.split("/")):
        raise SettingsError(f"{env_name('leader_lease')}: expected <namespace>/<name> of a Lease, got {lease!r}")
    kube = Kube(api_client(settings.kube_api))
    nc = await natsio.connect(settings, "creator")
    try:
        js = nc.jetstream()
        await natsio.declare(js, settings)
        members = await natsio.bucket(js, subjects.MEMBERS_BUCKET)

        async def lead(ended: asyncio.Event) -> None:
            # a new Creator each term: what it knew as the leader before may be stale by now
            await Creator(kube, js, members, settings).run(ended)

        namespace, name = lease.split("/")
        elector = leader.LeaderElector(
            kube, namespace, name, identity=leader.identity(), duration=settings.leader_lease_seconds
        )
        await elector.run(lead, stop)
    finally:
        await kube.close()
        await nc.drain()
