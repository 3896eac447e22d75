"""The state store: API keys, budgets and usage, flags.

:class:`StateStore` is what the service needs; :class:`MemoryStateStore` keeps
everything in this process behind one asyncio lock (the Redis store of the
scale-out issue implements the same methods with one Lua script per operation).

The budget is charged with :meth:`StateStore.reserve`, one atomic
check-and-charge: however many requests race, the images charged never exceed
the budget, and a request that does not fit is refused whole. Images that are
not served afterwards (failed inference, caller gone) are given back with
:meth:`StateStore.refund`, which never takes ``used`` below 0 (so ``remaining``
never exceeds the budget). Secrets are stored only as SHA-256 digests.

Budgets and top-ups are integers from 0 to :data:`MAX_BUDGET`; every store
refuses others with the same :class:`~stealsim.errors.InvalidRequestError`, so
every backend answers alike and exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from stealsim.errors import BudgetExceededError, InvalidRequestError, KeyNotFoundError

__all__ = [
    "MAX_BUDGET", "KeyRecord", "MemoryStateStore", "StateStore", "budget_exceeded", "check_budget",
    "check_count", "check_top_up", "hash_secret", "new_secret", "top_up_over_limit",
]

MAX_BUDGET = 2**53 - 1
"""The largest budget a key may have, and the largest top-up: 9,007,199,254,740,991 images.

The largest integer an IEEE double holds exactly, with every integer below it: Redis's
Lua numbers are doubles, and so are the numbers of JSON clients in JavaScript.
"""


def check_budget(budget: int) -> None:
    """Raises InvalidRequestError unless ``budget`` is from 0 to :data:`MAX_BUDGET` images."""
    if not 0 <= budget <= MAX_BUDGET:
        raise InvalidRequestError(
            f"budget must be from 0 to {MAX_BUDGET} images (2**53 - 1), got {budget}",
            max_budget=MAX_BUDGET,
        )


def check_top_up(images: int) -> None:
    """Raises InvalidRequestError unless the top-up ``images`` is from 1 to :data:`MAX_BUDGET`."""
    if not 1 <= images <= MAX_BUDGET:
        raise InvalidRequestError(
            f"a top-up must be from 1 to {MAX_BUDGET} images (2**53 - 1), got {images}",
            max_budget=MAX_BUDGET,
        )


def top_up_over_limit(key_id: str, budget: int, images: int) -> InvalidRequestError:
    """The error of a top-up that would take a key's budget over :data:`MAX_BUDGET`."""
    return InvalidRequestError(
        f"a top-up of {images} images would take the budget of key {key_id} from {budget} to "
        f"{budget + images} images, over the maximum budget of {MAX_BUDGET} images (2**53 - 1)",
        max_budget=MAX_BUDGET,
    )


def check_count(images: int) -> None:
    """Raises ValueError for a negative number of images to charge or refund (a caller's bug)."""
    if images < 0:
        raise ValueError(f"images to charge or refund must be >= 0, got {images}")


def budget_exceeded(images: int, remaining: int) -> BudgetExceededError:
    """The error of a request of ``images`` that does not fit ``remaining``."""
    return BudgetExceededError(
        f"request of {images} images does not fit the remaining budget of {remaining} images",
        remaining=remaining, requested=images,
    )


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
    price_per_1000_images: float | None = None
    """The key's own price per 1,000 images, overriding each model's; None: the models'."""
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
            "price_per_1000_images": self.price_per_1000_images,
            "flags": list(self.flags), "blocked": self.blocked, "revoked": self.revoked,
            "created": self.created,
        }


@runtime_checkable
class StateStore(Protocol):
    """Keys, budgets and flags; every method is atomic with respect to the others."""

    async def ping(self) -> None:
        """Raises UnavailableError when the store cannot be reached."""

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live (not revoked) key with this secret, or None."""

    async def get(self, key_id: str) -> KeyRecord:
        """Raises KeyNotFoundError."""

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> KeyRecord: ...

    async def create_key(self, record: KeyRecord, secret: str) -> KeyRecord:
        """Store a new key; ValueError if its id or secret exists, InvalidRequestError for a budget
        outside 0..MAX_BUDGET."""

    async def top_up(self, key_id: str, images: int) -> KeyRecord:
        """Add ``images`` (1..MAX_BUDGET) to the budget; InvalidRequestError, and no change, if
        the budget would exceed MAX_BUDGET."""

    async def reserve(self, key_id: str, images: int) -> int:
        """Charge ``images`` if they fit the remaining budget; return what remains after.

        Raises BudgetExceededError (with ``remaining``) and charges nothing otherwise;
        ValueError for negative ``images``.
        """

    async def refund(self, key_id: str, images: int) -> None:
        """Give back up to ``images``: ``used`` never goes below 0; ValueError for negative ``images``."""

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
        check_budget(record.budget)
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
        check_top_up(images)
        async with self._lock:
            record = await self.get(key_id)
            if record.budget + images > MAX_BUDGET:
                raise top_up_over_limit(key_id, record.budget, images)
            record = replace(record, budget=record.budget + images)
            self._keys[key_id] = record
            return record

    async def reserve(self, key_id: str, images: int) -> int:
        check_count(images)
        async with self._lock:
            record = await self.get(key_id)
            if images > record.remaining:
                raise budget_exceeded(images, record.remaining)
            record = replace(record, used=record.used + images)
            self._keys[key_id] = record
            return record.remaining

    async def refund(self, key_id: str, images: int) -> None:
        check_count(images)
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
