"""docs/ensemble-file.md against the code that reads an Ensemble file (``ensemble_core/spec.py``), both ways.

Each field table of the page is parsed: its fields must be the ones the spec reads at that place (none
missing, none extra), a field it calls *required* must make a file invalid when left out (with the error at
its path), and a written default must be the one applied — a file that sets the field to the documented
default validates to the same ensemble as one that leaves it out. The options table must list every option
of every algorithm with its default, and the environment table the variables a job is given.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import msgspec
import yaml

from ensemble_core import algorithms, matrix, spec
from sidecar import queue
from tests.conftest import REPO

DOC = REPO / "docs" / "ensemble-file.md"

#: Each field table's heading (its first `code`) → the fields the spec reads there.
SECTIONS: dict[str, set[str]] = {
    "Ensemble": spec._TOP_KEYS,
    "metadata": spec._OBJECT_META_KEYS,  # every ObjectMeta field is taken: the page lists those read
    "spec": spec._SPEC_KEYS,
    "spec.members[]": spec._MEMBER_KEYS,
    "spec.members[].minicluster": spec._MINICLUSTER_KEYS,
    "spec.members[].minicluster.metadata": spec._MINICLUSTER_META_KEYS,
    "spec.members[].minicluster.spec": spec._SIZE_KEYS,
    "spec.members[].jobs[]": spec._JOB_KEYS,
    "algorithm": spec._ALGORITHM_KEYS,
    "spec.members[].sidecar": spec._SIDECAR_KEYS,
}
#: metadata: the fields read (the rest of ObjectMeta is accepted and ignored, as the page says).
METADATA_READ = {"name", "namespace", "labels", "annotations"}
#: Defaults that name another field rather than a value; each is checked by its own test below.
REFERENCES = {("spec.members[].minicluster.spec", "maxSize"): "size", ("spec.members[]", "algorithm"): "spec.algorithm"}


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Each heading's first `code` → the first table under it, as rows of cells (its header row first)."""
    found: dict[str, list[list[str]]] = {}
    name, table = "", None
    for line in text.splitlines():
        if line.startswith("#"):
            code = re.search(r"`([^`]+)`", line)
            name, table = (code.group(1) if code else line.lstrip("# ")), None
        elif line.startswith("|") and (table is not None or (name and name not in found)):
            table = found.setdefault(name, [])
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):  # not the |---| line
                table.append(cells)
        else:
            table = None
    return found


def _code(cell: str) -> str | None:
    found = re.search(r"`([^`]*)`", cell)
    return found.group(1) if found else None


def field_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """section → field → (type, default cell), from every table whose header is field | type | default | meaning."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for name, rows in _tables(DOC.read_text()).items():
        if rows[0] != ["field", "type", "default", "meaning"]:
            continue
        fields: dict[str, tuple[str, str]] = {}
        for cells in rows[1:]:
            field = _code(cells[0])
            assert field is not None and len(cells) == 4, (
                f"{name}: a row that is not `field` | type | default | meaning"
            )
            assert field not in fields, f"{name}: {field} twice"
            fields[field] = (cells[1], cells[2])
        tables[name] = fields
    return tables


def other_table(header: list[str]) -> list[list[str]]:
    """The rows of the page's table with this header."""
    [rows] = [rows[1:] for rows in _tables(DOC.read_text()).values() if rows[0] == header]
    return rows


def minimal() -> dict[str, Any]:
    """The smallest valid Ensemble: every field the page calls optional left out."""
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": "reference"},
        "spec": {"members": [{"minicluster": {"spec": {}}, "jobs": [{"name": "a", "command": "true"}]}]},
    }


def place(document: dict[str, Any], section: str) -> tuple[dict[str, Any], str]:
    """The mapping of ``document`` a section's fields live in (made when absent), and its field path."""
    if section == "Ensemble":
        return document, ""
    if section == "algorithm":
        return document["spec"].setdefault("algorithm", {}), "spec.algorithm"
    where: Any = document
    path = []
    for part in section.split("."):
        key = part.removesuffix("[]")
        where = where.setdefault(key, {})
        path.append(key)
        if part.endswith("[]"):
            where = where[0]
            path[-1] += "[0]"
    return where, ".".join(path)


def outcome(document: dict[str, Any]) -> tuple[Any, ...]:
    """What a document validates to, with the raw MiniCluster mapping left out (it keeps what was written)."""
    ensemble, errors = spec.validate(document)
    assert ensemble is not None, errors
    members = [
        (msgspec.to_builtins(ensemble.member_spec(member, "endpoint")), member.sidecar) for member in ensemble.members
    ]
    return ensemble.name, ensemble.namespace, ensemble.check_seconds, members


