"""The MiniCluster (``flux-framework.org/v1alpha2``) of one Ensemble member, built as a pure function.

The Flux Operator never updates a MiniCluster's pod template and fixes its broker configuration for
``maxSize`` hosts at creation, so everything the member will ever need is in the object created here:

- ``size``, ``minSize`` and ``maxSize`` from the validated member (``minSize <= size <= maxSize``, since the
  operator silently ignores a size outside those bounds);
- ``interactive: true`` — the broker stays up without a main command, and the sidecar submits the jobs;
- the user's containers, the application container marked ``runFlux: true`` (the one the user marked,
  else the first), and the sidecar container appended: ``ensemble sidecar --backend flux`` listening on
  the member's sidecar port, reaching the broker through the Flux Operator's shared view
  (``FLUX_URI=local:///mnt/flux/config/run/flux/local``), its bearer token from the Ensemble's Secret;
- labels ``ensemble.flux-framework.org/ensemble`` and ``.../member`` on the MiniCluster and its pods;
- a controller owner reference to the Ensemble (``blockOwnerDeletion``), so deleting the Ensemble deletes
  its MiniClusters and Secret through Kubernetes' garbage collector. Nothing else outside NATS needs
  cleaning, so there is no finalizer: an operator that is down never blocks a deletion, and the creator
  forgets the records of a deleted Ensemble when it next reconciles.

Names: a member's MiniCluster is ``<ensemble>-<index>``. Its pods are named (and get hostnames)
``<minicluster>-<pod index>``, which must be a DNS label of at most 63 characters, so when the Ensemble's
name is too long for the member's ``maxSize`` (or contains dots, which hostnames cannot), the name is cut
and eight hex digits of a hash of the full name are added: ``<first characters>-<hash>-<index>``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ensemble_core.kube import DOMAIN, short_name
from ensemble_core.spec import Ensemble, Member

GROUP = "flux-framework.org"
VERSION = "v1alpha2"
PLURAL = "miniclusters"
KIND = "MiniCluster"

ENSEMBLE_LABEL = f"{DOMAIN}/ensemble"
MEMBER_LABEL = f"{DOMAIN}/member"
#: The name of the injected container (reserved: an Ensemble may not use it).
SIDECAR_CONTAINER = "ensemble-sidecar"
#: The key of the sidecar token in the Ensemble's Secret.
TOKEN_KEY = "token"
#: The lead broker's socket in the Flux Operator's shared view.
FLUX_URI = "local:///mnt/flux/config/run/flux/local"
#: Labels the Flux Operator (and the Job controller) put on a MiniCluster's pods.
JOB_NAME_LABEL = "job-name"
JOB_INDEX_LABEL = "job-index"

_DNS_LABEL = 63


def minicluster_name(ensemble: str, member: Member) -> str:
    """The MiniCluster name of ``member`` (``<ensemble>-<index>``, shortened as the module docstring says)."""
    # the longest pod hostname is "<minicluster>-<maxSize - 1>"
    room = _DNS_LABEL - len(f"-{max(member.max_size - 1, 0)}")
    return short_name(ensemble, room, suffix=f"-{member.index}")


def label_value(name: str) -> str:
    """``name`` as a label value (at most 63 characters; a longer name is shortened with a hash)."""
    return name if len(name) <= _DNS_LABEL else short_name(name, _DNS_LABEL)


def token_secret_name(ensemble: str) -> str:
    """The Secret holding the sidecar token of an Ensemble's members."""
    return short_name(ensemble, 253, suffix="-sidecar-token")


def token_secret(ensemble: Ensemble, token: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The Secret with the sidecar token of ``ensemble`` (owned by the Ensemble)."""
    return _secret(ensemble, token_secret_name(ensemble.name), "Opaque", {TOKEN_KEY: token}, owner)


def _secret(
    ensemble: Ensemble, name: str, kind: str, data: Mapping[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    """A Secret of ``ensemble``'s namespace, labelled with it and owned by it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kind,
        "metadata": {
            "name": name,
            "namespace": ensemble.namespace,
            "labels": {ENSEMBLE_LABEL: label_value(ensemble.name)},
            "ownerReferences": [dict(owner)],
        },
        "stringData": dict(data),
    }


#: Where the sidecar container finds its TLS certificate and key (``tls.crt``, ``tls.key``), when TLS is on.
TLS_DIR = "/etc/ensemble/sidecar-tls"
#: The sidecar container's volume with them.
TLS_VOLUME = "ensemble-sidecar-tls"


def tls_secret_name(ensemble: str) -> str:
    """The Secret holding the sidecar TLS certificate and key in an Ensemble's namespace."""
    return short_name(ensemble, 253, suffix="-sidecar-tls")


