"""The Kubernetes API as the creator and actuator use it: one small async wrapper over the official client.

The official client is synchronous; every call runs in a worker thread (``asyncio.to_thread``) so the
NATS loop keeps running. Answers that say "try again" are retried here with bounded exponential backoff:
409 Conflict (an optimistic-concurrency clash on a ``resourceVersion``), 429, every 5xx, and a broken
connection. What remains is raised as :class:`KubeError`, whose ``transient`` flag tells the caller
whether a later retry may succeed (the backoff ran out) or not (404, 422 and the like). A create that
answers 409 AlreadyExists is not retried: it means an earlier attempt (or an earlier life of the
service) already made the object, and :meth:`Kube.create` returns without error.

Ensemble status is written read-modify-write with the ``resourceVersion`` read, so the creator and the
actuator (which both write ``status.members``) never overwrite each other's change: the loser gets 409,
reads again and reapplies its change.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

log = logging.getLogger(__name__)

ENSEMBLE_GROUP = "ensemble.flux-framework.org"
ENSEMBLE_VERSION = "v1alpha1"
ENSEMBLE_PLURAL = "ensembles"
ENSEMBLE_KIND = "Ensemble"

#: Label and annotation prefix of everything this operator makes.
DOMAIN = "ensemble.flux-framework.org"
#: The name of the component that posts Events (``kubectl describe`` shows it as the source).
COMPONENT = "ensemble-operator"

#: HTTP statuses worth retrying: a conflict on a resourceVersion, throttling, and server-side failures.
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
#: The longest ``Retry-After`` honoured (seconds); a server asking for more is retried after this.
LONGEST_RETRY_AFTER = 60.0

T = TypeVar("T")
Obj = dict[str, Any]


class KubeError(Exception):
    """A Kubernetes call failed; ``transient`` says whether a later retry may succeed."""

    def __init__(self, message: str, *, status: int, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        #: the seconds a throttled answer asked to wait (``Retry-After``), when it said
        self.retry_after = retry_after


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently a retryable answer is retried."""

    attempts: int = 6
    first: float = 0.2
    longest: float = 5.0

    def delays(self) -> list[float]:
        """The waits between attempts (one fewer than ``attempts``)."""
        return [min(self.first * 2**i, self.longest) for i in range(self.attempts - 1)]


def api_client(host: str = "") -> Any:
    """An API client: to ``host`` when given, else in-cluster (service account), else the kubeconfig."""
    if host:
        return k8s.ApiClient(k8s.Configuration(host=host.rstrip("/")))
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def retry_after(exc: k8s.ApiException) -> float | None:
    """The seconds a 429 (or 503) answer's ``Retry-After`` header asks to wait, or None."""
    headers = exc.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return None if seconds is None or seconds < 0 else min(seconds, LONGEST_RETRY_AFTER)


