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

This combination (an MSP threshold turned into a per-account sequential binomial
test) is stealsim's own, not a published detector; it differs from PRADA (which
tests the distribution of distances between an account's queries) and from SEAT
(which counts near-duplicate pairs).

Usage::

    detector = OodRateDetector(tau=0.57, honest_rate=0.01, alpha=1e-6, min_queries=64)
    verdict = detector.observe(probabilities)   # [N, K] of the served model
    verdict.flagged, verdict.ood, verdict.queries, verdict.p_value
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

__all__ = ["OodRateDetector", "OodRateVerdict", "ood_p_value"]


@dataclass(frozen=True)
class OodRateVerdict:
    flagged: bool
    ood: int
    """Queries so far whose MSP fell under ``tau``."""
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
    """One account's OOD count; feed it the served model's probabilities for every query, in order."""

    def __init__(self, tau: float, honest_rate: float, alpha: float, min_queries: int) -> None:
        if not 0 < tau <= 1 or not 0 < honest_rate < 1 or not 0 < alpha < 1 or min_queries < 1:
            raise ValueError(f"bad OOD-rate settings: {tau=} {honest_rate=} {alpha=} {min_queries=}")
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

    def observe(self, probabilities: np.ndarray, labels: np.ndarray | None = None) -> OodRateVerdict:
        """Count the new queries (``[N, K]`` probabilities) under ``tau``, then test the account."""
        msp = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1).max(axis=1)
        self._ood += int(np.sum(msp < self.tau))
        self._queries += len(msp)
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
                   min_queries: int) -> OodRateDetector:
        detector = cls(tau, honest_rate, alpha, min_queries)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            ood, queries, flagged = arrays["state"].tolist()
        detector._ood, detector._queries, detector._flagged = int(ood), int(queries), bool(flagged)
        return detector
