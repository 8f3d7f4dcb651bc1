"""The MiniCluster (``flux-framework.org/v1alpha2``) of one Ensemble member, built as a pure function.

The Flux Operator never updates a MiniCluster's pod template and fixes its broker configuration for
``maxSize`` hosts at creation, so everything the member will ever need is in the object created here:

- ``size``, ``minSize`` and ``maxSize`` from the validated member (``minSize <= size <= maxSize``, since the
  operator silently ignores a size outside those bounds);
- ``interactive: true`` — the broker stays up without a main command, and the sidecar submits the jobs;
- the user's containers, the application container marked ``runFlux: true`` (the one the user marked,
  else the first), and the sidecar container appended (:func:`sidecar_container`): ``ensemble sidecar
  --backend flux`` on the member's sidecar port, reaching the broker with the view's own ``flux``
  (``<mountPath>/view/bin/flux``, whose Python runs the sidecar's helper) at the socket the broker makes
  (``local://<mountPath>/config/run/flux/local``), serving on the lead broker's pod only, as the uid
  the broker runs as (:func:`sidecar_uid`: Flux takes jobs only from the instance owner), its bearer
  token from the Ensemble's Secret, and (when given) the operator's shrink grace as ``--shrink-grace``;
- ``flux.noWaitSocket: true`` unless the user set it: the operator's start script waits for the socket
  at ``<mountPath>/view/run/flux/local``, where no broker puts it; the sidecar waits for the real one;
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
import hashlib
from collections.abc import Mapping
from typing import Any

from ensemble_core.kube import DOMAIN, short_name
from ensemble_core.spec import Ensemble, Member, SidecarSpec
from ensemble_core.version import VERSION as RELEASE

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
#: The image our Dockerfile builds, at this release: every service and, unless a member names another, the sidecar.
DEFAULT_IMAGE = f"ghcr.io/flux-framework/ensemble-operator:{RELEASE}"
#: Where the Flux Operator mounts its shared view when ``flux.container.mountPath`` is not set.
DEFAULT_MOUNT = "/mnt/flux"
#: The lead broker's socket in the Flux Operator's shared view (wait.sh: ``-Slocal-uri=local://$configroot/run/flux/local``).
FLUX_URI = f"local://{DEFAULT_MOUNT}/config/run/flux/local"
#: Labels the Job controller puts on every pod of the Indexed Job the Flux Operator makes for a MiniCluster
#: (``job-name`` is the Job's name, which is the MiniCluster's).
JOB_NAME_LABEL = "job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
#: The Flux Operator's own index label: computed from pod names across the whole namespace, so a pod of
#: MiniCluster ``lammps-1`` can be labelled by ``lammps``'s controller (controllers/flux/labels.go). Not used.
JOB_INDEX_LABEL = "job-index"
#: How the sidecar container's exit codes say its image cannot run it (the shell: not executable, not found).
_CANNOT_RUN = {126: "the command is not executable", 127: "the command was not found"}
#: Waiting reasons of a container that will not start by itself.
_STUCK = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerError", "CreateContainerConfigError", "RunContainerError",
}  # fmt: skip
#: Restarts of the sidecar container after which it is called failing (each counts toward the Job's backoffLimit).
RESTART_LIMIT = 3

_DNS_LABEL = 63


def minicluster_name(ensemble: str, member: Member) -> str:
    """The MiniCluster name of ``member`` (``<ensemble>-<index>``, shortened as the module docstring says)."""
    # the longest pod hostname is "<minicluster>-<maxSize - 1>"
    room = _DNS_LABEL - len(f"-{max(member.max_size - 1, 0)}")
    return short_name(ensemble, room, suffix=f"-{member.index}")


def label_value(name: str) -> str:
    """``name`` as a label value (at most 63 characters; a longer name is shortened with a hash)."""
    return name if len(name) <= _DNS_LABEL else short_name(name, _DNS_LABEL)


def _content(*parts: str | bytes) -> str:
    """Ten hex digits naming a Secret's content: another content is another Secret (never an overwrite)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def token_secret_name(ensemble: str, token: str) -> str:
    """The Secret holding the sidecar token of an Ensemble's members: named after the Ensemble and the
    token, so it is created once and never changed (the creator may create Secrets, not read or patch them)."""
    return short_name(ensemble, 253, suffix=f"-sidecar-token-{_content(token)}")


