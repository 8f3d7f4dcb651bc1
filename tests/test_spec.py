"""Ensemble validation: every rule reports the field path and the fix; the reference files parse."""

from __future__ import annotations

import copy
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensemble_core import matrix
from ensemble_core.matrix import MatrixRange
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
    # the parser's own limits are reported too, not raised past `ensemble validate`
    huge = tmp_path / "huge.yaml"
    huge.write_text(f"spec: {{checkSeconds: {'1' * 5000}}}")
    with pytest.raises(SpecError, match="cannot be read as YAML: Exceeds the limit"):
        load(huge)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match="cannot be read as YAML: nested too deeply"):
        load(deep)


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
    assert f"{example}: valid (1 member, 11 jobs: member 0: wide 2, pair 3, single 6)\n" in result.stdout
    assert f"{path}: spec.members[0].jobs[1].nodes: 12 exceeds maxSize 8" in result.stdout


# --- parameter sweeps (matrix) -----------------------------------------------------------------------


def with_matrix_group(**group: Any) -> dict[str, Any]:
    """VALID with a third job group, ``sweep``, made of ``group`` (a matrix and a command by default)."""
    document = copy.deepcopy(VALID)
    job = {"name": "sweep", "command": "lmp -var x {x} -var seed {seed} -in in.lj", "nodes": 1, **group}
    job.setdefault("matrix", {"x": [1, 2, 4], "seed": {"range": [0, 10]}})
    document["spec"]["members"][0]["jobs"].append(job)
    return document


def sweep_errors(**group: Any) -> list[str]:
    ensemble, errors = validate(with_matrix_group(**group))
    assert ensemble is None and errors
    return errors


def test_a_matrix_group_counts_one_job_per_combination() -> None:
    ensemble, errors = validate(with_matrix_group())
    assert errors == [] and ensemble is not None
    job = ensemble.members[0].jobs[2]
    assert job.count == 30
    assert job.matrix == {"x": [1, 2, 4], "seed": MatrixRange(start=0, stop=10)}
    assert matrix.params(job.matrix, 13) == {"x": "2", "seed": "3"}
    assert [j.matrix for j in ensemble.members[0].jobs[:2]] == [{}, {}]  # groups without one are as before


def test_a_matrix_group_may_state_its_count_when_it_matches() -> None:
    ensemble, errors = validate(with_matrix_group(count=30))
    assert errors == [] and ensemble is not None and ensemble.members[0].jobs[2].count == 30
    ensemble, errors = validate(with_matrix_group(matrix={"x": {"range": [10, 0, -2]}}, command="run {x}"))
    assert errors == [] and ensemble is not None and ensemble.members[0].jobs[2].count == 5


def test_a_count_that_differs_from_the_matrix_is_refused_saying_what_the_matrix_gives() -> None:
    assert sweep_errors(count=10) == [
        "spec.members[0].jobs[2].count: 10 does not match the matrix, which gives 30 jobs (x: 3 × seed: 10); "
        "remove count: a group with a matrix runs one job per combination"
    ]