def test_the_page_lists_every_field_the_spec_reads_and_no_other() -> None:
    tables = field_tables()
    assert set(tables) == set(SECTIONS), "sections of docs/ensemble-file.md"
    for section, keys in SECTIONS.items():
        documented = set(tables[section])
        if section == "metadata":
            assert documented == METADATA_READ and documented <= keys
            continue
        assert documented - keys == set(), f"{section}: documented but not read by ensemble_core/spec.py"
        assert keys - documented == set(), f"{section}: read by ensemble_core/spec.py but not documented"


def test_every_field_called_required_is_and_no_other() -> None:
    assert spec.validate(minimal())[1] == []
    for section, fields in field_tables().items():
        for field, (_, default) in fields.items():
            document = minimal()
            where, path = place(document, section)
            field_path = f"{path}.{field}" if path else field
            had = field in where
            where.pop(field, None)
            _, errors = spec.validate(document)
            if default == "required":
                assert had, f"{field_path}: called required, but the minimal file leaves it out"
                assert any(error.startswith(field_path) for error in errors), (field_path, errors)
            else:
                assert errors == [], f"{field_path}: has a default ({default}), yet leaving it out is an error"


def test_every_written_default_is_the_one_applied() -> None:
    checked = 0
    for section, fields in field_tables().items():
        for field, (_, default) in fields.items():
            value = _code(default)
            if default == "required" or value is None or (section, field) in REFERENCES:
                continue
            document = minimal()
            where, path = place(document, section)
            where[field] = yaml.safe_load(value)
            assert spec.validate(document)[1] == [], f"{path}.{field}: {value}"
            assert outcome(document) == outcome(minimal()), f"{path}.{field}: the default is not {value}"
            checked += 1
    assert checked >= 20


def test_the_defaults_that_name_another_field() -> None:
    tables = field_tables()
    for (section, field), reference in REFERENCES.items():
        assert _code(tables[section][field][1]) == reference
    document = minimal()
    document["spec"]["members"][0]["minicluster"]["spec"]["size"] = 3
    document["spec"]["algorithm"] = {"name": "workload-demand", "options": {"scaleChecks": 2}}
    ensemble, errors = spec.validate(document)
    assert ensemble is not None, errors
    [member] = ensemble.members
    assert member.max_size == member.size == 3  # maxSize: size
    assert member.algorithm.name == "workload-demand" and member.algorithm.options == {"scaleChecks": 2}


def test_the_options_table_lists_every_option_of_every_algorithm_with_its_default() -> None:
    documented: dict[str, dict[str, Any]] = {}
    for name_cell, options_cell in other_table(["algorithm", "options and their defaults"]):
        pairs = re.findall(r"`([A-Za-z]+): ([^`]*)`", options_cell)
        documented[_code(name_cell) or ""] = {key: yaml.safe_load(value) for key, value in pairs}
    assert set(documented) == set(algorithms.names())
    for name in algorithms.names():
        fields = msgspec.structs.fields(algorithms.get(name).options_type)
        assert documented[name] == {field.encode_name: field.default for field in fields}, name


def test_the_environment_table_names_what_a_job_is_given() -> None:
    documented = {_code(cells[0]) for cells in other_table(["variable", "value"])}
    identity = set(queue.job_identity_environment("g", 0, 1))
    params = {name.replace("X", "<NAME>") for name in matrix.environment({"x": "1"})}
    # the variables the local backend sets as Flux's job shell does (sidecar/local.py, _execute)
    source = (REPO / "sidecar" / "local.py").read_text()
    flux = set(
        re.findall(r"\b(FLUX_(?:JOB|TASK)_[A-Z_]+)\b", source.split("async def _execute", 1)[1].split("\n    def ")[0])
    )
    assert flux, "the local backend's job variables were not found"
    assert documented == identity | params | flux
    # and the sidecar's own settings and secrets do not reach a job, as the page says
    assert queue.job_environment({"ENSEMBLE_SIDECAR_TOKEN": "s", "GRPC_X": "1", "HOME": "/h"}) == {"HOME": "/h"}
    assert "every `ENSEMBLE_*` and `GRPC_*`" in DOC.read_text()


def test_the_pages_whole_example_is_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    whole = [yaml.safe_load(block) for block in blocks if block.startswith("apiVersion")]
    assert whole
    for document in whole:
        assert spec.validate(copy.deepcopy(document))[1] == []
