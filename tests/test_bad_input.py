"""Bad input on every way in: Ensemble specs, NATS messages and KV records, and gRPC calls to the sidecar.

Each input is either refused with a message that names what is wrong (a field path, a dead letter with the
reason, a ``ResultType`` with an error) or accepted and then usable; the service that received it keeps
running and still handles the next good input. Nothing here is mocked: the NATS tests run the real services
in-process on the session's nats-server, the gRPC fuzz calls a real sidecar server over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import random
import re
import shlex
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import jsonschema
import kmock
import msgspec
import pytest
import yaml
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from ensemble_core import algorithms, matrix, minicluster, subjects
from ensemble_core.messages import (
    AlgorithmSpec,
    Applied,
    DeadLetter,
    Decision,
    GroupStats,
    JobSpec,
    MemberSpec,
    Metrics,
    NodeCounts,
    QueueCounts,
    encode,
)
from ensemble_core.rpc import ensemble_service_pb2 as pb
from ensemble_core.settings import Settings
from ensemble_core.spec import validate
from ensemble_core.subjects import MemberAddress
from ensemble_core.tokens import ensemble_token
from services.actuator.service import run as run_actuator
from services.creator.service import run as run_creator
from services.decider.service import DeciderRecord
from services.decider.service import run as run_decider
from services.poller.service import run as run_poller
from sidecar.server import RunningServer, serve_local
from tests.conftest import REPO, service_running, wait_for
from tests.test_kubernetes import (
    ENSEMBLE,
    EVENTS,
    MINICLUSTERS,
    condition,
    create_ensemble,
    k8s_settings,
    live,
)
from tests.test_minicluster import crd_validator
from tests.test_security import kube_emulator

# --- Ensemble specs ----------------------------------------------------------------------------------

#: A valid Ensemble as the creator sees it in Kubernetes mode (a container with Flux, labels, rules).
KUBE_ENSEMBLE: dict[str, Any] = {
    "apiVersion": "ensemble.flux-framework.org/v1alpha1",
    "kind": "Ensemble",
    "metadata": {"name": "demo.v1", "namespace": "science"},
    "spec": {
        "checkSeconds": 2,
        "algorithm": {"name": "workload-demand", "options": {"scaleChecks": 2, "order": "ascending"}},
        "members": [
            {
                "minicluster": {
                    "metadata": {"labels": {"team": "md"}},
                    "spec": {
                        "size": 2,
                        "minSize": 1,
                        "maxSize": 4,
                        "containers": [{"image": "ghcr.io/converged-computing/metric-lammps:latest"}],
                        "pod": {"labels": {"tier": "batch"}},
                    },
                },
                "sidecar": {"port": 7000, "workers": 4},
                "jobs": [
                    {"name": "lmp", "command": "lmp -in in.reaxc", "count": 4, "nodes": 2, "tasks": 4, "duration": 60},
                    {"name": "post", "command": "python post.py", "workdir": "/out"},
                ],
            },
            {
                "minicluster": {"spec": {"size": 1, "containers": [{"image": "flux:1", "runFlux": True}]}},
                "algorithm": {
                    "name": "rules",
                    "rules": [
                        {"trigger": "start", "action": {"name": "submit", "group": "a"}},
                        {"trigger": "metric", "name": "count.a.success", "when": 1, "action": {"name": "terminate"}},
                    ],
                },
                "jobs": [{"name": "a", "command": "true", "count": 2}],
            },
        ],
    },
}
EXAMPLES = [
    yaml.safe_load((REPO / "examples" / name).read_text()) for name in ("hello-world.yaml", "rules.yaml", "sweep.yaml")
]

#: An error is "<field path>: <problem>".
ERROR = re.compile(r"^(?P<path>.+?): \S", re.S)


def names_a_field(error: str, document: object) -> bool:
    """Whether ``error`` is "<path>: <problem>" with a path that starts at a key the document has or needs."""
    found = ERROR.match(error)
    if found is None:
        return False
    path = found["path"]
    keys = {str(key) if str(key).strip() else f'"{key}"' for key in document} if isinstance(document, dict) else set()
    starts = keys | {"apiVersion", "kind", "metadata", "spec"}
    return path == "(document)" or any(path == key or path.startswith((f"{key}.", f"{key}[")) for key in starts)


odd_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 9_999, 10_001, 1_000_001]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "3", " 7 ", "-2", "a.b.c", "Ünï.cödé", "x" * 300, "\x00", "scale-checks", "rules"]),
)
odd_values = st.recursive(
    odd_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=6,
)
#: Keys a user could misspell or invent (with dots and Unicode), beside the real ones.
odd_keys = st.sampled_from(
    ["scaleUpChecks", "minsize", "Size", "max_size", "x.y", "é", "", "options", "rules", "jobs", "count", "nodes"]
) | st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), max_size=6)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def ensembles(draw: st.DrawFn) -> object:
    """A valid Ensemble with one to four random edits: a value replaced, a key dropped, a key added."""
    document = copy.deepcopy(draw(st.sampled_from([KUBE_ENSEMBLE, *EXAMPLES])))
    for _ in range(draw(st.integers(1, 4))):
        paths = [path for path in _paths(document) if path]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        edit = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if edit == "replace":
            parent[path[-1]] = draw(odd_values)
        elif edit == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(odd_keys)] = draw(odd_values)
        else:
            parent.append(draw(odd_values))
    return document


OWNER = {"apiVersion": "ensemble.flux-framework.org/v1alpha1", "kind": "Ensemble", "name": "demo.v1", "uid": "u"}


@functools.cache
def _minicluster_schema() -> jsonschema.Draft7Validator:
    return crd_validator()


def assert_rejected_by_path_or_usable(document: object) -> None:
    """The creator's whole check of an Ensemble: named errors, or a spec every service can use."""
    ensemble, errors = validate(document, "default")
    if ensemble is None:
        assert errors, "refused without a reason"
        for error in errors:
            assert names_a_field(error, document), f"an error that names no field: {error!r}"
        return
    assert errors == []
    for member in ensemble.members:
        # what the services share: the record survives the wire, the decider can run its algorithm
        record = msgspec.json.decode(encode(ensemble.member_spec(member, "10.0.0.1:50051")), type=MemberSpec)
        options = algorithms.parse_options(record.algorithm.name, record.algorithm.options)
        algorithms.get(record.algorithm.name).initial_state(record, options)
        # Kubernetes mode: the creator's extra checks name their field too, and a member that passes
        # them becomes a MiniCluster the Flux Operator's CRD accepts, unknown fields included: the spec
        # checks them against the vendored CRD schema (and an API server with another CRD refuses what
        # it does not know, since the creator asks for strict field validation:
        # test_a_minicluster_the_api_refuses_fails_the_ensemble_naming_the_field)
        problems = minicluster.check(member)
        for problem in problems:
            assert problem.startswith(f"spec.members[{member.index}].minicluster"), problem
        if not problems:
            body = minicluster.build(ensemble, member, OWNER, token_secret="demo-sidecar-token-0123456789")
            schema_errors = [e.message for e in _minicluster_schema().iter_errors(body)]
            assert schema_errors == [], schema_errors


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=ensembles())
def test_an_edited_ensemble_is_refused_naming_the_field_or_is_usable_by_every_service(document: object) -> None:
    assert_rejected_by_path_or_usable(document)


