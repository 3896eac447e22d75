"""Per-key rate limits (requests and images per window) with the ``limits`` library.

The storage is a ``limits`` URI: ``async+memory://`` in one process,
``async+redis://host:6379`` when several API processes share the limits.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import limits
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from stealsim.errors import ConfigError, InvalidRequestError, RateLimitedError, UnavailableError

__all__ = ["RateLimiter", "parse_rate"]


@functools.lru_cache(maxsize=1024)
def parse_rate(text: str) -> limits.RateLimitItem:
    """``"20/second"`` -> a RateLimitItem; raises InvalidRequestError naming the bad value."""
    try:
        return limits.parse(text)
    except ValueError as exc:
        raise InvalidRequestError(
            f"invalid rate limit {text!r}: use the limits syntax, e.g. '20/second' or '5000/minute'"
        ) from exc


@dataclass(frozen=True)
class _Check:
    kind: str
    item: limits.RateLimitItem
    cost: int


class RateLimiter:
    """Fixed-window limits per key: one for requests, one for images."""

    def __init__(self, storage_uri: str = "async+memory://", **options: str | bool) -> None:
        """``options`` go to the storage (for Redis: ``implementation``, ``key_prefix``)."""
        try:
            storage = storage_from_string(storage_uri, wrap_exceptions=True, **options)
        except Exception as exc:
            raise ConfigError(f"rate-limit storage {storage_uri!r} cannot be used: {exc}") from exc
        self._limiter = FixedWindowRateLimiter(storage)

    async def hit(self, key_id: str, rate: str | None, image_rate: str | None, images: int) -> None:
        """Count one request of ``images`` images, or raise RateLimitedError."""
        try:
            await self._hit(key_id, rate, image_rate, images)
        except StorageError as exc:
            raise UnavailableError(f"rate limits: storage unavailable ({exc})", retry_after=1) from exc

    async def _hit(self, key_id: str, rate: str | None, image_rate: str | None, images: int) -> None:
        checks = [_Check("requests", parse_rate(rate), 1)] if rate else []
        if image_rate:
            checks.append(_Check("images", parse_rate(image_rate), images))
        # A fixed-window hit() counts even when it fails. For the request limit that is
        # harmless (the window is already full); the image limit is tested first so a
        # refused request does not eat the images it was refused.
        for check in checks:
            if check.cost > 1 and not await self._limiter.test(check.item, key_id, check.kind, cost=check.cost):
                await self._refuse(key_id, check)
            if not await self._limiter.hit(check.item, key_id, check.kind, cost=check.cost):
                await self._refuse(key_id, check)

    async def _refuse(self, key_id: str, check: _Check) -> None:
        stats = await self._limiter.get_window_stats(check.item, key_id, check.kind)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        headers = {
            "Retry-After": str(retry_after),
            "X-RateLimit-Limit": str(check.item.amount),
            "X-RateLimit-Remaining": str(stats.remaining),
            "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
        }
        raise RateLimitedError(
            f"rate limit of {check.item.amount} {check.kind} per {_window(check.item)} reached; "
            f"retry in {retry_after} s",
            retry_after=retry_after, headers=headers, limit=str(check.item), kind=check.kind,
        )

    async def describe(self, key_id: str, rate: str | None, image_rate: str | None) -> list[dict[str, Any]]:
        """The key's limits with what remains of the current windows (for /v1/usage)."""
        try:
            return await self._describe(key_id, rate, image_rate)
        except StorageError as exc:
            raise UnavailableError(f"rate limits: storage unavailable ({exc})", retry_after=1) from exc

    async def _describe(self, key_id: str, rate: str | None, image_rate: str | None) -> list[dict[str, Any]]:
        described: list[dict[str, Any]] = []
        for kind, text in (("requests", rate), ("images", image_rate)):
            if not text:
                continue
            item = parse_rate(text)
            stats = await self._limiter.get_window_stats(item, key_id, kind)
            described.append({
                "kind": kind, "limit": text, "amount": item.amount,
                "window_seconds": item.get_expiry(), "remaining": stats.remaining,
                "reset": stats.reset_time,
            })
        return described


def _window(item: limits.RateLimitItem) -> str:
    seconds = item.get_expiry()
    return f"{seconds} s" if seconds != 1 else "second"
