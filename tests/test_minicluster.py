"""The MiniCluster of each member: valid against the Flux Operator's real CRD, sidecar injected, names that fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ensemble_core import minicluster
from ensemble_core.spec import Ensemble, minicluster_spec_schema, validate
from ensemble_core.version import VERSION
from tests.conftest import REPO, SHARED

TOKEN_SECRET = minicluster.token_secret_name("demo", "a-token")
OWNER = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "name": "demo",
    "uid": "0c7a1f6e-0000-4000-8000-000000000001",
    "controller": True,
    "blockOwnerDeletion": True,
}


def _closed(schema: Any) -> Any:
    """The schema with unknown fields forbidden: the API server silently prunes them, which hides typos."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


def crd_validator() -> jsonschema.Draft7Validator:
    """A validator of whole MiniCluster objects built from the Flux Operator's CRD (v1alpha2)."""
    crd = yaml.safe_load((SHARED / "reference" / "minicluster-crd.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == minicluster.VERSION)
    schema = _closed(version["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta, not described by the CRD
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def assert_valid_minicluster(body: dict[str, Any]) -> None:
    """Fail with every schema error of ``body`` (a MiniCluster as the creator makes it)."""
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator().iter_errors(body)]
    assert errors == []


def ensemble_from(path: Path) -> Ensemble:
    document = yaml.safe_load(path.read_text())
    # the original's examples set an option it ignored (scaleUpChecks); dropped, the rest is as written
    for member in document["spec"]["members"]:
        (member.get("algorithm") or {}).get("options", {}).pop("scaleUpChecks", None)
        member["minicluster"]["spec"].setdefault("containers", [{"image": "ghcr.io/flux-framework/flux:latest"}])
    ensemble, errors = validate(document, "science")
    assert errors == [], errors
    assert ensemble is not None
    return ensemble


EXAMPLES = [
    *sorted((SHARED / "reference" / "seed-examples").glob("*.yaml")),
    REPO / "examples" / "hello-world.yaml",
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_generated_minicluster_is_valid_against_the_flux_operator_crd(path: Path) -> None:
    ensemble = ensemble_from(path)
    for member in ensemble.members:
        assert minicluster.check(member) == []
        body = minicluster.build(ensemble, member, OWNER, token_secret=TOKEN_SECRET)
        assert_valid_minicluster(body)
        spec = body["spec"]
        assert (spec["size"], spec["minSize"], spec["maxSize"]) == (member.size, member.min_size, member.max_size)
        assert spec["interactive"] is True
        assert body["metadata"]["ownerReferences"] == [OWNER]


def test_the_sidecar_is_injected_beside_the_application_container_that_runs_flux() -> None:
    document = yaml.safe_load((REPO / "examples" / "hello-world.yaml").read_text())
    spec = document["spec"]["members"][0]["minicluster"]["spec"]
    spec["containers"] = [
        {"name": "logger", "image": "busybox"},
        {"image": "ghcr.io/converged-computing/metric-lammps:latest", "runFlux": True, "workingDir": "/opt"},
    ]
    document["spec"]["members"][0]["sidecar"] = {"image": "example.org/sidecar:1", "pullAlways": True, "port": 7000}
    document["spec"]["members"][0]["minicluster"]["metadata"] = {"labels": {"team": "md"}}
    ensemble, errors = validate(document, "science")
    assert ensemble is not None, errors
    body = minicluster.build(ensemble, ensemble.members[0], OWNER, token_secret=TOKEN_SECRET)
    assert_valid_minicluster(body)
    logger, app, sidecar = body["spec"]["containers"]
    assert (logger["runFlux"], app["runFlux"], sidecar["runFlux"]) == (False, True, False)
    assert app["workingDir"] == "/opt"
    assert sidecar["name"] == minicluster.SIDECAR_CONTAINER
    assert sidecar["image"] == "example.org/sidecar:1" and sidecar["pullAlways"] is True
    # exec: the sidecar replaces the operator's start script (PID 1) and so gets SIGTERM; the view's flux
    # runs the helper; the socket is where the broker makes it; only the lead broker's pod serves
    assert sidecar["command"] == (
        "exec env -u PYTHONPATH -u PYTHONHOME -u LD_LIBRARY_PATH ensemble sidecar --backend flux "
        "--flux /mnt/flux/view/bin/flux --flux-uri local:///mnt/flux/config/run/flux/local --host :: --port 7000 "
        "--serve-on-index 0 --wait-for-broker inf"
    )
    assert sidecar["ports"] == [7000]
    assert sidecar["environment"]["FLUX_URI"] == "local:///mnt/flux/config/run/flux/local"
    assert sidecar["secrets"]["ENSEMBLE_SIDECAR_TOKEN"] == {"name": TOKEN_SECRET, "key": "token"}
    # root owns every Flux Operator instance (allow-root-owner): the sidecar is never a guest
    assert sidecar["securityContext"] == {"runAsUser": 0, "runAsNonRoot": False}
    # the start script would wait for the socket where no broker puts it (<view>/run/flux/local)
    assert body["spec"]["flux"]["noWaitSocket"] is True
    assert body["metadata"]["name"] == "hello-world-0"
    assert body["metadata"]["namespace"] == "science"
    labels = {"ensemble.flux-framework.org/ensemble": "hello-world", "ensemble.flux-framework.org/member": "0"}
    assert body["metadata"]["labels"] == {"team": "md", **labels}
    assert body["spec"]["pod"]["labels"] == labels
    # the Ensemble's own data is never changed by building
    assert "runFlux" not in document["spec"]["members"][0]["minicluster"]["spec"]["containers"][0]


def _member_with(max_size: int, name: str) -> tuple[Ensemble, Any]:
    document = yaml.safe_load((REPO / "examples" / "hello-world.yaml").read_text())
    document["metadata"]["name"] = name
    document["spec"]["members"][0]["minicluster"]["spec"]["maxSize"] = max_size
    document["spec"]["members"][0]["minicluster"]["spec"]["containers"] = [{"image": "flux"}]
    ensemble, errors = validate(document)
    assert ensemble is not None, errors
    return ensemble, ensemble.members[0]


@pytest.mark.parametrize("name", ["a" * 60, "x" * 253, "lammps.v2.study", "b" * 57])
def test_names_too_long_or_dotted_are_shortened_stably_so_every_pod_hostname_fits(name: str) -> None:
    ensemble, member = _member_with(1000, name)
    mc = minicluster.minicluster_name(name, member)
    longest_hostname = f"{mc}-{member.max_size - 1}"
    assert len(longest_hostname) <= 63
    assert "." not in mc and mc.endswith("-0")
    assert mc == minicluster.minicluster_name(name, member)  # a restart finds the same object
    body = minicluster.build(ensemble, member, OWNER, token_secret=minicluster.token_secret_name(name, "t"))
    assert all(len(value) <= 63 for value in body["metadata"]["labels"].values())
    assert len(body["spec"]["containers"][-1]["secrets"]["ENSEMBLE_SIDECAR_TOKEN"]["name"]) <= 253


def test_a_short_name_is_kept_as_is_and_two_long_names_stay_distinct() -> None:
    _, member = _member_with(8, "demo")
    assert minicluster.minicluster_name("demo", member) == "demo-0"
    first = minicluster.minicluster_name("c" * 80 + "one", member)
    second = minicluster.minicluster_name("c" * 80 + "two", member)
    assert first != second


@pytest.mark.parametrize(
    ("containers", "expected"),
    [
        (None, "spec.members[0].minicluster.spec.containers: required"),
        ([], "spec.members[0].minicluster.spec.containers: expected a non-empty list"),
        ([{"name": "x"}], "spec.members[0].minicluster.spec.containers[0].image: required"),
        (
            [{"image": "a", "runFlux": True}, {"image": "b", "name": "b", "runFlux": True}],
            "spec.members[0].minicluster.spec.containers[1].runFlux: only one container may run Flux",
        ),
        ([{"image": "a"}, {"image": "b"}], "spec.members[0].minicluster.spec.containers[1].name: required"),
        (
            [{"image": "a"}, {"image": "b", "name": "ensemble-sidecar"}],
            "spec.members[0].minicluster.spec.containers[1].name: 'ensemble-sidecar' is reserved",
        ),
    ],
)
def test_containers_the_flux_operator_would_refuse_are_reported_by_field(containers: Any, expected: str) -> None:
    _, member = _member_with(4, "demo")
    raw = copy.deepcopy(dict(member.minicluster))
    if containers is None:
        raw["spec"].pop("containers")
    else:
        raw["spec"]["containers"] = containers
    errors = minicluster.check(type(member)(**{**member.__dict__, "minicluster": raw}))
    assert any(error.startswith(expected) for error in errors), errors


def test_the_default_sidecar_image_is_this_release_and_a_view_elsewhere_is_followed() -> None:
    document = yaml.safe_load((REPO / "examples" / "hello-world.yaml").read_text())
    spec = document["spec"]["members"][0]["minicluster"]["spec"]
    spec["containers"] = [{"image": "flux-app"}]
    spec["flux"] = {"container": {"mountPath": "/opt/fluxview"}, "noWaitSocket": False}
    document["spec"]["members"][0]["sidecar"] = {"runAsUser": 1000}
    ensemble, errors = validate(document, "science")
    assert ensemble is not None, errors
    body = minicluster.build(ensemble, ensemble.members[0], OWNER, token_secret=TOKEN_SECRET)
    assert_valid_minicluster(body)
    sidecar = body["spec"]["containers"][-1]
    assert sidecar["image"] == f"ghcr.io/flux-framework/ensemble-operator:{VERSION}" == minicluster.DEFAULT_IMAGE
    assert (
        "--flux /opt/fluxview/view/bin/flux --flux-uri local:///opt/fluxview/config/run/flux/local"
        in sidecar["command"]
    )
    assert sidecar["securityContext"] == {"runAsUser": 1000, "runAsNonRoot": True}
    assert body["spec"]["flux"]["noWaitSocket"] is False  # the user's own choice stays
    with_image = minicluster.build(ensemble, ensemble.members[0], OWNER, token_secret=TOKEN_SECRET, image="r/x:2")
    assert with_image["spec"]["containers"][-1]["image"] == "r/x:2"
    # Secrets are named after their content: another token (or certificate) is another Secret, never an overwrite
    assert minicluster.token_secret_name("demo", "a") != minicluster.token_secret_name("demo", "b")
    assert minicluster.tls_secret_name("demo", b"cert-1") != minicluster.tls_secret_name("demo", b"cert-2")


def container_status(name: str, image: str, **fields: Any) -> dict[str, Any]:
    """A container's status as the kubelet reports it (every field the API always sets)."""
    return {
        "name": name,
        "image": image,
        "imageID": f"{image}@sha256:{'0' * 64}" if fields.get("state", {}).get("running") is not None else "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": "ContainerCreating"}},
        **fields,
    }


SIDECAR_RUNNING = {"ready": True, "started": True, "state": {"running": {"startedAt": "2026-12-01T10:00:00Z"}}}


def operator_pod(
    minicluster_name: str, index: int, *, job_index: str, ip: str = "10.0.0.1", sidecar: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A pod of a MiniCluster's Indexed Job, named and labelled as the Job controller and the Flux Operator do
    (``job-index`` as the operator computes it: possibly another MiniCluster's); ``sidecar``: the status fields
    of the sidecar container (default: running)."""
    name = f"{minicluster_name}-{index}-{'abcde'[index % 5]}x9k2"
    image = minicluster.DEFAULT_IMAGE
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "science",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {
                "job-name": minicluster_name,
                "batch.kubernetes.io/job-name": minicluster_name,
                "batch.kubernetes.io/job-completion-index": str(index),
                "controller-uid": f"uid-{minicluster_name}",
                "batch.kubernetes.io/controller-uid": f"uid-{minicluster_name}",
                "app": "flux-operator",
                "app.kubernetes.io/name": minicluster_name,
                "hpa-selector": minicluster_name,
                "namespace": "science",
                "job-index": job_index,
            },
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {
            "hostname": f"{minicluster_name}-{index}",
            "subdomain": "flux-service",
            "containers": [
                {"name": minicluster_name, "image": "ghcr.io/converged-computing/metric-lammps:latest"},
                {"name": minicluster.SIDECAR_CONTAINER, "image": image},
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "containerStatuses": [
                container_status(
                    minicluster_name, "ghcr.io/converged-computing/metric-lammps:latest", **SIDECAR_RUNNING
                ),
                container_status(
                    minicluster.SIDECAR_CONTAINER, image, **(SIDECAR_RUNNING if sidecar is None else sidecar)
                ),
            ],
        },
    }


def test_the_lead_pod_is_found_by_completion_index_whatever_the_operator_labelled_it() -> None:
    # two MiniClusters whose names extend each other, in one namespace: lammps-1's controller labels the pods
    # of lammps-1-0 by stripping "lammps-1-" from their names (labels.go), and the other way round
    pods = [
        operator_pod("lammps-1", 0, job_index="1", ip="10.0.0.10"),  # labelled by lammps' controller: wrong
        operator_pod("lammps-1", 1, job_index="1"),
        operator_pod("lammps-1-0", 0, job_index="0", ip="10.0.0.20"),
        operator_pod("lammps-1-0", 1, job_index="0"),  # "lammps-1-0-1-..." stripped of "lammps-1-": wrong
    ]
    lead = minicluster.lead_pod(pods, "lammps-1")
    assert lead is not None and minicluster.pod_ip(lead) == "10.0.0.10"
    other = minicluster.lead_pod(pods, "lammps-1-0")
    assert other is not None and minicluster.pod_ip(other) == "10.0.0.20"
    # a terminating lead pod is not the lead (its replacement is coming); without the completion-index label
    # (Kubernetes < 1.28) the annotation, then the hostname <name>-0, say it
    pods[0]["metadata"]["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    assert minicluster.lead_pod(pods, "lammps-1") is None
    old = operator_pod("lammps-1", 0, job_index="x")
    del old["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
    assert minicluster.lead_pod([old], "lammps-1") is old
    del old["metadata"]["annotations"]
    assert minicluster.lead_pod([old], "lammps-1") is old
    assert (
        minicluster.endpoint("fd00::1", 50051) == "[fd00::1]:50051"
        and minicluster.endpoint("10.0.0.1", 1) == "10.0.0.1:1"
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (SIDECAR_RUNNING, None),
        (
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}},
            "ImagePullBackOff: no such image",
        ),
        (
            {"restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"exitCode": 127, "reason": "Error"}}},
            "exit 127, the command was not found (Error)",
        ),
        (
            {"restartCount": 3, "state": {"running": {}},
             "lastState": {"terminated": {"exitCode": 1, "message": "boom"}}},
            "restarted 3 times, last exit 1: boom",
        ),
    ],
)  # fmt: skip
def test_a_sidecar_container_that_cannot_run_is_named_with_its_reason(
    status: dict[str, Any], expected: str | None
) -> None:
    pods = [operator_pod("demo-0", 0, job_index="0", sidecar=status)]
    # the application container restarting is not the sidecar's problem
    pods[0]["status"]["containerStatuses"][0].update(restartCount=7, state={"waiting": {"reason": "ImagePullBackOff"}})
    problem = minicluster.sidecar_problem(pods, "demo-0")
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.endswith(expected), problem
        assert problem.startswith("pod demo-0-0-")


def test_the_vendored_minicluster_schema_is_what_the_script_derives_from_the_flux_operator_crd() -> None:
    """``ensemble_core/data/minicluster-spec-schema.json`` is generated (``make schema``), never edited."""
    crd_path = SHARED / "reference" / "minicluster-crd.yaml"
    if not crd_path.exists():
        pytest.skip(f"{crd_path} is not beside the clone: nothing to compare the vendored schema with")
    from tools import minicluster_schema

    assert minicluster_schema.VERSION == minicluster.VERSION
    derived = minicluster_schema.render(minicluster_schema.derive(yaml.safe_load(crd_path.read_text())))
    assert (REPO / "ensemble_core" / "data" / "minicluster-spec-schema.json").read_text() == derived
    # and it is the schema validation reads: every property of the CRD's spec, at any depth
    assert minicluster_spec_schema() == minicluster_schema.derive(yaml.safe_load(crd_path.read_text()))["spec"]
