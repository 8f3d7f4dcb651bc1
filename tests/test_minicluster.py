"""The MiniCluster of each member: valid against the Flux Operator's real CRD, sidecar injected, names that fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ensemble_core import minicluster
from ensemble_core.spec import Ensemble, validate
from tests.conftest import REPO, SHARED

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
        body = minicluster.build(ensemble, member, OWNER)
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
    body = minicluster.build(ensemble, ensemble.members[0], OWNER)
    assert_valid_minicluster(body)
    logger, app, sidecar = body["spec"]["containers"]
    assert (logger["runFlux"], app["runFlux"], sidecar["runFlux"]) == (False, True, False)
    assert app["workingDir"] == "/opt"
    assert sidecar["name"] == minicluster.SIDECAR_CONTAINER
    assert sidecar["image"] == "example.org/sidecar:1" and sidecar["pullAlways"] is True
    assert sidecar["command"] == "ensemble sidecar --backend flux --host 0.0.0.0 --port 7000"
    assert sidecar["ports"] == [7000]
    assert sidecar["environment"]["FLUX_URI"] == "local:///mnt/flux/config/run/flux/local"
    assert sidecar["secrets"]["ENSEMBLE_SIDECAR_TOKEN"] == {"name": "hello-world-sidecar-token", "key": "token"}
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
    body = minicluster.build(ensemble, member, OWNER)
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
