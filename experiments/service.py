"""The victim service as a child process, and the admin calls the experiments make.

:class:`ServiceProcess` runs ``python -m stealsim serve`` exactly as a user
would, on a free port, and stops it explicitly (SIGTERM, then SIGKILL after a
grace period); the child is also tied to this process (:mod:`stealsim.processes`),
so a SIGKILLed demo or grid leaves no service behind::

    with ServiceProcess({"normal": Path("ckpt/normal")}, admin_key="k", log_path=Path("service.log")) as service:
        key = create_key(service.url, "k", budget=1000, name="random/normal")
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from stealsim.errors import ConfigError, StealsimError
from stealsim.processes import child_environment

__all__ = ["ServiceError", "ServiceProcess", "create_key", "free_port", "new_admin_key", "wait_ready"]

logger = logging.getLogger(__name__)

UNLIMITED_RATE = "100000/second"
UNLIMITED_IMAGE_RATE = "1000000000/minute"


class ServiceError(StealsimError):
    """The victim service could not be started, reached, or asked for a key."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_admin_key() -> str:
    return "admin-" + secrets.token_urlsafe(16)


def wait_ready(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``GET /v2/health/ready`` answers 200 (or the process exits)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"the victim service exited with status {process.returncode}")
        try:
            response = httpx.get(f"{url}/v2/health/ready", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    raise ServiceError(f"the victim service at {url} was not ready within {timeout:.0f} s ({last})")


class ServiceProcess:
    """``stealsim serve`` in a child process on a free port of 127.0.0.1.

    ``start()`` returns once the service is ready; ``stop()`` is idempotent and
    always leaves no process behind.
    """

    def __init__(
        self,
        models: Mapping[str, Path],
        *,
        admin_key: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        torch_threads: int = 1,
        ready_timeout: float = 120.0,
    ) -> None:
        if not models:
            raise ConfigError("the victim service needs at least one model")
        self.models = dict(models)
        self.admin_key = admin_key
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self.torch_threads = torch_threads
        self.ready_timeout = ready_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> ServiceProcess:
        if self.process is not None:
            raise ServiceError("the victim service is already started")
        self.port = free_port()
        command = [sys.executable, "-m", "stealsim", "--log-level", "WARNING", "serve",
                   "--port", str(self.port), "--host", "127.0.0.1", "--device", "cpu",
                   "--torch-threads", str(self.torch_threads), "--log-text", *self.extra_args]
        for name, directory in self.models.items():
            command += ["--model", f"{name}={directory}"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = child_environment({**os.environ, "STEALSIM_ADMIN_KEY": self.admin_key,
                                         "OMP_NUM_THREADS": str(self.torch_threads)})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=environment)
        logger.info("victim service starting on %s (pid %d, log %s)", self.url, self.process.pid, self.log_path)
        try:
            wait_ready(self.url, self.ready_timeout, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("victim service (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        logger.info("victim service stopped (status %s)", process.returncode)
        return process.returncode

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def create_key(
    url: str,
    admin_key: str,
    budget: int,
    *,
    name: str,
    models: Sequence[str] | None = None,
    policy: list[dict[str, Any]] | None = None,
) -> str:
    """Create an API key with ``budget`` images (and no practical rate limit) via the admin API."""
    body: dict[str, Any] = {"budget": budget, "name": name, "rate": UNLIMITED_RATE,
                            "image_rate": UNLIMITED_IMAGE_RATE}
    if models is not None:
        body["models"] = list(models)
    if policy is not None:
        body["policy"] = policy
    try:
        response = httpx.post(f"{url}/v1/admin/keys", json=body, headers={"X-API-Key": admin_key}, timeout=30.0)
    except httpx.TransportError as exc:
        raise ServiceError(f"cannot reach the victim service at {url}: {exc}") from exc
    if response.status_code != 201:
        raise ServiceError(f"creating key {name!r} at {url} failed: {response.status_code} {response.text[:300]}")
    return str(response.json()["api_key"])
