"""The ``pooled_ood`` detector: one window over every key's traffic to a model.

Honest traffic stays quiet; a Sybil thief spread over 16 keys, each far below a per-key
detector's ``min_queries``, raises the pool's alarm and its keys (only its keys) are flagged:
on the detector itself, through both detector-state stores (memory, Redis), and through a real
``stealsim serve`` with either store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from redis_support import prefix, redis_url  # noqa: F401
from server_support import ServerProcess, binary_request, new_key

from defense.ood_rate import OodRateDetector
from defense.policies import parse_policy
from defense.pooled_ood import PooledOodDetector
from defense.steps import PooledOodStep
from stealsim.checkpoint import load_checkpoint
from stealsim.data import load_dataset
from stealsim.errors import ConfigError
from victim_server.detector_state import MemoryDetectorStates, RedisDetectorStates
from victim_server.redis_keys import RedisNames, connect

K = 10
TAU = 0.5


def rows(ood: np.ndarray) -> np.ndarray:
    """Probability rows ``[N, K]``: MSP 0.15 (under ``TAU``: OOD) where ``ood``, else 0.95."""
    top = np.where(ood, 0.15, 0.95)
    p = np.repeat(((1 - top) / (K - 1))[:, None], K, axis=1)
    p[:, 0] = top
    return p.astype(np.float32)


def detector(**changes: float) -> PooledOodDetector:
    settings: dict[str, float] = {"tau": TAU, "honest_rate": 0.01, "alpha": 1e-6, "min_queries": 256,
                                  "window": 2048, "attribution_alpha": 1e-3, **changes}
    return PooledOodDetector(settings["tau"], settings["honest_rate"], settings["alpha"],
                             int(settings["min_queries"]), int(settings["window"]), settings["attribution_alpha"])


def honest_requests(rng: np.random.Generator, keys: int, requests: int, size: int = 16) -> list[tuple[str, np.ndarray]]:
    """Round robin over ``keys`` honest keys, each query OOD with probability 1 %."""
    return [(f"key_honest{k}", rows(rng.random(size) < 0.01)) for _ in range(requests) for k in range(keys)]


def sybil_requests(rng: np.random.Generator, keys: int, rounds: int, size: int = 16) -> list[tuple[str, np.ndarray]]:
    """Round robin over ``keys`` thief keys, each query OOD with probability 1/2."""
    return [(f"key_sybil{k}", rows(rng.random(size) < 0.5)) for _ in range(rounds) for k in range(keys)]


def test_honest_traffic_over_many_keys_never_raises_the_alarm() -> None:
    pool = detector()
    for key, p in honest_requests(np.random.default_rng(0), keys=20, requests=12):  # 3,840 queries
        verdict = pool.observe(p, key_id=key)
        assert not verdict.alarm and not verdict.flagged, verdict
    assert verdict.queries == 2048  # the window slid


def test_a_sybil_spread_over_16_keys_raises_the_alarm_and_flags_only_its_keys() -> None:
    rng = np.random.default_rng(1)
    pool = detector()
    per_key = OodRateDetector(TAU, 0.01, 1e-6, 64)  # ood_rate's defaults, shared here as if one key
    flagged: set[str] = set()
    for key, p in [*honest_requests(rng, keys=4, requests=6), *sybil_requests(rng, keys=16, rounds=3),
                   *honest_requests(rng, keys=4, requests=6)]:
        verdict = pool.observe(p, key_id=key)
        if verdict.flagged:
            flagged.add(key)
        if key.startswith("key_honest"):
            assert not verdict.flagged, (key, verdict)
    assert pool.flagged  # the alarm holds
    assert flagged == {f"key_sybil{k}" for k in range(16)}
    # Each thief key sent 48 queries: a per-key ood_rate detector (min_queries 64) never tests one.
    for _, p in sybil_requests(rng, keys=1, rounds=3):
        assert not per_key.observe(p).flagged


def test_keys_that_sent_before_the_alarm_are_named_when_it_rises() -> None:
    """16 Sybil accounts sending one request each: the first ones never send again, yet are flagged."""
    rng = np.random.default_rng(6)
    pool = detector(min_queries=128, window=512)
    for key, p in honest_requests(rng, keys=2, requests=12):
        assert not pool.observe(p, key_id=key).alarm
    named: dict[str, str] = {}  # key -> the key whose request named it
    for key, p in sybil_requests(rng, keys=16, rounds=1):
        verdict = pool.observe(p, key_id=key)
        assert not set(verdict.newly_flagged) & set(named)  # each named once
        named.update(dict.fromkeys(verdict.newly_flagged, key))
        assert verdict.flagged == (key in named)
    assert sorted(named) == sorted(f"key_sybil{k}" for k in range(16))
    assert any(by != key for key, by in named.items())  # accounts named after their only request
    for key, p in honest_requests(rng, keys=2, requests=2):
        verdict = pool.observe(p, key_id=key)
        assert not verdict.flagged and verdict.newly_flagged == ()


def test_the_oldest_request_leaves_the_window_whole() -> None:
    pool = detector(min_queries=8, window=100)
    pool.observe(rows(np.zeros(60, bool)), key_id="key_a")
    pool.observe(rows(np.zeros(30, bool)), key_id="key_b")
    assert pool.queries == 90
    pool.observe(rows(np.zeros(20, bool)), key_id="key_c")  # 110 > 100: key_a's 60 leave together
    assert pool.queries == 50 and list(pool.window_keys) == ["key_b", "key_c"]
    pool.observe(rows(np.zeros(150, bool)), key_id="key_d")  # longer than the window: its last 100
    assert pool.queries == 100 and list(pool.window_keys) == ["key_d"]


def test_the_window_slides_and_min_queries_waits() -> None:
    rng = np.random.default_rng(2)
    pool = detector(min_queries=256, window=512)
    verdict = pool.observe(rows(np.ones(255, bool)), key_id="key_thief")
    assert not verdict.alarm and verdict.key_p_value < 1e-100  # all OOD, but 255 < min_queries
    verdict = pool.observe(rows(np.ones(1, bool)), key_id="key_thief")
    assert verdict.alarm and verdict.flagged
    for key, p in honest_requests(rng, keys=2, requests=16):  # 512 honest queries push the thief out
        verdict = pool.observe(p, key_id=key)
    assert not verdict.alarm and not pool.flagged and verdict.queries == 512
    assert "key_thief" not in pool.window_keys and len(pool.window_keys) == 2  # forgotten once out


def test_state_round_trips_and_a_smaller_window_keeps_the_newest() -> None:
    rng = np.random.default_rng(3)
    pool = detector(window=300, min_queries=100)
    requests = [*honest_requests(rng, 3, 4), *sybil_requests(rng, 4, 2)]
    for key, p in requests[:12]:
        pool.observe(p, key_id=key)
    restored = PooledOodDetector.from_bytes(pool.to_bytes(), TAU, 0.01, 1e-6, 100, 300, 1e-3)
    for key, p in requests[12:]:
        assert restored.observe(p, key_id=key) == pool.observe(p, key_id=key)
    assert restored.to_bytes() == pool.to_bytes()
    smaller = PooledOodDetector.from_bytes(pool.to_bytes(), TAU, 0.01, 1e-6, 50, 64, 1e-3)
    assert smaller.queries == 64 and set(smaller.window_keys) == {f"key_sybil{k}" for k in range(4)}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="bad pooled-OOD settings"):
        detector(min_queries=4096)
    with pytest.raises(ConfigError, match="exceeds the window"):
        parse_policy([{"name": "pooled_ood", "tau": 0.5, "window": 100}])
    with pytest.raises(ConfigError, match="score msp needs tau"):
        parse_policy([{"name": "pooled_ood"}])


# -- the detector-state stores ------------------------------------------------------------------


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_memory_and_redis_states_pool_every_key_like_one_detector(redis_url: str, prefix: str) -> None:  # noqa: F811
    step = PooledOodStep(tau=TAU, window=512, min_queries=64)
    rng = np.random.default_rng(4)
    requests = [*honest_requests(rng, 3, 4), *sybil_requests(rng, 6, 2), *honest_requests(rng, 3, 2)]

    async def scenario() -> None:
        client, other = connect(redis_url), connect(redis_url)  # two API processes
        names = RedisNames(prefix)
        local, memory = step.new_detector(), MemoryDetectorStates()
        stores = [RedisDetectorStates(client, names), RedisDetectorStates(other, names)]
        for index, (key, p) in enumerate(requests):
            expected = local.observe(p, key_id=key)
            labels = p.argmax(axis=1)
            assert await memory.observe_pooled(step, key, "victim", p, labels) == expected
            assert await stores[index % 2].observe_pooled(step, key, "victim", p, labels) == expected
        assert expected.alarm
        # One state per (step, model) under one Redis key; another model has its own.
        stored = await client.get(f"{prefix}:pooled_ood:_pool:victim")
        assert stored == local.to_bytes()
        assert not (await stores[0].observe_pooled(step, "key_sybil0", "other", rows(np.ones(8, bool)),
                                                   np.zeros(8))).alarm
        # Concurrent requests of many keys from both processes: none is lost under the lock.
        await asyncio.gather(*(stores[i % 2].observe_pooled(step, f"key_c{i}", "busy", rows(np.zeros(4, bool)),
                                                            np.zeros(4)) for i in range(24)))
        after = await client.get(f"{prefix}:pooled_ood:_pool:busy")
        assert isinstance(after, bytes)
        final = PooledOodDetector.from_bytes(after, TAU, 0.01, 1e-6, 64, 512, 1e-3)
        assert final.queries == 96 and set(final.window_keys) == {f"key_c{i}" for i in range(24)}
        await client.aclose()
        await other.aclose()

    _run(scenario)


# -- through a real server ------------------------------------------------------------------------


def _msp(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return torch.softmax(model(images), dim=1).max(dim=1).values.numpy()


def _send(server: ServerProcess, key: str, images: np.ndarray) -> None:
    content, headers = binary_request(images)
    response = httpx.post(f"{server.url}/v2/models/victim/infer", content=content,
                          headers={"X-API-Key": key, **headers}, timeout=60)
    assert response.status_code == 200, response.text


def _flags(server: ServerProcess, key: str) -> list[str]:
    return list(httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}, timeout=30).json()["flags"])


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_pooled_ood_flags_a_16_key_sybil_and_no_honest_key_over_http(
    store: str, digits_checkpoint: Path, redis_url: str, prefix: str, tmp_path: Path,  # noqa: F811
) -> None:
    data = load_dataset("digits")
    # tau: the 2 % quantile of the victim's MSP on the validation split (the defender's choice).
    tau = float(np.quantile(_msp(digits_checkpoint, data.x_val), 0.02))
    # Dim uniform noise (pixels uniform in [0, 0.5]): this small victim gives nearly all of it an
    # MSP under tau (full-range noise fools it more often).
    noise = 0.5 * np.random.default_rng(5).random((16 * 48, 1, 8, 8), dtype=np.float32)
    assert (_msp(digits_checkpoint, torch.from_numpy(noise)) < tau).mean() > 0.5
    steps = [{"name": "pooled_ood", "tau": tau, "honest_rate": 0.02},
             {"name": "ood_rate", "tau": tau, "honest_rate": 0.02}]
    args = ["--policy", f"victim={json.dumps(steps)}"]
    if store == "redis":
        args += ["--redis-url", redis_url, "--redis-prefix", prefix]
    server = ServerProcess({"victim": digits_checkpoint}, args=args, log_path=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            honest = [new_key(client, budget=10_000, name=f"honest{k}") for k in range(2)]
            thieves = [new_key(client, budget=48, name=f"sybil{k}") for k in range(16)]
        test = data.x_test.numpy()
        for start in range(0, len(test), 60):  # the test split, shared by the two honest users
            _send(server, honest[(start // 60) % 2], test[start:start + 60])
        assert [_flags(server, key) for key in honest] == [[], []]
        for round_ in range(3):  # 16 keys x 3 requests x 16 images; each key far below ood_rate's 64
            for index, key in enumerate(thieves):
                start = (round_ * 16 + index) * 16
                _send(server, key, noise[start:start + 16])
        for start in range(0, len(test), 60):  # honest users keep working while the alarm holds
            _send(server, honest[(start // 60) % 2], test[start:start + 60])
        assert [_flags(server, key) for key in thieves] == [["pooled_ood"]] * 16
        assert [_flags(server, key) for key in honest] == [[], []]
        if store == "redis":
            assert redis.Redis.from_url(redis_url).exists(f"{prefix}:pooled_ood:_pool:victim") == 1
        assert "pooled_ood flagged key" in server.log()
    finally:
        server.stop()
