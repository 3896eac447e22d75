"""Stateful detection by an account's rate of out-of-distribution queries.

Data-free thieves (Dual Student, DFME) and thieves with the wrong surrogate data
send images the victim was never trained on. One such image proves nothing: a
natural image is sometimes hard too. Many of them from one account are evidence.
The detector scores each query with the victim's maximum softmax probability
(MSP; Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017), the same score
adaptive misinformation uses (Kariyappa & Qureshi, CVPR 2020, Sec. 4.1), calls a
query out-of-distribution when ``MSP < tau``, and keeps per account the number
of queries ``n`` and of OOD ones ``m``. With ``tau`` chosen on the defender's
validation split so that a share ``r`` of natural images fall under it (the
``honest_rate``), an honest account's count is ``Binomial(n, r)``; the account is
flagged once the one-sided p-value::

    p = P(Binomial(n, r) >= m)

falls below ``alpha`` after at least ``min_queries`` queries. The test is
repeated after every request, so ``alpha`` is per look, not family-wise: keep it
small (1e-6) and measure false positives on honest traffic (``stealsim honest``).

``score="mahalanobis"`` counts a query as out-of-distribution when its
Mahalanobis distance in the victim's feature space (:mod:`defense.mahalanobis`,
Lee et al. 2018) exceeds ``tau`` instead: data-free generators learn to make the
victim confident (on mnist5k Dual Student's images have a median MSP of 0.998),
and the feature-space distance still tells them apart.

This combination (an OOD score turned into a per-account sequential binomial
test) is stealsim's own, not a published detector; it differs from PRADA (which
tests the distribution of distances between an account's queries) and from SEAT
(which counts near-duplicate pairs).

Usage::

    detector = OodRateDetector(tau=0.57, honest_rate=0.01, alpha=1e-6, min_queries=64)
    verdict = detector.observe(probabilities)   # [N, K] of the served model
    detector = OodRateDetector(tau=412.0, honest_rate=0.01, alpha=1e-6, min_queries=64, score="mahalanobis")
    verdict = detector.observe(distances)       # [N] Mahalanobis distances
    verdict.flagged, verdict.ood, verdict.queries, verdict.p_value
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binom

__all__ = ["OOD_SCORES", "OodRateDetector", "OodRateVerdict", "ood_p_value"]

OodScore = Literal["msp", "mahalanobis"]
OOD_SCORES: tuple[OodScore, ...] = ("msp", "mahalanobis")


@dataclass(frozen=True)
class OodRateVerdict:
    flagged: bool
    ood: int
    """Queries so far scored out-of-distribution (MSP under ``tau``, or distance over it)."""
    queries: int
    """Queries seen so far."""
    p_value: float
    """``P(Binomial(queries, honest_rate) >= ood)``: how unlikely the count is for an honest account."""


def ood_p_value(ood: int, queries: int, honest_rate: float) -> float:
    """One-sided binomial tail ``P(Binomial(queries, honest_rate) >= ood)`` (1 when ``ood`` is 0)."""
    if ood <= 0:
        return 1.0
    return float(binom.sf(ood - 1, queries, honest_rate))


class OodRateDetector:
    """One account's OOD count; feed it every query's score input, in order.

    ``score="msp"``: the served model's probabilities ``[N, K]`` (OOD: max under ``tau``);
    ``score="mahalanobis"``: distances ``[N]`` (OOD: over ``tau``).
    """

    def __init__(self, tau: float, honest_rate: float, alpha: float, min_queries: int,
                 score: OodScore = "msp") -> None:
        if (score not in OOD_SCORES or tau <= 0 or (score == "msp" and tau > 1) or not 0 < honest_rate < 1
                or not 0 < alpha < 1 or min_queries < 1):
            raise ValueError(f"bad OOD-rate settings: {score=} {tau=} {honest_rate=} {alpha=} {min_queries=}")
        self.score = score
        self.tau = tau
        self.honest_rate = honest_rate
        self.alpha = alpha
        self.min_queries = min_queries
        self._ood = 0
        self._queries = 0
        self._flagged = False

    @property
    def flagged(self) -> bool:
        return self._flagged

    def observe(self, values: np.ndarray, labels: np.ndarray | None = None) -> OodRateVerdict:
        """Count the new queries' OOD ones (see the class), then test the account."""
        values = np.asarray(values, dtype=np.float64)
        if self.score == "msp":
            ood = values.reshape(len(values), -1).max(axis=1) < self.tau
        else:
            ood = values.reshape(-1) > self.tau
        self._ood += int(np.sum(ood))
        self._queries += len(ood)
        p_value = ood_p_value(self._ood, self._queries, self.honest_rate)
        # Once flagged, stays flagged, like PRADA and SEAT.
        self._flagged = self._flagged or (self._queries >= self.min_queries and p_value < self.alpha)
        return OodRateVerdict(self._flagged, self._ood, self._queries, p_value)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False,
                 state=np.asarray([self._ood, self._queries, int(self._flagged)], np.int64))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, tau: float, honest_rate: float, alpha: float,
                   min_queries: int, score: OodScore = "msp") -> OodRateDetector:
        detector = cls(tau, honest_rate, alpha, min_queries, score)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            ood, queries, flagged = arrays["state"].tolist()
        detector._ood, detector._queries, detector._flagged = int(ood), int(queries), bool(flagged)
        return detector