def token_secret(ensemble: Ensemble, token: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The Secret with the sidecar token of ``ensemble`` (owned by the Ensemble)."""
    return _secret(ensemble, token_secret_name(ensemble.name, token), "Opaque", {TOKEN_KEY: token}, owner)


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


def tls_secret_name(ensemble: str, chain: bytes) -> str:
    """The Secret holding the sidecar TLS certificate and key in an Ensemble's namespace, named after the
    certificate: a renewed certificate is a new Secret, which the MiniClusters made afterwards mount."""
    return short_name(ensemble, 253, suffix=f"-sidecar-tls-{_content(chain)}")


def tls_secret(ensemble: Ensemble, chain: bytes, key: bytes, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kubernetes.io/tls`` Secret the sidecars of ``ensemble`` serve TLS with (owned by the Ensemble)."""
    data = {"tls.crt": chain.decode(), "tls.key": key.decode()}
    return _secret(ensemble, tls_secret_name(ensemble.name, chain), "kubernetes.io/tls", data, owner)


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
    flux_spec = spec.get("flux")
    if flux_spec is not None and not isinstance(flux_spec, dict):
        errors.append(
            f"{path}.flux: expected a mapping (the Flux Operator's flux settings), got {type(flux_spec).__name__}"
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


def mount_path(spec: Mapping[str, Any]) -> str:
    """Where the Flux Operator mounts the shared view in this MiniCluster spec (``flux.container.mountPath``)."""
    container = ((spec.get("flux") or {}).get("container") or {}) if isinstance(spec.get("flux"), dict) else {}
    path = container.get("mountPath") if isinstance(container, dict) else None
    return str(path).rstrip("/") if isinstance(path, str) and path.strip() else DEFAULT_MOUNT


def sidecar_command(
    sidecar: SidecarSpec, mount: str = DEFAULT_MOUNT, *, tls: bool = False, shrink_grace: float | None = None
) -> str:
    """The shell command of the injected container, as the operator's start script runs it.

    ``exec`` replaces the start script (PID 1, which passes no signal on), so SIGTERM reaches the sidecar;
    ``env -u`` drops what the script put on the paths for the view's Python, which is not ours.
    ``shrink_grace`` (None: the sidecar's default) is how long its jobs may stay on ranks a shrink gave up.
    """
    words = [
        "exec", "env", "-u", "PYTHONPATH", "-u", "PYTHONHOME", "-u", "LD_LIBRARY_PATH",
        "ensemble", "sidecar", "--backend", "flux",
        "--flux", f"{mount}/view/bin/flux",
        "--flux-uri", f"local://{mount}/config/run/flux/local",
        "--host", "::", "--port", str(sidecar.port),
        "--serve-on-index", "0", "--wait-for-broker", "inf",
    ]  # fmt: skip
    if shrink_grace is not None:
        words += ["--shrink-grace", f"{shrink_grace:g}"]
    if tls:
        words += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    return " ".join(words)


def sidecar_uid(sidecar: SidecarSpec, spec: Mapping[str, Any]) -> int:
    """The uid the sidecar runs as: ``sidecar.runAsUser``, else the application container's
    ``securityContext.runAsUser`` (the broker runs as the application image's user), else root."""
    if sidecar.run_as_user is not None:
        return sidecar.run_as_user
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    application = next((c for c in containers if c.get("runFlux") is True), containers[0] if containers else {})
    context = application.get("securityContext") if isinstance(application, dict) else None
    user = context.get("runAsUser") if isinstance(context, dict) else None
    return user if isinstance(user, int) and not isinstance(user, bool) and user >= 0 else 0


def sidecar_container(
    ensemble: Ensemble,
    member: Member,
    spec: Mapping[str, Any],
    *,
    image: str,
    token_secret: str,
    tls_secret: str = "",
    shrink_grace: float | None = None,
) -> dict[str, Any]:
    """The container injected into ``member``'s MiniCluster (see the module docstring): its token from the
    Secret ``token_secret``; with ``tls_secret``, serving TLS with that Secret's certificate; ``shrink_grace``
    as in :func:`sidecar_command`."""
    tls = bool(tls_secret)
    sidecar = member.sidecar
    mount = mount_path(spec)
    injected: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": sidecar.image or image,
        "pullAlways": sidecar.pull_always,
        "command": sidecar_command(sidecar, mount, tls=tls, shrink_grace=shrink_grace),
        "environment": {"FLUX_URI": f"local://{mount}/config/run/flux/local"},
        "secrets": {
            "ENSEMBLE_SIDECAR_TOKEN": {"name": token_secret, "key": TOKEN_KEY},
        },
        "ports": [sidecar.port],
        "runFlux": False,
        "securityContext": {"runAsUser": sidecar_uid(sidecar, spec), "runAsNonRoot": sidecar_uid(sidecar, spec) != 0},
    }
    if tls:
        injected["volumes"] = {TLS_VOLUME: {"secretName": tls_secret, "path": TLS_DIR, "readOnly": True}}
    return injected


def build(
    ensemble: Ensemble,
    member: Member,
    owner: Mapping[str, Any],
    *,
    token_secret: str,
    tls_secret: str = "",
    image: str = DEFAULT_IMAGE,
    shrink_grace: float | None = None,
) -> dict[str, Any]:
    """The MiniCluster of ``member`` (see the module docstring); ``member`` must pass :func:`check`.

    ``token_secret``: the Secret of :func:`token_secret` the sidecar takes its token from; ``tls_secret``:
    the Secret of :func:`tls_secret` it serves TLS with, mounted at ``TLS_DIR`` (empty: plaintext).
    ``image``: the sidecar image of a member that names none (the creator's ``ENSEMBLE_SIDECAR_IMAGE``).
    ``shrink_grace``: the sidecar's ``--shrink-grace`` (the creator's ``ENSEMBLE_SHRINK_GRACE``; None: its default).
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
    containers.append(
        sidecar_container(
            ensemble,
            member,
            spec,
            image=image,
            token_secret=token_secret,
            tls_secret=tls_secret,
            shrink_grace=shrink_grace,
        )
    )
    pod = dict(spec.get("pod") or {})
    pod["labels"] = {**(pod.get("labels") or {}), **labels}
    flux = dict(spec.get("flux") or {})
    flux.setdefault("noWaitSocket", True)
    spec["flux"] = flux
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


def _index(pod: Mapping[str, Any]) -> str | None:
    """A pod's completion index: the Job controller's label, else its annotation, else None."""
    metadata = pod.get("metadata") or {}
    for table in (metadata.get("labels") or {}, metadata.get("annotations") or {}):
        value = table.get(COMPLETION_INDEX)
        if isinstance(value, str):
            return value
    return None


def pods_of(pods: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The pods of MiniCluster ``name`` that are not being deleted (by the Job controller's ``job-name``)."""
    return [
        pod
        for pod in pods
        if ((pod.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL) == name
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    ]


def lead_pod(pods: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The lead broker's pod of MiniCluster ``name``: completion index 0 (the Job controller's label or
    annotation; else the hostname ``<name>-0`` the Indexed Job gives it), not being deleted."""
    for pod in pods_of(pods, name):
        index = _index(pod)
        hostname = (pod.get("spec") or {}).get("hostname")
        if index == "0" or (index is None and hostname == f"{name}-0"):
            return pod
    return None


def pod_ip(pod: Mapping[str, Any]) -> str:
    """A running pod's IP ("" while it is not running or has none)."""
    status = pod.get("status") or {}
    return str(status.get("podIP") or "") if status.get("phase") == "Running" else ""


def endpoint(ip: str, port: int) -> str:
    """``ip:port`` as gRPC takes it: an IPv6 address in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def sidecar_ready(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's sidecar container is running (its status says so)."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == SIDECAR_CONTAINER:
            return bool((container.get("state") or {}).get("running")) and container.get("ready", True) is not False
    return False


def sidecar_problem(pods: list[dict[str, Any]], name: str) -> str | None:
    """Why the sidecar container cannot run in MiniCluster ``name``'s pods, or None.

    Failing: a container waiting for a reason that will not go by itself (the image cannot be pulled or
    the container created), a command its image has not got (exit 126 / 127), or :data:`RESTART_LIMIT`
    restarts. Each restart counts toward the Job's backoffLimit, after which the operator tears the whole
    MiniCluster down: better to say so at once.
    """
    for pod in pods_of(pods, name):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != SIDECAR_CONTAINER:
                continue
            where = f"pod {(pod.get('metadata') or {}).get('name')}, image {container.get('image', '?')}"
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK:
                return f"{where}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
            for state in ("state", "lastState"):
                ended = (container.get(state) or {}).get("terminated") or {}
                code = ended.get("exitCode")
                if code in _CANNOT_RUN:
                    said = ended.get("message") or ended.get("reason") or ""
                    return f"{where}: exit {code}, {_CANNOT_RUN[code]} ({said})".replace(" ()", "")
            restarts = int(container.get("restartCount") or 0)
            if restarts >= RESTART_LIMIT:
                ended = ((container.get("lastState") or {}).get("terminated")) or {}
                said = ended.get("message") or ended.get("reason") or "no reason given"
                return f"{where}: restarted {restarts} times, last exit {ended.get('exitCode', '?')}: {said}"
    return None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj`` has a controller owner reference to the Ensemble with this ``uid``."""
    for reference in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("kind") == "Ensemble" and reference.get("uid") == uid and reference.get("controller"):
            return True
    return False
