"""Where PRADA detectors keep their per-key state: this process, or Redis (shared).

:class:`PradaStates` feeds one key's queries to its detector for one model and
says whether the key was flagged before. With several API processes the
detector's state must be shared and updated one request at a time:
:class:`RedisPradaStates` holds it in ``PREFIX:prada:KEY:MODEL`` and updates it
under a Redis lock of that key.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import LockError

from defense.prada import PradaDetector, PradaVerdict
from stealsim.errors import UnavailableError
from victim_server.redis_keys import RedisNames, redis_errors

__all__ = ["MemoryPradaStates", "PradaStates", "RedisPradaStates"]


@runtime_checkable
class PradaStates(Protocol):
    async def observe(
        self, key_id: str, model: str, delta: float, min_queries: int,
        images: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, PradaVerdict]:
        """Feed the queries; returns ``(flagged before these, verdict after)``."""


class MemoryPradaStates:
    """Detectors in this process (``observe`` runs without awaiting: atomic in asyncio)."""

    def __init__(self) -> None:
        self._detectors: dict[tuple[str, str], PradaDetector] = {}

    async def observe(
        self, key_id: str, model: str, delta: float, min_queries: int,
        images: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, PradaVerdict]:
        detector = self._detectors.get((key_id, model))
        if detector is None:
            detector = self._detectors[(key_id, model)] = PradaDetector(delta, min_queries)
        already = detector.flagged
        return already, detector.observe(images, labels)


class RedisPradaStates:
    """Detector state in Redis, read-modified-written under a per-(key, model) lock."""

    def __init__(self, client: aioredis.Redis, names: RedisNames, lock_timeout_s: float = 10.0) -> None:
        self._redis = client
        self._names = names
        self._lock_timeout_s = lock_timeout_s

    async def observe(
        self, key_id: str, model: str, delta: float, min_queries: int,
        images: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, PradaVerdict]:
        name = self._names.prada(key_id, model)
        lock = self._redis.lock(name + ":lock", timeout=self._lock_timeout_s,
                                blocking_timeout=self._lock_timeout_s)
        with redis_errors("updating the PRADA state"):
            try:
                async with lock:
                    data: bytes | None = await self._redis.get(name)  # type: ignore[assignment]
                    detector = (PradaDetector(delta, min_queries) if data is None
                                else PradaDetector.from_bytes(data, delta, min_queries))
                    already = detector.flagged
                    verdict = detector.observe(images, labels)
                    await self._redis.set(name, detector.to_bytes())
            except LockError as exc:
                raise UnavailableError(f"PRADA state of key {key_id} is busy: {exc}", retry_after=1) from exc
        return already, verdict