def test_a_matrix_too_large_for_a_member_is_refused() -> None:
    errors = sweep_errors(matrix={"x": [1, 2, 4], "seed": {"range": [0, 1_000_000]}})
    assert errors == [
        "spec.members[0].jobs[2].matrix: x: 3 × seed: 1000000 combinations is more than the limit of 1000000 jobs "
        "per member; use fewer values, or split the sweep over several members"
    ]
    # the limit is per member: groups together may not pass it either
    errors = sweep_errors(matrix={"x": [1], "seed": {"range": [0, 1_000_000]}})
    assert errors == ["spec.members[0].jobs: 1000006 jobs in all exceeds the limit of 1000000 per member"]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"x": [], "seed": [1]}, "matrix.x: empty list; give at least one value"),
        ({"x": [1, None], "seed": [1]}, 'matrix.x[1]: null is not a value; quote it ("null")'),
        ({"x": [[1, 2]], "seed": [1]}, "matrix.x[0]: expected a string, a number or a boolean, got a list"),
        ({"x": [{"range": [0, 2]}], "seed": [1]}, "matrix.x[0]: expected a string, a number or a boolean, got a map"),
        ({"x": [float("nan")], "seed": [1]}, "matrix.x[0]: nan is not a finite number; quote it"),
        ({"x": [float("inf")], "seed": [1]}, "matrix.x[0]: inf is not a finite number"),
        ({"x": ["a\x00b"], "seed": [1]}, "matrix.x[0]: contains a NUL character"),
        ({"x": [2**64], "seed": [1]}, "matrix.x[0]: 18446744073709551616 is outside the 64-bit integers"),
        (
            {"x": [datetime.date(2024, 1, 1)], "seed": [1]},
            "matrix.x[0]: expected a string, a number or a boolean, got date",
        ),
        (
            {"x": 3, "seed": [1]},
            "matrix.x: expected a list of values ([1, 2, 4]) or {range: [start, stop]}, got an integer 3",
        ),
        (
            {"x": None, "seed": [1]},
            "matrix.x: expected a list of values ([1, 2, 4]) or {range: [start, stop]}, got null",
        ),
        ({"x": [1], "seed": {"range": [0, 10, 0]}}, "matrix.seed.range[2]: step must not be 0"),
        (
            {"x": [1], "seed": {"range": [10, 0]}},
            "matrix.seed.range: [10, 0] is empty; stop must be above start, and stop is excluded: [10, 11]",
        ),
        ({"x": [1], "seed": {"range": [0, 10, -1]}}, "matrix.seed.range: [0, 10, -1] is empty; with a negative step"),
        (
            {"x": [1], "seed": {"range": [0]}},
            "matrix.seed.range: expected [start, stop] or [start, stop, step] (integers; stop is excluded), "
            "got a list of 1",
        ),
        ({"x": [1], "seed": {"range": "0..10"}}, "matrix.seed.range: expected [start, stop] or [start, stop, step]"),
        (
            {"x": [1], "seed": {"range": [0, 2.5]}},
            "matrix.seed.range[1]: expected an integer, got float 2.5; a range holds integers",
        ),
        ({"x": [1], "seed": {"range": [True, 3]}}, "matrix.seed.range[0]: expected an integer, got a boolean"),
        ({"x": [1], "seed": {"range": [0, 2**63]}}, "matrix.seed.range[1]: 9223372036854775808 is outside the 64-bit"),
        ({"x": [1], "seed": {"rnage": [0, 3]}}, "matrix.seed.rnage: unknown field; did you mean range?"),
        ({"x": [1], "seed": {}}, "matrix.seed: empty mapping; write the values as a list"),
        ({"x": [1], "seed": [1], "1st": [1]}, "matrix.1st: not a parameter name: use letters, digits and _"),
        ({"x": [1], "seed": [1], "a-b": [1]}, "matrix.a-b: not a parameter name"),
        ({"x": [1], "seed": [1], "": [1]}, 'matrix."": not a parameter name'),
        ({"x": [1], "seed": [1], True: [1]}, "matrix.True: not a parameter name"),
        ({"x": [1], "seed": [1], 7: [1]}, "matrix.7: not a parameter name"),
        ({"x": [1], "seed": [1], "X": [2]}, "matrix.X: X and x both become ENSEMBLE_PARAM_X; rename one of them"),
        ({}, "matrix: empty; give each parameter its values"),
        (None, "matrix: empty; give each parameter its values"),
        ([1, 2], "matrix: expected a mapping of parameter names to values"),
        ("x=1", "matrix: expected a mapping of parameter names to values"),
    ],
)
def test_a_bad_matrix_is_refused_at_its_field(sweep: object, expected: str) -> None:
    errors = sweep_errors(matrix=sweep)
    assert any(error.startswith(f"spec.members[0].jobs[2].{expected}") for error in errors), errors
    assert all(error.startswith("spec.members[0].jobs") for error in errors), errors


def test_a_yaml_boolean_parameter_name_is_explained() -> None:
    (error,) = sweep_errors(matrix=yaml.safe_load("{x: [1], seed: [1], on: [1]}"))
    assert error.startswith("spec.members[0].jobs[2].matrix.True: not a parameter name")
    assert "YAML reads an unquoted yes, no, on, off as a boolean: quote the name" in error


def test_a_placeholder_that_names_no_parameter_is_refused_with_the_close_name() -> None:
    assert sweep_errors(command="lmp -var x {x} -var seed {sede}") == [
        "spec.members[0].jobs[2].command: {sede} names no parameter of the matrix (x, seed); did you mean {seed}? "
        "A bare name in braces is replaced by a parameter's value: write other braces differently, e.g. "
        "{ sede } or ${sede}"
    ]
    (error,) = sweep_errors(command="awk '{print}' in.{x}.{seed}")
    assert error.startswith("spec.members[0].jobs[2].command: {print} names no parameter of the matrix (x, seed). A")


