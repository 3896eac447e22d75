"""The app factory: ``create_app(settings)`` wires the services and maps errors to statuses.

Nothing is built at import. The lifespan loads the models, starts the batcher
and, on shutdown, stops taking requests and drains every queued batch::

    app = create_app(load_settings(overrides={"models": {"victim": {"path": "runs/victim"}}}))
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from stealsim.errors import (
    BudgetExceededError,
    ForbiddenError,
    InvalidRequestError,
    KeyNotFoundError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServiceError,
    UnauthorizedError,
    UnavailableError,
)
from stealsim.training import resolve_device
from stealsim.wire import ADMIN_KEYS_PATH, MODEL_INFER_PATH
from victim_server import deps, routes_oip, routes_v1
from victim_server.audit import AuditLog, JsonlAuditLog
from victim_server.audit_redis import RedisAuditLog
from victim_server.batching import Batcher, LocalBatcher
from victim_server.batching_redis import RedisBatcher
from victim_server.detector_state import DetectorStates, MemoryDetectorStates, RedisDetectorStates
from victim_server.metrics import ServerMetrics
from victim_server.ratelimit import RateLimiter
from victim_server.redis_keys import RedisNames, connect
from victim_server.runner import ModelRunner, load_runners
from victim_server.service import VictimService, printable
from victim_server.settings import ServerSettings
from victim_server.store import MemoryStateStore, StateStore
from victim_server.store_redis import RedisStateStore
from victim_server.watermark_ledger import (
    MemoryWatermarkLedger,
    RedisWatermarkLedger,
    WatermarkLedger,
)

__all__ = ["STATUS_CODES", "create_app"]

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServiceError], int] = {
    InvalidRequestError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    ModelNotFoundError: 404,
    KeyNotFoundError: 404,
    PayloadTooLargeError: 413,
    BudgetExceededError: 429,
    RateLimitedError: 429,
    UnavailableError: 503,
}
"""The one place where project errors become HTTP statuses (docs/api.md, "Errors")."""


def _status(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


CLIENT_GONE = 499
"""Status counted (never sent) for a request whose client disconnected before its answer."""


def _count(request: Request, status: int, code: str) -> None:
    """Count an error; an inference request under its model's name only if that model is served."""
    service: VictimService | None = getattr(request.app.state, "service", None)
    if service is None:
        return
    service.metrics.errors.labels(str(status), code).inc()
    model = request.path_params.get("model")
    if model is not None and request.scope.get("endpoint") is routes_oip.infer:
        service.metrics.requests.labels(service.metrics_label(str(model)), str(status)).inc()


def _error_response(request: Request, status: int, code: str, message: str, **details: Any) -> JSONResponse:
    _count(request, status, code)
    return JSONResponse({"error": message, "code": code, **details}, status_code=status)


def _client_gone(request: Request) -> None:
    """A client that disconnected before its answer: counted as 499, logged without a traceback."""
    _count(request, CLIENT_GONE, "client_disconnected")
    logger.info("%s %s: the client disconnected before the answer", request.method,
                printable(request.url.path))


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = _status(exc)
    if status >= 500:
        logger.warning("%s %s: %s", request.method, printable(request.url.path), exc.message)
    response = _error_response(request, status, exc.code, exc.message, **exc.details)
    if isinstance(exc, RateLimitedError):
        response.headers.update(exc.headers)
    elif isinstance(exc, UnavailableError) and "retry_after" in exc.details:
        response.headers["Retry-After"] = str(exc.details["retry_after"])
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, printable(request.url.path), exc_info=exc)
    return _error_response(request, 500, "internal", f"internal error: {type(exc).__name__}")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's body reading wraps it in a 400
        _client_gone(request)
        return Response(status_code=400)  # never reaches the client
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return _error_response(request, exc.status_code, code, str(exc.detail))


_INFER_PATH = re.compile(MODEL_INFER_PATH.replace("{model}", "([^/]+)"))  # no regex characters in it
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ADMIN_PREFIX = ADMIN_KEYS_PATH.rsplit("/", 1)[0] + "/"


