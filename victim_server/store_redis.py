"""The state store in Redis: keys, budgets and usage shared by every API process.

Each key is a hash ``PREFIX:key:ID`` (``budget``, ``used``, ``flags``, ...); the
secret's SHA-256 maps to the id in ``PREFIX:digests``. Every operation that
reads and writes is one Lua script, which Redis runs atomically: however many
API processes race on one key, :meth:`RedisStateStore.reserve` never charges
more than the budget, and a request that does not fit is refused whole.

The arithmetic is exact for every count Redis holds (64-bit integers): Lua's
numbers are doubles, so the scripts never compute with them. They change counts
with HINCRBY (Redis's own integers), compare the decimal strings, and return
strings; Python computes ``remaining``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import redis.asyncio as aioredis

from stealsim.errors import KeyNotFoundError
from victim_server.redis_keys import RedisNames, redis_errors
from victim_server.store import (
    MAX_BUDGET,
    KeyRecord,
    budget_exceeded,
    check_budget,
    check_count,
    check_top_up,
    hash_secret,
    top_up_over_limit,
)

__all__ = ["RedisStateStore"]

logger = logging.getLogger(__name__)

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

_AUTHENTICATE = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return redis.call('HGETALL', ARGV[2] .. id)
"""

# Is the decimal string a greater than b? Both hold non-negative integers as Redis writes them.
_GREATER = """
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""

# Returns {charged (1) / refused (0) / no such key (-1), budget, used after}.
_RESERVE = _GREATER + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, '0', '0'} end
local budget = redis.call('HGET', KEYS[1], 'budget')
local used = redis.call('HGET', KEYS[1], 'used')
redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
local after = redis.call('HGET', KEYS[1], 'used')
if greater(after, budget) then
  redis.call('HSET', KEYS[1], 'used', used)
  return {0, budget, used}
end
return {1, budget, after}
"""

# ARGV[1]: minus the images to give back; 'used' stops at 0.
_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
if string.sub(redis.call('HGET', KEYS[1], 'used'), 1, 1) == '-' then
  redis.call('HSET', KEYS[1], 'used', '0')
end
return 1
"""

# ARGV[1]: images (1..MAX_BUDGET), ARGV[2]: MAX_BUDGET. Returns {added (1) / over the maximum (0)
# / no such key (-1), budget before, the key's fields after}.
_TOP_UP = _GREATER + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, '0', {}} end
local budget = redis.call('HGET', KEYS[1], 'budget')
if greater(budget, ARGV[2]) then return {0, budget, {}} end
redis.call('HINCRBY', KEYS[1], 'budget', ARGV[1])
if greater(redis.call('HGET', KEYS[1], 'budget'), ARGV[2]) then
  redis.call('HSET', KEYS[1], 'budget', budget)
  return {0, budget, {}}
end
return {1, budget, redis.call('HGETALL', KEYS[1])}
"""

# ARGV[1]: 'revoke' | 'flag'; ARGV[2]: the flag; ARGV[3]: block ('1'/'0').
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == 'revoke' then
  redis.call('HSET', KEYS[1], 'revoked', '1')
elseif ARGV[1] == 'flag' then
  local flags = cjson.decode(redis.call('HGET', KEYS[1], 'flags'))
  local found = false
  for _, f in ipairs(flags) do if f == ARGV[2] then found = true end end
  if not found then
    table.insert(flags, ARGV[2])
    redis.call('HSET', KEYS[1], 'flags', cjson.encode(flags))
  end
  if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'blocked', '1') end
end
return redis.call('HGETALL', KEYS[1])
"""


def _fields(record: KeyRecord) -> dict[str, str]:
    def as_json(value: Any) -> str:
        return orjson.dumps(None if value is None else list(value)).decode()

    return {
        "key_id": record.key_id, "name": record.name, "budget": str(record.budget),
        "used": str(record.used), "rate": record.rate or "", "image_rate": record.image_rate or "",
        "models": as_json(record.models), "policy": as_json(record.policy),
        "price_per_1000_images": "" if record.price_per_1000_images is None else repr(record.price_per_1000_images),
        "flags": as_json(record.flags), "blocked": "1" if record.blocked else "0",
        "revoked": "1" if record.revoked else "0", "created": repr(record.created),
    }


def _record(flat: list[bytes]) -> KeyRecord:
    """A KeyRecord from HGETALL's flat ``[field, value, ...]`` reply to a Lua script."""
    return _record_of({flat[i]: flat[i + 1] for i in range(0, len(flat), 2)})


