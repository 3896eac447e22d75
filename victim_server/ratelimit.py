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

__all__ = ["AuthFailureThrottle", "RateLimiter", "parse_rate"]


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

    async def hit_raw(self, item: limits.RateLimitItem, *identifiers: str) -> bool:
        """One hit of ``item`` for ``identifiers``; False when over the limit (StorageError passes)."""
        return await self._limiter.hit(item, *identifiers)

    async def window_stats(self, item: limits.RateLimitItem, *identifiers: str) -> limits.WindowStats:
        return await self._limiter.get_window_stats(item, *identifiers)

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


class AuthFailureThrottle:
    """Wrong keys per client address: past ``rate`` of them, every key it presents gets 429.

    The failures are counted in the limiter's storage (shared by the API processes with
    Redis); the addresses over the limit are remembered in the process until their window
    ends, so checking a request costs a dictionary look-up, not a storage round trip. A
    process refuses an address once a failure it sees tips the shared count over.
    """

    def __init__(self, limiter: RateLimiter, rate: str | None) -> None:
        self._limiter = limiter
        self._item = parse_rate(rate) if rate else None
        self._blocked: dict[str, float] = {}  # address -> end of its window (time.time())

    def check(self, address: str) -> None:
        """Raise RateLimitedError while ``address`` is over the limit."""
        until = self._blocked.get(address)
        if until is None:
            return
        if until <= time.time():
            del self._blocked[address]
            return
        self._refuse(until)

    async def failed(self, address: str) -> None:
        """Count a wrong key from ``address``; raise RateLimitedError if that tips it over."""
        if self._item is None:
            return
        try:
            allowed = await self._limiter.hit_raw(self._item, address, "auth-failures")
            if allowed:
                return
            stats = await self._limiter.window_stats(self._item, address, "auth-failures")
        except StorageError as exc:
            raise UnavailableError(f"rate limits: storage unavailable ({exc})", retry_after=1) from exc
        now = time.time()
        for expired in [a for a, until in self._blocked.items() if until <= now]:
            del self._blocked[expired]
        self._blocked[address] = stats.reset_time
        self._refuse(stats.reset_time)

    def _refuse(self, until: float) -> None:
        assert self._item is not None
        retry_after = max(1, math.ceil(until - time.time()))
        raise RateLimitedError(
            f"too many wrong keys from this address ({self._item.amount} per {_window(self._item)}); "
            f"retry in {retry_after} s",
            retry_after=retry_after, headers={"Retry-After": str(retry_after)}, kind="auth_failures",
        )
