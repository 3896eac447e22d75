"""Run the victim app on uvicorn (``stealsim serve``), with structured logs if asked."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stealsim.errors import CheckpointError, ConfigError
from victim_server.app import create_app
from victim_server.settings import ServerSettings

__all__ = ["BoundedHttpToolsProtocol", "JsonLogFormatter", "app_from_environment", "check_startup", "serve"]

_SETTINGS_ENV = "STEALSIM_SERVE_SETTINGS_JSON"
"""How ``serve`` hands its settings to the API processes uvicorn starts (``workers`` > 1)."""

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on the request head (line and headers).

    httptools (llhttp) buffers a header of any size; h11 stops at uvicorn's
    ``h11_max_incomplete_event_size``. This applies that same setting to httptools: once
    more bytes than it arrived for a request whose head is not complete, the client gets
    431 and the connection is closed, so an anonymous client holds at most the limit plus
    one socket read. The check runs per read, not per byte, which keeps the parser's
    speed on the hot path.
    """

    _head_bytes = 0
    _head_complete = False

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._head_complete = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_complete = True
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_complete or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and self._head_bytes > limit:
            body = orjson.dumps({"error": f"request headers over the limit of {limit} bytes",
                                 "code": "headers_too_large"})
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()


_HTTP_PROTOCOL = f"{__name__}:{BoundedHttpToolsProtocol.__name__}"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _configure_logging(settings: ServerSettings) -> None:
    if settings.log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]


def _settings_json(settings: ServerSettings) -> str:
    """The settings as JSON with their secrets (model_dump masks SecretStr)."""
    data = settings.model_dump(mode="json")
    if settings.admin_key is not None:
        data["admin_key"] = settings.admin_key.get_secret_value()
    for spec, dumped in zip(settings.api_keys, data["api_keys"], strict=True):
        dumped["api_key"] = spec.api_key.get_secret_value()
    return orjson.dumps(data).decode()


def app_from_environment() -> FastAPI:
    """The app of one of ``serve``'s API processes when ``workers`` > 1 (a uvicorn factory)."""
    settings = ServerSettings(**orjson.loads(os.environ[_SETTINGS_ENV]))
    if not logging.getLogger().handlers:  # a fresh (spawned) process: no CLI logging
        logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s: %(message)s")
    _configure_logging(settings)
    return create_app(settings)


def check_startup(settings: ServerSettings) -> None:
    """What would make uvicorn fail at start, checked before it starts (``error:``, exit 2).

    Every checkpoint is loaded once on the CPU (files, hashes, architecture, weights)
    and the port is bound and released, so a typo costs one line, not a traceback
    printed after the models loaded.

    Raises:
        CheckpointError: a model's checkpoint is missing, truncated or does not fit.
        ConfigError: the device is not available, or the address cannot be bound.
    """
    from stealsim.checkpoint import load_checkpoint
    from stealsim.training import resolve_device

    resolve_device(settings.device)
    for name, spec in settings.models.items():
        try:
            load_checkpoint(spec.path, "cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"model {name!r}: {exc}") from exc
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            reason = "it is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(
                f"cannot listen on {settings.host}:{settings.port}: {reason} (choose another --port or --host)"
            ) from exc


def serve(settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests and queued batches finish first.

    With ``settings.workers`` > 1, uvicorn runs that many API processes on one port,
    sharing their state through Redis. :func:`check_startup` runs first.
    """
    check_startup(settings)
    _configure_logging(settings)
    if settings.workers > 1:
        os.environ[_SETTINGS_ENV] = _settings_json(settings)
        uvicorn.run(
            "victim_server.server:app_from_environment", factory=True, workers=settings.workers,
            host=settings.host, port=settings.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=max(5, int(settings.inference_timeout_s) + 5), lifespan="on",
            http=_HTTP_PROTOCOL, h11_max_incomplete_event_size=settings.max_header_bytes,
        )
        return
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's (or the JSON) logging
        access_log=False,  # the service logs each served request itself
        timeout_graceful_shutdown=max(5, int(settings.inference_timeout_s) + 5),
        lifespan="on",
        http=_HTTP_PROTOCOL,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    uvicorn.Server(config).run()
