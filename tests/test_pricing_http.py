"""Prices and declared rate limits through a real ``stealsim serve``: the model metadata and
``/v1/usage`` publish them, ``--rate-limits declare`` serves past a limit that ``enforce``
refuses, and both state stores keep a key's own price."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from redis_support import prefix, redis_url  # noqa: F401
from server_support import ADMIN_KEY, ServerProcess, admin, json_request, new_key

from stealsim.service_client import ServiceClient
from victim_server.redis_keys import RedisNames, connect
from victim_server.store import KeyRecord, MemoryStateStore, StateStore
from victim_server.store_redis import RedisStateStore

IMAGE = json_request(np.zeros((4, 1, 8, 8), np.float32))


def _server(checkpoint: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess({"victim": checkpoint, "free": checkpoint},
                         args=["--price", "victim=0.25", "--currency", "EUR", *args], env=env, log_path=log)


@pytest.fixture(scope="module")
def enforcing(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = _server(digits_checkpoint, tmp_path_factory.mktemp("pricing") / "enforce.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def declaring(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    provisioned = [{"api_key": "sk-provisioned-priced", "budget": 50, "name": "provisioned",
                    "price_per_1000_images": 3.5, "rate": "1/minute"}]
    server = _server(digits_checkpoint, tmp_path_factory.mktemp("pricing") / "declare.log",
                     "--rate-limits", "declare", env={"STEALSIM_API_KEYS": json.dumps(provisioned)})
    yield server
    server.stop()


def _get(server: ServerProcess, path: str, key: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}{path}", headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _infer(server: ServerProcess, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/victim/infer", json=IMAGE, headers={"X-API-Key": key}, timeout=60)


def test_the_price_is_in_the_metadata_of_priced_models_and_a_keys_own_overrides_it(enforcing: ServerProcess) -> None:
    with enforcing.service() as service:
        plain = service.create_key(100).api_key
        own = service.create_key(100, price_per_1000_images=2.0)
        assert own.listing["price_per_1000_images"] == 2.0
        listed = next(entry for entry in service.list_keys() if entry["key_id"] == own.key_id)
        assert listed["price_per_1000_images"] == 2.0
    priced = _get(enforcing, "/v2/models/victim", plain)["parameters"]
    assert priced["price_per_1000_images"] == 0.25 and priced["currency"] == "EUR"
    free = _get(enforcing, "/v2/models/free", plain)["parameters"]
    assert "price_per_1000_images" not in free and "currency" not in free  # no price applies
    for model in ("victim", "free"):
        parameters = _get(enforcing, f"/v2/models/{model}", own.api_key)["parameters"]
        assert parameters["price_per_1000_images"] == 2.0 and parameters["currency"] == "EUR"
    usage = _get(enforcing, "/v1/usage", own.api_key)
    assert usage["price_per_1000_images"] == 2.0 and usage["currency"] == "EUR"
    usage = _get(enforcing, "/v1/usage", plain)
    assert usage["price_per_1000_images"] is None and usage["currency"] == "EUR"  # the key has none of its own


def test_bad_prices_are_refused_with_a_named_reason(enforcing: ServerProcess) -> None:
    with httpx.Client(base_url=enforcing.url, timeout=30) as client:
        before = len(client.get("/v1/admin/keys", headers=admin()).json()["keys"])
        for price in (-1, "2", True, "1e999", None):  # 1e999: infinity in JSON
            body = {"budget": 10, "price_per_1000_images": price}
            text = json.dumps(body).replace('"1e999"', "1e999")
            response = client.post("/v1/admin/keys", content=text,
                                   headers={**admin(), "Content-Type": "application/json"})
            if price is None:
                assert response.status_code == 201 and response.json()["price_per_1000_images"] is None
            else:
                assert response.status_code == 400, price
                assert "price_per_1000_images" in response.json()["error"]
        after = len(client.get("/v1/admin/keys", headers=admin()).json()["keys"])
    assert after == before + 1  # the refused bodies created no key


def test_enforce_refuses_past_a_limit_and_publishes_enforced_limits(enforcing: ServerProcess) -> None:
    with httpx.Client(base_url=enforcing.url, timeout=30) as client:
        key = new_key(client, budget=100, rate="2/minute", image_rate="1000/minute")
    assert [_infer(enforcing, key).status_code for _ in range(3)] == [200, 200, 429]
    usage = _get(enforcing, "/v1/usage", key)
    assert usage["rate_limits_enforced"] is True and usage["used"] == 8
    assert [(entry["kind"], entry["enforced"]) for entry in usage["rate_limits"]] == [
        ("requests", True), ("images", True)]
    requests = next(entry for entry in usage["rate_limits"] if entry["kind"] == "requests")
    assert requests["remaining"] == 0 and requests["amount"] == 2 and requests["window_seconds"] == 60
    declared = _get(enforcing, "/v2/models/victim", key)["parameters"]
    assert declared["rate_limits_enforced"] is True
    assert [entry["limit"] for entry in declared["rate_limits"]] == ["2/minute", "1000/minute"]


def test_declare_serves_past_the_limit_and_says_so(declaring: ServerProcess) -> None:
    with httpx.Client(base_url=declaring.url, timeout=30) as client:
        key = new_key(client, budget=100, rate="2/minute", image_rate="10/minute")
    # 6 requests of 4 images: over both the request and the image limit, all served and charged.
    assert [_infer(declaring, key).status_code for _ in range(6)] == [200] * 6
    usage = _get(declaring, "/v1/usage", key)
    assert usage["used"] == 24 and usage["rate_limits_enforced"] is False
    assert [(entry["kind"], entry["limit"], entry["enforced"]) for entry in usage["rate_limits"]] == [
        ("requests", "2/minute", False), ("images", "10/minute", False)]
    parameters = _get(declaring, "/v2/models/victim", key)["parameters"]
    assert parameters["rate_limits_enforced"] is False
    assert [(entry["kind"], entry["amount"], entry["window_seconds"], entry["enforced"])
            for entry in parameters["rate_limits"]] == [("requests", 2, 60, False), ("images", 10, 60, False)]
    # A key provisioned from the settings (STEALSIM_API_KEYS) keeps its own price.
    usage = _get(declaring, "/v1/usage", "sk-provisioned-priced")
    assert usage["price_per_1000_images"] == 3.5 and usage["name"] == "provisioned"
    assert [_infer(declaring, "sk-provisioned-priced").status_code for _ in range(3)] == [200] * 3


def test_bad_serve_options_exit_2_with_one_line(digits_checkpoint: Path) -> None:
    for options in (["--rate-limits", "sometimes"], ["--price", "victim=cheap"], ["--price", "nobody=1"],
                    ["--price", "victim=-1"], ["--currency", "US dollars"]):
        result = subprocess.run([sys.executable, "-m", "stealsim", "serve", "--model", f"victim={digits_checkpoint}",
                                 "--admin-key", ADMIN_KEY, *options], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (options, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (options, result.stderr)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_both_stores_keep_a_keys_price(backend: str, redis_url: str, prefix: str) -> None:  # noqa: F811
    async def scenario() -> None:
        client = connect(redis_url)
        store: StateStore = MemoryStateStore() if backend == "memory" else RedisStateStore(client, RedisNames(prefix))
        priced = await store.create_key(KeyRecord("key_priced", "p", budget=10, price_per_1000_images=0.125), "sk-p")
        plain = await store.create_key(KeyRecord("key_plain", "q", budget=10), "sk-q")
        assert await store.authenticate("sk-p") == priced and await store.get("key_plain") == plain
        assert (await store.get("key_priced")).price_per_1000_images == 0.125
        assert (await store.get("key_plain")).price_per_1000_images is None
        flagged = await store.flag("key_priced", "pooled_ood")
        assert flagged.price_per_1000_images == 0.125 and flagged.flags == ("pooled_ood",)
        assert {record.key_id: record.price_per_1000_images for record in await store.list_keys()} == {
            "key_priced": 0.125, "key_plain": None}
        await client.aclose()

    asyncio.run(scenario())


def test_service_client_sends_the_price(enforcing: ServerProcess) -> None:
    with ServiceClient(enforcing.url, ADMIN_KEY) as service:
        issued = service.create_key(5, price_per_1000_images=0.0)
    assert issued.listing["price_per_1000_images"] == 0.0
    parameters = _get(enforcing, "/v2/models/free", issued.api_key)["parameters"]
    assert parameters["price_per_1000_images"] == 0.0  # free of charge is a price too