class _BoundedBody:
    """The ASGI ``receive`` of one request, bounded in time and size; tells whether the body was read.

    The body must be complete ``timeout_s`` after the app got the request (its headers are
    in by then): a slow or stalled client gets 408 rather than holding the connection.
    More than ``limit`` bytes (None: no limit here) get 413. Messages after the body (the
    disconnect) pass through unbounded. (FastAPI's ``max_body_size`` would count the bytes
    too, but answers a declared Content-Length over the limit in plain text, not in the
    API's JSON error form.)
    """

    __slots__ = ("_deadline", "_limit", "_receive", "_received", "_timeout_s", "complete")

    def __init__(self, receive: Receive, timeout_s: float, expects_body: bool, limit: int | None) -> None:
        self._receive = receive
        self._timeout_s = timeout_s
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._limit = limit
        self._received = 0
        self.complete = not expects_body

    async def __call__(self) -> Message:
        if self.complete:
            return await self._receive()
        message = routes_oip.ready_message(self._receive)  # usually there: no timer needed
        if message is None:
            try:
                async with asyncio.timeout_at(self._deadline):
                    message = await self._receive()
            except TimeoutError:
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {self._timeout_s:g} s"
                ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
        if self._limit is not None and message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise StarletteHTTPException(413, f"body is over the limit of {self._limit} bytes")
        return message


def _declared_body(scope: Scope) -> int | None:
    """The body's declared length: None without a body, -1 when chunked (length unknown)."""
    if scope["method"] not in _BODY_METHODS:
        return None
    for name, value in scope["headers"]:
        if name == b"content-length":  # the server has checked it is a number
            if len(value) > 18:
                return 1 << 62  # beyond every limit (and int() of thousands of digits raises)
            return int(value) or None
        if name == b"transfer-encoding":
            return -1
    return None


