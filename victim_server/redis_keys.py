"""What the Redis backends share: key names under one prefix, the client, error translation.

Every key the service and its workers write starts with ``PREFIX:`` (the
``redis_prefix`` setting, default ``stealsim``), so several deployments (or test
runs) share one Redis server without seeing each other's state::

    names = RedisNames("stealsim")
    names.key("key_ab12")        # stealsim:key:key_ab12
    names.stream("victim")       # stealsim:stream:victim

Redis errors are translated here, at the boundary, with :func:`redis_errors`: an
outage (no connection, a timeout, a server loading, out of memory, read-only, busy)
into the project's :class:`~stealsim.errors.UnavailableError` (503, retry later);
anything else Redis refuses (a script error, a value of the wrong type) into
:class:`~stealsim.errors.BackendError` (500). Messages never carry a script's SHA.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stealsim.errors import BackendError, ConfigError, UnavailableError

__all__ = ["RedisNames", "connect", "redis_errors"]

logger = logging.getLogger(__name__)

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


_OUTAGES = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError, ClusterDownError,
            TryAgainError)
"""Errors of a Redis that cannot serve now (BusyLoadingError is a ConnectionError)."""

_OUTAGE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "NOGROUP")
"""Error replies that mean the same: a long script, a restart, a lost stream group."""

_SCRIPT_SHA = re.compile(r"(?:f_)?\b[0-9a-f]{40}\b")
_SCRIPT_PLACE = re.compile(r"\s*script: ?, on @user_script:\d+\.?|\s*\(call to \): ?")


def _reason(exc: RedisError) -> str:
    """Redis's reason for ``exc``, without a script's SHA (what a client may see)."""
    text = _SCRIPT_PLACE.sub("", _SCRIPT_SHA.sub("", str(exc))).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis errors raised inside into UnavailableError or BackendError naming ``what`` failed."""
    try:
        yield
    except RedisError as exc:
        reason = _reason(exc)
        if isinstance(exc, _OUTAGES) or (
            isinstance(exc, ResponseError) and str(exc).startswith(_OUTAGE_REPLIES)
        ):
            raise UnavailableError(f"{what}: Redis is unavailable ({reason})", retry_after=1) from exc
        logger.error("%s failed: Redis refused it: %s", what, exc)
        raise BackendError(f"{what} failed: Redis refused the operation ({reason})") from exc