def test_other_braces_and_unused_parameters_are_fine() -> None:
    command = "sh -c 'cd ${HOME}; awk \"{ print $1 }\" in.lj' {x}"
    ensemble, errors = validate(with_matrix_group(command=command))
    assert errors == [] and ensemble is not None  # seed is unused in the command: the job has it in its environment
    # without a matrix a command's braces are nobody's business
    document = copy.deepcopy(VALID)
    document["spec"]["members"][0]["jobs"][0]["command"] = "echo {anything}"
    assert validate(document)[1] == []


def test_a_quoted_placeholder_whose_value_needs_quoting_is_refused() -> None:
    errors = sweep_errors(command="sh -c 'echo {label}'", matrix={"label": ["plain", "two words"]})
    assert errors == [
        "spec.members[0].jobs[2].command: {label} is inside quotes, but its value 'two words' needs shell quoting, "
        "which would end those quotes; put {label} outside the quotes (sh -c 'echo \"$1\"' sh {label}) or read "
        "$ENSEMBLE_PARAM_LABEL in the quoted script"
    ]
    # values that need no quoting may sit inside quotes, and a quoting value may sit outside them
    for command, values in [
        ("sh -c 'echo {label}'", ["plain", "run-1.txt", 0.5, True]),
        ("echo {label}", ["a b"]),
        ("sh -c 'echo \"$1\"' sh {label}", ["a b"]),
    ]:
        assert validate(with_matrix_group(command=command, matrix={"label": values}))[1] == [], command


def test_matrix_errors_are_reported_with_the_groups_other_errors() -> None:
    errors = sweep_errors(count="many", nodes=0, matrix={"x": [], "seed": [1]})
    assert {error.split(":")[0] for error in errors} == {
        "spec.members[0].jobs[2].count",
        "spec.members[0].jobs[2].nodes",
        "spec.members[0].jobs[2].matrix.x",
    }, errors
    # a null count is an unset one: only the matrix is wrong
    assert sweep_errors(count=None, matrix={"x": [], "seed": [1]}) == [
        "spec.members[0].jobs[2].matrix.x: empty list; give at least one value"
    ]
    ensemble, errors = validate(with_matrix_group(count=None))
    assert errors == [] and ensemble is not None and ensemble.members[0].jobs[2].count == 30


def test_validate_prints_the_job_count_of_each_group(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(with_matrix_group()))
    result = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{path}: valid (1 member, 36 jobs: member 0: small 4, big 2, sweep 30)\n"


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
        f"{path}: valid (2 members, 6 jobs: member 0: small 4, big 2; member 1: {'no jobs' if not jobs else 'a 0'})",
    ]
    # an invalid file beside it still fails the command
    both = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "validate", str(path), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert both.returncode == 1 and f"{bad}: kind: expected 'Ensemble'" in both.stdout


def test_the_sweep_example_runs_twelve_jobs_in_product_order() -> None:
    (member,) = load(REPO / "examples/sweep.yaml").members
    (job,) = member.jobs
    assert job.count == 12
    rendered = [matrix.render(job.command, matrix.params(job.matrix, i)) for i in range(job.count)]
    assert rendered[0] == "sh -c 'echo \"lj x=$1 seed=$2\"; sleep 1' lj 1 0"
    assert rendered[5] == "sh -c 'echo \"lj x=$1 seed=$2\"; sleep 1' lj 2 1"
    assert rendered[11] == "sh -c 'echo \"lj x=$1 seed=$2\"; sleep 1' lj 4 3"
    output = subprocess.run(
        shlex.split(rendered[11].replace("sleep 1", "true")), capture_output=True, text=True, check=True
    )
    assert output.stdout == "lj x=4 seed=3\n"


def test_the_readme_sweep_is_valid_and_in_the_order_it_says() -> None:
    section = (REPO / "README.md").read_text().split("### Parameter sweeps", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    document = copy.deepcopy(VALID)
    document["spec"]["members"][0]["jobs"] = yaml.safe_load(block)["jobs"]
    ensemble, errors = validate(document)
    assert errors == [] and ensemble is not None
    (job,) = ensemble.members[0].jobs
    assert job.count == 30
    said = {0: ("1", "0"), 1: ("1", "1"), 10: ("2", "0"), 29: ("4", "9")}
    assert {i: tuple(matrix.params(job.matrix, i).values()) for i in said} == said


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
