"""Streaming statistics of a series of durations, O(1) time and memory per value.

The sidecar reports per job group the count, mean, min and max of run and pending times and, like the
successor's River statistics, their variance, interquartile range and mean absolute deviation — without
keeping every job's sample (a queue may see hundreds of thousands of jobs):

- variance: Welford's update, exact (sample variance, n - 1 in the denominator; none below 2 values);
- interquartile range: the 75th minus the 25th percentile, each estimated with the P² algorithm (Jain
  and Chlamtac, 1985: five markers moved by piecewise-parabolic interpolation). Exact up to five
  values (linear interpolation between order statistics, as ``statistics.quantiles(method="inclusive")``),
  an estimate after that, good to a few per cent on smooth distributions;
- mean absolute deviation: the mean of ``|x - mean|`` with each value taken against the running mean at
  the time it arrived — exact when the mean no longer moves, an estimate before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class Quantile:
    """The P² estimate of the ``p``-quantile of the values added so far."""

    __slots__ = ("_dn", "_heights", "_p", "_positions", "_wanted")

    def __init__(self, p: float) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"quantile {p} is not between 0 and 1")
        self._p = p
        self._heights: list[float] = []  # the first five values (sorted), then the five markers' heights
        self._positions = [0.0, 1.0, 2.0, 3.0, 4.0]
        self._wanted = [0.0, 2 * p, 4 * p, 2 + 2 * p, 4.0]
        self._dn = [0.0, p / 2, p, (1 + p) / 2, 1.0]

    def add(self, value: float) -> None:
        heights = self._heights
        if len(heights) < 5:
            heights.append(value)
            heights.sort()
            return
        positions = self._positions
        if value < heights[0]:
            heights[0] = value
            cell = 0
        elif value >= heights[4]:
            heights[4] = max(heights[4], value)
            cell = 3
        else:
            cell = 0
            while value >= heights[cell + 1]:
                cell += 1
        for index in range(cell + 1, 5):
            positions[index] += 1
        for index in range(5):
            self._wanted[index] += self._dn[index]
        for index in (1, 2, 3):
            off = self._wanted[index] - positions[index]
            if (off >= 1 and positions[index + 1] - positions[index] > 1) or (
                off <= -1 and positions[index - 1] - positions[index] < -1
            ):
                step = 1 if off > 0 else -1
                height = self._parabolic(index, step)
                if not heights[index - 1] < height < heights[index + 1]:
                    height = heights[index] + step * (heights[index + step] - heights[index]) / (
                        positions[index + step] - positions[index]
                    )
                heights[index] = height
                positions[index] += step

    def _parabolic(self, i: int, step: int) -> float:
        q, n = self._heights, self._positions
        return q[i] + step / (n[i + 1] - n[i - 1]) * (
            (n[i] - n[i - 1] + step) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
            + (n[i + 1] - n[i] - step) * (q[i] - q[i - 1]) / (n[i] - n[i - 1])
        )

    def value(self) -> float | None:
        """The estimate; None before the first value."""
        heights = self._heights
        if not heights:
            return None
        if len(heights) < 5 or self._positions[4] == 4:  # exactly the values seen: interpolate
            rank = self._p * (len(heights) - 1)
            low = math.floor(rank)
            high = min(low + 1, len(heights) - 1)
            return heights[low] + (heights[high] - heights[low]) * (rank - low)
        return heights[2]


@dataclass(slots=True)
class Spread:
    """Count, sum, min, max, variance, quartiles and mean absolute deviation of a series of durations."""

    n: int = 0
    total: float = 0.0
    low: float = 0.0
    high: float = 0.0
    _mean: float = 0.0
    _m2: float = 0.0
    _deviations: float = 0.0
    _q1: Quantile = field(default_factory=lambda: Quantile(0.25))
    _q3: Quantile = field(default_factory=lambda: Quantile(0.75))

    def add(self, value: float) -> None:
        self.low = value if self.n == 0 else min(self.low, value)
        self.high = value if self.n == 0 else max(self.high, value)
        self.n += 1
        self.total += value
        delta = value - self._mean
        self._mean += delta / self.n
        self._m2 += delta * (value - self._mean)
        self._deviations += abs(value - self._mean)
        self._q1.add(value)
        self._q3.add(value)

    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def variance(self) -> float | None:
        """Sample variance; None below two values."""
        return self._m2 / (self.n - 1) if self.n > 1 else None

    def iqr(self) -> float | None:
        """75th minus 25th percentile; None before the first value."""
        q1, q3 = self._q1.value(), self._q3.value()
        return None if q1 is None or q3 is None else max(0.0, q3 - q1)

    def mad(self) -> float | None:
        """Mean absolute deviation from the mean; None before the first value."""
        return self._deviations / self.n if self.n else None