def tls_secret(ensemble: Ensemble, chain: bytes, key: bytes, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kubernetes.io/tls`` Secret the sidecars of ``ensemble`` serve TLS with (owned by the Ensemble)."""
    data = {"tls.crt": chain.decode(), "tls.key": key.decode()}
    return _secret(ensemble, tls_secret_name(ensemble.name), "kubernetes.io/tls", data, owner)


def check(member: Member) -> list[str]:
    """What the Flux Operator would refuse (or misrun) in the member's containers, as ``<path>: <problem>``."""
    path = f"spec.members[{member.index}].minicluster.spec"
    spec = member.minicluster.get("spec") or {}
    errors = _string_maps(
        {
            f"{path[:-5]}.metadata.labels": (member.minicluster.get("metadata") or {}),
            f"{path[:-5]}.metadata.annotations": (member.minicluster.get("metadata") or {}),
            f"{path}.pod.labels": spec.get("pod") or {},
        }
    )
    containers = spec.get("containers")
    if containers is None:
        return [*errors, f"{path}.containers: required; list the application container (its image must contain Flux)"]
    if not isinstance(containers, list) or not containers:
        return [*errors, f"{path}.containers: expected a non-empty list of containers"]
    flux = []
    for i, container in enumerate(containers):
        where = f"{path}.containers[{i}]"
        if not isinstance(container, dict):
            errors.append(f"{where}: expected a mapping (a container), got {type(container).__name__}")
            continue
        if not isinstance(container.get("image"), str) or not container["image"].strip():
            errors.append(f"{where}.image: required; set it to an image that contains Flux")
        if container.get("name") == SIDECAR_CONTAINER:
            errors.append(f"{where}.name: {SIDECAR_CONTAINER!r} is reserved for the injected sidecar; rename it")
        if container.get("runFlux") is True:
            flux.append(i)
    if len(flux) > 1:
        errors.append(f"{path}.containers[{flux[1]}].runFlux: only one container may run Flux (also [{flux[0]}])")
    application = flux[0] if flux else 0
    for i, container in enumerate(containers):
        if isinstance(container, dict) and i != application and not container.get("name"):
            errors.append(f"{path}.containers[{i}].name: required for a container that does not run Flux")
    return errors


def _string_maps(places: Mapping[str, object]) -> list[str]:
    """Errors for each ``<parent path>.<key>`` whose parent is not a mapping or whose value is not strings."""
    errors = []
    for path, parent in places.items():
        parent_path, _, key = path.rpartition(".")
        if not isinstance(parent, dict):
            errors.append(f"{parent_path}: expected a mapping, got {type(parent).__name__}")
            continue
        value = parent.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            errors.append(f"{path}: expected a mapping of names to strings")
    return errors


def build(ensemble: Ensemble, member: Member, owner: Mapping[str, Any], *, tls: bool = False) -> dict[str, Any]:
    """The MiniCluster of ``member`` (see the module docstring); ``member`` must pass :func:`check`.

    ``tls``: the sidecar serves TLS with the certificate of :func:`tls_secret`, mounted at ``TLS_DIR``.
    """
    user = copy.deepcopy(dict(member.minicluster))
    user_metadata = user.get("metadata") or {}
    spec: dict[str, Any] = copy.deepcopy(user.get("spec") or {})
    name = minicluster_name(ensemble.name, member)
    labels = {ENSEMBLE_LABEL: label_value(ensemble.name), MEMBER_LABEL: str(member.index)}
    containers = [dict(container) for container in spec.get("containers") or []]
    application = next((i for i, c in enumerate(containers) if c.get("runFlux") is True), 0)
    for i, container in enumerate(containers):
        container["runFlux"] = i == application
    sidecar = member.sidecar
    injected: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": sidecar.image,
        "pullAlways": sidecar.pull_always,
        "command": f"ensemble sidecar --backend flux --host 0.0.0.0 --port {sidecar.port}",
        "environment": {"FLUX_URI": FLUX_URI},
        "secrets": {
            "ENSEMBLE_SIDECAR_TOKEN": {"name": token_secret_name(ensemble.name), "key": TOKEN_KEY},
        },
        "ports": [sidecar.port],
        "runFlux": False,
    }
    if tls:
        injected["command"] += f" --tls-cert {TLS_DIR}/tls.crt --tls-key {TLS_DIR}/tls.key"
        injected["volumes"] = {
            TLS_VOLUME: {"secretName": tls_secret_name(ensemble.name), "path": TLS_DIR, "readOnly": True}
        }
    containers.append(injected)
    pod = dict(spec.get("pod") or {})
    pod["labels"] = {**(pod.get("labels") or {}), **labels}
    spec.update(
        size=member.size,
        minSize=member.min_size,
        maxSize=member.max_size,
        interactive=True,
        containers=containers,
        pod=pod,
    )
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": ensemble.namespace,
            "labels": {**(user_metadata.get("labels") or {}), **labels},
            "annotations": dict(user_metadata.get("annotations") or {}),
            "ownerReferences": [dict(owner)],
        },
        "spec": spec,
    }
