"""Ensemble validation: every rule reports the field path and the fix; the reference files parse."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_core.spec import SpecError, load, validate
from tests.conftest import REPO, SHARED

VALID: dict[str, Any] = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "metadata": {"name": "demo"},
    "spec": {
        "checkSeconds": 2,
        "members": [
            {
                "minicluster": {"spec": {"size": 2, "minSize": 1, "maxSize": 8}},
                "algorithm": {"name": "workload-demand", "options": {"scaleChecks": 3}},
                "jobs": [
                    {"name": "small", "command": "sleep 1", "count": 4, "nodes": 1},
                    {"name": "big", "command": "sleep 2", "count": 2, "nodes": 8, "tasks": 8},
                ],
            }
        ],
    },
}


def errors_of(change: Any) -> list[str]:
    document = copy.deepcopy(VALID)
    change(document)
    ensemble, errors = validate(document)
    assert ensemble is None
    return errors


def test_valid_document_gives_typed_members() -> None:
    ensemble, errors = validate(copy.deepcopy(VALID))
    assert errors == []
    assert ensemble is not None
    member = ensemble.members[0]
    assert (member.size, member.min_size, member.max_size) == (2, 1, 8)
    assert ensemble.check_seconds == 2
    assert [job.count for job in member.jobs] == [4, 2]
    spec = ensemble.member_spec(member, "127.0.0.1:1")
    assert spec.algorithm.options == {"scaleChecks": 3}


def test_job_wider_than_max_size_names_the_field() -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["members"][0]["jobs"][1]["nodes"] = 12

    assert "spec.members[0].jobs[1].nodes: 12 exceeds maxSize 8; raise maxSize or use fewer nodes" in errors_of(change)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("minicluster", "spec", "minSize"), 3, "spec.members[0].minicluster.spec.minSize: 3 is above size 2"),
        (("minicluster", "spec", "maxSize"), 1, "spec.members[0].minicluster.spec.maxSize: 1 is below size 2"),
        (("minicluster", "spec", "size"), 0, "spec.members[0].minicluster.spec.size: 0 is below the minimum 1"),
        (("minicluster", "spec", "size"), "two", "spec.members[0].minicluster.spec.size: expected an integer"),
        (("jobs",), "sleep", "spec.members[0].jobs: expected a list"),
        (("algorithm", "name"), "workload-demnd", "spec.members[0].algorithm.name: unknown algorithm"),
        (
            ("algorithm", "options", "scaleUpChecks"),
            4,
            "spec.members[0].algorithm.options.scaleUpChecks: unknown option for workload-demand; "
            "did you mean scaleChecks?",
        ),
        (("algorithm", "options", "scaleChecks"), "abc", "spec.members[0].algorithm.options.scaleChecks: expected"),
        (("algorithm", "options", "order"), "sideways", "spec.members[0].algorithm.options.order: must be one of"),
        (("sidecar", "port"), 70000, "spec.members[0].sidecar.port: 70000 is above the maximum 65535"),
        (("jobz",), [], "spec.members[0].jobz: unknown field; did you mean jobs?"),
    ],
)
def test_member_rules(path: tuple[str, ...], value: object, expected: str) -> None:
    def change(d: dict[str, Any]) -> None:
        target = d["spec"]["members"][0]
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value

    errors = errors_of(change)
    assert any(error.startswith(expected) for error in errors), errors


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("name", None, "spec.members[0].jobs[0].name: required"),
        ("command", "", "spec.members[0].jobs[0].command: must not be empty"),
        ("count", -1, "spec.members[0].jobs[0].count: -1 is below the minimum 0"),
        ("nodes", 0, "spec.members[0].jobs[0].nodes: 0 is below the minimum 1"),
        ("tasks", 1, None),
        ("duration", "long", "spec.members[0].jobs[0].duration: expected an integer"),
        ("nodez", 1, "spec.members[0].jobs[0].nodez: unknown field; did you mean nodes?"),
    ],
)
def test_job_rules(key: str, value: object, expected: str | None) -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["members"][0]["jobs"][0][key] = value

    if expected is None:
        document = copy.deepcopy(VALID)
        change(document)
        assert validate(document)[1] == []
        return
    errors = errors_of(change)
    assert any(error.startswith(expected) for error in errors), errors


def test_fewer_tasks_than_nodes_is_refused() -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["members"][0]["jobs"][1]["tasks"] = 4

    assert any(e.startswith("spec.members[0].jobs[1].tasks: 4 is fewer than nodes 8") for e in errors_of(change))


def test_duplicate_group_names_are_refused() -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["members"][0]["jobs"][1]["name"] = "small"

    assert any(e.startswith("spec.members[0].jobs[1].name: 'small' is used by another") for e in errors_of(change))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(apiVersion="v1"), "apiVersion: expected 'ensemble.flux-framework.org/v1alpha1'"),
        (lambda d: d.update(kind="Pod"), "kind: expected 'Ensemble'"),
        (lambda d: d["metadata"].update(name="Not_Valid"), "metadata.name: 'Not_Valid' is not a valid Kubernetes name"),
        (lambda d: d["spec"].update(members=[]), "spec.members: empty"),
        (lambda d: d["spec"].update(checkSeconds=0), "spec.checkSeconds: 0 is below the minimum 1"),
        (lambda d: d["spec"].update(algorithm={"name": "nope"}), "spec.algorithm.name: unknown algorithm 'nope'"),
        (lambda d: d.pop("spec"), "spec: required"),
    ],
)
def test_ensemble_rules(change: Any, expected: str) -> None:
    errors = errors_of(change)
    assert any(error.startswith(expected) for error in errors), errors


def test_every_error_is_reported_at_once() -> None:
    def change(d: dict[str, Any]) -> None:
        d["kind"] = "Pod"
        d["spec"]["members"][0]["jobs"][0]["nodes"] = 9
        d["spec"]["members"][0]["algorithm"]["options"]["scaleUpChecks"] = 1

    assert len(errors_of(change)) == 3


def test_dotted_and_unicode_names_are_handled() -> None:
    document = copy.deepcopy(VALID)
    document["metadata"]["name"] = "sweep.v2"
    ensemble, errors = validate(document)
    assert errors == [] and ensemble is not None and ensemble.name == "sweep.v2"
    document["metadata"]["name"] = "ünï"
    assert validate(document)[1][0].startswith("metadata.name:")


@pytest.mark.parametrize("document", [None, [], "text", 3])
def test_documents_that_are_not_mappings_are_refused(document: object) -> None:
    ensemble, errors = validate(document)
    assert ensemble is None and errors and errors[0].startswith("(document)")


def test_max_size_defaults_to_size(tmp_path: Path) -> None:
    document = copy.deepcopy(VALID)
    del document["spec"]["members"][0]["minicluster"]["spec"]["maxSize"]
    document["spec"]["members"][0]["jobs"][1]["nodes"] = 2
    document["spec"]["members"][0]["jobs"][1]["tasks"] = 2
    ensemble, errors = validate(document)
    assert errors == [] and ensemble is not None and ensemble.members[0].max_size == 2


def test_seed_gke_ensembles_are_valid() -> None:
    for path in sorted((SHARED / "data/seed-gke").glob("*/ensemble.yaml")):
        ensemble = load(path)
        assert ensemble.members[0].max_size == 24


def test_seed_examples_parse_and_their_wrong_option_is_reported() -> None:
    for path in sorted((SHARED / "reference/seed-examples").glob("*.yaml")):
        with pytest.raises(SpecError) as info:
            load(path)
        assert info.value.errors == [
            "spec.members[0].algorithm.options.scaleUpChecks: unknown option for workload-demand; "
            "did you mean scaleChecks? (valid: order, scaleChecks, scaleUpStrategy, scaleDownStrategy, "
            "terminateChecks, disableTermination)"
        ], path


def test_unreadable_and_broken_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load(broken)


def test_validate_command_prints_each_error_or_valid(tmp_path: Path) -> None:
    bad = copy.deepcopy(VALID)
    bad["spec"]["members"][0]["jobs"][1]["nodes"] = 12
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    example = REPO / "examples/hello-world.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "validate", str(example), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert f"{example}: valid" in result.stdout
    assert f"{path}: spec.members[0].jobs[1].nodes: 12 exceeds maxSize 8" in result.stdout
