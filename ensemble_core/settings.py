"""Settings read from the environment and validated at start.

Every setting is an ``ENSEMBLE_*`` environment variable. A service calls :func:`load` first thing; a
missing or bad value raises :class:`SettingsError` naming the variable, and the command exits with it.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

PREFIX = "ENSEMBLE_"


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Settings common to all services; each field is read from ``ENSEMBLE_<FIELD IN UPPER CASE>``."""

    #: NATS server URL(s), comma-separated.
    nats_url: str = "nats://127.0.0.1:4222"
    #: Logging level of the structured (JSON lines) log on stderr.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Bearer token the poller and actuator present to sidecars (empty: none).
    sidecar_token: str = ""
    #: poller and actuator: the CA certificate (PEM file) that signed the sidecars' TLS certificates; empty:
    #: plaintext gRPC to sidecars.
    sidecar_ca: str = ""
    #: poller and actuator: the name the sidecars' certificates are issued for (checked instead of the pod IP).
    sidecar_tls_name: str = "ensemble-sidecar"
    #: creator (Kubernetes mode): ``<namespace>/<name>`` of a ``kubernetes.io/tls`` Secret whose certificate
    #: (for ``sidecar_tls_name``) every sidecar serves; copied into each Ensemble's namespace. Empty: no TLS.
    sidecar_tls_secret: str = ""
    #: creator (Kubernetes mode): the sidecar image of members that name none; the manifests set it to the
    #: creator's own image, so services and sidecars are always one release.
    sidecar_image: str = ""
    #: Seconds a gRPC call to a sidecar may take.
    sidecar_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: creator (local mode): the Ensemble file to run.
    file: str = ""
    #: creator (local mode): sidecar endpoint per member index, ``0=127.0.0.1:50051,1=...``.
    endpoints: str = ""
    #: Namespace given to ensembles read from a file (Kubernetes ones carry their own).
    namespace: str = "default"
    #: actuator: seconds between two scale changes of one member.
    scale_cooldown: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Messages fetched per pull from a JetStream consumer.
    fetch_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 64
    #: decider: metrics fetched per pull. Snapshots of one member in a batch share one state write, so
    #: under a backlog a batch of several times the number of members is what keeps the decider fast;
    #: at most two batches are unacknowledged at once (the consumer allows 10,000).
    decider_batch: Annotated[int, msgspec.Meta(ge=1, le=5_000)] = 4096
    #: Seconds before an unacknowledged message is redelivered.
    ack_wait: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: creator, poller and actuator: ``local`` (an Ensemble file and sidecar endpoints, what ``ensemble up``
    #: runs) or ``kubernetes`` (Ensemble resources, MiniClusters through the Kubernetes API; the poller then
    #: takes each member's requested size from its MiniCluster).
    mode: Literal["local", "kubernetes"] = "local"
    #: creator (Kubernetes mode): the namespace whose Ensembles are watched; empty: every namespace.
    watch_namespace: str = ""
    #: creator, poller and actuator (Kubernetes mode): the API server URL (e.g. ``kubectl proxy``'s); empty: the
    #: in-cluster service account, else the kubeconfig.
    kube_api: str = ""
    #: creator and poller (Kubernetes mode): seconds between two full lists of the objects they watch
    #: (Ensembles, their pods, MiniClusters): a safety net under the watches, which see a change at once;
    #: each relist also reconciles every Ensemble.
    resync_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: creator (Kubernetes mode): seconds between two updates of the members' nodes up and job counts in
    #: each Ensemble's status (from their last metrics).
    status_seconds: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: actuator (Kubernetes mode): scale a completed member's MiniCluster down to its minSize.
    complete_to_min_size: bool = False
    #: actuator (Kubernetes mode): seconds a shrink waits for the nodes that leave to be idle before it patches the
    #: MiniCluster's size anyway (their jobs become lost); 0: wait until they are idle, however long. The creator
    #: gives each injected sidecar the same ``--shrink-grace``, after which it kills those jobs itself.
    shrink_grace: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    #: actuator: the nodes every member of every ensemble may hold at once, divided by weighted max-min fair share
    #: (docs/budget.md); 0: no cluster-wide budget. At most 100,000: the fair share hands nodes out one at a time.
    node_budget: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    #: actuator: per-namespace budgets, ``team-a=8,team-b=4`` (within the cluster-wide one, if set); empty: none.
    namespace_budgets: str = ""
    #: Replicas of every stream and bucket the services create (1: a single server; 3 on a three-node
    #: JetStream cluster). An existing stream with another count stops the services: change it with
    #: ``ensemble nats-replicas N`` (docs/kubernetes.md).
    nats_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    #: poller: seconds between two heartbeats of a poller in ``ensemble-pollers``.
    poller_heartbeat: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    #: poller: seconds after its last heartbeat at which a poller counts as gone and its members move to
    #: the others (the ``ensemble-pollers`` bucket's TTL, fixed when the bucket is created); at least
    #: three heartbeats.
    poller_lease_seconds: Annotated[float, msgspec.Meta(gt=0)] = 6.0
    #: creator (Kubernetes mode): the Lease two or more creators elect their leader with
    #: (``<namespace>/<name>``; the manifests give the pod's namespace).
    leader_lease: str = "ensemble-system/ensemble-creator"
    #: creator (Kubernetes mode): seconds a leader's Lease holds without renewal before a standby takes over.
    leader_lease_seconds: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    #: Port of the /healthz, /readyz and /metrics HTTP server (0: none; the Kubernetes manifests use 8080).
    health_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable and the fix."""


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return PREFIX + field.upper()


def _choices(annotation: object) -> list[str]:
    """The values a ``Literal`` setting takes (empty for any other type)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is not Literal:
        return []
    return [str(value) for value in typing.get_args(annotation)]


def load(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Read :class:`Settings` from the environment (``overrides`` win), validating every value."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        name = env_name(field.name)
        if name in environ:
            raw[field.name] = environ[name]
    raw.update(overrides)
    errors = []
    for field in msgspec.structs.fields(Settings):
        if field.name not in raw:
            continue
        try:
            msgspec.convert({field.name: raw[field.name]}, type=Settings, strict=False)
        except msgspec.ValidationError as exc:
            detail = str(exc).split(" - at ")[0]
            choices = _choices(field.type)
            if choices:
                detail += f"; use one of {', '.join(choices)}"
            errors.append(f"{env_name(field.name)}={raw[field.name]!r}: {detail}")
    if errors:
        raise SettingsError("invalid settings: " + "; ".join(errors))
    settings = msgspec.convert(raw, type=Settings, strict=False)
    if settings.poller_lease_seconds < 3 * settings.poller_heartbeat:
        raise SettingsError(
            f"{env_name('poller_lease_seconds')}={settings.poller_lease_seconds:g}: must be at least three "
            f"heartbeats ({env_name('poller_heartbeat')}={settings.poller_heartbeat:g}), or one late heartbeat "
            "would move every member of a live poller"
        )
    return settings


def parse_endpoints(value: str) -> dict[int, str]:
    """Parse ``ENSEMBLE_ENDPOINTS`` (``0=host:port,1=host:port``) into {member index: endpoint}."""
    endpoints: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        index, sep, endpoint = item.partition("=")
        if not sep or not index.strip().isdigit() or ":" not in endpoint:
            raise SettingsError(
                f"{env_name('endpoints')}: {item!r} is not <member index>=<host>:<port> "
                "(example: 0=127.0.0.1:50051,1=127.0.0.1:50052)"
            )
        endpoints[int(index)] = endpoint.strip()
    return endpoints


def parse_namespace_budgets(value: str) -> dict[str, int]:
    """Parse ``ENSEMBLE_NAMESPACE_BUDGETS`` (``team-a=8,team-b=4``) into {namespace: nodes}."""
    budgets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        namespace, sep, nodes = (text.strip() for text in item.partition("="))
        if not sep or not namespace or not nodes.isdigit():
            raise SettingsError(
                f"{env_name('namespace_budgets')}: {item!r} is not <namespace>=<nodes> with nodes a whole number >= 0 "
                "(example: team-a=8,team-b=4)"
            )
        if namespace in budgets:
            raise SettingsError(
                f"{env_name('namespace_budgets')}: namespace {namespace!r} is given twice; give it once"
            )
        budgets[namespace] = int(nodes)
    return budgets
