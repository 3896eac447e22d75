"""Pooled detection: the share of out-of-distribution queries in ALL the traffic to a model.

A per-key detector (:mod:`defense.ood_rate`, PRADA, SEAT) sees one account. A
Sybil thief spreads its queries over many accounts, each too small to test, and
none is flagged. This detector pools every key's queries to one model into a
sliding window of the last ``window`` queries, scores each one as
:mod:`defense.ood_rate` does (``msp``: the served model's maximum softmax
probability under ``tau``; ``mahalanobis``: the feature-space distance over
``tau``) and tests the pool's count ``m`` of OOD queries among its ``n``::

    pool alarm  <=>  n >= min_queries  and  P(Binomial(n, honest_rate) >= m) < alpha

While the alarm holds, the key of each request is flagged when its own queries in
the window (``n_k``, of them ``m_k`` OOD) are unlikely for an honest account::

    P(Binomial(n_k, honest_rate) >= m_k) < attribution_alpha

so the keys that send the OOD traffic are named and honest keys are not, although
none of them alone reached a per-key detector's ``min_queries``. The server records
the flag on the key (``StateStore.flag``); a flagged key stays flagged after its
queries leave the window.

Testing the distribution of the pooled traffic over a sliding window is the idea
of the windowed distribution test of arXiv 2606.05725; the statistic here is
simpler, the OOD share with the binomial test of :mod:`defense.ood_rate`, and
the two-level test (pool alarm, then per-key attribution inside the window) is
stealsim's own combination, not a published detector. As with ``ood_rate``, the
tests repeat after every request: ``alpha`` is per look, so keep it small and
measure false positives on honest traffic.

Usage::

    detector = PooledOodDetector(tau=0.57, honest_rate=0.01, alpha=1e-6, min_queries=256,
                                 window=2048, attribution_alpha=1e-3)
    verdict = detector.observe(probabilities, key_id="key_ab12")   # [N, K] of the served model
    verdict.alarm, verdict.flagged, verdict.key_p_value
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from defense.ood_rate import OOD_SCORES, OodScore, ood_p_value

__all__ = ["PooledOodDetector", "PooledOodVerdict", "ood_mask"]


def ood_mask(values: np.ndarray, score: OodScore, tau: float) -> np.ndarray:
    """Which queries are out-of-distribution: ``msp`` rows ``[N, K]`` with max under ``tau``,
    ``mahalanobis`` distances ``[N]`` over it (as :class:`defense.ood_rate.OodRateDetector`)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return np.zeros(0, bool)
    if score == "msp":
        return np.asarray(values.reshape(len(values), -1).max(axis=1) < tau)
    return np.asarray(values.reshape(-1) > tau)


@dataclass(frozen=True)
class PooledOodVerdict:
    flagged: bool
    """Whether this request flags its key: the alarm holds and the key's own p-value is under
    ``attribution_alpha``. (Whether it was flagged before is the store's record.)"""
    alarm: bool
    """Whether the pool's test fires on the window after this request."""
    ood: int
    """OOD queries in the window."""
    queries: int
    """Queries in the window (at most ``window``)."""
    p_value: float
    """``P(Binomial(queries, honest_rate) >= ood)`` of the pool."""
    key_ood: int
    key_queries: int
    key_p_value: float
    """The same three for the request's key's queries in the window."""


class PooledOodDetector:
    """The window of one model's traffic: each query's key and whether it was OOD, in order."""

    def __init__(self, tau: float, honest_rate: float, alpha: float, min_queries: int, window: int,
                 attribution_alpha: float, score: OodScore = "msp") -> None:
        if (score not in OOD_SCORES or tau <= 0 or (score == "msp" and tau > 1) or not 0 < honest_rate < 1
                or not 0 < alpha < 1 or not 0 < attribution_alpha < 1 or window < 1
                or not 1 <= min_queries <= window):
            raise ValueError(f"bad pooled-OOD settings: {score=} {tau=} {honest_rate=} {alpha=} "
                             f"{min_queries=} {window=} {attribution_alpha=}")
        self.score = score
        self.tau = tau
        self.honest_rate = honest_rate
        self.alpha = alpha
        self.min_queries = min_queries
        self.window = window
        self.attribution_alpha = attribution_alpha
        self._keys: list[str] = []  # the key ids the window's queries index
        self._index = np.zeros(0, np.int64)  # per query in the window: its key's position in _keys
        self._ood = np.zeros(0, bool)  # per query in the window: out-of-distribution
        self._alarm = False

    @property
    def flagged(self) -> bool:
        """Whether the pool's alarm held after the latest request."""
        return self._alarm

    @property
    def queries(self) -> int:
        """Queries in the window now."""
        return len(self._ood)

    @property
    def window_keys(self) -> tuple[str, ...]:
        """The keys with queries in the window now (the others are forgotten)."""
        return tuple(self._keys)

    def observe(self, values: np.ndarray, labels: np.ndarray | None = None, key_id: str = "") -> PooledOodVerdict:
        """Add one request of ``key_id`` to the window, test the pool, then (under alarm) the key.

        ``values``: the score's input (``msp``: probabilities ``[N, K]``; ``mahalanobis``:
        distances ``[N]``); ``labels`` are not used (the :class:`defense.steps.Detector` signature).
        """
        ood = ood_mask(values, self.score, self.tau)
        if key_id not in self._keys:
            self._keys.append(key_id)
        position = self._keys.index(key_id)
        self._index = np.concatenate([self._index, np.full(len(ood), position, np.int64)])[-self.window:]
        self._ood = np.concatenate([self._ood, ood])[-self.window:]
        self._compact()
        position = self._keys.index(key_id) if key_id in self._keys else -1
        queries, count = len(self._ood), int(self._ood.sum())
        p_value = ood_p_value(count, queries, self.honest_rate)
        self._alarm = queries >= self.min_queries and p_value < self.alpha
        mine = self._index == position
        key_queries, key_ood = int(mine.sum()), int(self._ood[mine].sum())
        key_p_value = ood_p_value(key_ood, key_queries, self.honest_rate) if key_queries else 1.0
        flagged = self._alarm and key_p_value < self.attribution_alpha
        return PooledOodVerdict(flagged, self._alarm, count, queries, p_value, key_ood, key_queries, key_p_value)

    def _compact(self) -> None:
        """Drop the key ids no query in the window belongs to any more."""
        used, inverse = np.unique(self._index, return_inverse=True)
        if len(used) != len(self._keys):
            self._keys = [self._keys[int(i)] for i in used]
            self._index = inverse.astype(np.int64).reshape(-1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False,
                 keys=np.asarray(self._keys, dtype=str), index=self._index, ood=self._ood,
                 alarm=np.asarray([int(self._alarm)], np.int64))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, tau: float, honest_rate: float, alpha: float, min_queries: int,
                   window: int, attribution_alpha: float, score: OodScore = "msp") -> PooledOodDetector:
        """The detector saved by :meth:`to_bytes`, with these settings (a smaller ``window`` keeps the newest)."""
        detector = cls(tau, honest_rate, alpha, min_queries, window, attribution_alpha, score)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            detector._keys = [str(key) for key in arrays["keys"].tolist()]
            detector._index = arrays["index"].astype(np.int64)[-window:]
            detector._ood = arrays["ood"].astype(bool)[-window:]
            detector._alarm = bool(arrays["alarm"][0])
        detector._compact()
        return detector