class VictimApp(FastAPI):
    """FastAPI, plus a direct path for ``POST /v2/models/{model}/infer`` and a guard for bodies.

    The inference route skips FastAPI's and Starlette's middleware stack (error,
    exception, exit-stack and body-limit middlewares, router matching): on 2 cores
    that stack cost about as much per single-image request as the route itself.
    Errors are answered by the same handlers as every other route, so the JSON
    bodies and statuses are the same; every other request takes the normal path.

    Every request's body must arrive within ``request_read_timeout_s``; an admin request
    with a body is authenticated before the body is read (FastAPI reads a route's body
    before its dependencies); an answer sent before the body was read closes the
    connection rather than draining the rest.
    """

    victim_settings: ServerSettings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        settings = self.victim_settings
        declared = _declared_body(scope)
        infer = None
        if scope["method"] == "POST" and not self.root_path:
            infer = _INFER_PATH.fullmatch(scope["path"])
        limit = None if infer is not None else settings.max_json_body_bytes  # infer: read_body's own
        body = _BoundedBody(receive, settings.request_read_timeout_s, declared is not None, limit)

        async def send_closing_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and not body.complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if infer is not None:
            # scope["path"] is decoded once already (by the server): no second unquote.
            scope["app"] = self
            scope["path_params"] = {"model": infer.group(1)}
            scope["endpoint"] = routes_oip.infer
            await self._infer(scope, body, send_closing_if_unread)
            return
        if declared is not None:
            refusal = await self._refuse_body(scope, body, declared)
            if refusal is not None:
                await refusal(scope, body, send_closing_if_unread)
                return
        await super().__call__(scope, body, send_closing_if_unread)

    async def _refuse_body(self, scope: Scope, receive: Receive, declared: int) -> Response | None:
        """The answer to a request with a body, before the body is read: an admin route's
        authentication (FastAPI would read the body first), then the declared size."""
        scope["app"] = self
        request = Request(scope, receive)
        try:
            if scope["path"].startswith(_ADMIN_PREFIX):
                await deps.require_admin(request, request.app.state.service)
        except ServiceError as exc:
            return await _service_error(request, exc)
        limit = self.victim_settings.max_json_body_bytes
        if declared > limit:
            return await _http_error(request, StarletteHTTPException(
                413, f"body of {declared} bytes is over the limit of {limit} bytes"))
        return None

    async def _infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        try:
            response = await routes_oip.infer(request)
        except ServiceError as exc:
            response = await _service_error(request, exc)
        except StarletteHTTPException as exc:
            response = await _http_error(request, exc)
        except ClientDisconnect:
            _client_gone(request)
            return
        except Exception as exc:
            response = await _unexpected_error(request, exc)
        await response(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return _error_response(request, 400, "invalid_request", f"invalid request: {problems}")

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


@dataclass
class _Backends:
    """The state store, rate limiter, audit log, detector states and batcher of one app."""

    store: StateStore
    limiter: RateLimiter
    audit: AuditLog
    detectors: DetectorStates
    ledger: WatermarkLedger
    batcher: Batcher
    clients: tuple[aioredis.Redis, ...] = ()

    @classmethod
    def build(
        cls, settings: ServerSettings, runners: Mapping[str, ModelRunner], metrics: ServerMetrics
    ) -> _Backends:
        if settings.batching == "local":
            batcher: Batcher = LocalBatcher(
                {name: runner.predict_batch for name, runner in runners.items()},
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                wait_when_busy=settings.batch_wait_when_busy,
                observer=metrics.observe_batch,
            )
        if settings.redis_url is None:
            return cls(MemoryStateStore(), RateLimiter(settings.rate_limit_storage),
                       JsonlAuditLog(settings.audit_log), MemoryDetectorStates(),
                       MemoryWatermarkLedger(), batcher)
        client = connect(settings.redis_url)
        names = RedisNames(settings.redis_prefix)
        storage = settings.rate_limit_storage
        if storage == "async+memory://":  # the default: share the limits in Redis too
            storage = "async+" + settings.redis_url
        limiter = RateLimiter(storage, implementation="redispy", key_prefix=names.rate_limits) \
            if storage.startswith("async+redis") else RateLimiter(storage)
        clients: tuple[aioredis.Redis, ...] = (client,)
        if settings.batching == "redis":
            # Its own client: BLPOP blocks up to the inference timeout, beyond the usual 5 s.
            blocking = connect(settings.redis_url, socket_timeout=settings.inference_timeout_s + 5)
            clients += (blocking,)
            batcher = RedisBatcher(
                blocking, names, runners, reply_timeout_s=settings.inference_timeout_s,
                stream_max_len=settings.stream_max_len, worker_seen_s=settings.worker_seen_s,
            )
        return cls(RedisStateStore(client, names), limiter, RedisAuditLog(client, names),
                   RedisDetectorStates(client, names), RedisWatermarkLedger(client, names), batcher, clients)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


def create_app(
    settings: ServerSettings, runners: Mapping[str, ModelRunner] | None = None
) -> FastAPI:
    """Build the victim app. ``runners`` (name -> runner) replaces loading ``settings.models``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
        loaded = dict(runners) if runners is not None else load_runners(
            {name: spec.path for name, spec in settings.models.items()},
            resolve_device(settings.device), settings.inference_graph,
        )
        metrics = ServerMetrics()
        backends = _Backends.build(settings, loaded, metrics)
        batcher = backends.batcher
        service = VictimService(
            settings, loaded, batcher, backends.store, backends.limiter, backends.audit, metrics,
            backends.detectors, backends.ledger,
        )
        for name in loaded:
            metrics.track_queue(name, lambda name=name: batcher.queue_depth(name))  # type: ignore[misc]
        for spec in settings.api_keys:
            secret = spec.api_key.get_secret_value()
            if await service.store.authenticate(secret) is not None:
                continue  # provisioned before (Redis), by this or another API process
            try:
                await service.create_key(
                    spec.budget, name=spec.name, rate=spec.rate, image_rate=spec.image_rate,
                    models=spec.models, policy=spec.policy, secret=secret,
                    price_per_1000_images=spec.price_per_1000_images,
                )
            except ValueError:
                logger.info("key %s was provisioned by another API process", printable(spec.name))
        app.state.service = service
        await batcher.start()
        service.ready = True
        logger.info("serving %s (max batch %d images, wait %.1f ms)",
                    sorted(loaded), settings.max_batch_size, settings.max_wait_ms)
        try:
            yield
        finally:
            service.ready = False
            logger.info("shutting down: draining queued batches")
            await batcher.stop()
            await service.audit.close()
            await backends.close()

    app = VictimApp(
        title="stealsim victim",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
        openapi_url="/openapi.json" if settings.api_docs else None,
        # FastAPI's native OpenTelemetry is off: it would check its providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.victim_settings = settings
    _install_error_handlers(app)
    app.include_router(routes_oip.router)
    app.include_router(routes_v1.router)
    return app
