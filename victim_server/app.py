"""The app factory: ``create_app(settings)`` wires the services and maps errors to statuses.

Nothing is built at import. The lifespan loads the models, starts the batcher
and, on shutdown, stops taking requests and drains every queued batch::

    app = create_app(load_settings(overrides={"models": {"victim": {"path": "runs/victim"}}}))
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

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
from stealsim.wire import MODEL_INFER_PATH
from victim_server import routes_oip, routes_v1
from victim_server.audit import AuditLog, JsonlAuditLog
from victim_server.audit_redis import RedisAuditLog
from victim_server.batching import Batcher, LocalBatcher
from victim_server.batching_redis import RedisBatcher
from victim_server.detector_state import DetectorStates, MemoryDetectorStates, RedisDetectorStates
from victim_server.metrics import ServerMetrics
from victim_server.ratelimit import RateLimiter
from victim_server.redis_keys import RedisNames, connect
from victim_server.runner import ModelRunner, load_runners
from victim_server.service import VictimService
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


def _error_response(request: Request, status: int, code: str, message: str, **details: Any) -> JSONResponse:
    service: VictimService | None = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.errors.labels(str(status), code).inc()
        model = request.path_params.get("model")
        if model is not None and request.url.path.endswith("/infer"):
            service.metrics.requests.labels(str(model), str(status)).inc()
    return JSONResponse({"error": message, "code": code, **details}, status_code=status)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status = _status(exc)
    if status >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
    response = _error_response(request, status, exc.code, exc.message, **exc.details)
    if isinstance(exc, RateLimitedError):
        response.headers.update(exc.headers)
    elif isinstance(exc, UnavailableError) and "retry_after" in exc.details:
        response.headers["Retry-After"] = str(exc.details["retry_after"])
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_response(request, 500, "internal", f"internal error: {type(exc).__name__}")


_INFER_PATH = re.compile(MODEL_INFER_PATH.replace("{model}", "([^/]+)"))  # no regex characters in it


class VictimApp(FastAPI):
    """FastAPI, plus a direct path for ``POST /v2/models/{model}/infer``.

    The inference route skips FastAPI's and Starlette's middleware stack (error,
    exception, exit-stack and body-limit middlewares, router matching): on 2 cores
    that stack cost about as much per single-image request as the route itself.
    Errors are answered by the same handlers as every other route, so the JSON
    bodies and statuses are the same; every other request takes the normal path.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not self.root_path:
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self
                scope["path_params"] = {"model": unquote(match.group(1))}
                request = Request(scope, receive)
                response: Response
                try:
                    response = await routes_oip.infer(request)
                except ServiceError as exc:
                    response = await _service_error(request, exc)
                except Exception as exc:
                    response = await _unexpected_error(request, exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return _error_response(request, 400, "invalid_request", f"invalid request: {problems}")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(request, exc.status_code, code, str(exc.detail))

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


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
                )
            except ValueError:
                logger.info("key %r was provisioned by another API process", spec.name)
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
        docs_url="/docs",
        redoc_url=None,
        # FastAPI's native OpenTelemetry is off: it would check its providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    _install_error_handlers(app)
    app.include_router(routes_oip.router)
    app.include_router(routes_v1.router)
    return app
