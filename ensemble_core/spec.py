"""The Ensemble resource: parsing and validation with every error named by its field path.

The same format serves the Kubernetes custom resource and a local ``ensemble.yaml``: apiVersion
``ensemble.flux-framework.org/v1alpha1``, kind ``Ensemble``, ``spec.members[]`` each with a
``minicluster.spec`` (``size``, ``minSize``, ``maxSize`` and the rest of a MiniCluster spec), ``jobs``
(job groups, each of ``count`` jobs or a parameter sweep over a ``matrix``: ``ensemble_core.matrix``),
an optional ``algorithm {name, options}`` and ``sidecar``; ``spec.algorithm`` and
``spec.checkSeconds`` apply to every member. :func:`validate` returns every problem at once, each as
``<path>: <problem>`` (``spec.members[0].jobs[1].nodes: 12 exceeds maxSize 8``).

Unknown fields are errors everywhere, with the nearest valid name (``did you mean maxSize?``):
``metadata`` takes Kubernetes' ObjectMeta fields, a member's ``minicluster`` takes ``metadata`` (its
labels and annotations go on the MiniCluster) and ``spec``, and ``minicluster.spec`` is checked, at
every depth, against the Flux Operator's MiniCluster CRD schema (field names and types), vendored in
``ensemble_core/data/minicluster-spec-schema.json`` by ``tools/minicluster_schema.py``: the API server
would otherwise drop a misspelt field silently (``maxsize: 4`` would leave the MiniCluster at ``size``).

Defaults, where the original left a hole: ``minSize`` defaults to 1 and ``maxSize`` to ``size`` (the
Flux Operator sizes its broker configuration for ``maxSize``, or ``size`` when unset, so a MiniCluster
can never grow past it; the original instead refused every scale-up when ``maxSize`` was unset).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ensemble_core import algorithms
from ensemble_core import matrix as sweep
from ensemble_core.commands import command_argv
from ensemble_core.messages import DEFAULT_ALGORITHM, AlgorithmSpec, JobSpec, MemberSpec
from ensemble_core.words import plural

API_VERSION = "ensemble.flux-framework.org/v1alpha1"
KIND = "Ensemble"
#: Most jobs one member may define (sum of ``count``); more is refused as a likely typo.
MAX_JOBS_PER_MEMBER = 1_000_000
#: Largest MiniCluster size accepted.
MAX_SIZE = 10_000
#: Largest ``spec.weight`` (the budget's fair share, docs/budget.md).
MAX_WEIGHT = 1000

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TOP_KEYS = {"apiVersion", "kind", "metadata", "spec", "status"}
_SPEC_KEYS = {"members", "algorithm", "checkSeconds", "weight"}
_MEMBER_KEYS = {"minicluster", "jobs", "algorithm", "sidecar"}
#: ``apiVersion`` and ``kind`` are taken (the original embedded a whole MiniCluster), but only naming the
#: MiniCluster the creator makes
_MINICLUSTER_KEYS = {"metadata", "spec", "apiVersion", "kind"}
_MINICLUSTER_TYPE = {"apiVersion": "flux-framework.org/v1alpha2", "kind": "MiniCluster"}
#: Kubernetes' ObjectMeta fields: what ``metadata`` may hold (``kubectl get -o yaml`` prints them all).
_OBJECT_META_KEYS = {
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "managedFields", "ownerReferences", "finalizers", "generateName",
    "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink",
}  # fmt: skip
#: The member MiniCluster's metadata the creator takes from the file; the rest of it the operator sets.
_MINICLUSTER_META_KEYS = {"labels", "annotations"}
#: The MiniCluster spec fields read (and checked) by :func:`_member` itself, whose integers may be strings.
_SIZE_KEYS = {"size", "minSize", "maxSize"}
_JOB_KEYS = {"name", "command", "count", "nodes", "tasks", "workdir", "duration", "matrix", "retries", "lostRetries"}
_ALGORITHM_KEYS = {"name", "options", "rules"}
_SIDECAR_KEYS = {"image", "pullAlways", "port", "workers", "runAsUser"}
#: Integers of a matrix (listed or range bounds) are 64-bit, so every JSON reader holds them exactly.
_INT64 = 2**63


class SpecError(ValueError):
    """An Ensemble that does not validate; ``errors`` lists every problem as ``<path>: <problem>``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class SidecarSpec:
    """How the sidecar container is run in each MiniCluster."""

    #: empty: the creator's ``ENSEMBLE_SIDECAR_IMAGE`` (by default the image of this release)
    image: str = ""
    pull_always: bool = False
    port: int = 50051
    workers: int = 10
    #: the uid the sidecar runs as: it must be the Flux instance's owner, the uid the application image
    #: runs the broker as (Flux runs jobs as their submitter). None: the application container's
    #: ``securityContext.runAsUser`` when set, else root (0), the user most application images run as
    run_as_user: int | None = None


