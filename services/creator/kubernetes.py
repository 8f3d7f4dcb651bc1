"""The creator in Kubernetes mode: Ensemble resources become MiniClusters and registered members.

The loop is level-triggered: every ``ENSEMBLE_RESYNC_SECONDS`` the Ensembles of ``ENSEMBLE_WATCH_NAMESPACE``
(or of every namespace) are listed and each is reconciled. Listing rather than a watch stream keeps the
loop free of a blocking client thread; a change is seen within one resync period.

1. it is validated (:func:`ensemble_core.spec.validate` and :func:`ensemble_core.minicluster.check`); an
   invalid one gets a ``Failed`` condition and one Warning Event listing every error by field path, and
   is not looked at again until its ``metadata.generation`` changes (no hot retries, no crash);
2. its Secret with the sidecar token (derived from ``ENSEMBLE_SIDECAR_TOKEN``) is created or updated;
3. each member without a record in ``ensemble-members`` gets its MiniCluster (get before create; 409
   AlreadyExists counts as created), and once the lead broker pod (``job-name=<minicluster>``,
   ``job-index=0``) is running with an IP, its ``MemberSpec`` (endpoint ``<pod IP>:<sidecar port>``) is
   written with KV ``create`` and its ``ready`` event published (deduplicated by ``Nats-Msg-Id``). A
   member with a record is never created again, so a terminated member stays terminated; an active
   member's record follows its lead broker pod to a new IP (compare-and-set);
4. the Ensemble's status (phase, members, conditions) is updated.

Then the records are swept: an active member whose MiniCluster is gone gets a ``gone`` event and its
record moves to ``terminated``; the records of an Ensemble that no longer exists are deleted (a new
Ensemble of the same name starts afresh). Every step can be repeated: a restart at any point creates
nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from ensemble_core import minicluster, natsio, subjects
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
from ensemble_core.messages import EventKind, MemberEvent, MemberSpec, encode
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


class Creator:
    """Reconciles Ensembles into MiniClusters and member records (see the module docstring)."""

    def __init__(self, kube: Kube, js: JetStreamContext, members: KeyValue, settings: Settings) -> None:
        self.kube = kube
        self.js = js
        self.members = members
        self.settings = settings

    async def reconcile_all(self) -> None:
        """Reconcile every watched Ensemble, then sweep the records of gone members and Ensembles."""
        documents = await self.kube.list_objects(
            ENSEMBLE_GROUP, ENSEMBLE_VERSION, ENSEMBLE_PLURAL, self.settings.watch_namespace
        )
        existing = set()
        for document in documents:
            metadata = document.get("metadata") or {}
            existing.add((metadata.get("namespace", ""), metadata.get("name", "")))
            try:
                await self.reconcile(document)
            except KubeError as exc:
                # one Ensemble the API will not serve now must not hold up the others: the next pass retries
                log.warning("reconcile failed: %s", exc, extra={"ensemble": metadata.get("name")})
            except Exception:
                log.exception("reconcile failed; retrying next pass", extra={"ensemble": metadata.get("name")})
        await self.sweep(existing)

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
        await self.kube.ensure_secret(minicluster.token_secret(ensemble, token, owner))
        tls = False
        if self.settings.sidecar_tls_secret:
            pair = await self.sidecar_tls(document)
            if pair is None:
                return  # told in an Event; retried next pass, once the Secret is there
            await self.kube.ensure_secret(minicluster.tls_secret(ensemble, *pair, owner))
            tls = True
        phases: dict[int, str] = {}
        for member in ensemble.members:
            try:
                phases[member.index] = await self.member(document, ensemble, member, owner, tls)
            except KubeError as exc:
                if exc.status not in (400, 422):
                    raise
                path = f"spec.members[{member.index}].minicluster"
                await self.fail(document, "MiniClusterRefused", f"{path}: the API refused the MiniCluster: {exc}")
                return
        await self.kube.update_status(namespace, name, lambda status, _: _summary(status, ensemble, phases, generation))

    async def member(self, document: Obj, ensemble: Ensemble, member: Member, owner: Obj, tls: bool) -> str:
        """Create one member's MiniCluster and register it once its lead broker is up; return its phase."""
        address = MemberAddress(ensemble.namespace, ensemble.name, member.index)
        with contextlib.suppress(KeyNotFoundError):
            entry = await self.members.get(address.key)
            if entry.value:
                spec = msgspec.json.decode(entry.value, type=MemberSpec)
                if spec.phase == "active":
                    await self.follow_lead(document, address, member, spec, entry.revision or 0)
                return _PHASES[spec.phase]
        name = minicluster.minicluster_name(ensemble.name, member)
        found = await self.kube.get(*MC, ensemble.namespace, name)
        if found is None:
            body = minicluster.build(ensemble, member, owner, tls=tls)
            if await self.kube.create(*MC, body):
                log.info("created MiniCluster", extra={"member": str(address), "minicluster": name})
                await self.kube.event(
                    document,
                    "Normal",
                    "Created",
                    f"member {member.index}: created MiniCluster {name} (size {member.size}, max {member.max_size})",
                    key=f"created:{name}:{metadata_uid(document)}",
                )
                await self.publish(address, "created", member.size, f"MiniCluster {name}")
        ip = await self.lead_ip(ensemble.namespace, name)
        if not ip:
            return "Creating"
        endpoint = f"{ip}:{member.sidecar.port}"
        readonly = status_token(ensemble_token(self.settings.sidecar_token, ensemble.namespace, ensemble.name))
        record = ensemble.member_spec(member, endpoint, created=time.time(), status_token=readonly)
        record = msgspec.structs.replace(record, name=name)
        try:
            await self.members.create(address.key, encode(record))
            log.info("registered member", extra={"member": str(address), "endpoint": endpoint})
        except KeyWrongLastSequenceError:
            log.info("member already registered", extra={"member": str(address)})
        await self.publish(address, "ready", member.size, f"sidecar at {endpoint}")
        return "Running"

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
        ip = await self.lead_ip(address.namespace, spec.name)
        endpoint = f"{ip}:{member.sidecar.port}"
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

    async def lead_ip(self, namespace: str, name: str) -> str:
        """The IP of the running lead broker pod of MiniCluster ``name``, or "" while there is none."""
        pods = await self.kube.pods(namespace, {minicluster.JOB_NAME_LABEL: name, minicluster.JOB_INDEX_LABEL: "0"})
        for pod in pods:
            status = pod.get("status") or {}
            if status.get("phase") == "Running" and status.get("podIP"):
                return str(status["podIP"])
        return ""

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

    async def sweep(self, existing: set[tuple[str, str]]) -> None:
        """Announce members whose MiniCluster vanished; forget the records of deleted Ensembles."""
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
            record = msgspec.json.decode(entry.value, type=MemberSpec)
            if (address.namespace, address.ensemble) not in existing:
                if record.phase == "active":
                    await self.publish(address, "gone", None, "the Ensemble was deleted")
                with contextlib.suppress(KeyNotFoundError):
                    await self.members.delete(key, last=entry.revision)
                log.info("forgot the member of a deleted Ensemble", extra={"member": str(address)})
                continue
            if record.phase != "active":
                continue
            found = await self.kube.get(*MC, address.namespace, record.name)
            if found is not None:
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


def _summary(status: Obj, ensemble: Ensemble, phases: dict[int, str], generation: object) -> None:
    """Write the creator's view into ``status`` (shape: docs/kubernetes.md): members, totals, phase, conditions."""
    for member in ensemble.members:
        entry = member_status(status, member.index)
        entry["phase"] = phases[member.index]
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
    kube = Kube(api_client(settings.kube_api))
    nc = await natsio.connect(settings, "creator")
    try:
        js = nc.jetstream()
        await natsio.declare(js)
        creator = Creator(kube, js, await natsio.bucket(js, subjects.MEMBERS_BUCKET), settings)
        while not stop.is_set():
            try:
                await creator.reconcile_all()
            except KubeError as exc:
                log.warning("cannot list Ensembles: %s", exc)
            except Exception:
                log.exception("reconciliation failed; retrying next pass")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.resync_seconds):  # not wait_for (3.11 cancellation)
                    await stop.wait()
    finally:
        await kube.close()
        await nc.drain()
