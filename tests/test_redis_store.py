"""The Redis backends against a real Redis server: state store, audit stream, PRADA state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest
from redis_support import prefix, redis_url  # noqa: F401
from server_support import free_port

from defense.prada import PradaDetector
from defense.steps import PradaStep
from stealsim.errors import BudgetExceededError, KeyNotFoundError, UnavailableError
from victim_server.audit import AuditRecord
from victim_server.audit_redis import RedisAuditLog
from victim_server.detector_state import RedisDetectorStates
from victim_server.redis_keys import RedisNames, connect
from victim_server.store import KeyRecord
from victim_server.store_redis import RedisStateStore

T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()
    return asyncio.run(main())


def test_reserve_is_atomic_across_clients(redis_url: str, prefix: str) -> None:  # noqa: F811
    async def scenario() -> None:
        # Two clients stand for two API processes: separate connections, one Redis.
        clients = [connect(redis_url), connect(redis_url)]
        stores = [RedisStateStore(client, RedisNames(prefix)) for client in clients]
        record = await stores[0].create_key(KeyRecord("key_race", "race", budget=100), "sk-race")
        assert (await stores[1].authenticate("sk-race")) == record
        sizes = np.random.default_rng(0).integers(1, 9, size=120).tolist()

        async def one(index: int, size: int) -> int:
            try:
                await stores[index % 2].reserve("key_race", size)
            except BudgetExceededError as exc:
                assert exc.details["remaining"] < size  # refused only when it does not fit
                return 0
            return size

        charged = sum(await asyncio.gather(*(one(i, s) for i, s in enumerate(sizes))))
        assert 100 - max(sizes) < charged <= 100
        assert (await stores[1].get("key_race")).used == charged
        await stores[0].refund("key_race", 10)
        assert (await stores[1].get("key_race")).used == charged - 10
        await stores[0].refund("key_race", 10_000)  # never below zero
        assert (await stores[0].get("key_race")).used == 0
        for client in clients:
            await client.aclose()

    run(scenario)


def test_key_lifecycle(redis_url: str, prefix: str) -> None:  # noqa: F811
    async def scenario() -> None:
        client = connect(redis_url)
        store = RedisStateStore(client, RedisNames(prefix))
        record = KeyRecord("key_a", "alice", budget=5, rate="5/second", models=("victim",),
                           policy=({"name": "top_k", "k": 2},))
        await store.create_key(record, "sk-a")
        with pytest.raises(ValueError, match="already exists"):
            await store.create_key(KeyRecord("key_b", "bob", budget=1), "sk-a")  # same secret
        await store.create_key(KeyRecord("key_b", "bob", budget=1), "sk-b")
        assert [r.key_id for r in await store.list_keys()] == ["key_a", "key_b"]
        assert await store.get("key_a") == record
        assert await store.authenticate("sk-nope") is None
        assert (await store.top_up("key_a", 7)).budget == 12
        assert await store.reserve("key_a", 12) == 0
        with pytest.raises(BudgetExceededError):
            await store.reserve("key_a", 1)
        flagged = await store.flag("key_a", "prada", block=True)
        assert flagged.flags == ("prada",) and flagged.blocked
        assert (await store.flag("key_a", "prada")).flags == ("prada",)
        await store.revoke("key_b")
        assert await store.authenticate("sk-b") is None
        with pytest.raises(KeyNotFoundError):
            await store.reserve("key_zz", 1)
        with pytest.raises(KeyNotFoundError):
            await store.top_up("key_zz", 1)
        await client.aclose()

    run(scenario)


def test_redis_errors_become_unavailable() -> None:
    async def scenario() -> None:
        client = connect(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
        store = RedisStateStore(client, RedisNames("nowhere"))
        with pytest.raises(UnavailableError, match="Redis is unavailable"):
            await store.reserve("key_a", 1)
        with pytest.raises(UnavailableError):
            await store.ping()
        await client.aclose()

    run(scenario)


def test_audit_stream_and_prada_state(redis_url: str, prefix: str) -> None:  # noqa: F811
    async def scenario() -> None:
        client = connect(redis_url)
        names = RedisNames(prefix)
        audit = RedisAuditLog(client, names)
        for index in range(3):
            await audit.append(AuditRecord("key_a", "victim", index + 1, "00", [], [], f"r{index}"))
        other = connect(redis_url)  # another API process, or this one restarted
        assert (await RedisAuditLog(other, names).export()).count(b"\n") == 3
        await other.aclose()

        # The shared state gives the verdicts of one detector fed the same queries in order.
        rng = np.random.default_rng(1)
        seeds = rng.random((5, 64), dtype=np.float32)
        local = PradaDetector(0.95, 20)
        shared = RedisDetectorStates(client, names)
        for step in range(12):
            images = np.clip(seeds[rng.integers(0, 5, 8)] + rng.normal(0, 0.05, (8, 64)), 0, 1)
            labels = rng.integers(0, 3, 8)
            expected = local.observe(images, labels)
            _, verdict = await shared.observe(PradaStep(delta=0.95, min_queries=20), "key_a", "victim", images, labels)
            assert verdict == expected, step
        restored = PradaDetector.from_bytes(local.to_bytes(), 0.95, 20)
        assert restored.observe(seeds[:2], np.array([0, 1])) == local.observe(seeds[:2], np.array([0, 1]))
        await client.aclose()

    run(scenario)
