"""Redis Streams batching in one process: RedisBatcher callers and a StreamWorker, real Redis.

``predict_batch`` here is a plain function (the worker knows nothing of models),
so these tests see exactly which batches the worker formed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from redis_support import prefix, redis_url  # noqa: F401

from stealsim.errors import UnavailableError
from victim_server.batching_redis import RedisBatcher, encode_request
from victim_server.redis_keys import CONSUMER_GROUP, RedisNames, connect
from victim_server.worker import StreamWorker, WorkerConfig


def row_sums(images: np.ndarray) -> np.ndarray:
    """A stand-in model: [N, 2] = (sum of pixels, index within the batch)."""
    return np.stack([images.reshape(len(images), -1).sum(1), np.arange(len(images))], 1).astype(np.float32)


async def with_worker(
    url: str, prefix: str, predict: Callable[[np.ndarray], np.ndarray],  # noqa: F811
    body: Callable[[RedisBatcher], Awaitable[None]], **config: object,
) -> StreamWorker:
    client = connect(url, socket_timeout=30)
    batcher = RedisBatcher(client, RedisNames(prefix), ["m"], reply_timeout_s=10)
    await batcher.start()
    worker = StreamWorker(client, {"m": predict},
                          WorkerConfig(redis_url=url, redis_prefix=prefix, **config))  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        await body(batcher)
    finally:
        worker.stop()
        await task
        await client.aclose()
    return worker


def test_worker_coalesces_entries_and_answers_each_its_rows(redis_url: str, prefix: str) -> None:  # noqa: F811
    batches: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        batches.append(len(images))
        return row_sums(images)

    async def body(batcher: RedisBatcher) -> None:
        requests = [np.full((n, 1, 2, 2), float(n), np.float32) for n in (1, 2, 3, 4, 5, 6)]
        answers = await asyncio.gather(*(batcher.submit("m", images) for images in requests))
        for images, answer in zip(requests, answers, strict=True):
            assert answer.shape == (len(images), 2)
            np.testing.assert_allclose(answer[:, 0], images.reshape(len(images), -1).sum(1))
        with pytest.raises(Exception, match="no model named"):
            await batcher.submit("other", requests[0])

    worker = asyncio.run(with_worker(redis_url, prefix, predict, body, max_batch_size=8, max_wait_ms=500))
    assert sum(batches) == 21 and max(batches) <= 8  # never more than the batch size
    assert len(batches) < 6  # entries were coalesced
    assert worker.images == 21


def test_failed_inference_fails_every_caller_of_the_batch(redis_url: str, prefix: str) -> None:  # noqa: F811
    def predict(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    async def body(batcher: RedisBatcher) -> None:
        results = await asyncio.gather(
            *(batcher.submit("m", np.zeros((2, 1, 2, 2), np.float32)) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, UnavailableError) and "RuntimeError" in str(r) for r in results)

    asyncio.run(with_worker(redis_url, prefix, predict, body))


def test_full_stream_refuses_at_once(redis_url: str, prefix: str) -> None:  # noqa: F811
    async def scenario() -> None:
        client = connect(redis_url, socket_timeout=30)
        batcher = RedisBatcher(client, RedisNames(prefix), ["m"], reply_timeout_s=1, stream_max_len=2)
        await batcher.start()
        image = np.zeros((1, 1, 2, 2), np.float32)
        waiting = [asyncio.create_task(batcher.submit("m", image)) for _ in range(2)]
        while await client.xlen(f"{prefix}:stream:m") < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError, match="2 requests queued"):
            await batcher.submit("m", image)
        for task in waiting:  # no worker: each gives up after its reply timeout
            with pytest.raises(UnavailableError, match="no worker answered"):
                await task
        status = (await batcher.status())["m"]
        assert (status.ready, status.queued, status.workers) == (False, 2, 0)
        await client.aclose()

    asyncio.run(scenario())


def test_an_entry_delivered_too_often_is_answered_with_an_error(redis_url: str, prefix: str) -> None:  # noqa: F811
    served: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        served.append(len(images))
        return row_sums(images)

    stream = f"{prefix}:stream:m"

    async def setup() -> None:
        # An entry that three workers read and then died on (a request that kills workers?).
        client = connect(redis_url)
        await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        request_id, shape, deadline, data = encode_request("poison", np.ones((1, 1, 2, 2), np.float32), 1e12)
        await client.xadd(stream, {"id": request_id, "shape": shape, "deadline": deadline, "data": data})
        await client.xreadgroup(CONSUMER_GROUP, "dead-1", {stream: ">"})
        for name in ("dead-2", "dead-3"):
            pending = await client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 1)
            await client.xclaim(stream, CONSUMER_GROUP, name, 0, [pending[0]["message_id"]])
        await client.aclose()

    async def body(batcher: RedisBatcher) -> None:
        client = connect(redis_url, socket_timeout=30)
        reply = await client.blpop([f"{prefix}:reply:poison"], timeout=20)
        assert reply is not None and reply[1].startswith(b"error:")
        assert await client.xlen(stream) == 0
        # The worker goes on serving.
        answer = await batcher.submit("m", np.ones((3, 1, 2, 2), np.float32))
        np.testing.assert_allclose(answer[:, 0], [4.0, 4.0, 4.0])
        await client.aclose()

    asyncio.run(setup())
    asyncio.run(with_worker(redis_url, prefix, predict, body, claim_idle_ms=1, max_deliveries=3))
    assert served == [3]
