"""The victim service as a child process, and the admin calls the experiments make.

:class:`ServiceProcess` runs ``python -m stealsim serve`` exactly as a user
would, on a free port, and stops it explicitly (SIGTERM, then SIGKILL after a
grace period); the child is also tied to this process (:mod:`stealsim.processes`),
so a SIGKILLed demo or grid leaves no service behind::

    with ServiceProcess({"normal": Path("ckpt/normal")}, admin_key="k", log_path=Path("service.log")) as service:
        key = create_key(service.url, "k", budget=1000, name="random/normal")
        with service.client() as admin:
            print(admin.usage(key)["used"])

The admin calls go through :class:`stealsim.service_client.ServiceClient`, which
raises :class:`~stealsim.errors.APIRequestError` when the service refuses or cannot
be reached.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from stealsim.errors import ConfigError
from stealsim.processes import child_environment
from stealsim.service_client import ServiceClient

__all__ = ["ServiceProcess", "create_key", "free_port", "new_admin_key", "wait_ready"]

logger = logging.getLogger(__name__)

UNLIMITED_RATE = "100000/second"
UNLIMITED_IMAGE_RATE = "1000000000/minute"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_admin_key() -> str:
    return "admin-" + secrets.token_urlsafe(16)


def wait_ready(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``GET /v2/health/ready`` answers 200; APIRequestError if ``process`` exits first or time runs out."""

    def exited() -> str | None:
        if process is not None and process.poll() is not None:
            return f"the victim service exited with status {process.returncode}"
        return None

    with ServiceClient(url) as service:
        service.wait_ready(timeout, give_up=exited, interval=0.2)


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
        self.stop_outcome: str | None = None
        """How :meth:`stop` ended it: ``stopped`` (our SIGTERM), ``killed ...``, or ``had exited ...`` by itself."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> ServiceClient:
        """A :class:`ServiceClient` of this service with its admin key (close it, or use ``with``)."""
        return ServiceClient(self.url, self.admin_key)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> ServiceProcess:
        if self.process is not None:
            raise RuntimeError("the victim service is already started")  # a programming error, not a user's
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
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit status.

        :attr:`stop_outcome` says how it ended: ``stopped`` when our SIGTERM ended it
        (exit status 0, or -15 for the signal itself: not an error), ``stopped (exit status
        N after SIGTERM)``, ``killed after ignoring SIGTERM for G s``, or ``had exited by
        itself with status N`` when it was gone before the SIGTERM.
        """
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
                self.stop_outcome = ("stopped" if process.returncode in (0, -signal.SIGTERM)
                                     else f"stopped (exit status {process.returncode} after SIGTERM)")
            except subprocess.TimeoutExpired:
                logger.warning("victim service (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
                self.stop_outcome = f"killed after ignoring SIGTERM for {grace:g} s"
        elif self.stop_outcome is None:
            self.stop_outcome = f"had exited by itself with status {process.returncode}"
        logger.info("victim service %s (pid %d)", self.stop_outcome, process.pid)
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
    """Create an API key with ``budget`` images (and no practical rate limit) via the admin API; its secret."""
    with ServiceClient(url, admin_key, timeout=30.0) as service:
        return service.create_key(budget, name=name, rate=UNLIMITED_RATE, image_rate=UNLIMITED_IMAGE_RATE,
                                  models=models, policy=policy).api_key
