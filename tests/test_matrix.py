"""Parameter sweeps: combination order, rendering into commands and environments, and the compact wire form."""

from __future__ import annotations

import itertools
import shlex
import subprocess

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble_core import matrix
from ensemble_core.matrix import MatrixRange, Scalar
from ensemble_core.messages import AlgorithmSpec, Decision, JobSpec, MemberSpec, encode

SWEEP: matrix.Matrix = {"x": [1, 2, 4], "seed": MatrixRange(start=0, stop=10)}


def member_with(*jobs: JobSpec) -> MemberSpec:
    return MemberSpec(
        namespace="default",
        ensemble="sweep",
        member=0,
        name="sweep-0",
        size=1,
        min_size=1,
        max_size=2,
        endpoint="127.0.0.1:50051",
        algorithm=AlgorithmSpec(),
        jobs=list(jobs),
    )


def test_size_is_the_product_of_the_value_counts() -> None:
    assert matrix.size(SWEEP) == 30
    assert matrix.size({}) == 1
    assert matrix.size({"a": ["p", "q"], "b": MatrixRange(start=10, stop=0, step=-3)}) == 2 * 4  # 10, 7, 4, 1


def test_params_follow_itertools_product_with_the_last_name_fastest() -> None:
    assert matrix.params(SWEEP, 0) == {"x": "1", "seed": "0"}
    assert matrix.params(SWEEP, 1) == {"x": "1", "seed": "1"}
    assert matrix.params(SWEEP, 10) == {"x": "2", "seed": "0"}
    assert matrix.params(SWEEP, 29) == {"x": "4", "seed": "9"}
    expected = [{"x": str(x), "seed": str(seed)} for x, seed in itertools.product([1, 2, 4], range(10))]
    assert [matrix.params(SWEEP, i) for i in range(30)] == expected
    assert list(matrix.params({"b": [1], "a": [2]}, 0)) == ["b", "a"]  # the order written, not sorted


@given(
    lists=st.lists(st.lists(st.integers(-5, 5), min_size=1, max_size=4), min_size=1, max_size=4),
    bounds=st.tuples(st.integers(-20, 20), st.integers(-20, 20), st.integers(-4, 4).filter(bool)),
)
def test_params_of_every_index_is_the_product_in_order(lists: list[list[int]], bounds: tuple[int, int, int]) -> None:
    start, stop, step = bounds
    values = range(start, stop, step)
    sweep: matrix.Matrix = {f"p{i}": list[Scalar](v) for i, v in enumerate(lists)}
    sweep["r"] = MatrixRange(start=start, stop=stop, step=step)
    combos = list(itertools.product(*lists, values))
    assert matrix.size(sweep) == len(combos)
    for index, combo in enumerate(combos):
        assert list(matrix.params(sweep, index).values()) == [str(v) for v in combo]


@pytest.mark.parametrize("index", [-1, 30, 31, 10**20])
def test_an_index_outside_the_matrix_is_refused_naming_it(index: int) -> None:
    with pytest.raises(ValueError, match=rf"^index: {index} is outside the matrix's 30 combinations \(0 to 29\)"):
        matrix.params(SWEEP, index)


def test_a_huge_range_is_indexed_without_being_listed() -> None:
    huge: matrix.Matrix = {"seed": MatrixRange(start=0, stop=10**30), "x": ["a", "b"]}
    assert matrix.size(huge) == 2 * 10**30
    assert matrix.params(huge, 2 * 10**30 - 1) == {"seed": str(10**30 - 1), "x": "b"}
    assert matrix.count(MatrixRange(start=5, stop=5)) == 0
    assert matrix.count(MatrixRange(start=0, stop=-10, step=-3)) == 4  # 0, -3, -6, -9
    assert matrix.count(MatrixRange(start=-(2**63), stop=2**63)) == 2**64


@pytest.mark.parametrize(
    ("value", "text"),
    [(1, "1"), (-7, "-7"), (0.5, "0.5"), (1e-05, "1e-05"), (100.0, "100.0"), (True, "true"), (False, "false"),
     ("run 1", "run 1"), ("", "")],
)  # fmt: skip
def test_values_become_the_text_a_user_expects(value: Scalar, text: str) -> None:
    assert matrix.value_text(value) == text
    assert matrix.params({"v": [value]}, 0) == {"v": text}


