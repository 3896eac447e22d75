"""Run the victim app on uvicorn (``stealsim serve``), with structured logs if asked."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import uvicorn

from victim_server.app import create_app
from victim_server.settings import ServerSettings

__all__ = ["JsonLogFormatter", "serve"]

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


def serve(settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests and queued batches finish first."""
    if settings.log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
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
