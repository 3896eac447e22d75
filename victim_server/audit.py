"""Audit log: one JSON line per served request (key, model, images, input digest, policy, flags).

:class:`AuditLog` is the interface (the Redis backend appends to a stream that
survives restarts); :class:`JsonlAuditLog` appends to a JSONL file, or keeps the
lines in memory when no file is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import orjson

__all__ = ["AuditLog", "AuditRecord", "JsonlAuditLog", "input_digest"]

logger = logging.getLogger(__name__)


def input_digest(images: np.ndarray) -> str:
    """SHA-256 of the request's pixels (float32, row-major), as hex."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).data).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    key_id: str
    model: str
    images: int
    input_sha256: str
    policy: list[dict[str, Any]]
    flags: list[str]
    request_id: str | None = None
    time: float = field(default_factory=time.time)


@runtime_checkable
class AuditLog(Protocol):
    async def append(self, record: AuditRecord) -> None: ...

    async def export(self) -> bytes:
        """Every record so far, as JSON lines."""

    async def close(self) -> None: ...


class JsonlAuditLog:
    """Appends JSON lines to ``path`` (flushed per record), or to memory when ``path`` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lines: list[bytes] = []
        self._handle: IO[bytes] | None = None
        self._lock = asyncio.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("ab")

    async def append(self, record: AuditRecord) -> None:
        line = orjson.dumps(asdict(record)) + b"\n"
        async with self._lock:
            if self._handle is None:
                self._lines.append(line)
            else:
                self._handle.write(line)
                self._handle.flush()

    async def export(self) -> bytes:
        async with self._lock:
            if self._path is None:
                return b"".join(self._lines)
            return await asyncio.to_thread(self._path.read_bytes)

    async def close(self) -> None:
        async with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
