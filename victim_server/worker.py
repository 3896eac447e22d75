"""``stealsim worker``: read inference requests from Redis Streams, batch, infer, reply.

Any number of workers, on any host (one per GPU), serve a model together: each
reads its model's stream ``PREFIX:stream:M`` with the consumer group
``workers`` (so an entry goes to one worker), coalesces entries up to
``max_batch_size`` images or ``max_wait_ms`` after the first, calls the same
``predict_batch(images)`` as the in-process batcher, pushes each reply to
``PREFIX:reply:ID`` (with an expiry), then XACKs and deletes the entries.

Crash recovery: entries read by a worker that died (SIGKILL, lost host) stay
pending on it. Every worker sends a heartbeat to ``PREFIX:workers:M`` every
``heartbeat_s`` (Redis server time, so hosts' clocks do not matter) and, as
often, looks for consumers of its group that hold pending entries but whose
heartbeat is older than ``dead_after_s`` (or gone): it claims their entries at
once (XCLAIM) and serves them, so a killed worker costs its callers about
``dead_after_s``, not a fixed idle time. ``claim_idle_ms`` (XAUTOCLAIM of any
entry idle that long) stays as the safety net. An entry delivered more than
``max_deliveries`` times (it may be what kills workers) is answered with an
error and dropped. Entries whose caller's deadline has passed are acknowledged
without inference. The heartbeats also tell the API which models have live workers.

A worker wrongly declared dead (its heartbeat stalled longer than ``dead_after_s``)
costs double work, never a double charge: the API charges once per request and
takes the first reply; a second one expires unread.

Graceful stop (SIGTERM/SIGINT, or :meth:`StreamWorker.stop`): the current batch
finishes, is replied to and acknowledged, then the worker leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from stealsim.errors import ConfigError
from victim_server.batching import PredictFn
from victim_server.batching_redis import (
    StreamRequest,
    decode_request,
    encode_error,
    encode_reply,
)
from victim_server.redis_keys import CONSUMER_GROUP, RedisNames, connect

__all__ = ["StreamWorker", "WorkerConfig", "run_worker", "serve_checkpoints"]

logger = logging.getLogger(__name__)

_READ_BLOCK_MS = 500
"""Longest blocking read: how soon an idle worker notices a stop request."""


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process."""

    redis_url: str
    redis_prefix: str = "stealsim"
    max_batch_size: int = 256
    """Images per forward pass at most (one larger request runs alone, unsplit)."""
    max_wait_ms: float = 2.0
    """How long a batch waits for more entries after its first one."""
    claim_idle_ms: int = 10_000
    """Safety net: entries pending this long on any other worker are claimed and served."""
    max_deliveries: int = 3
    """An entry claimed more often than this (it keeps killing workers?) is answered with
    an error and dropped instead of being served again."""
    heartbeat_s: float = 0.5
    """How often this worker says it is alive, and looks for dead ones."""
    dead_after_s: float = 1.5
    """A worker whose latest heartbeat is older than this is dead: its entries are claimed."""
    reply_ttl_s: float = 60.0
    """Expiry of a reply nobody pops (its caller gave up)."""
    name: str | None = None
    """Consumer name in the group; default: host-pid-random."""

    def __post_init__(self) -> None:
        if (self.max_batch_size < 1 or self.max_wait_ms < 0 or self.claim_idle_ms < 1
                or self.max_deliveries < 1 or self.heartbeat_s <= 0
                or self.dead_after_s <= self.heartbeat_s):
            raise ValueError(
                f"bad worker settings: max_batch_size={self.max_batch_size} "
                f"max_wait_ms={self.max_wait_ms} claim_idle_ms={self.claim_idle_ms} "
                f"heartbeat_s={self.heartbeat_s} dead_after_s={self.dead_after_s} "
                "(dead_after_s must exceed heartbeat_s)"
            )


Entry = tuple[bytes, dict[bytes, bytes]]


