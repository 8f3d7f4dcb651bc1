"""Ensemble validation: every rule reports the field path and the fix; the reference files parse."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_core.spec import SpecError, load, validate, warnings
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


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda m: m["minicluster"]["spec"].update(maxsize=4),
            "spec.members[0].minicluster.spec.maxsize: unknown field; did you mean maxSize?",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(minsize=1),
            "spec.members[0].minicluster.spec.minsize: unknown field; did you mean minSize?",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(containers=[{"image": "flux", "workingdir": "/opt"}]),
            "spec.members[0].minicluster.spec.containers[0].workingdir: unknown field; did you mean workingDir?",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(flux={"container": {"mountpath": "/x"}}),
            "spec.members[0].minicluster.spec.flux.container.mountpath: unknown field; did you mean mountPath?",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(interactive="yes"),
            "spec.members[0].minicluster.spec.interactive: expected true or false, got a string 'yes'",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(containers={"image": "flux"}),
            "spec.members[0].minicluster.spec.containers: expected a list, got a mapping",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(containers=[{"image": "flux", "environment": {"N": 4}}]),
            "spec.members[0].minicluster.spec.containers[0].environment.N: expected a string, got an integer 4",
        ),
        (
            lambda m: m["minicluster"]["spec"].update(pod={"resources": {"cpu": [1]}}),
            "spec.members[0].minicluster.spec.pod.resources.cpu: expected an integer or a string",
        ),
        (
            lambda m: m["minicluster"].update(specs={}),
            "spec.members[0].minicluster.specs: unknown field; did you mean spec?",
        ),
        (
            lambda m: m["minicluster"].update(metadata={"label": {"a": "b"}}),
            "spec.members[0].minicluster.metadata.label: unknown field; did you mean labels?",
        ),
        (
            lambda m: m["minicluster"].update(metadata={"name": "mine"}),
            "spec.members[0].minicluster.metadata.name: set by the operator",
        ),
        (
            lambda m: m["minicluster"].update(metadata={"labels": {"team": 7}}),
            "spec.members[0].minicluster.metadata.labels.team: expected a string, got an integer 7; quote it",
        ),
        (lambda m: m.pop("minicluster"), "spec.members[0].minicluster: required; give minicluster.spec.size at least"),
        (lambda m: m.update(minicluster={}), "spec.members[0].minicluster.spec: required; give spec.size at least"),
    ],
)
def test_unknown_minicluster_fields_and_wrong_types_are_named_with_the_nearest_field(
    change: Any, expected: str
) -> None:
    errors = errors_of(lambda d: change(d["spec"]["members"][0]))
    assert any(error.startswith(expected) for error in errors), errors


def test_a_member_without_minicluster_gets_one_error_not_a_cascade_about_default_sizes() -> None:
    errors = errors_of(lambda d: d["spec"]["members"][0].pop("minicluster"))
    assert errors == ["spec.members[0].minicluster: required; give minicluster.spec.size at least"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"name": "demo", "lables": {"a": "b"}}, "metadata.lables: unknown field; did you mean labels?"),
        ({"name": "demo", "namespce": "x"}, "metadata.namespce: unknown field; did you mean namespace?"),
        ({"name": "demo", "annotations": "x"}, "metadata.annotations: expected a mapping of names to strings"),
    ],
)
def test_unknown_metadata_fields_are_errors(metadata: dict[str, Any], expected: str) -> None:
    errors = errors_of(lambda d: d.update(metadata=metadata))
    assert any(error.startswith(expected) for error in errors), errors


def test_metadata_as_kubectl_prints_it_and_a_full_minicluster_spec_are_valid() -> None:
    document = copy.deepcopy(VALID)
    document["metadata"].update(
        namespace="science",
        uid="3f9c2a10-0000-4000-8000-00000000d3e0",
        resourceVersion="42",
        generation=2,
        creationTimestamp="2024-05-01T10:00:00Z",
        labels={"team": "md"},
        annotations={"note": "x"},
        finalizers=[],
        managedFields=[{"manager": "kubectl"}],
    )
    member = document["spec"]["members"][0]
    member["minicluster"]["metadata"] = {"labels": {"team": "md"}, "annotations": {"a": "b"}}
    member["minicluster"]["spec"].update(
        size="2",  # a quoted size is taken, as before
        tasks=4,
        logging={"quiet": True},
        flux={"completeWorkers": True, "container": {"mountPath": "/mnt/flux"}, "environment": {"A": "1"}},
        containers=[{"image": "flux", "resources": {"limits": {"cpu": 3, "memory": "1Gi"}}, "workingDir": "/opt"}],
        pod={"labels": {"a": "b"}, "nodeSelector": {"disk": "ssd"}},
    )
    ensemble, errors = validate(document)
    assert errors == [] and ensemble is not None


def test_the_schema_comes_from_the_package_not_from_the_shared_reference(tmp_path: Path) -> None:
    """Validation reads the vendored schema only: a copy of the package with no ../shared beside it works."""
    shutil.copytree(REPO / "ensemble_core", tmp_path / "repo" / "ensemble_core")
    document = copy.deepcopy(VALID)
    document["spec"]["members"][0]["minicluster"]["spec"]["maxsize"] = 4
    code = (
        "import json, sys; from ensemble_core import spec; print(spec.__file__); "
        "print(spec.validate(json.loads(sys.argv[1]))[1])"
    )
    result = subprocess.run(
        [sys.executable, "-E", "-c", code, json.dumps(document)],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        check=True,
    )
    assert not (tmp_path / "shared").exists()
    assert result.stdout.startswith(str(tmp_path / "repo" / "ensemble_core" / "spec.py"))
    assert "minicluster.spec.maxsize: unknown field; did you mean maxSize?" in result.stdout


def test_a_command_with_a_quote_left_open_is_refused_at_validate_time_with_the_fix() -> None:
    def change(d: dict[str, Any]) -> None:
        d["spec"]["members"][0]["jobs"][1]["command"] = "lmp -in 'in file"

    assert errors_of(change) == [
        "spec.members[0].jobs[1].command: cannot be split into arguments: a ' quote is never closed; "
        "close it, or escape it as \\'"
    ]


@pytest.mark.parametrize(
    ("jobs", "what"),
    [([], "the list is empty"), ([{"name": "a", "command": "true", "count": 0}], "every job group has count 0")],
)
def test_validate_warns_of_a_member_with_nothing_to_run_and_still_calls_it_valid(
    tmp_path: Path, jobs: list[dict[str, Any]], what: str
) -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["members"].append(copy.deepcopy(document["spec"]["members"][0]))
    document["spec"]["members"][1]["jobs"] = jobs
    path = tmp_path / "idle.yaml"
    path.write_text(yaml.safe_dump(document))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**document, "kind": "Pod"}))
    result = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "validate", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not an error
    assert result.stdout.splitlines() == [
        f"{path}: warning: spec.members[1].jobs: {what}, so this member runs nothing (it starts and terminates); "
        "add a job group or raise a count",
        f"{path}: valid",
    ]
    # an invalid file beside it still fails the command
    both = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "validate", str(path), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert both.returncode == 1 and f"{bad}: kind: expected 'Ensemble'" in both.stdout


def test_a_member_with_jobs_to_run_gives_no_warning() -> None:
    ensemble, errors = validate(copy.deepcopy(VALID))
    assert ensemble is not None and errors == [] and warnings(ensemble) == []


def test_a_minicluster_may_name_its_type_as_the_original_embedded_it_but_only_the_one_made() -> None:
    document = copy.deepcopy(VALID)
    document["spec"]["members"][0]["minicluster"].update(apiVersion="flux-framework.org/v1alpha2", kind="MiniCluster")
    assert validate(document)[1] == []
    document["spec"]["members"][0]["minicluster"]["apiVersion"] = "flux-framework.org/v1alpha1"
    assert validate(document)[1] == [
        "spec.members[0].minicluster.apiVersion: must be 'flux-framework.org/v1alpha2' (the MiniCluster the "
        "creator makes), got 'flux-framework.org/v1alpha1'; set it so or remove it"
    ]
