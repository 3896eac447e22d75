"""The audit log as a Redis Stream (``PREFIX:audit``): it survives API restarts and is
shared by every API process; entries are never trimmed by the service."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson
import redis.asyncio as aioredis

from victim_server.audit import AuditRecord
from victim_server.redis_keys import RedisNames, redis_errors

__all__ = ["RedisAuditLog"]

_EXPORT_PAGE = 1000


class RedisAuditLog:
    """:class:`~victim_server.audit.AuditLog` appending one stream entry (a JSON record) per request."""

    def __init__(self, client: aioredis.Redis, names: RedisNames) -> None:
        self._redis = client
        self._stream = names.audit

    async def append(self, record: AuditRecord) -> None:
        with redis_errors("writing the audit log"):
            await self._redis.xadd(self._stream, {"record": orjson.dumps(asdict(record))})

    async def export(self) -> bytes:
        lines: list[bytes] = []
        start = "-"
        with redis_errors("reading the audit log"):
            while True:
                page: Any = await self._redis.xrange(self._stream, min=start, max="+", count=_EXPORT_PAGE)
                lines.extend(fields[b"record"] + b"\n" for _, fields in page)
                if len(page) < _EXPORT_PAGE:
                    break
                start = "(" + page[-1][0].decode()
        return b"".join(lines)

    async def close(self) -> None:
        """Nothing to flush: every record is in Redis when append returns."""
