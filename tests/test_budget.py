"""The node budget's fair-share rule (ensemble_core.budget), shared by the simulator and the actuator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble_core.budget import fair_share, jain_index


def test_wants_that_fit_are_granted_whole() -> None:
    assert fair_share({"a": 3, "b": 2}, {}, 10) == {"a": 3, "b": 2}


def test_equal_weights_split_evenly_and_ties_go_by_name() -> None:
    assert fair_share({"b": 9, "a": 9, "c": 9}, {}, 7) == {"a": 3, "b": 2, "c": 2}


def test_a_small_want_leaves_its_share_to_the_others() -> None:
    assert fair_share({"small": 1, "big": 10, "mid": 3}, {}, 9) == {"small": 1, "mid": 3, "big": 5}


def test_weights_scale_the_shares() -> None:
    assert fair_share({"a": 20, "b": 20}, {"a": 3.0, "b": 1.0}, 8) == {"a": 6, "b": 2}


def test_members_that_want_nothing_get_nothing() -> None:
    assert fair_share({"idle": 0, "busy": 5}, {}, 3) == {"idle": 0, "busy": 3}
    assert fair_share({}, {}, 4) == {}
    assert fair_share({"a": 4}, {}, 0) == {"a": 0}


@pytest.mark.parametrize(
    ("wants", "weights", "budget", "field"),
    [
        ({"a": -1}, {}, 3, "wants['a']"),
        ({"a": 1.5}, {}, 3, "wants['a']"),
        ({"a": 1}, {"a": 0.0}, 3, "weights['a']"),
        ({"a": 1}, {"a": float("nan")}, 3, "weights['a']"),
        ({"a": 1}, {}, -2, "budget"),
    ],
)
def test_bad_input_names_the_field(wants: dict[str, int], weights: dict[str, float], budget: int, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        fair_share(wants, weights, budget)


@settings(max_examples=200, deadline=None)
@given(
    wants=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 30), max_size=8),
    weights=st.dictionaries(st.sampled_from("abcdefgh"), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
    budget=st.integers(0, 120),
)
def test_grants_are_weighted_max_min_fair(wants: dict[str, int], weights: dict[str, float], budget: int) -> None:
    grants = fair_share(wants, weights, budget)
    assert set(grants) == set(wants)
    assert sum(grants.values()) == min(budget, sum(wants.values()))
    assert all(0 <= grants[name] <= wants[name] for name in wants)
    weight = {name: weights.get(name, 1.0) for name in wants}
    # No node can move from one member to an unsatisfied one and leave the pair more equal per weight.
    for short in wants:
        if grants[short] == wants[short]:
            continue
        for other in wants:
            if other != short and grants[other] > 0:
                assert grants[other] / weight[other] <= (grants[short] + 1) / weight[short] + 1e-9
    # The answer does not depend on the order of the mapping.
    assert fair_share(dict(reversed(list(wants.items()))), weights, budget) == grants


def test_jain_index() -> None:
    assert jain_index({"a": 2.0, "b": 2.0}) == 1.0
    assert jain_index({"a": 4.0, "b": 0.0}) == 0.5
    assert jain_index({}) == 1.0
