"""Security of the key store and the budget arithmetic, on every backend (issue #39).

The admin API takes only strictly typed, bounded values; budgets and top-ups stay
within what every backend represents exactly (:data:`~victim_server.store.MAX_BUDGET`);
the in-memory and Redis stores give the same answers; Redis errors reach the client
as what they are, without a script's SHA. HTTP tests run a real ``stealsim serve``
with in-memory state and one with Redis state; store tests use a real Redis.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis
from redis_support import delete_prefix, prefix, redis_url  # noqa: F401
from server_support import ServerProcess, admin, json_request, new_key

from stealsim.errors import BackendError, BudgetExceededError, InvalidRequestError, UnavailableError
from victim_server.redis_keys import RedisNames, connect
from victim_server.store import MAX_BUDGET, KeyRecord, MemoryStateStore, StateStore
from victim_server.store_redis import RedisStateStore

T = TypeVar("T")
SHA = re.compile(r"[0-9a-f]{40}")
MAX_TEXT = str(MAX_BUDGET)


# --- servers and stores -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_prefix(redis_url: str) -> Iterator[str]:  # noqa: F811
    name = "stealsim-test-" + uuid.uuid4().hex[:10]
    yield name
    delete_prefix(redis_url, name)


@pytest.fixture(scope="module")
def redis_server(
    digits_checkpoint: Path, redis_url: str, redis_prefix: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """``stealsim serve`` keeping its keys and budgets in Redis."""
    server = ServerProcess(
        {"victim": digits_checkpoint},
        args=["--redis-url", redis_url, "--redis-prefix", redis_prefix, "--batching", "local"],
        env={"STEALSIM_MAX_BODY_BYTES": str(1 << 20)},
        log_path=tmp_path_factory.mktemp("redis-state") / "server.log",
    )
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """The server with in-memory state (the session's) and the one with Redis state."""
    name = "victim_server" if request.param == "memory" else "redis_server"
    served: ServerProcess = request.getfixturevalue(name)
    return served


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()
    return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def with_store(store_kind: str, request: pytest.FixtureRequest) -> Callable[[Callable[[StateStore], Awaitable[T]]], T]:
    """Runs a scenario against a fresh in-memory store, or a Redis store under a new prefix."""

    def runner(scenario: Callable[[StateStore], Awaitable[T]]) -> T:
        if store_kind == "memory":
            return run(lambda: scenario(MemoryStateStore()))
        url: str = request.getfixturevalue("redis_url")
        names = RedisNames(request.getfixturevalue("prefix"))

        async def in_redis() -> T:
            client = connect(url)
            try:
                return await scenario(RedisStateStore(client, names))
            finally:
                await client.aclose()
        return run(in_redis)

    return runner


def create(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/admin/keys", json=body, headers=admin())


def key_id_of(http: httpx.Client, secret: str) -> str:
    return str(http.get("/v1/usage", headers={"X-API-Key": secret}).json()["key_id"])


def assert_refused(response: httpx.Response, field: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == "invalid_request" and field in body["error"], body


# --- strict types and ranges over HTTP --------------------------------------------------------


@pytest.mark.parametrize("budget", [True, False, "100", 100.0, 1.5, None, [5], -1])
def test_budget_takes_only_integers_in_range(http: httpx.Client, budget: object) -> None:
    assert_refused(create(http, {"budget": budget}), "budget")


def test_top_up_takes_only_positive_integers(http: httpx.Client) -> None:
    key_id = key_id_of(http, new_key(http, budget=5))
    for images in (True, "5", 5.0, 0, -3, None):
        response = http.post(f"/v1/admin/keys/{key_id}/topup", json={"images": images}, headers=admin())
        assert_refused(response, "images")
    assert http.get("/v1/admin/keys", headers=admin()).status_code == 200
    listed = {k["key_id"]: k for k in http.get("/v1/admin/keys", headers=admin()).json()["keys"]}
    assert listed[key_id]["budget"] == 5


def test_string_fields_take_strict_types(http: httpx.Client) -> None:
    assert_refused(create(http, {"budget": 1, "name": 7}), "name")
    assert_refused(create(http, {"budget": 1, "rate": 20}), "rate")
    assert_refused(create(http, {"budget": 1, "models": "victim"}), "models")


@pytest.mark.parametrize("budget", [MAX_BUDGET + 1, 2**53 + 1, 2**63 - 1, 2**64, 10**17])
def test_budget_over_the_maximum_is_refused_naming_it(http: httpx.Client, budget: int) -> None:
    response = create(http, {"budget": budget})
    assert_refused(response, "budget")
    assert MAX_TEXT in response.json()["error"]


def test_top_up_over_the_maximum_is_refused_naming_it(http: httpx.Client) -> None:
    key_id = key_id_of(http, new_key(http, budget=MAX_BUDGET - 10))
    topup = f"/v1/admin/keys/{key_id}/topup"
    reached = http.post(topup, json={"images": 10}, headers=admin())
    assert reached.status_code == 200 and reached.json()["budget"] == MAX_BUDGET, reached.text
    for images in (1, MAX_BUDGET, 10**17):
        response = http.post(topup, json={"images": images}, headers=admin())
        assert_refused(response, "budget" if images == 1 else "images")
        assert MAX_TEXT in response.json()["error"] and "Redis" not in response.text
        assert not SHA.search(response.text)
    listed = {k["key_id"]: k for k in http.get("/v1/admin/keys", headers=admin()).json()["keys"]}
    assert listed[key_id]["budget"] == MAX_BUDGET and listed[key_id]["remaining"] == MAX_BUDGET


def test_remaining_is_exact_at_the_maximum_budget(http: httpx.Client) -> None:
    """The same exact numbers from both backends, in the infer answer and in /v1/usage."""
    secret = new_key(http, budget=MAX_BUDGET)
    headers = {"X-API-Key": secret}
    for step in range(1, 3):
        answer = http.post("/v2/models/victim/infer", json=json_request(np.zeros((1, 1, 8, 8), np.float32)),
                           headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["parameters"]["remaining"] == MAX_BUDGET - step
    usage = http.get("/v1/usage", headers=headers).json()
    assert (usage["budget"], usage["used"], usage["remaining"]) == (MAX_BUDGET, 2, MAX_BUDGET - 2)


# --- key names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x" * 201, "alice\nINFO forged line", "a\rb", "\x1b[31mred", "a\u2028b",
                                  "a\x00b", "a\u202eb"])
def test_key_names_are_short_and_printable(http: httpx.Client, name: str) -> None:
    assert_refused(create(http, {"budget": 1, "name": name}), "name")


def test_long_printable_names_are_kept(http: httpx.Client) -> None:
    name = "grid/ü-名前 " + "x" * 188
    response = create(http, {"budget": 1, "name": name})
    assert response.status_code == 201 and response.json()["name"] == name, response.text
    assert_refused(create(http, {"budget": 1, "models": ["v" * 201]}), "models")


def test_huge_key_names_are_refused_and_never_logged(http: httpx.Client, server: ServerProcess) -> None:
    """65 MiB (over the body limit, or over the name's) and 500,000 characters (under the body limit)."""
    headers = {**admin(), "Content-Type": "application/json"}
    for length, statuses in (((65 << 20), (400, 413)), (500_000, (400,))):
        response = http.post("/v1/admin/keys", headers=headers, timeout=60,
                             content=b'{"budget": 1, "name": "' + b"N" * length + b'"}')
        assert response.status_code in statuses, response.text[:500]
        assert len(response.content) < 10_000
        if response.status_code == 400:
            assert "name" in response.json()["error"] and "200" in response.json()["error"]
        assert http.get("/v2/health/ready", timeout=10).status_code == 200
    assert "N" * 1000 not in server.log()


# --- Redis errors over HTTP --------------------------------------------------------------------


def test_a_redis_script_error_is_a_500_naming_what_failed(
    redis_server: ServerProcess, redis_url: str, redis_prefix: str,  # noqa: F811
) -> None:
    with httpx.Client(base_url=redis_server.url, timeout=60.0) as http:
        key_id = key_id_of(http, new_key(http, budget=5))
        corrupt = redis.Redis.from_url(redis_url)
        corrupt.hset(f"{redis_prefix}:key:{key_id}", "budget", "five")
        corrupt.close()
        response = http.post(f"/v1/admin/keys/{key_id}/topup", json={"images": 1}, headers=admin())
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["code"] == "backend_error" and "topping up" in body["error"], body
        assert "unavailable" not in body["error"] and not SHA.search(response.text)
        assert http.get("/v2/health/ready").status_code == 200


# --- the stores themselves, in memory and in a real Redis --------------------------------------


def test_refund_never_pushes_used_below_zero_or_remaining_over_the_budget(with_store: Any) -> None:
    async def scenario(store: StateStore) -> None:
        await store.create_key(KeyRecord("key_r", "r", budget=10), "sk-r")
        assert await store.reserve("key_r", 4) == 6
        await store.refund("key_r", 100)
        record = await store.get("key_r")
        assert (record.used, record.remaining, record.budget) == (0, 10, 10)
        for bad in (-5, -1):
            with pytest.raises(ValueError, match="images"):
                await store.refund("key_r", bad)
            with pytest.raises(ValueError, match="images"):
                await store.reserve("key_r", bad)
        record = await store.get("key_r")
        assert (record.used, record.remaining) == (0, 10)
        assert await store.reserve("key_r", 10) == 0
        await store.refund("key_r", 3)
        assert (await store.get("key_r")).remaining == 3

    with_store(scenario)


def test_budget_limits_are_the_same_on_every_store(with_store: Any) -> None:
    async def scenario(store: StateStore) -> list[object]:
        answers: list[object] = []
        for budget in (-1, MAX_BUDGET + 1, 2**63 - 1):
            with pytest.raises(InvalidRequestError, match=MAX_TEXT):
                await store.create_key(KeyRecord(f"key_{budget & 0xffff}", "x", budget=budget), f"sk-{budget}")
        await store.create_key(KeyRecord("key_m", "m", budget=MAX_BUDGET - 1), "sk-m")
        answers.append((await store.top_up("key_m", 1)).budget)
        for images in (1, MAX_BUDGET, 10**17, 2**63 - 1, 0, -1):
            with pytest.raises(InvalidRequestError, match=MAX_TEXT) as refused:
                await store.top_up("key_m", images)
            assert "Redis" not in refused.value.message
        answers.append((await store.get("key_m")).budget)
        answers.append(await store.reserve("key_m", MAX_BUDGET - 1))
        with pytest.raises(BudgetExceededError) as exceeded:
            await store.reserve("key_m", 2)
        answers.append((exceeded.value.details["remaining"], exceeded.value.message))
        await store.refund("key_m", MAX_BUDGET)
        answers.append((await store.get("key_m")).remaining)
        return answers

    assert with_store(scenario) == [
        MAX_BUDGET, MAX_BUDGET, 1,
        (1, "request of 2 images does not fit the remaining budget of 1 images"), MAX_BUDGET,
    ]


def test_racing_charges_at_the_maximum_budget_stay_exact(with_store: Any) -> None:
    """100 images left of a budget of 2**53 - 1, and 90 racing requests: never a charge too many.

    (90: one Redis client's pool holds 100 connections; more at once fail with MaxConnectionsError.)
    """
    async def scenario(store: StateStore) -> None:
        await store.create_key(KeyRecord("key_x", "x", budget=MAX_BUDGET), "sk-x")
        assert await store.reserve("key_x", MAX_BUDGET - 100) == 100
        sizes = np.random.default_rng(2).integers(1, 9, size=90).tolist()

        async def one(size: int) -> int:
            try:
                await store.reserve("key_x", size)
            except BudgetExceededError as exc:
                assert int(str(exc.details["remaining"])) < size
                return 0
            return size

        charged = sum(await asyncio.gather(*(one(size) for size in sizes)))
        assert sum(sizes) > 100 and 100 - max(sizes) < charged <= 100
        record = await store.get("key_x")
        assert (record.used, record.remaining) == (MAX_BUDGET - 100 + charged, 100 - charged)

    with_store(scenario)


def test_redis_arithmetic_is_exact_beyond_2_53(redis_url: str, prefix: str) -> None:  # noqa: F811
    """Budgets written by an older deployment, beyond the limit, are still charged exactly."""
    async def scenario() -> None:
        client = connect(redis_url)
        store = RedisStateStore(client, RedisNames(prefix))
        await store.create_key(KeyRecord("key_big", "big", budget=0), "sk-big")
        await store.create_key(KeyRecord("key_odd", "odd", budget=0), "sk-odd")
        await client.hset(f"{prefix}:key:key_big", "budget", str(2**63 - 1))
        await client.hset(f"{prefix}:key:key_odd", "budget", str(2**53 + 1))
        assert await store.reserve("key_big", 1) == 2**63 - 2
        assert (await store.get("key_big")).remaining == 2**63 - 2
        with pytest.raises(BudgetExceededError) as refused:
            await store.reserve("key_odd", 2**53 + 2)
        assert refused.value.details["remaining"] == 2**53 + 1
        assert await store.reserve("key_odd", 2**53) == 1
        assert await store.reserve("key_odd", 1) == 0
        with pytest.raises(InvalidRequestError, match=MAX_TEXT):
            await store.top_up("key_big", 1)
        assert (await store.get("key_big")).budget == 2**63 - 1
        await client.aclose()

    run(scenario)


def test_redis_command_errors_are_backend_errors_without_the_script_sha(
    redis_url: str, prefix: str,  # noqa: F811
) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        store = RedisStateStore(client, RedisNames(prefix))
        await client.set(f"{prefix}:key:key_s", "not a hash")
        actions: list[tuple[Callable[[], Awaitable[object]], str]] = [
            (lambda: store.reserve("key_s", 1), "charging the budget"),
            (lambda: store.top_up("key_s", 1), "topping up"),
            (lambda: store.refund("key_s", 1), "refunding"),
        ]
        for action, what in actions:
            with pytest.raises(BackendError) as failed:
                await action()
            assert what in failed.value.message and not SHA.search(failed.value.message)
            assert not isinstance(failed.value, UnavailableError)
        await client.aclose()

    run(scenario)