@settings(max_examples=300, deadline=None)
@given(document=odd_values)
def test_a_document_that_is_not_an_ensemble_at_all_is_refused_with_a_reason(document: object) -> None:
    ensemble, errors = validate(document)
    assert ensemble is None
    assert errors and all(names_a_field(error, document) for error in errors), errors


good_values = st.lists(
    st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.text(max_size=5)
    | st.text(alphabet="a -'\"$\\{}();*", max_size=5),
    min_size=1,
    max_size=4,
) | st.fixed_dictionaries({"range": st.lists(st.integers(-4, 4), min_size=2, max_size=3)})
matrix_values = st.one_of(
    good_values,
    good_values,
    odd_values,
    st.lists(odd_scalars, max_size=4),
    st.fixed_dictionaries({"range": st.lists(st.integers(-(10**20), 10**20) | odd_scalars, max_size=4)}),
)
matrix_names = st.sampled_from(["x", "seed", "X", "_", "a1"])


@st.composite
def hostile_sweeps(draw: st.DrawFn) -> tuple[object, str, object]:
    """A matrix (half of them of good values), a command using its names in every context, and a count."""
    sweep = draw(
        st.one_of(
            st.dictionaries(matrix_names, good_values, min_size=1, max_size=3),
            st.dictionaries(matrix_names, matrix_values, min_size=1, max_size=3),
            st.dictionaries(matrix_names | odd_keys | st.integers() | st.booleans(), matrix_values, max_size=4),
            odd_values,
        )
        if draw(st.booleans())
        else st.dictionaries(matrix_names, good_values, min_size=1, max_size=3)
    )
    count = draw(odd_scalars) if draw(st.integers(0, 4)) == 0 else None
    names = [key for key in sweep if isinstance(key, str)] if isinstance(sweep, dict) else []
    words = ["run"]
    extra = draw(st.lists(matrix_names, max_size=1)) if draw(st.integers(0, 3)) == 0 else []
    for name in names + extra:
        words.append(draw(st.sampled_from(["{%s}", "'{%s}'", '"{%s}"', "--%s={%s}", "${%s}"])).replace("%s", name))
    tail = draw(st.sampled_from(["", "", "awk '{ print $1 }'", "${HOME}", "'{x}{seed}'"]))
    return sweep, " ".join([*words, tail]), count


