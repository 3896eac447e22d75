"""SEAT-style stateful detection: count an account's near-duplicate query pairs.

Zhang, Chen, Wang, Hu, Jones (2021), "SEAT: Similarity Encoder by Adversarial
Training for Detecting Model Extraction Attack Queries", ACM AISec. Extraction
queries crafted from each other (adversarial examples, a generator that keeps
sampling the same region) come in pairs that an encoder ``E`` maps close
together; honest queries rarely do. For each account the detector keeps the
encodings of its queries and counts the *similar pairs*::

    pairs = #{(i, j), i < j : ||E(x_i) - E(x_j)||_2 < δ}

and flags the account once ``pairs >= N`` (Sec. 4: an account is suspicious when
its number of similar pairs exceeds a threshold).

Departure, a named setting (``encoder``): SEAT trains ``E`` adversarially for the
task; stealsim offers ``pixels`` (the image itself, distance as root-mean-square
pixel difference, so ``δ`` is in pixel units) or the penultimate features of any
checkpoint the defender names (L2-normalised, so ``δ`` is in [0, 2]). The
account's most recent ``history`` encodings are kept (SEAT keeps all).

Usage::

    detector = SeatDetector(threshold=0.05, max_pairs=50, history=10_000)
    verdict = detector.observe(encodings)        # [N, E] float32
    verdict.flagged, verdict.pairs
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

__all__ = ["SeatDetector", "SeatVerdict", "similar_pairs"]


@dataclass(frozen=True)
class SeatVerdict:
    flagged: bool
    pairs: int
    """Similar pairs counted so far."""
    queries: int
    """Queries seen so far."""


def similar_pairs(new: np.ndarray, old: np.ndarray, threshold: float) -> int:
    """Pairs closer than ``threshold`` among ``new`` and between ``new`` and ``old`` (``[*, E]``)."""
    count = 0
    if len(old):
        count += int(np.sum(_squared_distances(new, old) < threshold * threshold))
    if len(new) > 1:
        within = _squared_distances(new, new)
        count += int(np.sum(np.triu(within < threshold * threshold, k=1)))
    return count


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    squared = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return np.maximum(squared, 0.0)


class SeatDetector:
    """One account's encodings and similar-pair count; feed it every query in order."""

    def __init__(self, threshold: float, max_pairs: int, history: int = 10_000) -> None:
        if threshold <= 0 or max_pairs < 1 or history < 1:
            raise ValueError(f"bad SEAT settings: {threshold=} {max_pairs=} {history=}")
        self.threshold = threshold
        self.max_pairs = max_pairs
        self.history = history
        self._encodings = np.empty((0, 0), np.float32)
        self._pairs = 0
        self._queries = 0
        self._flagged = False

    @property
    def flagged(self) -> bool:
        return self._flagged

    def observe(self, encodings: np.ndarray, labels: np.ndarray | None = None) -> SeatVerdict:
        """Count the pairs the new ``encodings`` ``[N, E]`` make, then remember them."""
        new = np.ascontiguousarray(encodings.reshape(len(encodings), -1), dtype=np.float32)
        old = self._encodings if self._encodings.shape[1:] == new.shape[1:] else new[:0]
        self._pairs += similar_pairs(new, old, self.threshold)
        self._encodings = np.concatenate([old, new])[-self.history :]
        self._queries += len(new)
        # Once flagged, stays flagged, like PRADA.
        self._flagged = self._flagged or self._pairs >= self.max_pairs
        return SeatVerdict(self._flagged, self._pairs, self._queries)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, encodings=self._encodings,
                 state=np.asarray([self._pairs, self._queries, int(self._flagged)], np.int64))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, threshold: float, max_pairs: int, history: int = 10_000) -> SeatDetector:
        detector = cls(threshold, max_pairs, history)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            detector._encodings = arrays["encodings"].astype(np.float32)
            pairs, queries, flagged = arrays["state"].tolist()
        detector._pairs, detector._queries, detector._flagged = int(pairs), int(queries), bool(flagged)
        return detector
