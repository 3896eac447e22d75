"""The state store: API keys, budgets and usage, flags.

:class:`StateStore` is what the service needs; :class:`MemoryStateStore` keeps
everything in this process behind one asyncio lock (the Redis store of the
scale-out issue implements the same methods with one Lua script per operation).

The budget is charged with :meth:`StateStore.reserve`, one atomic
check-and-charge: however many requests race, the images charged never exceed
the budget, and a request that does not fit is refused whole. Images that are
not served afterwards (failed inference, caller gone) are given back with
:meth:`StateStore.refund`. Secrets are stored only as SHA-256 digests.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from stealsim.errors import BudgetExceededError, KeyNotFoundError

__all__ = ["KeyRecord", "MemoryStateStore", "StateStore", "hash_secret", "new_secret"]


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One API key as the store knows it (never the secret itself)."""

    key_id: str
    name: str
    budget: int
    used: int = 0
    rate: str | None = None
    image_rate: str | None = None
    models: tuple[str, ...] | None = None
    """Models the key may query; None: all."""
    policy: tuple[dict[str, Any], ...] | None = None
    """Output policy overriding the model's; None: the model's."""
    flags: tuple[str, ...] = ()
    blocked: bool = False
    revoked: bool = False
    created: float = field(default_factory=time.time)

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.used)

    def public(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id, "name": self.name, "budget": self.budget, "used": self.used,
            "remaining": self.remaining, "rate": self.rate, "image_rate": self.image_rate,
            "models": None if self.models is None else list(self.models),
            "policy": None if self.policy is None else list(self.policy),
            "flags": list(self.flags), "blocked": self.blocked, "revoked": self.revoked,
            "created": self.created,
        }


@runtime_checkable
class StateStore(Protocol):
    """Keys, budgets and flags; every method is atomic with respect to the others."""

    async def ping(self) -> None:
        """Raises UnavailableError when the store cannot be reached."""

    async def create_key(self, record: KeyRecord, secret: str) -> KeyRecord: ...

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live (not revoked) key with this secret, or None."""

    async def get(self, key_id: str) -> KeyRecord:
        """Raises KeyNotFoundError."""

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> KeyRecord: ...

    async def top_up(self, key_id: str, images: int) -> KeyRecord: ...

    async def reserve(self, key_id: str, images: int) -> int:
        """Charge ``images`` if they fit the remaining budget; return what remains after.

        Raises BudgetExceededError (with ``remaining``) and charges nothing otherwise.
        """

    async def refund(self, key_id: str, images: int) -> None: ...

    async def flag(self, key_id: str, flag: str, block: bool = False) -> KeyRecord: ...


class MemoryStateStore:
    """:class:`StateStore` in this process's memory; lost on restart."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._keys: dict[str, KeyRecord] = {}
        self._by_digest: dict[str, str] = {}

    async def ping(self) -> None:
        """Always reachable."""

    async def create_key(self, record: KeyRecord, secret: str) -> KeyRecord:
        digest = hash_secret(secret)
        async with self._lock:
            if record.key_id in self._keys or digest in self._by_digest:
                raise ValueError(f"key {record.key_id} or its secret already exists")
            self._keys[record.key_id] = record
            self._by_digest[digest] = record.key_id
        return record

    async def authenticate(self, secret: str) -> KeyRecord | None:
        key_id = self._by_digest.get(hash_secret(secret))
        record = None if key_id is None else self._keys.get(key_id)
        return None if record is None or record.revoked else record

    async def get(self, key_id: str) -> KeyRecord:
        record = self._keys.get(key_id)
        if record is None:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)
        return record

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: r.created)

    async def _update(self, key_id: str, **changes: Any) -> KeyRecord:
        async with self._lock:
            record = replace(await self.get(key_id), **changes)
            self._keys[key_id] = record
            return record

    async def revoke(self, key_id: str) -> KeyRecord:
        return await self._update(key_id, revoked=True)

    async def top_up(self, key_id: str, images: int) -> KeyRecord:
        async with self._lock:
            record = await self.get(key_id)
            record = replace(record, budget=record.budget + images)
            self._keys[key_id] = record
            return record

    async def reserve(self, key_id: str, images: int) -> int:
        async with self._lock:
            record = await self.get(key_id)
            if images > record.remaining:
                raise BudgetExceededError(
                    f"request of {images} images does not fit the remaining budget of "
                    f"{record.remaining} images",
                    remaining=record.remaining, requested=images,
                )
            record = replace(record, used=record.used + images)
            self._keys[key_id] = record
            return record.remaining

    async def refund(self, key_id: str, images: int) -> None:
        async with self._lock:
            record = await self.get(key_id)
            self._keys[key_id] = replace(record, used=max(0, record.used - images))

    async def flag(self, key_id: str, flag: str, block: bool = False) -> KeyRecord:
        async with self._lock:
            record = await self.get(key_id)
            flags = record.flags if flag in record.flags else (*record.flags, flag)
            record = replace(record, flags=flags, blocked=record.blocked or block)
            self._keys[key_id] = record
            return record