class StreamWorker:
    """Serves ``predictors`` (model name -> ``predict_batch``) from their Redis Streams."""

    def __init__(
        self, client: aioredis.Redis, predictors: Mapping[str, PredictFn], config: WorkerConfig
    ) -> None:
        if not predictors:
            raise ValueError("a worker needs at least one model")
        self._redis = client
        self._names = RedisNames(config.redis_prefix)
        self._predictors = dict(predictors)
        self._config = config
        self.name = config.name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopping = asyncio.Event()
        self.batches = 0
        self.images = 0

    def stop(self) -> None:
        """Finish the current batch of each model, then return from :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; Redis outages are waited out, not fatal."""
        executors = {
            name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
            for name in self._predictors
        }
        # Seen before reading anything, so no other worker takes this one for dead.
        with contextlib.suppress(RedisError):
            await self._beat()
        heartbeat = asyncio.create_task(self._heartbeat(), name="worker-heartbeat")
        try:
            await asyncio.gather(*(
                self._serve(name, predict, executors[name])
                for name, predict in self._predictors.items()
            ))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            for executor in executors.values():
                executor.shutdown(wait=True)
            await self._leave()
        logger.info("worker %s stopped after %d batches (%d images)", self.name, self.batches, self.images)

    # --- the loop of one model --------------------------------------------------------

    async def _serve(self, model: str, predict: PredictFn, executor: ThreadPoolExecutor) -> None:
        stream = self._names.stream(model)
        claim_every = self._config.claim_idle_ms / 2000.0
        next_claim = 0.0
        next_rescue = 0.0
        group_ready = False
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    await self._ensure_group(stream)
                    group_ready = True
                entries: list[Entry] = []
                if time.monotonic() >= next_rescue:
                    entries = await self._claim_from_dead(stream, model)
                    next_rescue = time.monotonic() + self._config.heartbeat_s
                if not entries and time.monotonic() >= next_claim:
                    entries = await self._claim(stream)
                    next_claim = time.monotonic() + claim_every
                if not entries:
                    entries = await self._read(stream, self._config.max_batch_size, _READ_BLOCK_MS)
                if not entries:
                    continue
                entries += await self._coalesce(stream, entries)
                await self._process(model, stream, entries, predict, executor)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost the stream (restarted without persistence)
                    group_ready = False
                    continue
                logger.exception("worker %s: Redis refused a command for %s", self.name, model)
                await self._pause()
            except RedisError as exc:
                logger.warning("worker %s: Redis unavailable (%s); retrying", self.name, exc)
                group_ready = False
                await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), 0.5)

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self._redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, stream: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self._redis.xreadgroup(
            CONSUMER_GROUP, self.name, {stream: ">"}, count=count, block=block_ms
        )
        return list(reply[0][1]) if reply else []

    async def _claim_from_dead(self, stream: str, model: str) -> list[Entry]:
        """Entries pending on consumers whose heartbeat is older than dead_after_s (or gone).

        The claim's minimum idle time (dead_after_s - heartbeat_s: an entry the dead
        worker read after its last heartbeat is at least that old) makes two workers
        that spot the same death at once take each entry only once.
        """
        consumers: Any = await self._redis.xinfo_consumers(stream, CONSUMER_GROUP)
        names = [c["name"].decode() for c in consumers if int(c["pending"]) > 0]  # bytes: no decoding client
        holding = [name for name in names if name != self.name]
        if not holding:
            return []
        seconds, microseconds = await self._redis.time()
        now = seconds + microseconds / 1e6
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in holding:
                pipe.zscore(self._names.workers(model), name)
            beats = await pipe.execute()
        dead = [name for name, beat in zip(holding, beats, strict=True)
                if beat is None or now - float(beat) > self._config.dead_after_s]
        min_idle_ms = int((self._config.dead_after_s - self._config.heartbeat_s) * 1000)
        claimed: list[Entry] = []
        for name in dead:
            room = self._config.max_batch_size - len(claimed)
            if room <= 0:
                break
            pending: Any = await self._redis.xpending_range(
                stream, CONSUMER_GROUP, min="-", max="+", count=room, consumername=name
            )
            ids = [entry["message_id"] for entry in pending]
            if not ids:
                continue
            got: Any = await self._redis.xclaim(stream, CONSUMER_GROUP, self.name, min_idle_ms, ids)
            claimed += [(entry_id, fields) for entry_id, fields in got if fields]
            if got:
                logger.warning("worker %s claimed %d entries of %s from %s (no heartbeat for %.1f s)",
                               self.name, len(got), stream, name, self._config.dead_after_s)
        return await self._screen(stream, claimed)

    async def _claim(self, stream: str) -> list[Entry]:
        """Entries idle on another consumer (a dead worker) for claim_idle_ms."""
        reply: Any = await self._redis.xautoclaim(
            stream, CONSUMER_GROUP, self.name, self._config.claim_idle_ms,
            start_id="0-0", count=self._config.max_batch_size,
        )
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
        if claimed:
            logger.warning("worker %s claimed %d entries of %s idle for %d ms",
                           self.name, len(claimed), stream, self._config.claim_idle_ms)
        return await self._screen(stream, claimed)

    async def _screen(self, stream: str, claimed: list[Entry]) -> list[Entry]:
        """The claimed entries to serve; those delivered too often are answered with an error."""
        if not claimed:
            return []
        pending: Any = await self._redis.xpending_range(
            stream, CONSUMER_GROUP, min=claimed[0][0], max=claimed[-1][0], count=len(claimed),
            consumername=self.name,
        )
        deliveries = {entry["message_id"]: entry["times_delivered"] for entry in pending}
        poison = [e for e in claimed if deliveries.get(e[0], 0) > self._config.max_deliveries]
        if poison:
            await self._drop(stream, poison)
        return [e for e in claimed if deliveries.get(e[0], 0) <= self._config.max_deliveries]

    async def _drop(self, stream: str, entries: list[Entry]) -> None:
        """Answer entries delivered too often with an error; acknowledge and delete them."""
        logger.error("worker %s drops %d entries of %s delivered more than %d times",
                     self.name, len(entries), stream, self._config.max_deliveries)
        message = encode_error(
            f"the request was tried by {self._config.max_deliveries} workers, which all failed"
        )
        ids = [entry_id for entry_id, _ in entries]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, fields in entries:
                if b"id" in fields:
                    key = self._names.reply(fields[b"id"].decode(errors="replace"))
                    pipe.rpush(key, message)
                    pipe.expire(key, int(self._config.reply_ttl_s))
            pipe.xack(stream, CONSUMER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()

    async def _coalesce(self, stream: str, first: list[Entry]) -> list[Entry]:
        """More entries until the batch is full or max_wait_ms after the first arrived."""
        images = sum(_count(fields) for _, fields in first)
        more: list[Entry] = []
        deadline = time.monotonic() + self._config.max_wait_ms / 1000.0
        while images < self._config.max_batch_size and not self._stopping.is_set():
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            if remaining_ms <= 0:
                break
            # BLOCK 0 would wait forever: under a millisecond, take only what is there. Long
            # waits are cut in pieces so that a stop request ends the wait.
            block = min(int(remaining_ms), _READ_BLOCK_MS) if remaining_ms >= 1 else None
            got = await self._read(stream, self._config.max_batch_size - images, block)
            if not got:
                if block is None:
                    break
                continue
            more += got
            images += sum(_count(fields) for _, fields in got)
        return more

    async def _process(
        self, model: str, stream: str, entries: list[Entry],
        predict: PredictFn, executor: ThreadPoolExecutor,
    ) -> None:
        now = time.time()
        replies: list[tuple[str, bytes]] = []
        live: list[StreamRequest] = []
        for entry_id, fields in entries:
            try:
                request = decode_request(entry_id, fields)
            except (KeyError, ValueError) as exc:
                request_id = fields.get(b"id", b"").decode(errors="replace")
                if request_id:
                    replies.append((request_id, encode_error(f"malformed stream entry: {exc}")))
                continue
            if request.deadline >= now:  # else its caller gave up: acknowledge, skip the work
                live.append(request)
        for batch in _batches(live, self._config.max_batch_size):
            replies += await self._infer(model, batch, predict, executor)
        ids = [entry_id for entry_id, _ in entries]
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, payload in replies:
                key = self._names.reply(request_id)
                pipe.rpush(key, payload)
                pipe.expire(key, int(self._config.reply_ttl_s))
            pipe.xack(stream, CONSUMER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()

    async def _infer(
        self, model: str, batch: list[StreamRequest], predict: PredictFn, executor: ThreadPoolExecutor
    ) -> list[tuple[str, bytes]]:
        images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(executor, predict, images)
            if len(outputs) != len(images):
                raise RuntimeError(f"predict_batch returned {len(outputs)} rows for {len(images)} images")
        except Exception as exc:
            logger.exception("worker %s: batch of %d images for %s failed", self.name, len(images), model)
            error = encode_error(f"{type(exc).__name__} in model {model!r}")
            return [(request.request_id, error) for request in batch]
        self.batches += 1
        self.images += len(images)
        replies = []
        offset = 0
        for request in batch:
            count = len(request.images)
            replies.append((request.request_id, encode_reply(outputs[offset : offset + count])))
            offset += count
        return replies

    # --- presence -----------------------------------------------------------------------

    async def _beat(self) -> None:
        seconds, microseconds = await self._redis.time()  # Redis's clock: one clock for every host
        now = seconds + microseconds / 1e6
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in self._predictors:
                pipe.zadd(self._names.workers(model), {self.name: now})
                pipe.zremrangebyscore(self._names.workers(model), "-inf", now - 3600)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._beat()
            except RedisError as exc:
                logger.debug("worker %s: heartbeat failed (%s)", self.name, exc)
            await asyncio.sleep(self._config.heartbeat_s)

    async def _leave(self) -> None:
        """Remove this worker's heartbeat and (when nothing is pending on it) its consumer."""
        try:
            for model in self._predictors:
                await self._redis.zrem(self._names.workers(model), self.name)
                stream = self._names.stream(model)
                pending = await self._redis.xpending_range(
                    stream, CONSUMER_GROUP, min="-", max="+", count=1, consumername=self.name
                )
                if not pending:
                    await self._redis.xgroup_delconsumer(stream, CONSUMER_GROUP, self.name)
        except RedisError as exc:
            logger.warning("worker %s: could not deregister (%s)", self.name, exc)


def _count(fields: dict[bytes, bytes]) -> int:
    """Images in an entry (its shape's first dimension); 1 for a malformed one."""
    try:
        return max(1, int(fields[b"shape"].split(b",", 1)[0]))
    except (KeyError, ValueError):
        return 1


def _batches(requests: list[StreamRequest], max_images: int) -> list[list[StreamRequest]]:
    """Consecutive groups of at most ``max_images`` images (a larger request alone)."""
    batches: list[list[StreamRequest]] = []
    current: list[StreamRequest] = []
    size = 0
    for request in requests:
        count = len(request.images)
        if current and size + count > max_images:
            batches.append(current)
            current, size = [], 0
        current.append(request)
        size += count
    if current:
        batches.append(current)
    return batches


async def _run(predictors: Mapping[str, PredictFn], config: WorkerConfig) -> None:
    client = connect(config.redis_url)  # reads block _READ_BLOCK_MS at most, well under 5 s
    worker = StreamWorker(client, predictors, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    logger.info("worker %s serving %s from %s (prefix %s, max batch %d, wait %.1f ms)",
                worker.name, sorted(predictors), config.redis_url, config.redis_prefix,
                config.max_batch_size, config.max_wait_ms)
    try:
        await worker.run()
    finally:
        await client.aclose()


def run_worker(predictors: Mapping[str, PredictFn], config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT."""
    asyncio.run(_run(predictors, config))


def serve_checkpoints(
    models: Mapping[str, Path], config: WorkerConfig, device: str = "auto",
    inference_graph: str = "torchscript", torch_threads: int | None = None,
    gil_switch_interval_ms: float = 1.0,
) -> None:
    """``stealsim worker``: load each checkpoint (name -> directory) onto ``device`` and serve
    its stream until SIGTERM/SIGINT.

    ``gil_switch_interval_ms`` sets :func:`sys.setswitchinterval`: the forward pass runs in
    a thread beside the event loop that reads the stream, and a shorter interval than
    Python's 5 ms hands the GIL back to that loop sooner (benchmarks/gil_contention.py).

    Raises:
        ConfigError: an unknown ``inference_graph`` or no models; CheckpointError: a
        checkpoint cannot be loaded.
    """
    import torch

    from stealsim.training import resolve_device
    from victim_server.runner import load_runners

    if inference_graph not in ("torchscript", "eager"):
        raise ConfigError(f"--inference-graph {inference_graph!r}: choose torchscript or eager")
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    sys.setswitchinterval(gil_switch_interval_ms / 1000.0)
    runners = load_runners(models, resolve_device(device), inference_graph)  # type: ignore[arg-type]  # checked above
    run_worker({name: runner.predict_batch for name, runner in runners.items()}, config)