def test_render_replaces_only_the_parameters_and_leaves_other_braces() -> None:
    params = {"x": "2", "seed": "7"}
    command = "sh -c 'cd ${HOME} && awk \"{print $1}\" in.{x}' {x} {seed} {other} ${x} {{x}} { x }"
    assert matrix.render(command, params) == (
        "sh -c 'cd ${HOME} && awk \"{print $1}\" in.2' 2 7 {other} ${x} {2} { x }"
    )
    assert matrix.render("lmp -var x {x} -var seed {seed} -in in.lj", params) == "lmp -var x 2 -var seed 7 -in in.lj"


def test_render_quotes_a_value_only_where_it_needs_it() -> None:
    params = {"label": "a b", "x": "0.5", "path": "out/run-1.txt", "empty": "", "evil": "$(rm -rf ~); echo"}
    rendered = matrix.render("prog --label {label} -x {x} {path} {empty} {evil}", params)
    assert rendered == "prog --label 'a b' -x 0.5 out/run-1.txt '' '$(rm -rf ~); echo'"
    # one argument each, whether split by shlex (the local queue) or run by a shell
    expected = ["prog", "--label", "a b", "-x", "0.5", "out/run-1.txt", "", "$(rm -rf ~); echo"]
    assert shlex.split(rendered) == expected
    shell = subprocess.run(["sh", "-c", f"printf '%s\\n' {rendered}"], capture_output=True, text=True, check=True)
    assert shell.stdout.split("\n")[:-1] == expected


def test_placeholders_are_found_once_in_order_and_those_in_quotes_are_told_apart() -> None:
    command = 'sh -c \'echo {a} "{b}"\' {c} "{d}" \\\'{e} {a} ${f} {g h}'
    assert matrix.placeholders(command) == ["a", "b", "c", "d", "e"]
    assert matrix.placeholders_in_quotes(command) == {"a", "b", "d"}
    assert matrix.placeholders_in_quotes('echo "it\'s {x}" {y}') == {"x"}
    assert matrix.placeholders_in_quotes('echo "a\\"{x}" {y}') == {"x"}


def test_environment_names_each_parameter_upper_cased() -> None:
    assert matrix.environment({"x": "1", "seed": "0", "Mode_2": "a b"}) == {
        "ENSEMBLE_PARAM_X": "1",
        "ENSEMBLE_PARAM_SEED": "0",
        "ENSEMBLE_PARAM_MODE_2": "a b",
    }
    assert matrix.environment({}) == {}


def test_a_range_of_step_zero_cannot_be_made_or_decoded() -> None:
    with pytest.raises(ValueError, match="step: must not be 0"):
        MatrixRange(start=0, stop=1, step=0)
    with pytest.raises(msgspec.ValidationError, match="step: must not be 0"):
        msgspec.json.decode(b'{"start": 0, "stop": 1, "step": 0}', type=MatrixRange)


def test_a_job_spec_with_a_matrix_round_trips_through_the_member_record_and_a_decision() -> None:
    job = JobSpec(
        name="lj",
        command="lmp -var x {x} -var seed {seed} -in in.lj",
        count=30 * 3,
        matrix={
            "x": [1, 2.5, "four", True],
            "seed": MatrixRange(start=0, stop=30),
            "down": MatrixRange(start=3, stop=0, step=-1),
        },
    )
    record = member_with(job, JobSpec(name="plain", command="true"))
    decoded = msgspec.json.decode(encode(record), type=MemberSpec)
    assert decoded == record
    assert decoded.jobs[0].matrix["x"] == [1, 2.5, "four", True]
    assert [type(v) for v in decoded.jobs[0].matrix["x"]] == [int, float, str, bool]  # no value changes type
    assert decoded.jobs[0].matrix["seed"] == MatrixRange(start=0, stop=30)
    decision = Decision(namespace="default", ensemble="sweep", member=0, id="d", time=0, based_on=0,
                        action="submit", jobs=[job])  # fmt: skip
    assert msgspec.json.decode(encode(decision), type=Decision).jobs == [job]


def test_a_job_without_a_matrix_is_encoded_as_before() -> None:
    assert encode(JobSpec(name="a", command="true", count=2)) == b'{"name":"a","command":"true","count":2}'
    assert msgspec.json.decode(b'{"name":"a","command":"true"}', type=JobSpec).matrix == {}


def test_a_range_of_100000_values_stays_compact_in_the_member_record() -> None:
    job = JobSpec(
        name="seeds", command="run --seed {seed}", count=100_000, matrix={"seed": MatrixRange(start=0, stop=100_000)}
    )
    data = encode(member_with(job))
    assert len(data) < 500, data
    assert b'"seed":{"start":0,"stop":100000}' in data
    assert matrix.params(msgspec.json.decode(data, type=MemberSpec).jobs[0].matrix, 99_999) == {"seed": "99999"}