@dataclass(frozen=True)
class Member:
    """One validated member: its MiniCluster sizes and spec, jobs, algorithm and sidecar."""

    index: int
    size: int
    min_size: int
    max_size: int
    jobs: tuple[JobSpec, ...]
    algorithm: AlgorithmSpec
    sidecar: SidecarSpec
    minicluster: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ensemble:
    """A validated Ensemble."""

    name: str
    namespace: str
    check_seconds: float
    members: tuple[Member, ...]
    #: ``spec.weight``: the ensemble's weight in a shared node budget's fair share (docs/budget.md).
    weight: int = 1
    #: What was converted or refused to read the file (an ensemble-python file), one note each.
    notes: tuple[str, ...] = ()

    def member_spec(self, member: Member, endpoint: str, created: float = 0.0, status_token: str = "") -> MemberSpec:
        """The ``MemberSpec`` the services share for one member served at ``endpoint``."""
        return MemberSpec(
            namespace=self.namespace,
            ensemble=self.name,
            member=member.index,
            name=f"{self.name}-{member.index}",
            size=member.size,
            min_size=member.min_size,
            max_size=member.max_size,
            endpoint=endpoint,
            algorithm=member.algorithm,
            jobs=list(member.jobs),
            check_seconds=self.check_seconds,
            created=created,
            status_token=status_token,
            weight=self.weight,
        )