def values_put_in(word: str, params: dict[str, str]) -> str:
    """``word`` with each ``{name}`` of a parameter replaced by its value as it is, unquoted."""
    return re.sub(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda found: params.get(found[1], found[0]), word)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group=hostile_sweeps())
def test_a_hostile_matrix_is_refused_naming_the_field_or_puts_each_value_into_its_word(
    group: tuple[object, str, object],
) -> None:
    sweep, command, count = group
    document = copy.deepcopy(KUBE_ENSEMBLE)
    job_group = document["spec"]["members"][0]["jobs"][0]
    job_group.update(matrix=sweep, command=command, count=count)
    if count is None:
        del job_group["count"]
    assert_rejected_by_path_or_usable(document)
    ensemble, _ = validate(document)
    if ensemble is None:
        return
    job = ensemble.members[0].jobs[0]
    assert job.count == matrix.size(job.matrix) >= 1
    for index in {0, job.count // 2, job.count - 1}:
        params = matrix.params(job.matrix, index)
        assert list(params) == list(job.matrix)
        # each value arrives as written, inside the word its placeholder is in, even within quotes (the
        # spec refused the values that could not): the words are the command's with the values put in
        words = [values_put_in(word, params) for word in shlex.split(job.command)]
        assert shlex.split(matrix.render(job.command, params)) == words
        assert all(re.fullmatch(r"ENSEMBLE_PARAM_[A-Z0-9_]+", name) for name in matrix.environment(params))
    with pytest.raises(ValueError, match=r"^index: "):
        matrix.params(job.matrix, job.count)


def _member_edit(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(KUBE_ENSEMBLE)
    edit(document["spec"]["members"][0])
    return document


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (_member_edit(lambda m: m["minicluster"]["spec"].update(minSize=3, size=2, maxSize=1)), "minSize: 3 is above"),
        (_member_edit(lambda m: m["minicluster"]["spec"].update(maxSize=10**9)), "maxSize: 1000000000 is above"),
        (_member_edit(lambda m: m["jobs"][0].update(count=2**40)), "jobs[0].count: 1099511627776 is above"),
        (_member_edit(lambda m: m["jobs"][0].update(nodes="two")), "jobs[0].nodes: expected an integer"),
        (_member_edit(lambda m: m.update(algorithm={"name": "workload-demnd"})), "did you mean workload-demand?"),
        (
            _member_edit(lambda m: m.update(algorithm={"name": "workload-demand", "options": {"scaleUpChecks": 4}})),
            "did you mean scaleChecks?",
        ),
        (
            _member_edit(lambda m: m.update(algorithm={"options": {"scaleChecks": [1]}})),
            "options.scaleChecks: expected",
        ),
        (_member_edit(lambda m: m.update(algorithm={"name": "rules", "rules": "everything"})), "algorithm.rules"),
        (_member_edit(lambda m: m.update(algorithm={"name": "rules", "rules": [{"trigger": 7}]})), "rules[0].trigger"),
        (_member_edit(lambda m: m["minicluster"]["spec"]["containers"].append({"name": "sidecar"})), "containers[1]"),
        ({**KUBE_ENSEMBLE, "metadata": {"name": "Ünïcode"}}, "metadata.name: 'Ünïcode' is not a valid Kubernetes name"),
        ({"": 1, **KUBE_ENSEMBLE}, '"": unknown field'),
    ],
)
def test_known_mistakes_are_named(document: dict[str, Any], expected: str) -> None:
    ensemble, errors = validate(document)
    if ensemble is not None:  # the creator's Kubernetes checks come after the spec's own
        errors = [error for member in ensemble.members for error in minicluster.check(member)]
    assert any(expected in error for error in errors), errors
    assert all(names_a_field(error, document) for error in errors), errors


def test_a_dotted_name_is_accepted_and_travels_escaped() -> None:
    ensemble, errors = validate(KUBE_ENSEMBLE)
    assert ensemble is not None, errors
    address = MemberAddress(ensemble.namespace, ensemble.name, 0)
    assert ensemble.name == "demo.v1" and subjects.metrics(address) == "ensemble.metrics.science.demo_2Ev1.0"
    assert MemberAddress.from_subject(subjects.metrics(address)) == address


