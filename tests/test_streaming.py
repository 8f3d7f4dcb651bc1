"""sidecar.streaming: the per-group statistics the sidecar reports, against exact ones from every sample."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.queue import GroupTally
from sidecar.streaming import Quantile, Spread


def exact_quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_quartiles_of_up_to_five_values_are_exact(count: int) -> None:
    values = [random.Random(count).uniform(0, 100) for _ in range(count)]
    spread = Spread()
    for value in values:
        spread.add(value)
    q1, q3 = exact_quartiles(values)
    assert spread.iqr() == pytest.approx(q3 - q1)


@pytest.mark.parametrize(
    ("draw", "tolerance"),
    [
        (lambda rng: rng.uniform(0, 100), 0.03),
        (lambda rng: rng.gauss(60, 15), 0.05),
        (lambda rng: rng.lognormvariate(3, 0.5), 0.05),  # skewed, like run times
    ],
)
def test_streaming_estimates_follow_the_exact_statistics_of_ten_thousand_values(draw: object, tolerance: float) -> None:
    rng = random.Random(7)
    values = [draw(rng) for _ in range(10_000)]  # type: ignore[operator]
    spread = Spread()
    for value in values:
        spread.add(value)
    q1, q3 = exact_quartiles(values)
    mean = statistics.fmean(values)
    assert spread.n == 10_000 and spread.mean() == pytest.approx(mean)
    assert spread.variance() == pytest.approx(statistics.variance(values), rel=1e-9)
    assert spread.iqr() == pytest.approx(q3 - q1, rel=tolerance)
    assert spread.mad() == pytest.approx(statistics.fmean(abs(v - mean) for v in values), rel=0.02)


def test_nothing_has_a_value_before_the_first_sample_and_variance_needs_two() -> None:
    spread = Spread()
    assert (spread.variance(), spread.iqr(), spread.mad()) == (None, None, None)
    spread.add(4.0)
    assert (spread.variance(), spread.iqr(), spread.mad()) == (None, 0.0, 0.0)
    spread.add(6.0)
    assert spread.variance() == pytest.approx(2.0)


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300))
def test_estimates_stay_inside_the_data(values: list[float]) -> None:
    quantile = Quantile(0.25)
    spread = Spread()
    for value in values:
        quantile.add(value)
        spread.add(value)
    estimate = quantile.value()
    assert estimate is not None and min(values) <= estimate <= max(values)
    iqr, mad = spread.iqr(), spread.mad()
    assert iqr is not None and 0 <= iqr <= max(values) - min(values) + 1e-6
    assert mad is not None and 0 <= mad <= max(values) - min(values) + 1e-6
    if len(values) > 1:
        assert spread.variance() == pytest.approx(statistics.variance(values), rel=1e-6, abs=1e-6)


def test_a_quantile_outside_zero_and_one_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        Quantile(1.5)


def test_a_group_reports_its_spreads_once_jobs_ran() -> None:
    tally = GroupTally()
    assert tally.stats().run_var is None  # and omitted from the payload
    for run, wait in [(10.0, 1.0), (14.0, 3.0), (12.0, 2.0)]:
        tally.ended(success=True, run=run, wait=wait)
    stats = tally.stats()
    assert stats.run_var == pytest.approx(4.0) and stats.wait_var == pytest.approx(1.0)
    assert stats.run_iqr == pytest.approx(2.0) and stats.wait_iqr == pytest.approx(1.0)
    assert stats.run_mad == pytest.approx(statistics.fmean([0, 2, 0]))  # against the running mean
