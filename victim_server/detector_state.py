"""Where the query detectors (PRADA, SEAT, OOD rate; pooled OOD) keep their state: this process, or Redis.

:class:`DetectorStates` feeds one key's queries to its detector of one kind for
one model and says whether the key was flagged before. A detector is anything
with ``flagged``, ``observe(inputs, labels) -> verdict`` and ``to_bytes()``
(:class:`defense.steps.Detector`); the policy step that turns it on
(:class:`defense.steps.DetectorStep`) knows how to make a new one and how to
load one from bytes. With several API processes the state must
be shared and updated one request at a time: :class:`RedisDetectorStates` holds
it in ``PREFIX:KIND:KEY:MODEL`` and updates it under a Redis lock of that name,
so it also survives an API restart.

A pooled detector (:class:`defense.steps.PooledDetectorStep`, ``pooled_ood``) has
one state per (step, model) over every key's requests: :meth:`DetectorStates.observe_pooled`
feeds it one request with the request's key; Redis keeps it in
``PREFIX:KIND:_pool:MODEL`` (``_pool`` is no key id: those start with ``key_``),
updated under that name's lock.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import LockError

from defense.steps import Detector as StatefulDetector
from defense.steps import PooledDetector
from stealsim.errors import UnavailableError
from victim_server.redis_keys import RedisNames, redis_errors

__all__ = [
    "POOL", "DetectorFactory", "DetectorStates", "MemoryDetectorStates", "PooledDetectorFactory",
    "RedisDetectorStates", "StatefulDetector",
]

POOL = "_pool"
"""Where a pooled detector's state stands in for a key id in its Redis name."""


class DetectorFactory(Protocol):
    """What a detector's policy step offers: a fresh detector, or one restored from bytes."""

    @property
    def name(self) -> str: ...

    def new_detector(self) -> StatefulDetector: ...

    def load_detector(self, data: bytes) -> StatefulDetector: ...


class PooledDetectorFactory(Protocol):
    """What a pooled detector's policy step offers (:class:`defense.steps.PooledDetectorStep`)."""

    @property
    def name(self) -> str: ...

    def new_detector(self) -> PooledDetector: ...

    def load_detector(self, data: bytes) -> PooledDetector: ...


@runtime_checkable
class DetectorStates(Protocol):
    async def observe(
        self, factory: DetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, Any]:
        """Feed the queries; returns ``(flagged before these, verdict after)``."""

    async def observe_pooled(
        self, factory: PooledDetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> Any:
        """Feed one request of ``key_id`` to the model's pooled detector; returns its verdict."""


class MemoryDetectorStates:
    """Detectors in this process (``observe`` runs without awaiting: atomic in asyncio)."""

    def __init__(self) -> None:
        self._detectors: dict[tuple[str, str, str], StatefulDetector] = {}
        self._pooled: dict[tuple[str, str], PooledDetector] = {}

    async def observe(
        self, factory: DetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> tuple[bool, Any]:
        slot = (factory.name, key_id, model)
        detector = self._detectors.get(slot)
        if detector is None:
            detector = self._detectors[slot] = factory.new_detector()
        already = detector.flagged
        return already, detector.observe(inputs, labels)

    async def observe_pooled(
        self, factory: PooledDetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> Any:
        slot = (factory.name, model)
        detector = self._pooled.get(slot)
        if detector is None:
            detector = self._pooled[slot] = factory.new_detector()
        return detector.observe(inputs, labels, key_id=key_id)


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

    async def observe_pooled(
        self, factory: PooledDetectorFactory, key_id: str, model: str, inputs: np.ndarray, labels: np.ndarray,
    ) -> Any:
        name = self._names.detector(factory.name, POOL, model)
        # Every request to the model takes this lock: poll every 2 ms, not redis-py's 100 ms.
        lock = self._redis.lock(name + ":lock", timeout=self._lock_timeout_s, sleep=0.002,
                                blocking_timeout=self._lock_timeout_s)
        with redis_errors(f"updating the pooled {factory.name} state"):
            try:
                async with lock:
                    data: bytes | None = await self._redis.get(name)  # type: ignore[assignment]
                    detector = factory.new_detector() if data is None else factory.load_detector(data)
                    verdict = detector.observe(inputs, labels, key_id=key_id)
                    await self._redis.set(name, detector.to_bytes())
            except LockError as exc:
                raise UnavailableError(f"pooled {factory.name} state of model {model!r} is busy: {exc}",
                                       retry_after=1) from exc
        return verdict
