"""Pooled detection: the share of out-of-distribution queries in ALL the traffic to a model.

A per-key detector (:mod:`defense.ood_rate`, PRADA, SEAT) sees one account. A
Sybil thief spreads its queries over many accounts, each too small to test, and
none is flagged. This detector pools every key's queries to one model into a
sliding window of the last ``window`` queries (the oldest request leaves whole,
so no key is judged on the last few queries of a request), scores each one as
:mod:`defense.ood_rate` does (``msp``: the served model's maximum softmax
probability under ``tau``; ``mahalanobis``: the feature-space distance over
``tau``) and tests the pool's count ``m`` of OOD queries among its ``n``::

    pool alarm  <=>  n >= min_queries  and  P(Binomial(n, honest_rate) >= m) < alpha

While the alarm holds, every key with queries in the window, the request's own
included, is flagged when its queries there (``n_k``, of them ``m_k`` OOD) are
unlikely for an honest account::

    P(Binomial(n_k, honest_rate) >= m_k) < attribution_alpha

so the keys that send the OOD traffic are named and honest keys are not, although
none of them alone reached a per-key detector's ``min_queries``, and although a
Sybil account that sent one request before the alarm sends no other. The verdict
lists the keys a request's look flags first (``newly_flagged``); the server records
the flag on each (``StateStore.flag``), and a flagged key stays flagged after its
queries leave the window.

Testing the distribution of the pooled traffic over a sliding window is the idea
of the windowed distribution test of arXiv 2606.05725; the statistic here is
simpler, the OOD share with the binomial test of :mod:`defense.ood_rate`, and
the two-level test (a pool alarm, then each key's own test inside the window) is
stealsim's own combination, not a published detector. As with ``ood_rate``, the
tests repeat after every request: ``alpha`` is per look, so keep it small and
measure false positives on honest traffic.

Usage::

    detector = PooledOodDetector(tau=0.57, honest_rate=0.01, alpha=1e-6, min_queries=256,
                                 window=2048, attribution_alpha=1e-3)
    verdict = detector.observe(probabilities, key_id="key_ab12")   # [N, K] of the served model
    verdict.alarm, verdict.flagged, verdict.key_p_value, verdict.newly_flagged
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

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
    """Whether the request's key is flagged: under an alarm (now or since its queries entered
    the window) its own p-value was under ``attribution_alpha``."""
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
    newly_flagged: tuple[str, ...] = ()
    """Every key in the window this request's look flags for the first time (the request's own
    included): the server flags each of them."""


class PooledOodDetector:
    """The window of one model's traffic: each query's key, request and whether it was OOD, in order."""

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
        self._keys: list[str] = []  # the keys with queries in the window
        self._attributed = np.zeros(0, bool)  # per key: flagged while its queries are in the window
        self._index = np.zeros(0, np.int64)  # per query in the window: its key's position in _keys
        self._request = np.zeros(0, np.int64)  # per query: the number of its request
        self._ood = np.zeros(0, bool)  # per query: out-of-distribution
        self._requests = 0  # requests seen
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
        """Add one request of ``key_id`` to the window, test the pool, then (under alarm) every key in it.

        ``values``: the score's input (``msp``: probabilities ``[N, K]``; ``mahalanobis``:
        distances ``[N]``); ``labels`` are not used (the :class:`defense.steps.Detector` signature).
        """
        ood = ood_mask(values, self.score, self.tau)
        if key_id not in self._keys:
            self._keys.append(key_id)
            self._attributed = np.append(self._attributed, False)
        position = self._keys.index(key_id)
        self._index = np.concatenate([self._index, np.full(len(ood), position, np.int64)])
        self._request = np.concatenate([self._request, np.full(len(ood), self._requests, np.int64)])
        self._ood = np.concatenate([self._ood, ood])
        self._requests += 1
        self._trim()
        queries, count = len(self._ood), int(self._ood.sum())
        p_value = ood_p_value(count, queries, self.honest_rate)
        self._alarm = queries >= self.min_queries and p_value < self.alpha
        key_queries = np.bincount(self._index, minlength=len(self._keys))
        key_ood = np.bincount(self._index, weights=self._ood, minlength=len(self._keys)).astype(np.int64)
        newly: tuple[str, ...] = ()
        if self._alarm:  # every key in the window (not tested otherwise: no need)
            now = self._p_values(key_ood, key_queries) < self.attribution_alpha
            newly = tuple(self._keys[int(i)] for i in np.flatnonzero(now & ~self._attributed))
            self._attributed |= now
        if key_id in self._keys:
            mine = self._keys.index(key_id)
            flagged, mine_queries, mine_ood = bool(self._attributed[mine]), int(key_queries[mine]), int(key_ood[mine])
            mine_p = float(self._p_values(key_ood[mine:mine + 1], key_queries[mine:mine + 1])[0])
        else:  # an empty request of a key with nothing else in the window
            flagged, mine_queries, mine_ood, mine_p = False, 0, 0, 1.0
        return PooledOodVerdict(flagged, self._alarm, count, queries, p_value, mine_ood, mine_queries, mine_p, newly)

    def _p_values(self, ood: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """``P(Binomial(queries, honest_rate) >= ood)`` per key (1 where ``ood`` is 0)."""
        tail = binom.sf(np.maximum(ood - 1, 0), queries, self.honest_rate)
        return np.where(ood > 0, tail, 1.0)

    def _trim(self) -> None:
        """Keep the newest requests that fit ``window`` queries, each whole (the oldest leave whole,
        so no key is tested on the last few queries of a request); a request longer than the
        window keeps its last ``window``. Then forget the keys without queries left."""
        excess = len(self._ood) - self.window
        if excess > 0:
            starts = np.flatnonzero(np.diff(self._request) != 0) + 1  # where each later request begins
            whole = starts[starts >= excess]
            cut = int(whole[0]) if len(whole) else excess
            self._index, self._request, self._ood = self._index[cut:], self._request[cut:], self._ood[cut:]
        used, inverse = np.unique(self._index, return_inverse=True)
        if len(used) != len(self._keys):
            self._keys = [self._keys[int(i)] for i in used]
            self._attributed = self._attributed[used]
            self._index = inverse.astype(np.int64).reshape(-1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False,
                 keys=np.asarray(self._keys, dtype=str), attributed=self._attributed, index=self._index,
                 request=self._request, ood=self._ood,
                 state=np.asarray([self._requests, int(self._alarm)], np.int64))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, tau: float, honest_rate: float, alpha: float, min_queries: int,
                   window: int, attribution_alpha: float, score: OodScore = "msp") -> PooledOodDetector:
        """The detector saved by :meth:`to_bytes`, with these settings (a smaller ``window`` keeps the newest)."""
        detector = cls(tau, honest_rate, alpha, min_queries, window, attribution_alpha, score)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            detector._keys = [str(key) for key in arrays["keys"].tolist()]
            detector._attributed = arrays["attributed"].astype(bool)
            detector._index = arrays["index"].astype(np.int64)
            detector._request = arrays["request"].astype(np.int64)
            detector._ood = arrays["ood"].astype(bool)
            requests, alarm = arrays["state"].tolist()
        detector._requests, detector._alarm = int(requests), bool(alarm)
        detector._trim()
        return detector
