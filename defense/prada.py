"""PRADA: detecting model-extraction query streams per client.

Juuti, Szyller, Marchal, Asokan (2019), "PRADA: Protecting against DNN Model
Stealing Attacks", IEEE EuroS&P, Algorithm 1. For each query ``x`` of a client,
with predicted class ``c``:

1. ``d_min`` = minimum L2 distance from ``x`` to the client's growing set ``G_c``
   of earlier queries of class ``c`` (the first query of a class only seeds ``G_c``);
   ``d_min`` joins the client's distance set ``D``.
2. If ``d_min > T_c``, ``x`` joins ``G_c``, ``d_min`` joins ``D_{G_c}`` and the class
   threshold becomes ``T_c = max(T_c, mean(D_{G_c}) - std(D_{G_c}))``.
3. Once ``|D| >= min_queries``: drop the outliers of ``D`` (beyond 3 standard
   deviations of its mean) and compute the Shapiro-Wilk statistic ``W``. Natural
   queries give near-normal distances; synthetic queries crafted from few seeds
   (small steps around earlier queries) do not. ``W < delta`` flags the client.

Usage::

    detector = PradaDetector(delta=0.95, min_queries=100)
    verdict = detector.observe(images_flat, predicted_labels)
    verdict.flagged, verdict.statistic
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

__all__ = ["PradaDetector", "PradaVerdict"]

_MAX_TESTED = 5000  # scipy's Shapiro-Wilk is exact up to 5000 samples; test the latest ones


@dataclass(frozen=True)
class PradaVerdict:
    """The detector's state after a batch of queries."""

    flagged: bool
    statistic: float | None
    """Latest Shapiro-Wilk W (None until ``min_queries`` distances were seen)."""
    distances: int


@dataclass
class _ClassSet:
    points: np.ndarray  # [M, D] float32, grown by doubling
    count: int = 0
    threshold: float = 0.0
    added_distances: list[float] = field(default_factory=list)

    def add(self, x: np.ndarray) -> None:
        if self.count == len(self.points):
            grown = np.empty((max(16, 2 * len(self.points)), self.points.shape[1]), np.float32)
            grown[: self.count] = self.points[: self.count]
            self.points = grown
        self.points[self.count] = x
        self.count += 1


class PradaDetector:
    """Per-client state of Algorithm 1 of Juuti et al. (2019); feed it every query in order."""

    def __init__(self, delta: float = 0.95, min_queries: int = 100) -> None:
        if not 0.0 < delta < 1.0 or min_queries < 3:
            raise ValueError(f"bad PRADA settings: {delta=} {min_queries=}")
        self.delta = delta
        self.min_queries = min_queries
        self._classes: dict[int, _ClassSet] = {}
        self._distances: list[float] = []
        self._flagged = False
        self._statistic: float | None = None

    @property
    def flagged(self) -> bool:
        return self._flagged

    def observe(self, images: np.ndarray, labels: np.ndarray) -> PradaVerdict:
        """Feed queries ``images`` (``[N, ...]``, any shape per image) with predicted ``labels``."""
        flat = np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)
        for x, label in zip(flat, labels.tolist(), strict=True):
            self._observe_one(x, int(label))
        if len(self._distances) >= self.min_queries:
            self._statistic = self._shapiro()
            # Once flagged, stays flagged: an attacker cannot wash a detection out with natural queries.
            self._flagged = self._flagged or self._statistic < self.delta
        return PradaVerdict(self._flagged, self._statistic, len(self._distances))

    def to_bytes(self) -> bytes:
        """The detector's whole state (an ``.npz`` archive, no pickle), for a shared store."""
        arrays: dict[str, np.ndarray] = {
            "distances": np.asarray(self._distances, np.float64),
            "state": np.asarray([float(self._flagged),
                                 np.nan if self._statistic is None else self._statistic]),
        }
        for label, group in self._classes.items():
            arrays[f"points_{label}"] = group.points[: group.count]
            arrays[f"added_{label}"] = np.asarray(group.added_distances, np.float64)
            arrays[f"threshold_{label}"] = np.asarray([group.threshold])
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, delta: float = 0.95, min_queries: int = 100) -> PradaDetector:
        """A detector with the state written by :meth:`to_bytes`."""
        detector = cls(delta, min_queries)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            detector._distances = arrays["distances"].tolist()
            flagged, statistic = arrays["state"].tolist()
            detector._flagged = bool(flagged)
            detector._statistic = None if np.isnan(statistic) else float(statistic)
            for name in arrays.files:
                if name.startswith("points_"):
                    label = int(name.removeprefix("points_"))
                    points = np.array(arrays[name], np.float32)
                    group = _ClassSet(points if len(points) else np.empty((16, 0), np.float32),
                                      count=len(points),
                                      threshold=float(arrays[f"threshold_{label}"][0]),
                                      added_distances=arrays[f"added_{label}"].tolist())
                    detector._classes[label] = group
        return detector

    def _observe_one(self, x: np.ndarray, label: int) -> None:
        group = self._classes.get(label)
        if group is None:
            group = _ClassSet(np.empty((16, x.shape[0]), np.float32))
            group.add(x)
            self._classes[label] = group
            return
        diffs = group.points[: group.count] - x
        d_min = float(np.sqrt(np.min(np.einsum("ij,ij->i", diffs, diffs))))
        self._distances.append(d_min)
        if d_min > group.threshold:
            group.add(x)
            group.added_distances.append(d_min)
            added = np.asarray(group.added_distances)
            group.threshold = max(group.threshold, float(added.mean() - added.std()))

    def _shapiro(self) -> float:
        d = np.asarray(self._distances[-_MAX_TESTED:])
        mean, std = d.mean(), d.std()
        kept = d[np.abs(d - mean) <= 3 * std] if std > 0 else d
        if len(kept) < 3 or np.ptp(kept) == 0:
            return 0.0  # identical distances: as far from normal as it gets
        return float(stats.shapiro(kept).statistic)
