"""Helpers of the victim-server tests: a tiny checkpoint and a real ``stealsim serve`` process.

The server runs as a user runs it (``python -m stealsim serve`` on a free port),
and the tests talk to it over real HTTP with httpx; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from stealsim.checkpoint import save_checkpoint
from stealsim.data import load_dataset
from stealsim.errors import APIRequestError
from stealsim.processes import child_environment
from stealsim.service_client import ServiceClient
from stealsim.training import TrainConfig, train_classifier
from stealsim.wire import API_KEY_HEADER, BINARY_CONTENT_TYPE
from stealsim.wire import HEADER_LENGTH as HEADER_LENGTH  # the tests import it from here

ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoggedProcess:
    """A subprocess whose output goes to ``log_path``; ``log()`` reads it, ``stop()`` ends it."""

    def __init__(self, command: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        # Tied to this process: a killed pytest leaves no server or worker behind.
        self.process = subprocess.Popen(list(command), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=child_environment(env))

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 30 s; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def wait_until_ready(self, urls: Sequence[str], timeout: float, what: str) -> None:
        """Until every URL answers 200; ``RuntimeError`` with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if all(httpx.get(url, timeout=1.0).status_code == 200 for url in urls):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{what} not ready within {timeout} s:\n{self.log()}")


class ServerProcess(LoggedProcess):
    """``stealsim serve`` in a subprocess; ``url`` once ready; ``stop()`` sends SIGTERM."""

    def __init__(
        self,
        models: dict[str, Path],
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "stealsim", "serve", "--port", str(self.port),
                   "--admin-key", ADMIN_KEY, "--torch-threads", "1", "--device", "cpu"]
        for name, directory in models.items():
            command += ["--model", f"{name}={directory}"]
        command += list(args)
        super().__init__(command, log_path, {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        """Until the server is ready; ``RuntimeError`` with the log if it exits or time runs out."""

        def exited() -> str | None:
            code = self.process.poll()
            return None if code is None else f"server exited with {code}"

        with ServiceClient(self.url) as service:
            try:
                service.wait_ready(timeout, give_up=exited)
            except APIRequestError as exc:
                self.stop()
                raise RuntimeError(f"{exc}:\n{self.log()}") from exc

    def service(self) -> ServiceClient:
        """A :class:`ServiceClient` of this server with the admin key (close it, or use ``with``)."""
        return ServiceClient(self.url, ADMIN_KEY)


def admin() -> dict[str, str]:
    return {API_KEY_HEADER: ADMIN_KEY}


def new_key(client: httpx.Client, budget: int = 1000, **fields: Any) -> str:
    """A new key's secret, created by the admin on ``client``'s server; ``fields`` as ``ServiceClient.create_key``."""
    with ServiceClient(str(client.base_url), ADMIN_KEY) as service:
        return service.create_key(budget, **fields).api_key


def json_request(images: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.reshape(-1).tolist()}], **extra}


def binary_request(images: np.ndarray, binary_output: bool = True, output: str = "probabilities") -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(images, dtype="<f4").tobytes()
    header: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                          "parameters": {"binary_data_size": len(raw)}}]}
    if binary_output:
        header["outputs"] = [{"name": output, "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    return head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": BINARY_CONTENT_TYPE}


def decode_binary_response(response: httpx.Response) -> tuple[dict[str, Any], np.ndarray]:
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:length])
    output = header["outputs"][0]
    dtype = "<f4" if output["datatype"] == "FP32" else "<i8"
    values = np.frombuffer(response.content[length:], dtype=dtype).reshape(output["shape"])
    return header, values


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small-cnn trained 2 epochs on 8x8 digits (a few seconds)."""
    torch.set_num_threads(1)
    data = load_dataset("digits")
    model, meta = train_classifier(
        data, "small-cnn", TrainConfig(epochs=2, max_shift=1), "cpu", show_progress=False
    )
    directory = tmp_path_factory.mktemp("server") / "digits"
    save_checkpoint(directory, model, meta)
    return directory


@pytest.fixture(scope="session")
def victim_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two models side by side: ``victim`` (full probabilities) and ``guarded`` (top-2 policy)."""
    logs = tmp_path_factory.mktemp("server-logs")
    server = ServerProcess(
        {"victim": digits_checkpoint, "guarded": digits_checkpoint},
        args=["--policy", 'guarded=[{"name": "top_k", "k": 2}]', "--max-wait-ms", "5",
              "--audit-log", str(logs / "audit.jsonl")],
        env={"STEALSIM_MAX_IMAGES_PER_REQUEST": "512", "STEALSIM_MAX_BODY_BYTES": str(1 << 20)},
        log_path=logs / "server.log",
    )
    yield server
    server.stop()


@pytest.fixture
def client(victim_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=victim_server.url, timeout=60.0) as http:
        yield http
