"""Redis Streams batching: the API enqueues, ``stealsim worker`` processes coalesce and infer.

The request path, for one request of N images of model M:

1. the API adds one entry to the stream ``PREFIX:stream:M`` (fields ``id``,
   ``shape``, ``deadline``, ``data``: the float32 pixels as raw little-endian
   bytes), refused with 503 when the stream already holds ``stream_max_len``
   entries (one Lua script: length check and ``XADD ... MAXLEN ~``);
2. it blocks on ``BLPOP PREFIX:reply:ID`` until the reply or its timeout;
3. a worker (:mod:`victim_server.worker`) reads entries with the consumer group
   ``workers``, coalesces them up to its batch size or wait, calls
   ``predict_batch``, pushes each reply (with an expiry) and then XACKs and
   deletes the entries, so the stream holds only requests not yet answered.

A reply is ``ok:ROWS,COLS:`` followed by the float32 probabilities, or
``error:MESSAGE``. This module knows nothing of models: the worker is given one
``predict_batch`` per model name, like the local batcher.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stealsim.errors import ModelNotFoundError, UnavailableError
from victim_server.batching import ModelStatus
from victim_server.redis_keys import CONSUMER_GROUP, RedisNames, redis_errors

__all__ = [
    "RedisBatcher",
    "StreamRequest",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "encode_request",
]

logger = logging.getLogger(__name__)

_FP32 = np.dtype("<f4")

_ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                  'id', ARGV[2], 'shape', ARGV[3], 'deadline', ARGV[4], 'data', ARGV[5])
"""


@dataclass(frozen=True)
class StreamRequest:
    """One stream entry as a worker sees it."""

    entry_id: bytes
    request_id: str
    images: np.ndarray
    deadline: float
    """Epoch seconds after which the caller no longer waits (the worker skips it)."""


def encode_request(request_id: str, images: np.ndarray, deadline: float) -> list[bytes | str]:
    """The ARGV of the enqueue script after the max length: id, shape, deadline, data."""
    data = np.ascontiguousarray(images, dtype=_FP32).tobytes()
    return [request_id, ",".join(str(d) for d in images.shape), repr(deadline), data]


def decode_request(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamRequest:
    shape = tuple(int(d) for d in fields[b"shape"].decode().split(","))
    images = np.frombuffer(fields[b"data"], dtype=_FP32).reshape(shape)
    return StreamRequest(entry_id, fields[b"id"].decode(), images, float(fields[b"deadline"]))


def encode_reply(outputs: np.ndarray) -> bytes:
    rows, cols = outputs.shape
    return f"ok:{rows},{cols}:".encode() + np.ascontiguousarray(outputs, dtype=_FP32).tobytes()


def encode_error(message: str) -> bytes:
    return b"error:" + message.encode()


def decode_reply(reply: bytes) -> np.ndarray:
    """The probabilities of an ``ok`` reply; raises UnavailableError for an ``error`` reply."""
    kind, _, rest = reply.partition(b":")
    if kind != b"ok":
        raise UnavailableError(f"inference failed on a worker: {rest.decode(errors='replace')}")
    shape, _, data = rest.partition(b":")
    rows, cols = (int(d) for d in shape.decode().split(","))
    return np.frombuffer(data, dtype=_FP32).reshape(rows, cols)


class RedisBatcher:
    """:class:`~victim_server.batching.Batcher` over Redis Streams, for the models ``models``.

    ``reply_timeout_s`` is how long a caller blocks for its reply; the service's own
    timeout (``inference_timeout_s``) refunds and answers 503 when it runs out. The
    client's socket timeout must be longer than ``reply_timeout_s`` (BLPOP blocks).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        names: RedisNames,
        models: Iterable[str],
        reply_timeout_s: float,
        stream_max_len: int = 10_000,
        worker_seen_s: float = 5.0,
    ) -> None:
        self._redis = client
        self._names = names
        self._models = frozenset(models)
        self._reply_timeout_s = reply_timeout_s
        self._max_len = stream_max_len
        self._worker_seen_s = worker_seen_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._accepting = False

    async def start(self) -> None:
        self._accepting = True

    async def stop(self) -> None:
        """Stop taking requests; callers already blocked on a reply keep waiting for it."""
        self._accepting = False

    def queue_depth(self, model: str) -> int:
        return 0  # the backlog is in Redis: see status()

    async def submit(self, model: str, images: np.ndarray) -> np.ndarray:
        if model not in self._models:
            raise ModelNotFoundError(f"no model named {model!r}")
        if not self._accepting:
            raise UnavailableError("the server is shutting down")
        request_id = uuid.uuid4().hex
        deadline = time.time() + self._reply_timeout_s
        reply_key = self._names.reply(request_id)
        with redis_errors(f"queueing a request for model {model!r}"):
            entry = await self._enqueue(
                keys=[self._names.stream(model)],
                args=[self._max_len, *encode_request(request_id, images, deadline)],
            )
        if entry is None:
            raise UnavailableError(
                f"model {model!r} has {self._max_len} requests queued (the limit); retry later",
                retry_after=1,
            )
        with redis_errors(f"waiting for the reply of model {model!r}"):
            popped: list[bytes] | None = None
            try:
                popped = await self._redis.blpop(  # type: ignore[assignment]
                    [reply_key], timeout=self._reply_timeout_s
                )
            finally:
                if popped is None:  # timed out or cancelled: a late reply would sit until it expires
                    with contextlib.suppress(RedisError):
                        await self._redis.delete(reply_key)
        if popped is None:
            raise UnavailableError(
                f"no worker answered for model {model!r} within {self._reply_timeout_s} s",
                retry_after=1,
            )
        outputs = decode_reply(popped[1])
        if len(outputs) != len(images):
            raise UnavailableError(
                f"a worker answered {len(outputs)} rows for {len(images)} images of {model!r}"
            )
        return outputs

    async def status(self) -> dict[str, ModelStatus]:
        """Per model: ready (a worker seen lately), stream length, pending entries, live workers."""
        with redis_errors("reading the batching status"):
            seconds, microseconds = await self._redis.time()  # the clock the heartbeats use
            now = seconds + microseconds / 1e6
            async with self._redis.pipeline(transaction=False) as pipe:
                for model in sorted(self._models):
                    pipe.xlen(self._names.stream(model))
                    pipe.zcount(self._names.workers(model), now - self._worker_seen_s, "+inf")
                    pipe.xpending(self._names.stream(model), CONSUMER_GROUP)
                replies = await pipe.execute(raise_on_error=False)
        statuses: dict[str, ModelStatus] = {}
        for index, model in enumerate(sorted(self._models)):
            length, workers, pending = replies[3 * index : 3 * index + 3]
            pending_count = pending["pending"] if isinstance(pending, dict) else 0  # NOGROUP: none
            statuses[model] = ModelStatus(
                ready=int(workers) > 0,
                reason=None if int(workers) > 0 else
                f"no worker of model {model!r} seen within {self._worker_seen_s} s",
                queued=int(length), pending=int(pending_count), workers=int(workers),
            )
        return statuses
