"""The record of watermarked answers (DAWN), per key and model: in this process or in Redis.

Each served batch's marked rows are appended as one chunk (a
:class:`defense.watermark.WatermarkRecord` in ``.npz`` bytes); :meth:`read`
returns everything one key got from one model, for ``stealsim verify-watermark``.
In Redis the chunks are a list under ``PREFIX:watermark:KEY:MODEL``, shared by
every API process and kept across restarts.
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import redis.asyncio as aioredis

from defense.watermark import WatermarkRecord
from victim_server.redis_keys import RedisNames, redis_errors

__all__ = ["MemoryWatermarkLedger", "RedisWatermarkLedger", "WatermarkLedger"]


@runtime_checkable
class WatermarkLedger(Protocol):
    async def append(self, key_id: str, model: str, record: WatermarkRecord) -> None: ...

    async def read(self, key_id: str, model: str) -> list[WatermarkRecord]: ...


class MemoryWatermarkLedger:
    def __init__(self) -> None:
        self._chunks: dict[tuple[str, str], list[WatermarkRecord]] = {}

    async def append(self, key_id: str, model: str, record: WatermarkRecord) -> None:
        self._chunks.setdefault((key_id, model), []).append(record)

    async def read(self, key_id: str, model: str) -> list[WatermarkRecord]:
        return list(self._chunks.get((key_id, model), []))


class RedisWatermarkLedger:
    def __init__(self, client: aioredis.Redis, names: RedisNames) -> None:
        self._redis = client
        self._names = names

    async def append(self, key_id: str, model: str, record: WatermarkRecord) -> None:
        with redis_errors("recording the watermark"):
            await self._redis.rpush(self._names.watermark(key_id, model), record.to_bytes())

    async def read(self, key_id: str, model: str) -> list[WatermarkRecord]:
        with redis_errors("reading the watermark record"):
            # the service's clients do not decode responses: list items are bytes
            chunks = cast(list[bytes], await self._redis.lrange(self._names.watermark(key_id, model), 0, -1))
        return [WatermarkRecord.from_bytes(chunk) for chunk in chunks]