def _message(exc: k8s.ApiException) -> str:
    """The API server's own explanation (the ``message`` of its Status object), else the reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or f"HTTP {exc.status}")


def short_name(name: str, limit: int, *, suffix: str = "") -> str:
    """``name + suffix`` if it fits in ``limit`` characters and is a DNS label, else a stable shortened form.

    The shortened form keeps as much of the name as fits, with dots replaced, and adds eight hex digits of
    a hash of the full name so two long names that share a prefix stay distinct.
    """
    if len(name) + len(suffix) <= limit and "." not in name:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    head = name.replace(".", "-")[:keep].rstrip("-")
    return f"{head}-{digest}{suffix}" if head else f"{digest}{suffix}"


def owner_reference(ensemble: Obj) -> Obj:
    """The owner reference that makes an object belong to (and be deleted with) the Ensemble."""
    metadata = ensemble.get("metadata", {})
    return {
        "apiVersion": f"{ENSEMBLE_GROUP}/{ENSEMBLE_VERSION}",
        "kind": ENSEMBLE_KIND,
        "name": metadata.get("name", ""),
        "uid": metadata.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def set_condition(status: Obj, kind: str, value: bool, reason: str, message: str, generation: int | None) -> None:
    """Set one ``metav1.Condition`` in ``status.conditions``; its transition time moves only when the value does."""
    conditions: list[Obj] = status.setdefault("conditions", [])
    wanted = "True" if value else "False"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for condition in conditions:
        if condition.get("type") == kind:
            if condition.get("status") != wanted:
                condition["lastTransitionTime"] = now
            condition.update(status=wanted, reason=reason, message=message[:32768])
            if generation is not None:
                condition["observedGeneration"] = generation
            return
    condition = {"type": kind, "status": wanted, "reason": reason, "message": message[:32768]}
    condition["lastTransitionTime"] = now
    if generation is not None:
        condition["observedGeneration"] = generation
    conditions.append(condition)


def member_status(status: Obj, index: int) -> Obj:
    """The entry of member ``index`` in ``status.members`` (created, and kept sorted, when missing)."""
    members: list[Obj] = status.setdefault("members", [])
    for entry in members:
        if entry.get("index") == index:
            return entry
    entry = {"index": index}
    members.append(entry)
    members.sort(key=lambda item: int(item.get("index", 0)))
    return entry


class Kube:
    """Async access to the few API calls the operator makes, with retries (see the module docstring)."""

    def __init__(self, api: Any, backoff: Backoff | None = None) -> None:
        self.api = api
        self.custom = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.backoff = backoff or Backoff()

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one client call in a thread, retrying retryable answers; raise :class:`KubeError` otherwise."""
        delays = self.backoff.delays()
        for attempt in range(len(delays) + 1):
            wait: float | None = None
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except k8s.ApiException as exc:
                status = int(exc.status or 0)
                error = KubeError(f"{what}: {_message(exc)} (HTTP {status})", status=status, transient=status == 0)
                if status not in RETRY_STATUSES and status != 0:
                    raise error from exc
                wait = retry_after(exc) if status in (429, 503) else None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = KubeError(f"{what}: {exc}", status=0, transient=True)
            if attempt == len(delays):
                raise KubeError(
                    f"{error} — gave up after {attempt + 1} attempts",
                    status=error.status,
                    transient=True,
                    retry_after=wait,
                ) from error
            # throttled: the server says how long to wait (API priority and fairness sends Retry-After)
            delay = max(delays[attempt], wait) if wait is not None else delays[attempt]
            log.info("retrying in %.1f s: %s", delay, error, extra={"attempt": attempt + 1})
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def get(self, group: str, version: str, plural: str, namespace: str, name: str) -> Obj | None:
        """A namespaced custom object, or None when it does not exist."""
        try:
            found = await self.call(
                f"get {plural} {namespace}/{name}",
                self.custom.get_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                name,
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return cast(Obj, found)

    async def list_objects(self, group: str, version: str, plural: str, namespace: str = "") -> list[Obj]:
        """Every custom object of a kind, in one namespace or (``namespace`` empty) in all."""
        if namespace:
            found = await self.call(
                f"list {plural} in {namespace}",
                self.custom.list_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
            )
        else:
            found = await self.call(f"list {plural}", self.custom.list_cluster_custom_object, group, version, plural)
        return list(cast(Obj, found).get("items", []))

    async def create(self, group: str, version: str, plural: str, body: Obj) -> bool:
        """Create a namespaced custom object; False when it already existed (409 AlreadyExists)."""
        namespace = body["metadata"]["namespace"]
        try:
            await self.call(
                f"create {plural} {namespace}/{body['metadata']['name']}",
                self._create_once,
                group,
                version,
                namespace,
                plural,
                body,
            )
        except _AlreadyExists:
            return False
        return True

    def _create_once(self, group: str, version: str, namespace: str, plural: str, body: Obj) -> None:
        # 409 on create is "already there", not a conflict to retry: it leaves the retry loop as itself.
        # Strict: an unknown field (a typo in the user's MiniCluster spec) is refused with 400 naming it,
        # where the API server's default would drop it silently.
        try:
            self.custom.create_namespaced_custom_object(
                group, version, namespace, plural, body, field_validation="Strict"
            )
        except k8s.ApiException as exc:
            if exc.status == 409:
                raise _AlreadyExists from exc
            raise

    async def delete(self, group: str, version: str, plural: str, namespace: str, name: str) -> bool:
        """Delete a namespaced custom object (its dependents in the background); False when it was gone."""
        try:
            await self.call(
                f"delete {plural} {namespace}/{name}",
                self.custom.delete_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                name,
                propagation_policy="Background",
            )
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_scale(self, group: str, version: str, plural: str, namespace: str, name: str, size: int) -> None:
        """Ask for ``size`` replicas through the object's ``/scale`` subresource."""
        await self.call(
            f"scale {plural} {namespace}/{name} to {size}",
            self.custom.patch_namespaced_custom_object_scale,
            group,
            version,
            namespace,
            plural,
            name,
            {"spec": {"replicas": size}},
        )

    async def update_status(self, namespace: str, name: str, change: Callable[[Obj, Obj], None]) -> bool:
        """Apply ``change(status, ensemble)`` to an Ensemble's status (read, change, write with resourceVersion).

        A 409 (someone wrote in between) reads again and reapplies ``change``. Returns False when the
        Ensemble does not exist (it was deleted: nothing to report to).
        """
        delays = self.backoff.delays()
        for attempt in range(len(delays) + 1):
            ensemble = await self.get(ENSEMBLE_GROUP, ENSEMBLE_VERSION, ENSEMBLE_PLURAL, namespace, name)
            if ensemble is None:
                return False
            status = copy.deepcopy(ensemble.get("status") or {})
            change(status, ensemble)
            if status == (ensemble.get("status") or {}):
                return True
            body: Obj = {"status": status}
            version = ensemble.get("metadata", {}).get("resourceVersion")
            if version:
                body["metadata"] = {"resourceVersion": version}
            try:
                await self.call(
                    f"update status of {ENSEMBLE_KIND} {namespace}/{name}",
                    self._patch_status_once,
                    namespace,
                    name,
                    body,
                )
                return True
            except _AlreadyExists:
                if attempt == len(delays):
                    raise KubeError(
                        f"status of {namespace}/{name}: still conflicting after {attempt + 1} attempts",
                        status=409,
                        transient=True,
                    ) from None
                await asyncio.sleep(delays[attempt])
            except KubeError as exc:
                if exc.status == 404:
                    return False
                raise
        raise AssertionError("unreachable")

    def _patch_status_once(self, namespace: str, name: str, body: Obj) -> None:
        # a 409 means the status read is stale: the caller must read again, not resend the same body
        try:
            self.custom.patch_namespaced_custom_object_status(
                ENSEMBLE_GROUP, ENSEMBLE_VERSION, namespace, ENSEMBLE_PLURAL, name, body
            )
        except k8s.ApiException as exc:
            if exc.status == 409:
                raise _AlreadyExists from exc
            raise

    async def pods(self, namespace: str, labels: dict[str, str]) -> list[Obj]:
        """The pods of ``namespace`` carrying every label of ``labels`` (as plain API dicts)."""
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = await self.call(
            f"list pods in {namespace} ({selector})", self.core.list_namespaced_pod, namespace, label_selector=selector
        )
        items: list[Obj] = self.api.sanitize_for_serialization(found).get("items", [])
        # filtered here as well: the selector is an optimisation the answer is not trusted to have applied
        return [
            pod
            for pod in items
            if all((pod.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def secret(self, namespace: str, name: str) -> Obj | None:
        """Secret ``namespace/name`` as a plain API dict (``data`` still base64), or None when there is none."""
        try:
            found = await self.call(f"get secret {namespace}/{name}", self.core.read_namespaced_secret, name, namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return cast(Obj, self.api.sanitize_for_serialization(found))

    async def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The decoded ``data`` of Secret ``namespace/name``, or None when there is no such Secret."""
        found = await self.secret(namespace, name)
        return None if found is None else _decoded(found)

    async def create_secret(self, body: Obj) -> bool:
        """Create the Secret ``body``; False when a Secret of that name already exists (it is left alone).

        The operator never reads, changes or deletes a Secret outside its own namespace: a Secret it makes
        is named after its content (``minicluster.token_secret_name``), so new content is a new Secret.
        """
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self.call(f"create secret {namespace}/{name}", self._secret_once, namespace, body)
        except _AlreadyExists:
            return False
        return True

    def _secret_once(self, namespace: str, body: Obj) -> None:
        try:
            self.core.create_namespaced_secret(namespace, cast(Any, body))
        except k8s.ApiException as exc:
            if exc.status == 409:
                raise _AlreadyExists from exc
            raise

    async def event(
        self,
        involved: Obj,
        kind: Literal["Normal", "Warning"],
        reason: str,
        message: str,
        *,
        key: str = "",
    ) -> None:
        """Post an Event about ``involved`` (best effort: a failure is logged, never raised).

        ``key`` makes the Event's name deterministic, so posting the same Event again (after a restart or
        a redelivery) is answered 409 and leaves one Event; without it every call posts a new one.
        """
        metadata = involved.get("metadata", {})
        namespace = metadata.get("namespace", "default")
        unique = key or f"{time.time_ns()}"
        name = short_name(metadata.get("name", "ensemble"), 253, suffix=f".{_digest(unique)}")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", ""),
                "kind": involved.get("kind", ""),
                "name": metadata.get("name", ""),
                "namespace": namespace,
                "uid": metadata.get("uid", ""),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.call(f"post event {reason} on {namespace}/{metadata.get('name')}", self._event_once, body)
        except _AlreadyExists:
            return
        except KubeError as exc:
            log.warning("could not post an event: %s", exc, extra={"reason": reason, "event": message})

    def _event_once(self, body: Obj) -> None:
        try:
            self.core.create_namespaced_event(body["metadata"]["namespace"], cast(Any, body))
        except k8s.ApiException as exc:
            if exc.status == 409:
                raise _AlreadyExists from exc
            raise

    async def close(self) -> None:
        """Close the connection pool."""
        await asyncio.to_thread(self.api.close)


def _decoded(secret: Obj) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}


class _AlreadyExists(Exception):
    """A 409 that means "already done" (create) or "read again" (status), never retried as is."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
