"""What the Redis backends share: key names under one prefix, the client, error translation.

Every key the service and its workers write starts with ``PREFIX:`` (the
``redis_prefix`` setting, default ``stealsim``), so several deployments (or test
runs) share one Redis server without seeing each other's state::

    names = RedisNames("stealsim")
    names.key("key_ab12")        # stealsim:key:key_ab12
    names.stream("victim")       # stealsim:stream:victim

Redis errors are translated here, at the boundary, into the project's
:class:`~stealsim.errors.UnavailableError` (503), with :func:`redis_errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stealsim.errors import ConfigError, UnavailableError

__all__ = ["RedisNames", "connect", "redis_errors"]

CONSUMER_GROUP = "workers"
"""The consumer group every worker of a model reads its stream with."""


@dataclass(frozen=True)
class RedisNames:
    """The names of every Redis key of one deployment (one ``prefix``)."""

    prefix: str

    def key(self, key_id: str) -> str:
        """Hash of one API key: budget, used, flags, ..."""
        return f"{self.prefix}:key:{key_id}"

    @property
    def digests(self) -> str:
        """Hash: SHA-256 of a secret -> key id."""
        return f"{self.prefix}:digests"

    @property
    def key_ids(self) -> str:
        """Sorted set of key ids by creation time."""
        return f"{self.prefix}:keys"

    @property
    def audit(self) -> str:
        """Stream of audit records."""
        return f"{self.prefix}:audit"

    def detector(self, kind: str, key_id: str, model: str) -> str:
        """Serialized state of one key's detector of ``kind`` (``prada``, ``seat``) on one model."""
        return f"{self.prefix}:{kind}:{key_id}:{model}"

    def watermark(self, key_id: str, model: str) -> str:
        """List of the watermarked answers served to one key on one model (``.npz`` chunks)."""
        return f"{self.prefix}:watermark:{key_id}:{model}"

    def stream(self, model: str) -> str:
        """Stream of inference requests of one model (read by the workers' group)."""
        return f"{self.prefix}:stream:{model}"

    def reply(self, request_id: str) -> str:
        """List the API blocks on (BLPOP) for the reply to one request."""
        return f"{self.prefix}:reply:{request_id}"

    def workers(self, model: str) -> str:
        """Sorted set: worker name -> time of its latest heartbeat."""
        return f"{self.prefix}:workers:{model}"

    @property
    def rate_limits(self) -> str:
        """Key prefix of the ``limits`` library's Redis storage."""
        return f"{self.prefix}:limits"


def connect(url: str, socket_timeout: float = 5.0, **options: object) -> aioredis.Redis:
    """An asyncio Redis client of ``url`` (connects lazily, reconnects after a restart).

    ``socket_timeout`` bounds every reply's wait: a client that blocks (BLPOP,
    XREADGROUP BLOCK) needs it longer than its longest block.
    Raises ConfigError for a URL redis-py cannot parse.
    """
    try:
        client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=2.0,
            health_check_interval=10, **options,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise ConfigError(f"--redis-url {url!r}: {exc}") from exc
    return client


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis errors raised inside into UnavailableError naming ``what`` failed."""
    try:
        yield
    except RedisError as exc:
        raise UnavailableError(
            f"{what}: Redis is unavailable ({type(exc).__name__}: {exc})", retry_after=1
        ) from exc
