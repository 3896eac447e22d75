"""Where the per-key query detectors (PRADA, SEAT, OOD rate) keep their state: this process, or Redis.

:class:`DetectorStates` feeds one key's queries to its detector of one kind for
one model and says whether the key was flagged before. A detector is anything
with ``flagged``, ``observe(inputs, labels) -> verdict`` and ``to_bytes()``
(:class:`defense.steps.Detector`); the policy step that turns it on
(:class:`defense.steps.DetectorStep`) knows how to make a new one and how to
load one from bytes. With several API processes the state must
be shared and updated one request at a time: :class:`RedisDetectorStates` holds
it in ``PREFIX:KIND:KEY:MODEL`` and updates it under a Redis lock of that name,
so it also survives an API restart.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import LockError

from defense.steps import Detector as StatefulDetector
from stealsim.errors import UnavailableError
from victim_server.redis_keys import RedisNames, redis_errors

__all__ = ["DetectorFactory", "DetectorStates", "MemoryDetectorStates", "RedisDetectorStates", "StatefulDetector"]


class DetectorFactory(Protocol):
    """What a detector's policy step offers: a fresh detector, or one restored from bytes."""

    @property
    def name(self) -> str: ...

    def new_detector(self) -> StatefulDetector: ...

    def load_detector(self, data: bytes) -> StatefulDetector: ...


@runtime_checkable
class DetectorStates(Protocol):
    async def observe(
        self, factory: DetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, Any]:
        """Feed the queries; returns ``(flagged before these, verdict after)``."""


class MemoryDetectorStates:
    """Detectors in this process (``observe`` runs without awaiting: atomic in asyncio)."""

    def __init__(self) -> None:
        self._detectors: dict[tuple[str, str, str], StatefulDetector] = {}

    async def observe(
        self, factory: DetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, Any]:
        slot = (factory.name, key_id, model)
        detector = self._detectors.get(slot)
        if detector is None:
            detector = self._detectors[slot] = factory.new_detector()
        already = detector.flagged
        return already, detector.observe(inputs, labels)


class RedisDetectorStates:
    """Detector state in Redis, read-modified-written under a per-(kind, key, model) lock."""

    def __init__(self, client: aioredis.Redis, names: RedisNames, lock_timeout_s: float = 10.0) -> None:
        self._redis = client
        self._names = names
        self._lock_timeout_s = lock_timeout_s

    async def observe(
        self, factory: DetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, Any]:
        name = self._names.detector(factory.name, key_id, model)
        lock = self._redis.lock(name + ":lock", timeout=self._lock_timeout_s,
                                blocking_timeout=self._lock_timeout_s)
        with redis_errors(f"updating the {factory.name} state"):
            try:
                async with lock:
                    data: bytes | None = await self._redis.get(name)  # type: ignore[assignment]
                    detector = factory.new_detector() if data is None else factory.load_detector(data)
                    already = detector.flagged
                    verdict = detector.observe(inputs, labels)
                    await self._redis.set(name, detector.to_bytes())
            except LockError as exc:
                raise UnavailableError(f"{factory.name} state of key {key_id} is busy: {exc}",
                                       retry_after=1) from exc
        return already, verdict