async def test_a_misspelt_minicluster_field_fails_the_ensemble_before_any_minicluster_is_made(
    nc: Client, settings: Settings
) -> None:
    """A typo in the user's MiniCluster spec is named by validation (from the Flux Operator's CRD schema),
    so it never reaches an API server that would drop it (its default field validation only warns)."""
    document = copy.deepcopy(ENSEMBLE)
    document["spec"]["members"][0]["minicluster"]["spec"]["maxsize"] = 4
    async with kube_emulator() as (emulator, url):
        await create_ensemble(url, document)
        async with service_running(run_creator, k8s_settings(settings, url)) as task:
            await wait_for(lambda: condition(emulator, "Failed").get("status") == "True", timeout=10)
            assert not task.done()
        failed = condition(emulator, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.members[0].minicluster.spec.maxsize: unknown field; did you mean maxSize?" in failed["message"]
        assert live(emulator, MINICLUSTERS) == []


async def test_a_minicluster_the_api_refuses_fails_the_ensemble_naming_the_field(
    nc: Client, settings: Settings
) -> None:
    """A field the vendored schema knows but the cluster's Flux Operator does not (an older CRD): the creator
    asks for strict field validation, so the API server refuses it, and the refusal names it."""
    document = copy.deepcopy(ENSEMBLE)
    document["spec"]["members"][0]["minicluster"]["spec"]["shareProcessNamespace"] = True
    async with kube_emulator() as (emulator, url):
        # what an API server answers to fieldValidation=Strict; its default (Warn) drops the field and creates
        refusal = {
            "kind": "Status",
            "code": 400,
            "message": 'strict decoding error: unknown field "spec.shareProcessNamespace"',
        }
        (emulator**1)["post", MINICLUSTERS, kmock.params(fieldValidation="Strict")] << 400 << refusal
        await create_ensemble(url, document)
        async with service_running(run_creator, k8s_settings(settings, url)) as task:
            await wait_for(lambda: condition(emulator, "Failed").get("status") == "True", timeout=10)
            assert not task.done()
        failed = condition(emulator, "Failed")
        assert failed["reason"] == "MiniClusterRefused"
        assert failed["message"].startswith("spec.members[0].minicluster: the API refused the MiniCluster")
        assert 'unknown field "spec.shareProcessNamespace"' in failed["message"]
        assert not [event for event in live(emulator, EVENTS) if event["reason"] == "Created"]


# --- NATS: the services' consumers and the member records ---------------------------------------------

ADDRESS = MemberAddress("default", "bad.input", 0)


def record(endpoint: str = "127.0.0.1:9", algorithm: str = "workload-demand", member: int = 0) -> MemberSpec:
    """A member record as the creator writes it."""
    return MemberSpec(
        namespace=ADDRESS.namespace,
        ensemble=ADDRESS.ensemble,
        member=member,
        name=f"bad-input-{member}",
        size=1,
        min_size=1,
        max_size=4,
        endpoint=endpoint,
        algorithm=AlgorithmSpec(name=algorithm, options={"scaleChecks": 1} if algorithm == "workload-demand" else {}),
        jobs=[JobSpec(name="a", command="true", count=2, nodes=2)],
        check_seconds=0.2,
    )


def snapshot(address: MemberAddress, seq: int, **fields: Any) -> Metrics:
    """A plausible snapshot: one node up and free, two jobs of two nodes waiting."""
    values: dict[str, Any] = {
        "size": 1,
        "nodes": NodeCounts(node_up_count=1, node_free_count=1, node_cores_up=1, node_cores_free=1),
        "queue": QueueCounts(sched=2),
        "waiting": {2: 2},
        "next_jobs": [2, 2],
        **fields,
    }
    return Metrics(
        namespace=address.namespace,
        ensemble=address.ensemble,
        member=address.member,
        seq=seq,
        time=time.time(),
        **values,
    )


def malformed(valid: bytes, wrong_kind: bytes, max_payload: int) -> list[bytes]:
    """Bodies no reader may act on: broken, truncated, the wrong type, kind or version, and very large ones."""
    as_dict = json.loads(valid)
    return [
        b"",
        b"{not json",
        valid[: len(valid) // 2],
        b"\xff\xfe\x00garbage",
        b"[" * 10_000,
        json.dumps({**as_dict, "version": 2}).encode(),
        json.dumps({**as_dict, "member": -1}).encode(),
        json.dumps({**as_dict, "member": "0"}).encode(),
        json.dumps({**as_dict, "namespace": ["a"]}).encode(),
        json.dumps({k: v for k, v in as_dict.items() if k != "ensemble"}).encode(),
        wrong_kind,
        b'"just a string"',
        # 6 KB: an object nested 1,000 deep in an unknown field makes the decoder raise RecursionError
        json.dumps({**as_dict, "junk": None}).replace("null", "[" * 1000 + "]" * 1000).encode(),
        # a large body of valid JSON of the wrong type, and garbage just under the server's limit
        json.dumps(list(range(100_000))).encode(),
        b"x" * (max_payload - 1024),
    ]


async def stream_bodies(nc: Client, stream: str, subject: str) -> list[bytes]:
    """Every message body on ``subject`` in ``stream`` up to now (a live subject keeps growing meanwhile)."""
    js = nc.jetstream()
    try:
        last = (await js.get_last_msg(stream, subject)).seq or 0
    except NotFoundError:
        return []
    subscription = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    found = []
    try:
        while True:
            msg = await subscription.next_msg(timeout=5)
            found.append(msg.data)
            if msg.metadata.sequence.stream >= last:
                return found
    finally:
        await subscription.unsubscribe()


async def dead_letters(nc: Client, service: str) -> list[DeadLetter]:
    """The dead letters of ``service`` in the events stream."""
    bodies = await stream_bodies(nc, subjects.EVENTS_STREAM, subjects.deadletter(service))
    return [msgspec.json.decode(body, type=DeadLetter) for body in bodies]


def deadletter_count(service: str) -> float:
    """The ``ensemble_deadletters_total`` counter of ``service`` (what /metrics shows)."""
    return REGISTRY.get_sample_value("ensemble_deadletters_total", {"service": service}) or 0.0


async def _at_least(source: Callable[[], Coroutine[Any, Any, list[Any]]], count: int) -> bool:
    return len(await source()) >= count


def assert_kept(letters: list[DeadLetter], sent: list[bytes]) -> None:
    """Every bad body has its dead letter, with its subject, a reason, and its first 64 KiB."""
    assert len(letters) == len(sent)
    for letter, body in zip(letters, sent, strict=True):
        assert letter.error, letter
        assert letter.data == body[: 64 * 1024]


async def test_the_decider_dead_letters_every_bad_metrics_message_and_goes_on_deciding(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    members = await js.key_value(subjects.MEMBERS_BUCKET)
    await members.put(ADDRESS.key, encode(record()))
    # a member whose algorithm learns run times: a mean of 1e308 s once overflowed its saved state
    learner = MemberAddress(ADDRESS.namespace, ADDRESS.ensemble, 1)
    await members.put(learner.key, encode(record(algorithm="select-fastest-runtime", member=1)))
    wrong_kind = encode(
        Decision(namespace="default", ensemble="bad.input", member=0, id="d", time=1.0, based_on=0, action="scale")
    )
    bad = malformed(encode(snapshot(ADDRESS, 0)), wrong_kind, nc.max_payload)
    # any subject under ensemble.metrics.> is consumed, a member address or not
    subjects_used = [subjects.metrics(ADDRESS), "ensemble.metrics.x", "ensemble.metrics.a.b.c.d.e"]
    before = deadletter_count("decider")
    async with service_running(run_decider, settings) as task:
        for i, body in enumerate(bad):
            await js.publish(subjects_used[i % len(subjects_used)], body)
        for seq in (0, 1):  # the second mean times two finished jobs overflows a float
            extreme = GroupStats(submitted=2, finished=seq + 1, succeeded=seq + 1, run_mean=1e308)
            await js.publish(subjects.metrics(learner), encode(snapshot(learner, seq, groups={"a": extreme})))
        await js.publish(subjects.metrics(ADDRESS), encode(snapshot(ADDRESS, 0)))

        await wait_for(lambda: _at_least(lambda: dead_letters(nc, "decider"), len(bad)), timeout=20)
        decided = functools.partial(stream_bodies, nc, subjects.DECISIONS_STREAM, subjects.decisions(ADDRESS))
        await wait_for(lambda: _at_least(decided, 1), timeout=10)
        records = await js.key_value(subjects.DECIDER_BUCKET)

        async def learner_caught_up() -> bool:
            with contextlib.suppress(Exception):
                entry = await records.get(learner.key)
                return msgspec.json.decode(entry.value or b"", type=DeciderRecord).last_seq == 1
            return False

        await wait_for(learner_caught_up, timeout=10)
        assert not task.done()
    letters = await dead_letters(nc, "decider")
    assert_kept(letters, bad)
    assert [letter.subject for letter in letters] == [subjects_used[i % 3] for i in range(len(bad))]
    assert any("version: 2 is not supported" in letter.error for letter in letters)
    assert deadletter_count("decider") - before == len(bad)
    [decision] = [msgspec.json.decode(body, type=Decision) for body in await decided()]
    assert decision.action == "submit" and decision.based_on == 0
    state = msgspec.json.decode((await records.get(learner.key)).value or b"", type=DeciderRecord)
    algorithm = algorithms.get("select-fastest-runtime")
    msgspec.json.decode(state.state, type=algorithm.state_type)  # still readable: the member is not wedged


async def test_the_actuator_dead_letters_every_bad_decision_and_still_applies_a_good_one(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    token = ensemble_token(settings.sidecar_token, ADDRESS.namespace, ADDRESS.ensemble)
    running = await serve_local(token=token, nodes=1, max_nodes=4)
    try:
        await (await js.key_value(subjects.MEMBERS_BUCKET)).put(
            ADDRESS.key, encode(record(endpoint=f"127.0.0.1:{running.port}"))
        )
        good = Decision(
            namespace=ADDRESS.namespace,
            ensemble=ADDRESS.ensemble,
            member=0,
            id=f"{ADDRESS.key}:7",
            time=time.time(),
            based_on=7,
            action="scale",
            size=3,
            reason="two jobs of two nodes wait",
        )
        wrong_kind = encode(snapshot(ADDRESS, 0))
        bad = malformed(encode(good), wrong_kind, nc.max_payload)
        # decisions that decode but can never be applied
        bad += [
            encode(msgspec.structs.replace(good, id="no-size", size=None)),
            json.dumps({**json.loads(encode(good)), "action": "submit", "jobs": [{"name": "a", "nodes": 0}]}).encode(),
        ]
        # an action this actuator does not know (a newer algorithm's) is reported on the member, not lost
        unknown = msgspec.structs.replace(good, id="unknown-action", action="explode")
        before = deadletter_count("actuator")
        async with service_running(run_actuator, settings) as task:
            for body in bad:
                await js.publish(subjects.decisions(ADDRESS), body)
            await js.publish(subjects.decisions(ADDRESS), encode(unknown), headers={"Nats-Msg-Id": unknown.id})
            await js.publish(subjects.decisions(ADDRESS), encode(good), headers={"Nats-Msg-Id": good.id})
            await wait_for(lambda: _at_least(lambda: dead_letters(nc, "actuator"), len(bad)), timeout=20)
            applied = functools.partial(stream_bodies, nc, subjects.EVENTS_STREAM, subjects.applied(ADDRESS))
            await wait_for(lambda: _at_least(applied, 2), timeout=10)
            assert not task.done()
        assert_kept(await dead_letters(nc, "actuator"), bad)
        assert deadletter_count("actuator") - before == len(bad)
        refused, result = [msgspec.json.decode(body, type=Applied) for body in await applied()]
        assert (refused.decision, refused.ok, refused.error) == (unknown.id, False, "action 'explode' is not supported")
        assert (result.decision, result.ok, result.size_after) == (good.id, True, 3)
        assert running.backend.status().size == 3
    finally:
        await running.stop(grace=0.1)


async def test_the_poller_skips_unreadable_member_records_and_keeps_polling_the_others(
    nc: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    members = await js.key_value(subjects.MEMBERS_BUCKET)
    token = ensemble_token(settings.sidecar_token, ADDRESS.namespace, ADDRESS.ensemble)
    running = await serve_local(token=token, nodes=2, max_nodes=4)
    good = record(endpoint=f"127.0.0.1:{running.port}")
    garbage = {
        "default.junk.0": b"{not json",
        "default.junk.1": b"\xff\xfe",
        "default.junk.2": json.dumps(list(range(100_000))).encode(),
        "default.junk.3": json.dumps({**json.loads(encode(good)), "version": 2}).encode(),
        "default.junk.4": json.dumps({**json.loads(encode(good)), "check_seconds": 0}).encode(),
        "default.junk.5": encode(snapshot(ADDRESS, 0)),
    }
    # records that decode but point nowhere: their loops retry quietly, the others are not held up
    unreachable = {
        "default.nowhere.0": encode(msgspec.structs.replace(good, ensemble="nowhere", endpoint="")),
        "default.nowhere.1": encode(msgspec.structs.replace(good, ensemble="nowhere", member=1, endpoint="::::")),
    }
    try:
        for key, value in [*garbage.items(), *unreachable.items()]:
            await members.put(key, value)
        caplog.set_level(logging.ERROR, logger="poller")
        async with service_running(run_poller, settings) as task:
            await members.put(ADDRESS.key, encode(good))
            polled = functools.partial(stream_bodies, nc, subjects.METRICS_STREAM, subjects.metrics(ADDRESS))
            await wait_for(lambda: _at_least(polled, 3), timeout=15)
            # a record that turns to garbage stops its own loop only
            await members.put("default.junk.0", b"\x00")
            count = len(await polled())
            await wait_for(lambda: _at_least(polled, count + 2), timeout=10)
            assert not task.done()
        skipped = {r.getMessage().split(":")[0] for r in caplog.records if "unreadable member record" in r.getMessage()}
        assert skipped == {f"unreadable member record {key}" for key in garbage}
        published = [msgspec.json.decode(body, type=Metrics) for body in await polled()]
        assert [m.seq for m in published] == list(range(len(published)))
        assert published[-1].nodes.node_up_count == 2
    finally:
        await running.stop(grace=0.1)


# --- gRPC: fuzzed calls to a real sidecar -------------------------------------------------------------

SERVICE = "/convergedcomputing.org.grpc.v1.EnsembleOperator/"
TOKEN = "fuzz-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
#: A valid payload per action; the fuzz mutates these.
VALID_PAYLOADS: dict[str, Any] = {
    "submit": {
        "jobs": [
            {"name": "g", "command": "true", "count": 2, "nodes": 1, "tasks": 1, "workdir": "/tmp", "duration": 5}
        ],
        "order": "ascending",
        "seed": 3,
        "key": "k1",
    },
    "jobinfo": {"id": 1},
    "grow": {"size": 3},
    "shrink": {"size": 1},
    "cancel": {"group": "g"},
    "resetCounter": {},
    "terminate": {},
}
UNKNOWN_ACTIONS = ["", "SUBMIT", "sub mit", "é", "x" * 500, "submit\x00", "kill", "../grow"]
ODD: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30), 1.5, 1e308, -0.0]
ODD += ["", " ", "1", "x" * 300, "é", "💥", "\x00", "a'b", '"', "$(reboot)", [], [1, 2], {}, {"a": 1}, [[[[[]]]]]]
REQUESTS = {
    "RequestStatus": pb.StatusRequest,
    "RequestAction": pb.ActionRequest,
    "RequestUpdate": pb.UpdateRequest,
    "WatchStatus": pb.StatusRequest,
}


def mutate_json(value: Any, rng: random.Random) -> Any:
    """``value`` with one random change somewhere inside: a key dropped or added, a value replaced."""
    if isinstance(value, dict):
        value = dict(value)
        roll = rng.random()
        if value and roll < 0.25:
            value.pop(rng.choice(list(value)))
        elif not value or roll < 0.4:
            value[rng.choice(["extra", "jobs", "size", "id", "group", "Key", "", "é"])] = rng.choice(ODD)
        else:
            key = rng.choice(list(value))
            value[key] = mutate_json(value[key], rng)
        return value
    if isinstance(value, list):
        value = list(value)
        roll = rng.random()
        if value and roll < 0.3:
            index = rng.randrange(len(value))
            value[index] = mutate_json(value[index], rng)
        elif roll < 0.5:
            value = value * rng.choice([0, 2, 50])
        elif roll < 0.7:
            value.append(rng.choice(ODD))
        else:
            return rng.choice(ODD)
        return value
    return rng.choice(ODD) if rng.random() < 0.8 else mutate_json({"nested": value}, rng)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to six byte edits: inserted, overwritten, cut off, repeated."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if not out or roll < 0.3:
            out.insert(rng.randrange(len(out) + 1), rng.randrange(256))
        elif roll < 0.6:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif roll < 0.8:
            del out[rng.randrange(len(out)) :]
        else:
            out += out[: rng.randrange(len(out) + 1)]
    return bytes(out)


def fuzzed_call(rng: random.Random, actions: list[str]) -> tuple[str, bytes, tuple[tuple[str, str], ...]]:
    """One call: (method, serialized request, metadata). Mostly mutated JSON, some corrupt protobuf, some bad tokens."""
    roll = rng.random()
    metadata = AUTH
    if roll < 0.6:
        action = rng.choice(actions)
        valid = VALID_PAYLOADS.get(action, VALID_PAYLOADS["submit"])
        # one in ten unchanged: valid calls interleaved with the bad ones (and refused once terminated)
        text = json.dumps(valid if rng.random() < 0.1 else mutate_json(valid, rng))
        if rng.random() < 0.3:
            text = mutate_bytes(text.encode(), rng).decode("utf-8", "replace")
        member = rng.choice(["", "minicluster", "é" * 50])
        return (
            "RequestAction",
            pb.ActionRequest(member=member, action=action, payload=text).SerializeToString(),
            metadata,
        )
    if roll < 0.72:
        payload = json.dumps(mutate_json({"options": {"scaleChecks": 1}}, rng))
        return "RequestUpdate", pb.UpdateRequest(member="minicluster", payload=payload).SerializeToString(), metadata
    if roll < 0.77:
        method = rng.choice(["RequestStatus", "WatchStatus"])
        return method, pb.StatusRequest(member="é" * rng.randint(0, 2000), algorithm="x").SerializeToString(), metadata
    if roll < 0.8:
        token = "".join(rng.choice("ABCxyz019-_=. ") for _ in range(rng.randint(0, 60)))
        metadata = (("authorization", rng.choice([token, f"Bearer {token}", f"bearer {TOKEN}", f"Bearer {TOKEN} "])),)
    # the protobuf itself corrupted (truncated, bad lengths, invalid UTF-8 in strings), on any method
    method = rng.choice(list(REQUESTS))
    valid = pb.ActionRequest(action=rng.choice(actions), payload=json.dumps(VALID_PAYLOADS["submit"]))
    return method, mutate_bytes(valid.SerializeToString(), rng), metadata


def parses(method: str, request: bytes) -> bool:
    """Whether the server can decode ``request`` as the method's message at all."""
    try:
        REQUESTS[method].FromString(request)
    except Exception:
        return False
    return True


async def send(channel: aio.Channel, method: str, request: bytes, metadata: Any) -> pb.Response:
    """One raw call with a 5 s deadline; for WatchStatus, the first snapshot (then the stream is cancelled)."""
    if method == "WatchStatus":
        call = channel.unary_stream(SERVICE + method)(request, metadata=metadata, timeout=5)
        try:
            async for raw in call:
                return pb.Response.FromString(raw)
        finally:
            call.cancel()
        raise AssertionError("WatchStatus ended without a snapshot")
    return pb.Response.FromString(await channel.unary_unary(SERVICE + method)(request, metadata=metadata, timeout=5))


def check_answer(method: str, request: bytes, metadata: Any, outcome: pb.Response | aio.AioRpcError) -> str:
    """Fail on anything but a named refusal or a success; return the outcome's name."""
    authorized = metadata == AUTH
    if isinstance(outcome, aio.AioRpcError):
        code = outcome.code()
        if not authorized:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, metadata, outcome)
        elif code == grpc.StatusCode.UNKNOWN:
            # grpc refuses a request that is not the method's protobuf before the sidecar sees it
            assert not parses(method, request), (method, request, outcome.details())
            assert "Error parsing message" in (outcome.details() or "")
        else:
            raise AssertionError(f"{method} answered {code.name}: {outcome.details()} for {request!r}")
        return code.name
    assert authorized, f"{method} answered without a valid token"
    assert parses(method, request)
    assert outcome.status in (pb.Response.SUCCESS, pb.Response.ERROR, pb.Response.DENIED), outcome
    if outcome.status != pb.Response.SUCCESS:
        error = json.loads(outcome.payload)["error"]
        assert isinstance(error, str) and error, outcome
        # the catch-all answer means an exception escaped the validation: a bug to fix, not a refusal
        assert "failed inside the sidecar" not in error, (method, request, error)
    return pb.Response.ResultType.Name(outcome.status)


#: Calls of the fuzz; the last ``TERMINATING`` come after a ``terminate`` (the queue then refuses work) and
#: may send it again. Both are multiples of the 64 calls sent at a time.
FUZZ_CALLS = 10_432
TERMINATING = 448


async def test_ten_thousand_fuzzed_calls_get_an_answer_and_the_sidecar_keeps_serving() -> None:
    # No node ever comes up (0 nodes, an hour to provision one), so no fuzzed command is ever run.
    running: RunningServer = await serve_local(token=TOKEN, nodes=0, max_nodes=4, provision_delay=3600)
    rng = random.Random(20250101)
    outcomes: dict[tuple[str, str], int] = {}
    started = time.monotonic()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            everyday = [action for action in VALID_PAYLOADS if action != "terminate"] + UNKNOWN_ACTIONS

            async def one(actions: list[str]) -> None:
                method, request, metadata = fuzzed_call(rng, actions)
                outcome: pb.Response | aio.AioRpcError
                try:
                    outcome = await send(channel, method, request, metadata)
                except aio.AioRpcError as exc:
                    outcome = exc
                name = check_answer(method, request, metadata, outcome)
                outcomes[(method, name)] = outcomes.get((method, name), 0) + 1

            for first in range(0, FUZZ_CALLS, 64):
                if first == FUZZ_CALLS - TERMINATING:
                    stopped = await send(
                        channel, "RequestAction", pb.ActionRequest(action="terminate").SerializeToString(), AUTH
                    )
                    assert stopped.status == pb.Response.SUCCESS
                actions = everyday if first < FUZZ_CALLS - TERMINATING else [*everyday, "terminate"]
                await asyncio.gather(*(one(actions) for _ in range(min(64, FUZZ_CALLS - first))))

            # over gRPC's 4 MiB limit: refused by gRPC itself, and the server goes on
            with pytest.raises(aio.AioRpcError) as huge:
                await send(
                    channel,
                    "RequestAction",
                    pb.ActionRequest(action="submit", payload="x" * (5 << 20)).SerializeToString(),
                    AUTH,
                )
            assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            after = await send(channel, "RequestStatus", pb.StatusRequest().SerializeToString(), AUTH)
    finally:
        await running.stop(grace=0.1)
    elapsed = time.monotonic() - started
    assert sum(outcomes.values()) == FUZZ_CALLS
    assert after.status == pb.Response.SUCCESS and json.loads(after.payload)["terminated"] is True
    # every kind of answer was reached, so the fuzz did exercise each path
    for expected in [("RequestAction", "SUCCESS"), ("RequestAction", "ERROR"), ("RequestAction", "DENIED")]:
        assert outcomes.get(expected), outcomes
    for method in REQUESTS:
        assert outcomes.get((method, "UNKNOWN")) and outcomes.get((method, "UNAUTHENTICATED")), (method, outcomes)
    assert elapsed < 60, f"{FUZZ_CALLS} calls took {elapsed:.1f} s"
