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

from stealsim.errors import CheckpointError, ConfigError
from victim_server.app import create_app
from victim_server.settings import ServerSettings

__all__ = ["JsonLogFormatter", "app_from_environment", "check_startup", "serve"]

_SETTINGS_ENV = "STEALSIM_SERVE_SETTINGS_JSON"
"""How ``serve`` hands its settings to the API processes uvicorn starts (``workers`` > 1)."""

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


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
    )
    uvicorn.Server(config).run()