def _suggest(key: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown field; {hint}(valid: {', '.join(sorted(valid))})"


class _Checker:
    """Collects errors while reading untrusted YAML data."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def mapping(self, value: object, path: str, keys: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {_kind(value)}")
            return {}
        if keys is not None:
            for key in value:
                if str(key) not in keys:
                    # a blank key would leave the path without a visible last part (at the top, blank)
                    shown = str(key) if str(key).strip() else f'"{key}"'
                    self.error(f"{path}.{shown}", _suggest(shown, keys))
        return {str(k): v for k, v in value.items()}

    def integer(
        self, data: Mapping[str, Any], key: str, path: str, default: int | None, low: int, high: int
    ) -> int | None:
        value = data.get(key, default)
        where = f"{path}.{key}"
        if value is None:
            self.error(where, "required; set it to an integer")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            # isdigit() also takes digits int() refuses ('²'): ASCII digits only
            if isinstance(value, str) and value.strip().lstrip("-").isascii() and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                self.error(where, f"expected an integer, got {_kind(value)} {value!r}")
                return None
        if value < low:
            self.error(where, f"{value} is below the minimum {low}")
            return None
        if value > high:
            self.error(where, f"{value} is above the maximum {high}")
            return None
        return int(value)

    def string(self, data: Mapping[str, Any], key: str, path: str, *, required: bool, default: str = "") -> str:
        value = data.get(key)
        where = f"{path}.{key}"
        if value is None:
            if required:
                self.error(where, "required; set it to a non-empty string")
            return default
        if not isinstance(value, str):
            self.error(where, f"expected a string, got {_kind(value)} {value!r}")
            return default
        if required and not value.strip():
            self.error(where, "must not be empty")
        return value


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )


@functools.cache
def minicluster_spec_schema() -> dict[str, Any]:
    """The Flux Operator's MiniCluster ``spec`` schema (vendored; see the module docstring)."""
    text = (importlib.resources.files("ensemble_core") / "data" / "minicluster-spec-schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)["spec"]
    return schema


#: What a value of each JSON schema type is, and how an error calls it.
_SCHEMA_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "object": ((dict,), "a mapping"),
    "array": ((list,), "a list"),
    "string": ((str,), "a string"),
    "integer": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "boolean": ((bool,), "true or false"),
}


def _schema_check(check: _Checker, value: object, schema: Mapping[str, Any], path: str) -> None:
    """Report where ``value`` leaves ``schema`` (a CRD's structural schema): unknown fields, at any depth,
    with the nearest known name, and values of the wrong type. A null is an unset field, as the API server
    takes it."""
    if value is None or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            check.error(path, f"expected an integer or a string (a quantity such as 2 or 500m), got {_kind(value)}")
        return
    kind = schema.get("type")
    if kind in _SCHEMA_TYPES:
        types, name = _SCHEMA_TYPES[kind]
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
            check.error(path, f"expected {name}, got {_kind(value)} {value!r}"[:200])
            return
    if "enum" in schema and value not in schema["enum"]:
        check.error(path, f"{value!r} is not one of {', '.join(map(repr, schema['enum']))}")
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            shown = str(key) if str(key).strip() else f'"{key}"'
            if str(key) in properties:
                _schema_check(check, child, properties[str(key)], f"{path}.{shown}")
            elif isinstance(extra, dict):
                _schema_check(check, child, extra, f"{path}.{shown}")
            elif properties and extra is not True:
                check.error(f"{path}.{shown}", _suggest(shown, set(properties)))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _schema_check(check, item, schema["items"], f"{path}[{i}]")


def _string_map(check: _Checker, metadata: Mapping[str, Any], key: str, path: str) -> None:
    """Report ``metadata[key]`` (labels, annotations) unless it is unset or a mapping of names to strings."""
    value = metadata.get(key)
    if value is None:
        return
    if not isinstance(value, dict):
        check.error(f"{path}.{key}", f"expected a mapping of names to strings, got {_kind(value)}")
        return
    for name, text in value.items():
        if not isinstance(text, str):
            check.error(f"{path}.{key}.{name}", f"expected a string, got {_kind(text)} {text!r}; quote it")


def _minicluster_metadata(check: _Checker, value: object, path: str) -> None:
    """Check a member's ``minicluster.metadata``: labels and annotations; the rest of ObjectMeta is the operator's."""
    if value is not None and not isinstance(value, dict):
        check.error(path, f"expected a mapping, got {_kind(value)}")
        return
    for key in value or {}:
        if str(key) in _MINICLUSTER_META_KEYS:
            continue
        shown = str(key) if str(key).strip() else f'"{key}"'
        if str(key) in _OBJECT_META_KEYS:
            check.error(
                f"{path}.{shown}",
                "set by the operator (the MiniCluster is named <ensemble>-<member index>, in the Ensemble's "
                "namespace, owned by it); only labels and annotations are taken from here: remove it",
            )
        else:
            check.error(f"{path}.{shown}", _suggest(shown, _MINICLUSTER_META_KEYS))
    for key in _MINICLUSTER_META_KEYS:
        _string_map(check, value or {}, key, path)


def _algorithm(check: _Checker, value: object, path: str) -> AlgorithmSpec | None:
    data = check.mapping(value, path, _ALGORITHM_KEYS)
    if not data:
        return None
    name = check.string(data, "name", path, required=False, default=DEFAULT_ALGORITHM) or DEFAULT_ALGORITHM
    options_raw = check.mapping(data.get("options"), f"{path}.options")
    options: dict[str, str | int | float | bool] = {}
    for key, option in options_raw.items():
        if isinstance(option, (str, int, float, bool)):
            options[key] = option
        else:
            check.error(f"{path}.options.{key}", f"expected a string or a number, got {_kind(option)}")
    if name not in algorithms.names():
        try:
            algorithms.get(name)
        except algorithms.UnknownAlgorithm as exc:
            check.error(f"{path}.name", str(exc))
        return None
    # validate_options words each problem as "<option>: <problem>", so the path prefix completes it
    check.errors.extend(f"{path}.options.{problem}" for problem in algorithms.validate_options(name, options))
    # Rules name job groups, which only a member has: those are checked per member by _rule_groups.
    raw_rules = data.get("rules")
    check.errors.extend(
        f"{path}.{problem}" for problem in algorithms.validate_rules(name, raw_rules or [], options=options)
    )
    rules = [rule for rule in raw_rules if isinstance(rule, dict)] if isinstance(raw_rules, list) else []
    return AlgorithmSpec(name=name, options=options, rules=rules)


def _rule_groups(check: _Checker, algorithm: AlgorithmSpec, path: str, jobs: tuple[JobSpec, ...], member: str) -> None:
    """Add the problems of ``algorithm``'s rules that name a group ``jobs`` does not have."""
    if not algorithm.rules:
        return
    groups = [job.name for job in jobs]
    # Everything but the group names was reported with the algorithm itself.
    reported = set(algorithms.validate_rules(algorithm.name, algorithm.rules, options=algorithm.options))
    for problem in algorithms.validate_rules(algorithm.name, algorithm.rules, groups, algorithm.options):
        if problem not in reported:
            check.error(f"{path}.{problem.split(': ', 1)[0]}", f"{problem.split(': ', 1)[1]}{member}")


def _sidecar(check: _Checker, value: object, path: str) -> SidecarSpec:
    data = check.mapping(value, path, _SIDECAR_KEYS)
    default = SidecarSpec()
    image = check.string(data, "image", path, required=False, default=default.image) or default.image
    pull = data.get("pullAlways", False)
    if not isinstance(pull, bool):
        check.error(f"{path}.pullAlways", f"expected true or false, got {pull!r}")
        pull = False
    port = check.integer(data, "port", path, default.port, 1, 65535) or default.port
    workers = check.integer(data, "workers", path, default.workers, 1, 1000) or default.workers
    user = check.integer(data, "runAsUser", path, 0, 0, 2**31 - 1) if data.get("runAsUser") is not None else None
    return SidecarSpec(image=image, pull_always=pull, port=port, workers=workers, run_as_user=user)


def _matrix(check: _Checker, value: object, where: str, command: str) -> sweep.Matrix | None:
    """The job group's validated matrix, or None when it has an error (each recorded by its path).

    Also checks the group's ``command`` against it: a ``{name}`` that is no parameter is likely a typo,
    and a placeholder inside quotes cannot take a value that needs quoting.
    """
    path = f"{where}.matrix"
    if value is None or (isinstance(value, dict) and not value):
        check.error(path, "empty; give each parameter its values (x: [1, 2, 4], seed: {range: [0, 10]}) or remove it")
        return None
    if not isinstance(value, dict):
        check.error(
            path,
            f"expected a mapping of parameter names to values (x: [1, 2, 4], seed: {{range: [0, 10]}}), "
            f"got {_kind(value)}",
        )
        return None
    matrix: sweep.Matrix = {}
    valid = True
    by_variable: dict[str, str] = {}
    for key, raw in value.items():
        shown = str(key) if str(key).strip() else f'"{key}"'
        here = f"{path}.{shown}"
        values = _parameter(check, raw, here)
        if not isinstance(key, str) or not sweep.NAME.fullmatch(key):
            hint = (
                " (YAML reads an unquoted yes, no, on, off as a boolean: quote the name)"
                if isinstance(key, bool)
                else ""
            )
            check.error(
                here,
                "not a parameter name: use letters, digits and _, not starting with a digit, since it is "
                f"written {{name}} in command and becomes {sweep.ENVIRONMENT_PREFIX}<NAME>{hint}",
            )
            valid = False
            continue
        variable = sweep.ENVIRONMENT_PREFIX + key.upper()
        if variable in by_variable:
            check.error(here, f"{key} and {by_variable[variable]} both become {variable}; rename one of them")
            valid = False
        by_variable[variable] = key
        if values is None:
            valid = False
        else:
            matrix[key] = values
    names = [key for key in value if isinstance(key, str) and sweep.NAME.fullmatch(key)]
    _placeholders(check, f"{where}.command", command, names, matrix)
    if not valid:
        return None
    if sweep.size(matrix) > MAX_JOBS_PER_MEMBER:
        check.error(
            path,
            f"{_shape(matrix)} combinations is more than the limit of {MAX_JOBS_PER_MEMBER} jobs per member; "
            "use fewer values, or split the sweep over several members",
        )
        return None
    return matrix


def _parameter(check: _Checker, value: object, path: str) -> list[sweep.Scalar] | sweep.MatrixRange | None:
    """One parameter's values: a non-empty list of scalars or ``{range: [start, stop(, step)]}``."""
    if isinstance(value, list):
        if not value:
            check.error(path, "empty list; give at least one value")
            return None
        values: list[sweep.Scalar] = []
        for j, item in enumerate(value):
            problem = _scalar_problem(item)
            if problem:
                check.error(f"{path}[{j}]", problem)
            else:
                assert isinstance(item, (str, int, float, bool))
                values.append(item)
        return values if len(values) == len(value) else None
    if isinstance(value, dict):
        data = check.mapping(value, path, {"range"})
        if "range" not in data:
            if not data:
                check.error(path, "empty mapping; write the values as a list ([1, 2]) or as {range: [start, stop]}")
            return None
        return _range(check, data["range"], f"{path}.range")
    got = "null" if value is None else f"{_kind(value)} {value!r}"
    check.error(
        path,
        f"expected a list of values ([1, 2, 4]) or {{range: [start, stop]}}, got {got}; "
        "write one value as a list of one ([value])",
    )
    return None


def _range(check: _Checker, value: object, path: str) -> sweep.MatrixRange | None:
    """``[start, stop]`` or ``[start, stop, step]``: integers, Python's range (stop excluded), not empty."""
    if not isinstance(value, list) or len(value) not in (2, 3):
        got = f"a list of {len(value)}" if isinstance(value, list) else f"{_kind(value)} {value!r}"
        check.error(path, f"expected [start, stop] or [start, stop, step] (integers; stop is excluded), got {got}")
        return None
    bounds: list[int] = []
    for j, bound in enumerate(value):
        if isinstance(bound, bool) or not isinstance(bound, int):
            check.error(
                f"{path}[{j}]",
                f"expected an integer, got {_kind(bound)} {bound!r}; a range holds integers (list other values)",
            )
        elif not -_INT64 <= bound < _INT64:
            check.error(f"{path}[{j}]", f"{bound} is outside the 64-bit integers (±2**63)")
        else:
            bounds.append(bound)
    if len(bounds) != len(value):
        return None
    start, stop, step = (*bounds, 1) if len(bounds) == 2 else bounds
    if step == 0:
        check.error(f"{path}[2]", "step must not be 0; use 1 (the default) or another non-zero integer")
        return None
    found = sweep.MatrixRange(start=start, stop=stop, step=step)
    if not sweep.count(found):
        fix = (
            f"stop must be above start, and stop is excluded: [{start}, {start + 1}] is the one value {start}"
            if step > 0
            else "with a negative step the range counts down: stop must be below start"
        )
        check.error(path, f"{value} is empty; {fix}")
        return None
    return found


def _scalar_problem(value: object) -> str:
    """Why ``value`` cannot be one value of a parameter (empty when it can)."""
    if value is None:
        return 'null is not a value; quote it ("null") to pass the word, or remove it'
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        return (
            "" if -_INT64 <= value < _INT64 else f"{value} is outside the 64-bit integers; quote it to pass it as text"
        )
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"{value} is not a finite number; quote it to pass it as text"
    if isinstance(value, str):
        return "contains a NUL character, which no argument or environment variable can hold" if "\x00" in value else ""
    if isinstance(value, (list, dict)):
        return (
            f"expected a string, a number or a boolean, got {_kind(value)}: list the values directly "
            "(x: [1, 2]), a range is written x: {range: [0, 10]}"
        )
    return (
        f"expected a string, a number or a boolean, got {type(value).__name__} {value!r}; quote it to pass it as text"
    )


def _placeholders(check: _Checker, path: str, command: str, names: list[str], matrix: sweep.Matrix) -> None:
    """Refuse a ``{name}`` in ``command`` that names no parameter, and a quoted one whose value needs quoting."""
    for name in sweep.placeholders(command) if names else []:
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {{{close[0]}}}?" if close else "."
        check.error(
            path,
            f"{{{name}}} names no parameter of the matrix ({', '.join(names)}){hint} A bare name in braces is "
            f"replaced by a parameter's value: write other braces differently, e.g. {{ {name} }} or ${{{name}}}",
        )
    for name in sorted(sweep.placeholders_in_quotes(command)):
        values = matrix.get(name)
        if not isinstance(values, list):
            continue  # not a parameter (reported above), or a range: integers never need quoting
        needs = [text for text in map(sweep.value_text, values) if shlex.quote(text) != text]
        if needs:
            variable = sweep.ENVIRONMENT_PREFIX + name.upper()
            check.error(
                path,
                f"{{{name}}} is inside quotes, but its value {needs[0]!r} needs shell quoting, which would end "
                f"those quotes; put {{{name}}} outside the quotes (sh -c 'echo \"$1\"' sh {{{name}}}) or read "
                f"${variable} in the quoted script",
            )


def _shape(matrix: sweep.Matrix) -> str:
    """``x: 3 × seed: 10``: each parameter's number of values."""
    return " × ".join(f"{name}: {sweep.count(values)}" for name, values in matrix.items())


def _matrix_count(check: _Checker, data: Mapping[str, Any], where: str, matrix: sweep.Matrix | None) -> int | None:
    """A matrix group's ``count``: its number of combinations; a ``count`` written must say the same.

    None when the matrix (already reported) or the count is wrong. An unset or null ``count`` is the
    number of combinations; a written one is checked even beside a wrong matrix, so all is said at once.
    """
    if data.get("count") is None:
        return None if matrix is None else sweep.size(matrix)
    count = check.integer(data, "count", where, None, 0, MAX_JOBS_PER_MEMBER)
    if matrix is None or count is None:
        return None
    total = sweep.size(matrix)
    if count != total:
        check.error(
            f"{where}.count",
            f"{count} does not match the matrix, which gives {plural(total, 'job')} ({_shape(matrix)}); remove count: "
            "a group with a matrix runs one job per combination",
        )
        return None
    return total


def _jobs(check: _Checker, value: object, path: str, max_size: int | None) -> tuple[JobSpec, ...]:
    if value is None:
        check.error(path, "required; list the member's job groups (name, command, count, nodes)")
        return ()
    if not isinstance(value, list):
        check.error(path, f"expected a list of job groups, got {_kind(value)}")
        return ()
    jobs: list[JobSpec] = []
    names: set[str] = set()
    total = 0
    for i, raw in enumerate(value):
        where = f"{path}[{i}]"
        data = check.mapping(raw, where, _JOB_KEYS)
        if not data:
            if (raw is not None and isinstance(raw, dict)) or raw is None:
                check.error(where, "empty job group; give at least name and command")
            continue
        name = check.string(data, "name", where, required=True)
        if name and name in names:
            check.error(f"{where}.name", f"{name!r} is used by another job group of this member; names must be unique")
        names.add(name)
        command = check.string(data, "command", where, required=True)
        if "matrix" in data:
            matrix = _matrix(check, data["matrix"], where, command)
            count = _matrix_count(check, data, where, matrix)
        else:
            matrix = {}
            count = check.integer(data, "count", where, 1, 0, MAX_JOBS_PER_MEMBER)
        nodes = check.integer(data, "nodes", where, 1, 1, MAX_SIZE)
        tasks = check.integer(data, "tasks", where, 0, 0, 10_000_000)
        duration = check.integer(data, "duration", where, 0, 0, 10**9)
        workdir = check.string(data, "workdir", where, required=False)
        retries = check.integer(data, "retries", where, 0, 0, 100)
        lost_retries = check.integer(data, "lostRetries", where, 3, 0, 100)
        if nodes is not None and max_size is not None and nodes > max_size:
            check.error(f"{where}.nodes", f"{nodes} exceeds maxSize {max_size}; raise maxSize or use fewer nodes")
        if nodes is not None and tasks and tasks < nodes:
            check.error(f"{where}.tasks", f"{tasks} is fewer than nodes {nodes}; give each node at least one task")
        if count is not None:
            total += count
        if None in (count, nodes, tasks, duration, matrix, retries, lost_retries) or not name or not command:
            continue
        assert count is not None and nodes is not None and tasks is not None and duration is not None
        assert matrix is not None and retries is not None and lost_retries is not None
        jobs.append(
            JobSpec(
                name=name,
                command=command,
                count=count,
                nodes=nodes,
                tasks=tasks,
                workdir=workdir,
                duration=duration,
                retries=retries,
                lost_retries=lost_retries,
                matrix=matrix,
            )
        )
    if total > MAX_JOBS_PER_MEMBER:
        check.error(path, f"{total} jobs in all exceeds the limit of {MAX_JOBS_PER_MEMBER} per member")
    return tuple(jobs)


def _commands(check: _Checker, value: object, path: str) -> None:
    """Report each job command no backend could run: one with a quote left open (see ``ensemble_core.commands``)."""
    for i, raw in enumerate(value if isinstance(value, list) else []):
        command = raw.get("command") if isinstance(raw, dict) else None
        if not isinstance(command, str):
            continue
        try:
            command_argv(command)
        except ValueError as exc:
            check.error(f"{path}[{i}].command", f"cannot be split into arguments: {exc}")


def _member(check: _Checker, raw: object, path: str, index: int, default_algorithm: AlgorithmSpec) -> Member | None:
    data = check.mapping(raw, path, _MEMBER_KEYS)
    if not data:
        check.error(path, "empty member; give at least minicluster and jobs")
        return None
    given = data.get("minicluster") is not None
    if not given:
        check.error(f"{path}.minicluster", "required; give minicluster.spec.size at least")
    minicluster = check.mapping(data.get("minicluster"), f"{path}.minicluster", _MINICLUSTER_KEYS)
    for key, expected in _MINICLUSTER_TYPE.items():
        if minicluster.get(key, expected) != expected:
            check.error(
                f"{path}.minicluster.{key}",
                f"must be {expected!r} (the MiniCluster the creator makes), got {minicluster[key]!r}; "
                "set it so or remove it",
            )
    _minicluster_metadata(check, minicluster.get("metadata"), f"{path}.minicluster.metadata")
    mc_path = f"{path}.minicluster.spec"
    if isinstance(data.get("minicluster"), dict) and minicluster.get("spec") is None:
        check.error(mc_path, "required; give spec.size at least")
    mc_spec = check.mapping(minicluster.get("spec"), mc_path)
    # the sizes are read (and checked) below, where a quoted number is also taken
    rest = {key: value for key, value in mc_spec.items() if key not in _SIZE_KEYS}
    _schema_check(check, rest, minicluster_spec_schema(), mc_path)
    size = check.integer(mc_spec, "size", mc_path, 1, 1, MAX_SIZE)
    min_size = check.integer(mc_spec, "minSize", mc_path, 1, 1, MAX_SIZE)
    max_size = check.integer(mc_spec, "maxSize", mc_path, size, 1, MAX_SIZE)
    if size is not None and min_size is not None and min_size > size:
        check.error(f"{mc_path}.minSize", f"{min_size} is above size {size}; minSize <= size <= maxSize")
    if size is not None and max_size is not None and size > max_size:
        check.error(f"{mc_path}.maxSize", f"{max_size} is below size {size}; minSize <= size <= maxSize")
    # without a minicluster the sizes are defaults: measuring the jobs against them would only add noise
    jobs = _jobs(check, data.get("jobs"), f"{path}.jobs", max_size if given else None)
    _commands(check, data.get("jobs"), f"{path}.jobs")
    own = _algorithm(check, data.get("algorithm"), f"{path}.algorithm")
    algorithm = own or default_algorithm
    if own is not None:
        _rule_groups(check, own, f"{path}.algorithm", jobs, "")
    else:
        _rule_groups(check, default_algorithm, "spec.algorithm", jobs, f" (for {path})")
    sidecar = _sidecar(check, data.get("sidecar"), f"{path}.sidecar")
    if size is None or min_size is None or max_size is None:
        return None
    return Member(
        index=index,
        size=size,
        min_size=min_size,
        max_size=max_size,
        jobs=jobs,
        algorithm=algorithm,
        sidecar=sidecar,
        minicluster=minicluster,
    )


def validate(document: object, namespace: str = "default") -> tuple[Ensemble | None, list[str]]:
    """Validate an Ensemble document (already parsed from YAML/JSON).

    Returns the Ensemble and an empty list when it is valid, else ``None`` and every error found.
    """
    check = _Checker()
    top = check.mapping(document, "", _TOP_KEYS) if document is not None else {}
    if document is None:
        check.error("(document)", "empty; expected an Ensemble resource")
        return None, check.errors
    if not isinstance(document, dict):
        return None, [f"(document): expected a mapping (an Ensemble resource), got {_kind(document)}"]
    # top-level paths came out as ".<key>"; only that dot goes (a key may itself start with dots)
    check.errors = [e.removeprefix(".") for e in check.errors]
    if top.get("apiVersion") != API_VERSION:
        check.error("apiVersion", f"expected {API_VERSION!r}, got {top.get('apiVersion')!r}")
    if top.get("kind") != KIND:
        check.error("kind", f"expected {KIND!r}, got {top.get('kind')!r}")
    metadata = check.mapping(top.get("metadata"), "metadata", _OBJECT_META_KEYS)
    for key in ("labels", "annotations"):
        _string_map(check, metadata, key, "metadata")
    name = check.string(metadata, "name", "metadata", required=True)
    if name and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
        check.error(
            "metadata.name",
            f"{name!r} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.', at most 253)",
        )
    namespace = check.string(metadata, "namespace", "metadata", required=False, default=namespace) or namespace
    spec = check.mapping(top.get("spec"), "spec", _SPEC_KEYS)
    if "spec" not in top:
        check.error("spec", "required; an Ensemble needs spec.members")
    check_seconds = check.integer(spec, "checkSeconds", "spec", 10, 1, 86_400)
    weight = check.integer(spec, "weight", "spec", 1, 1, MAX_WEIGHT)
    default_algorithm = _algorithm(check, spec.get("algorithm"), "spec.algorithm") or AlgorithmSpec()
    raw_members = spec.get("members")
    members: list[Member] = []
    if "spec" in top and raw_members is None:
        check.error("spec.members", "required; list at least one member")
    elif raw_members is not None and not isinstance(raw_members, list):
        check.error("spec.members", f"expected a list, got {_kind(raw_members)}")
    elif isinstance(raw_members, list):
        if not raw_members:
            check.error("spec.members", "empty; list at least one member")
        for i, raw in enumerate(raw_members):
            member = _member(check, raw, f"spec.members[{i}]", i, default_algorithm)
            if member is not None:
                members.append(member)
    if check.errors:
        return None, check.errors
    return Ensemble(
        name=name,
        namespace=namespace,
        check_seconds=float(check_seconds or 10),
        members=tuple(members),
        weight=weight or 1,
    ), []


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as ``line L, column C: not valid YAML: <problem> (<context>)``, without the parser's own
    name for the text (``in "<unicode string>"``): the caller names the file, once."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"not valid YAML: {exc}"
    mark = exc.problem_mark
    context = f" ({exc.context})" if exc.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {exc.problem}{context}"


def load(path: str | Path, namespace: str = "default") -> Ensemble:
    """Read and validate an Ensemble file; raises :class:`SpecError` listing every problem.

    The errors do not repeat the file's path (every caller prints it once): a field's error starts with its
    field path, a file that cannot be read or parsed with what went wrong (``line 2, column 3: not valid
    YAML: mapping values are not allowed here``). An ensemble-python ``ensemble.yaml`` (top-level ``jobs``,
    ``rules``, ``logging``) is converted first (:mod:`ensemble_core.compat`); its notes are the Ensemble's
    ``notes`` (and come first among the errors).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise SpecError([f"cannot read: not UTF-8 text (byte {exc.start})"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([yaml_problem(exc)]) from exc
    except (ValueError, RecursionError) as exc:
        # the parser's own limits: an integer of more than 4300 digits, nesting deeper than Python's stack
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise SpecError([f"cannot be read as YAML: {reason}"]) from None
    from ensemble_core import compat  # it builds on this module

    notes: list[str] = []
    if compat.is_ensemble_python(document):
        document, notes = compat.convert(document, Path(path).stem)
    ensemble, errors = validate(document, namespace)
    if ensemble is None:
        raise SpecError([*notes, *errors] if notes else errors)
    return dataclasses.replace(ensemble, notes=tuple(notes)) if notes else ensemble


def warnings(ensemble: Ensemble) -> list[str]:
    """The notes of a converted file, then what a valid Ensemble says that is likely not meant, as
    ``<path>: <problem>``: a member with no job to
    run (an empty ``jobs`` list, or every group at ``count: 0``) starts, has nothing to do and terminates, and
    the run then "succeeds" having done nothing."""
    found: list[str] = list(ensemble.notes)
    for member in ensemble.members:
        if any(job.count for job in member.jobs):
            continue
        what = "the list is empty" if not member.jobs else "every job group has count 0"
        found.append(
            f"spec.members[{member.index}].jobs: {what}, so this member runs nothing (it starts and terminates); "
            "add a job group or raise a count"
        )
    return found