def _record_of(fields: dict[bytes, bytes]) -> KeyRecord:
    """A KeyRecord from the fields of its hash."""
    raw = {name.decode(): value.decode() for name, value in fields.items()}
    models = orjson.loads(raw["models"])
    policy = orjson.loads(raw["policy"])
    flags = orjson.loads(raw["flags"])
    price = raw.get("price_per_1000_images", "")  # absent from the keys of older versions
    return KeyRecord(
        key_id=raw["key_id"], name=raw["name"], budget=int(raw["budget"]), used=int(raw["used"]),
        rate=raw["rate"] or None, image_rate=raw["image_rate"] or None,
        models=None if models is None else tuple(models),
        policy=None if policy is None else tuple(policy),
        price_per_1000_images=float(price) if price else None,
        flags=tuple(flags) if isinstance(flags, list) else (),  # Lua's cjson writes {} for []
        blocked=raw["blocked"] == "1", revoked=raw["revoked"] == "1", created=float(raw["created"]),
    )


class RedisStateStore:
    """:class:`~victim_server.store.StateStore` in Redis; one Lua script per operation."""

    def __init__(self, client: aioredis.Redis, names: RedisNames) -> None:
        self._redis = client
        self._names = names
        self._create = client.register_script(_CREATE)
        self._authenticate = client.register_script(_AUTHENTICATE)
        self._reserve = client.register_script(_RESERVE)
        self._refund = client.register_script(_REFUND)
        self._top_up = client.register_script(_TOP_UP)
        self._update = client.register_script(_UPDATE)

    async def ping(self) -> None:
        """Raises UnavailableError when Redis does not answer."""
        with redis_errors("state store"):
            await self._redis.ping()

    async def create_key(self, record: KeyRecord, secret: str) -> KeyRecord:
        check_budget(record.budget)
        fields = [part for pair in _fields(record).items() for part in pair]
        with redis_errors("creating a key"):
            created = await self._create(
                keys=[self._names.key(record.key_id), self._names.digests, self._names.key_ids],
                args=[hash_secret(secret), record.key_id, record.created, *fields],
            )
        if not created:
            raise ValueError(f"key {record.key_id} or its secret already exists")
        return record

    async def authenticate(self, secret: str) -> KeyRecord | None:
        with redis_errors("authenticating"):
            flat = await self._authenticate(
                keys=[self._names.digests], args=[hash_secret(secret), self._names.key("")]
            )
        if not flat:
            return None
        record = _record(flat)
        return None if record.revoked else record

    async def get(self, key_id: str) -> KeyRecord:
        with redis_errors("reading a key"):
            fields: dict[bytes, bytes] = await self._redis.hgetall(self._names.key(key_id))  # type: ignore[assignment]
        if not fields:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)
        return _record_of(fields)

    async def list_keys(self) -> list[KeyRecord]:
        with redis_errors("listing keys"):
            ids: list[bytes] = await self._redis.zrange(self._names.key_ids, 0, -1)  # type: ignore[assignment]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(self._names.key(key_id.decode()))
                replies = await pipe.execute()
        return [_record_of(fields) for fields in replies if fields]

    async def _change(self, key_id: str, action: str, value: str = "", block: bool = False) -> KeyRecord:
        with redis_errors("updating a key"):
            flat = await self._update(
                keys=[self._names.key(key_id)], args=[action, value, "1" if block else "0"]
            )
        if not flat:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)
        return _record(flat)

    async def revoke(self, key_id: str) -> KeyRecord:
        return await self._change(key_id, "revoke")

    async def top_up(self, key_id: str, images: int) -> KeyRecord:
        check_top_up(images)
        with redis_errors("topping up the budget"):
            status, budget, flat = await self._top_up(
                keys=[self._names.key(key_id)], args=[images, MAX_BUDGET]
            )
        if status == -1:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)
        if status == 0:
            raise top_up_over_limit(key_id, int(budget), images)
        return _record(flat)

    async def reserve(self, key_id: str, images: int) -> int:
        check_count(images)
        with redis_errors("charging the budget"):
            status, budget, used = await self._reserve(keys=[self._names.key(key_id)], args=[images])
        if status == -1:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)
        remaining = max(0, int(budget) - int(used))
        if status == 0:
            raise budget_exceeded(images, remaining)
        return remaining

    async def refund(self, key_id: str, images: int) -> None:
        check_count(images)
        with redis_errors("refunding the budget"):
            found = await self._refund(keys=[self._names.key(key_id)], args=[-images])
        if found == -1:
            raise KeyNotFoundError(f"no API key with id {key_id!r}", key_id=key_id)

    async def flag(self, key_id: str, flag: str, block: bool = False) -> KeyRecord:
        return await self._change(key_id, "flag", flag, block)
