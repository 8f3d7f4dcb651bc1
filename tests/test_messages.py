"""Message round trips, version checks and subject escaping."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble_core import subjects
from ensemble_core.messages import (
    AlgorithmSpec,
    Applied,
    Decision,
    JobSpec,
    MemberEvent,
    MemberSpec,
    Metrics,
    NodeCounts,
    QueueCounts,
    VersionError,
    check_version,
    encode,
)
from ensemble_core.subjects import MemberAddress, escape, unescape
from tests.conftest import SHARED

ADDRESS = {"namespace": "default", "ensemble": "my.ensemble", "member": 2}

EXAMPLES: list[msgspec.Struct] = [
    Metrics(
        **ADDRESS,
        seq=4,
        time=1.5,
        size=3,
        nodes=NodeCounts(node_up_count=2, node_free_count=1),
        queue=QueueCounts(sched=3, run=1),
        waiting={2: 1, 4: 2},
        next_jobs=[4, 2, 4],
        finished=7,
        failed=1,
    ),
    Decision(**ADDRESS, id="default/my.ensemble/2/4/0", time=1.5, based_on=4, action="scale", size=5, reason="grow"),
    Decision(
        **ADDRESS,
        id="x",
        time=1.0,
        based_on=0,
        action="submit",
        jobs=[JobSpec(name="a", command="true", count=3, nodes=2)],
        order="random",
        seed=7,
    ),
    MemberEvent(**ADDRESS, event="ready", time=2.0, size=1),
    Applied(**ADDRESS, decision="x", time=3.0, ok=False, action="scale", error="refused"),
    MemberSpec(
        **ADDRESS,
        name="my.ensemble-2",
        size=1,
        min_size=1,
        max_size=4,
        endpoint="127.0.0.1:1",
        algorithm=AlgorithmSpec(options={"scaleChecks": 2}),
        jobs=[JobSpec(name="a", command="true")],
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_keeps_every_field(message: msgspec.Struct) -> None:
    decoded = msgspec.json.decode(encode(message), type=type(message))
    assert decoded == message


def test_messages_are_tagged_with_their_kind_so_a_recording_can_mix_them() -> None:
    union = Metrics | Decision | MemberEvent | Applied | MemberSpec
    for message in EXAMPLES:
        assert type(msgspec.json.decode(encode(message), type=union)) is type(message)
    assert b'"kind":"metrics"' in encode(EXAMPLES[0])


def test_recorded_seed_streams_decode_as_our_messages() -> None:
    union = Metrics | Decision | Applied
    lines = (SHARED / "data/seed-gke/run5-random/recording.jsonl").read_bytes().splitlines()
    decoded = [msgspec.json.decode(line, type=union) for line in lines]
    assert sum(isinstance(m, Metrics) for m in decoded) > 20
    assert any(isinstance(m, Decision) and m.action == "terminate" for m in decoded)


def test_wrong_version_is_refused_with_the_field_named() -> None:
    message = msgspec.structs.replace(EXAMPLES[0], version=99)
    with pytest.raises(VersionError, match="version: 99"):
        check_version(msgspec.json.decode(encode(message), type=Metrics))


def test_invalid_field_is_named_in_the_error() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.seq"):
        msgspec.json.decode(
            b'{"kind":"metrics","namespace":"a","ensemble":"b","member":0,"seq":-1,"time":0,'
            b'"size":1,"nodes":{},"queue":{}}',
            type=Metrics,
        )


@pytest.mark.parametrize("name", ["default", "my.ensemble", "a_b", "_", "x.y.z", "ünïcode", "a" * 253, "-"])
def test_escape_is_reversible_and_makes_one_safe_token(name: str) -> None:
    token = escape(name)
    assert "." not in token and "*" not in token and ">" not in token and " " not in token
    assert unescape(token) == name


@given(st.text(min_size=1, max_size=80))
def test_escape_round_trips_any_text(name: str) -> None:
    assert unescape(escape(name)) == name


def test_distinct_names_never_share_a_token() -> None:
    assert escape("a.b") != escape("a_b") != escape("a_2Eb")
    assert len({escape(n) for n in ["a.b", "a_b", "a_2Eb", "a-b"]}) == 4


def test_unescape_refuses_what_escape_cannot_produce() -> None:
    for token in ["a.b", "a_2", "a_zz", ""]:
        with pytest.raises(ValueError):
            unescape(token)


def test_member_subjects_carry_escaped_names_and_parse_back() -> None:
    address = MemberAddress("team.a", "sweep.v2", 3)
    subject = subjects.metrics(address)
    assert subject == "ensemble.metrics.team_2Ea.sweep_2Ev2.3"
    assert MemberAddress.from_subject(subject) == address
    assert MemberAddress.from_key(address.key) == address
    assert subjects.decisions(address).startswith("ensemble.decisions.")
    with pytest.raises(ValueError):
        MemberAddress.from_key("a.b")
