"""Statistics over seeds: one metric's mean ± sample std (min), seed groups, mean curves with a band.

Every aggregation over seeds goes through this module: the multi-run report
(:mod:`experiments.report`), the grid report (:mod:`experiments.grid_report`)
and the uq-study report (:mod:`experiments.uq_study`)::

    value = spread([0.8, 0.9, 1.0])               # n=3, mean 0.9, std 0.1 (n - 1), min 0.8
    format_spread(value)                          # "0.9000 ± 0.1000 (0.8000)"
    format_mean_std(value, ".3f", ".3f")          # "0.900 ± 0.100"
    curve = mean_curve(histories, "fidelity")     # mean over runs at common query counts
    low, high = curve.band()                      # ±1 sample std around the mean

The standard deviation is always the sample one (``statistics.stdev``, n - 1):
a handful of seeds estimates the spread of the population of seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from attacker.report import format_value

__all__ = [
    "Curve",
    "Spread",
    "format_mean_std",
    "format_spread",
    "mean_curve",
    "number",
    "parse_number",
    "seed_groups",
    "spread",
]

Row = TypeVar("Row")
Key = TypeVar("Key", bound=Hashable)


def number(value: Any) -> float | None:
    """``value`` as a float; None for None, NaN, booleans and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return None if math.isnan(result) else result


def parse_number(text: str | None) -> float:
    """A CSV cell as a float: NaN when it is empty or not a number (:func:`spread` skips NaN)."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class Spread:
    """One metric over the seeds of a group."""

    n: int
    """Runs with a value."""
    of: int
    """Runs in the group."""
    mean: float
    std: float
    """Sample standard deviation (n - 1); NaN for a single value."""
    min: float

    def band(self) -> tuple[float, float]:
        """``mean ± std``; the mean twice for a single value (no band)."""
        if self.n > 1:
            return self.mean - self.std, self.mean + self.std
        return self.mean, self.mean


def spread(values: Sequence[Any]) -> Spread | None:
    """Mean, sample std and min of the numbers in ``values`` (None, NaN and non-numbers skipped).

    None when no value is a number.
    """
    numbers = [value for value in map(number, values) if value is not None]
    if not numbers:
        return None
    std = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
    return Spread(n=len(numbers), of=len(values), mean=statistics.fmean(numbers), std=std, min=min(numbers))


def format_spread(value: Spread | None) -> str:
    """``mean ± std (min)``; a single value alone; ``[k/n]`` when only k of n runs have one.

    Numbers as in run reports (:func:`attacker.report.format_value`: 4 decimals below 10).
    """
    if value is None:
        return "—"
    if value.n == 1:
        text = format_value(value.mean)
    else:
        std = "0" if value.std == 0 else format_value(value.std)
        text = f"{format_value(value.mean)} ± {std} ({format_value(value.min)})"
    return text + (f" [{value.n}/{value.of}]" if value.n < value.of else "")


def format_mean_std(value: Spread | None, mean_format: str, std_format: str) -> str:
    """``mean ± std`` with the given format specs (e.g. ``".3f"``, ``".1e"``); a single value alone; "–" for none."""
    if value is None:
        return "–"
    if value.n == 1:
        return f"{value.mean:{mean_format}}"
    return f"{value.mean:{mean_format}} ± {value.std:{std_format}}"


def seed_groups(rows: Iterable[Row], key: Callable[[Row], Key]) -> dict[Key, list[Row]]:
    """``rows`` grouped by ``key`` (what the seeds of one experiment share), in order of first appearance."""
    groups: dict[Key, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


# -- curves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One metric against queries, the mean over a group's runs with a ±1 std band."""

    queries: list[float]
    mean: list[float]
    std: list[float]
    """Sample std per point (0 for a single run)."""
    runs: int
    interpolated: bool
    """True when the runs were evaluated at different queries and are interpolated
    (linearly) onto the union of their query counts where all of them overlap."""

    def band(self) -> tuple[list[float], list[float]]:
        """The lower and upper edge of the ±1 std band, point by point."""
        return ([m - s for m, s in zip(self.mean, self.std, strict=True)],
                [m + s for m, s in zip(self.mean, self.std, strict=True)])


X_AXES: dict[str, tuple[str, float, str]] = {
    "queries": ("queries", 1.0, "attack queries (images)"),
    "cost": ("cost", 1.0, "money spent (the run's currency)"),
    "hours": ("simulated_seconds", 1 / 3600, "simulated hours (the rate limits' clock)"),
    "accounts": ("accounts_used", 1.0, "accounts used"),
}
"""What a curve may be drawn against: name -> (history field, scale, axis label). ``cost``, ``hours``
and ``accounts`` are what every evaluation point records of the run's accounts (:mod:`attacker.accounts`)."""


def _points(history: Sequence[dict[str, Any]], metric: str, x: str = "queries") -> list[tuple[float, float]]:
    field, scale, _ = X_AXES[x]
    points: dict[float, float] = {}  # one point per x: the last evaluation there (cost 0 throughout, say)
    for line in history:
        value = number(line.get(metric))
        position = number(line.get(field))
        if value is not None and position is not None:
            points[position * scale] = value
    return sorted(points.items())


def mean_curve(histories: Sequence[Sequence[dict[str, Any]]], metric: str = "fidelity",
               x: str = "queries") -> Curve | None:
    """The mean of ``metric`` over the histories at common ``x`` (:data:`X_AXES`; None: no common point).

    Histories evaluated at the same queries are averaged there; otherwise each is
    interpolated onto the union of the query counts inside the range they all
    cover (no extrapolation). Histories without a point of ``metric`` are left out.
    """
    import numpy as np

    series = [points for points in (_points(history, metric, x) for history in histories) if points]
    if not series:
        return None
    grids = [[query for query, _ in points] for points in series]
    interpolated = any(grid != grids[0] for grid in grids)
    if interpolated:
        low, high = max(grid[0] for grid in grids), min(grid[-1] for grid in grids)
        queries = sorted({query for grid in grids for query in grid if low <= query <= high})
        if not queries:
            return None
        values = np.array([np.interp(queries, [q for q, _ in points], [v for _, v in points])
                           for points in series])
    else:
        queries = grids[0]
        values = np.array([[value for _, value in points] for points in series])
    std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(queries))
    return Curve(queries=list(map(float, queries)), mean=values.mean(axis=0).tolist(), std=std.tolist(),
                 runs=len(series), interpolated=interpolated)
