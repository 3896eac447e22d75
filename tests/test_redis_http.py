"""The Redis scale-out with real processes: API servers, workers and redis-servers.

Every process is started as a user starts it (``python -m stealsim serve|worker``);
clients talk HTTP; nothing is mocked. Tests that stop Redis run their own
``redis-server``; the others share ``STEALSIM_TEST_REDIS_URL`` under a unique prefix.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import redis
import torch
from redis_support import RedisServer, WorkerProcess, prefix, redis_url  # noqa: F401
from server_support import ServerProcess, admin, binary_request, decode_binary_response, new_key

from stealsim.checkpoint import load_checkpoint

MODEL = "victim"


def api(checkpoint: Path, url: str, prefix: str, log: Path, *, batching: str = "local",  # noqa: F811
        env: dict[str, str] | None = None, processes: int = 1) -> ServerProcess:
    return ServerProcess(
        {MODEL: checkpoint},
        args=["--redis-url", url, "--redis-prefix", prefix, "--batching", batching,
              "--workers", str(processes)],
        env=env, log_path=log,
    )


def used(client: httpx.Client, key: str) -> int:
    response = client.get("/v1/usage", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return int(response.json()["used"])


async def race(urls: list[str], key: str, sizes: list[int], clients: int) -> list[tuple[int, int]]:
    """``clients`` concurrent clients, spread over ``urls``, sending ``sizes``; (status, images)."""
    rng = np.random.default_rng(0)
    limits = httpx.Limits(max_connections=clients)
    https = [httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) for url in urls]

    async def one_client(worker: int) -> list[tuple[int, int]]:
        http = https[worker % len(https)]
        answers = []
        for size in sizes[worker::clients]:
            content, headers = binary_request(rng.random((size, 1, 8, 8), dtype=np.float32))
            response = await http.post(f"/v2/models/{MODEL}/infer", content=content,
                                       headers={"X-API-Key": key, **headers})
            if response.status_code == 200:
                _, values = decode_binary_response(response)
                assert values.shape == (size, 10)
            answers.append((response.status_code, size))
        return answers

    try:
        results = await asyncio.gather(*(one_client(w) for w in range(clients)))
    finally:
        for http in https:
            await http.aclose()
    return [answer for answers in results for answer in answers]


def test_two_api_processes_share_budget_rate_limits_and_keys(
    digits_checkpoint: Path, redis_url: str, prefix: str, tmp_path: Path,  # noqa: F811
) -> None:
    # One plain API process, and one port served by two (uvicorn --workers 2): three in all.
    servers = [api(digits_checkpoint, redis_url, prefix, tmp_path / f"api{i}.log", processes=1 + i)
               for i in range(2)]
    try:
        with httpx.Client(base_url=servers[0].url, timeout=60) as one, \
             httpx.Client(base_url=servers[1].url, timeout=60) as two:
            # A key made on one process works on the other.
            key = new_key(one, budget=100, rate="100000/second", image_rate="1000000/second")
            sizes = np.random.default_rng(1).integers(1, 9, size=96).tolist()
            answers = asyncio.run(race([s.url for s in servers], key, sizes, clients=48))
            served = sum(size for status, size in answers if status == 200)
            assert {status for status, _ in answers} == {200, 429}
            assert 100 - max(sizes) < served <= 100
            assert used(one, key) == used(two, key) == served

            # Rate-limit windows are shared too: 3 requests per minute in all, not per process.
            limited = new_key(two, budget=100, rate="3/minute")
            statuses = []
            for client in (one, two, one, two, one):
                content, headers = binary_request(np.zeros((1, 1, 8, 8), np.float32))
                statuses.append(client.post(f"/v2/models/{MODEL}/infer", content=content,
                                            headers={"X-API-Key": limited, **headers}).status_code)
            assert statuses == [200, 200, 200, 429, 429]
            assert used(one, limited) == 3

            # Revoked on one process, refused by the other.
            key_id = two.get("/v1/usage", headers={"X-API-Key": limited}).json()["key_id"]
            assert one.delete(f"/v1/admin/keys/{key_id}", headers=admin()).status_code == 200
            assert two.get("/v1/usage", headers={"X-API-Key": limited}).status_code == 401
    finally:
        for server in servers:
            server.stop()


def test_worker_killed_mid_batch_its_requests_are_served_by_another(
    digits_checkpoint: Path, redis_url: str, prefix: str, tmp_path: Path,  # noqa: F811
) -> None:
    models = {MODEL: digits_checkpoint}
    # The idle-time safety net is out of reach (10 minutes, the callers wait 40 s): only the
    # heartbeats can get worker A's entries served. A holds what it reads for 5 s (waiting to
    # fill a batch) and is SIGKILLed meanwhile; B, alive all along, must take them over.
    never = ["--claim-idle-ms", "600000"]
    first = WorkerProcess(redis_url, prefix, models, log_path=tmp_path / "a.log",
                          args=["--max-wait-ms", "5000", *never])
    second = WorkerProcess(redis_url, prefix, models, log_path=tmp_path / "b.log", args=never)
    first.wait_seen(redis_url, prefix, MODEL)
    second.wait_seen(redis_url, prefix, MODEL)
    server = api(digits_checkpoint, redis_url, prefix, tmp_path / "api.log", batching="redis",
                 env={"STEALSIM_INFERENCE_TIMEOUT_S": "40"})
    watcher = redis.Redis.from_url(redis_url)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            key = new_key(client, budget=10_000)
            sizes = [1, 2, 3, 4] * 8

            async def scenario() -> list[tuple[int, int]]:
                requests = asyncio.create_task(race([server.url], key, sizes, clients=32))
                deadline = time.monotonic() + 30
                while True:  # until worker A has read (and not acknowledged) some requests
                    pending = await asyncio.to_thread(
                        watcher.xpending_range, f"{prefix}:stream:{MODEL}", "workers",
                        "-", "+", 100, first.name,
                    )
                    if pending or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                assert pending, f"worker A never read a request:\n{first.log()}"
                first.kill()
                return await requests

            answers = asyncio.run(scenario())
            statuses = [status for status, _ in answers]
            assert set(statuses) <= {200, 503}, statuses
            assert statuses.count(200) == len(sizes), "the live worker should claim every entry"
            assert used(client, key) == sum(size for status, size in answers if status == 200)
            assert f"from {first.name} (no heartbeat" in " ".join(second.log().split())  # rich wraps lines
            # Nothing left behind: no entry in the stream, none pending.
            assert watcher.xlen(f"{prefix}:stream:{MODEL}") == 0
            assert watcher.xpending(f"{prefix}:stream:{MODEL}", "workers")["pending"] == 0
    finally:
        watcher.close()
        server.stop()
        second.stop()
        if first.process.poll() is None:
            first.kill()


def test_redis_restart_503_meanwhile_then_recovers_and_audit_survives(
    digits_checkpoint: Path, tmp_path: Path,
) -> None:
    own = RedisServer(tmp_path / "redis", append_only=True)
    name = "restart"
    env = {"STEALSIM_INFERENCE_TIMEOUT_S": "3", "STEALSIM_WORKER_SEEN_S": "3"}
    worker = WorkerProcess(own.url, name, {MODEL: digits_checkpoint}, log_path=tmp_path / "w.log")
    worker.wait_seen(own.url, name, MODEL)
    server = api(digits_checkpoint, own.url, name, tmp_path / "api1.log", batching="redis", env=env)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            key = new_key(client, budget=1000)
            content, headers = binary_request(np.full((5, 1, 8, 8), 0.5, np.float32))
            headers = {"X-API-Key": key, **headers}

            def infer() -> int:
                return client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers).status_code

            # Answers through the stream and a worker are the model's own.
            first = client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
            assert first.status_code == 200, first.text
            model, _ = load_checkpoint(digits_checkpoint)
            with torch.no_grad():
                reference = torch.softmax(model(torch.full((5, 1, 8, 8), 0.5)), dim=1).numpy()
            np.testing.assert_allclose(decode_binary_response(first)[1], reference, atol=1e-5)
            own.stop()
            down = client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
            assert down.status_code == 503 and down.json()["code"] == "unavailable", down.text
            assert "Redis" in down.json()["error"]
            ready = client.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert client.get("/v2/health/live").status_code == 200
            assert "stealsim_backend_up 0.0" in client.get("/metrics").text

            own.start()  # same port, same append-only file: keys and usage are back
            deadline = time.monotonic() + 30
            while (status := infer()) != 200 and time.monotonic() < deadline:
                assert status == 503
                time.sleep(0.2)
            assert status == 200, "the API did not recover after Redis came back"
            assert client.get("/v2/health/ready").json() == {"ready": True}
            assert used(client, key) == 10  # the requests refused while Redis was down cost nothing

            # No worker: the request is refused with 503 after the timeout, and refunded.
            worker.stop()
            gone = client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
            assert gone.status_code == 503 and "within 3" in gone.json()["error"], gone.text
            assert used(client, key) == 10
            not_ready = client.get("/v2/health/ready").json()
            assert not_ready["ready"] is False and "no worker" in not_ready["reasons"][0]
            metrics = client.get("/metrics").text
            assert f'stealsim_workers_live{{model="{MODEL}"}} 0.0' in metrics
            assert "stealsim_backend_up 1.0" in metrics
            assert f'stealsim_stream_entries{{model="{MODEL}"}} 1.0' in metrics  # the unanswered one

        server.stop()
        server = api(digits_checkpoint, own.url, name, tmp_path / "api2.log", env=env)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            audit = [json.loads(line) for line in
                     client.get("/v1/admin/audit", headers=admin()).text.splitlines()]
            assert [entry["images"] for entry in audit] == [5, 5]
            assert used(client, key) == 10
    finally:
        server.stop()
        if worker.process.poll() is None:
            worker.stop()
        own.stop()


def test_sigterm_worker_finishes_its_batch_then_exits(
    digits_checkpoint: Path, redis_url: str, prefix: str, tmp_path: Path,  # noqa: F811
) -> None:
    worker = WorkerProcess(redis_url, prefix, {MODEL: digits_checkpoint}, log_path=tmp_path / "w.log",
                           args=["--max-wait-ms", "30000"])  # holds what it reads until stopped
    worker.wait_seen(redis_url, prefix, MODEL)
    server = api(digits_checkpoint, redis_url, prefix, tmp_path / "api.log", batching="redis")
    watcher = redis.Redis.from_url(redis_url)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            key = new_key(client, budget=1000)

            async def scenario() -> list[tuple[int, int]]:
                requests = asyncio.create_task(race([server.url], key, [3] * 6, clients=6))
                while len(await asyncio.to_thread(  # until the worker holds all 6 requests
                    watcher.xpending_range, f"{prefix}:stream:{MODEL}", "workers", "-", "+", 10, worker.name
                )) < 6:
                    await asyncio.sleep(0.05)
                worker.process.send_signal(signal.SIGTERM)
                return await requests

            answers = asyncio.run(scenario())
            assert worker.process.wait(timeout=30) == 0, worker.log()
            # It stopped waiting for more, served what it held, acknowledged, left.
            assert [status for status, _ in answers if status != 200] == []
            assert used(client, key) == 18
            assert watcher.xpending(f"{prefix}:stream:{MODEL}", "workers")["pending"] == 0
            assert watcher.zcard(f"{prefix}:workers:{MODEL}") == 0  # it left
            assert client.get("/v2/health/ready").status_code == 503
    finally:
        watcher.close()
        server.stop()
        worker.stop()
