"""Helpers of the Redis tests: real Redis servers, real worker processes, isolated prefixes.

* ``redis_url``: the shared Redis of the test run, ``STEALSIM_TEST_REDIS_URL``
  (scripts/test.sh exports it); without it, a ``redis-server`` this session starts.
* ``prefix``: a unique ``--redis-prefix`` per test; its keys are deleted afterwards.
* :class:`RedisServer`: a ``redis-server`` of a test's own on a free port (optionally
  with an append-only file), for the tests that stop and restart Redis.
* :class:`WorkerProcess`: ``python -m stealsim worker`` in a subprocess.
* :func:`grid_workers`: ``stealsim grid-worker`` processes on a queue, registered before use.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from server_support import LoggedProcess, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _require_redis_server() -> str:
    if not Path(REDIS_SERVER).is_file():
        pytest.fail(
            "redis-server is not installed: the Redis tests need it "
            "(run scripts/test.sh, or `bash scripts/redis.sh`, or apt-get install redis-server)",
            pytrace=False,
        )
    return REDIS_SERVER


class RedisServer:
    """A ``redis-server`` on a free port in ``directory``; ``stop()`` and ``start()`` again."""

    def __init__(self, directory: Path, *, append_only: bool = False) -> None:
        self.binary = _require_redis_server()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.directory = directory
        self.append_only = append_only
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(self.directory), "--appendonly", "yes" if self.append_only else "no",
                   "--appendfsync", "always", "--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


class WorkerProcess(LoggedProcess):
    """``stealsim worker`` in a subprocess, on CPU with one thread."""

    def __init__(
        self, redis_url: str, prefix: str, models: dict[str, Path], *,
        args: Sequence[str] = (), log_path: Path,
    ) -> None:
        self.name = "worker-" + uuid.uuid4().hex[:8]
        command = [sys.executable, "-m", "stealsim", "worker", "--redis-url", redis_url,
                   "--redis-prefix", prefix, "--device", "cpu", "--torch-threads", "1",
                   "--name", self.name, *args]
        for name, directory in models.items():
            command += ["--model", f"{name}={directory}"]
        super().__init__(command, log_path, {**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_seen(self, redis_url: str, prefix: str, model: str, timeout: float = 60.0) -> None:
        """Wait for this worker's first heartbeat."""
        client = redis.Redis.from_url(redis_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
                if client.zscore(f"{prefix}:workers:{model}", self.name) is not None:
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"worker not seen within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


def delete_prefix(url: str, prefix: str) -> None:
    delete_matching(url, f"{prefix}:*")


def delete_matching(url: str, pattern: str) -> None:
    """Delete every key matching the glob ``pattern`` (a test's own keys)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The run's shared Redis: STEALSIM_TEST_REDIS_URL, or a redis-server of this session."""
    url = os.environ.get("STEALSIM_TEST_REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url, socket_timeout=2).ping()
        except redis.RedisError as exc:
            pytest.fail(f"STEALSIM_TEST_REDIS_URL={url} does not answer PING: {exc}", pytrace=False)
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A --redis-prefix of this test alone; every key under it is deleted afterwards."""
    name = "stealsim-test-" + uuid.uuid4().hex[:10]
    yield name
    delete_prefix(redis_url, name)


@contextmanager
def grid_workers(redis_url: str, queue: str, directory: Path, cache: Path, count: int = 1) -> Iterator[list[Path]]:
    """``count`` ``stealsim grid-worker`` processes on ``queue``, each with work dir ``directory/worker<i>``.

    Yields their log paths once rq lists every worker; on exit, SIGTERM (a worker finishes its
    job first) and the test fails unless each exited with 0.
    """
    from rq import Worker

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    names = [f"{queue}-w{index}" for index in range(count)]
    logs = [directory / f"worker{index}.log" for index in range(count)]
    processes: list[subprocess.Popen[bytes]] = []
    handles = []
    try:
        for index, name in enumerate(names):
            handle = logs[index].open("wb")
            handles.append(handle)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "stealsim", "grid-worker", "--redis-url", redis_url, "--queue", queue,
                 "--work-dir", str(directory / f"worker{index}"), "--cache-dir", str(cache), "--name", name],
                stdout=handle, stderr=subprocess.STDOUT, env=environment,
            ))
        connection = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 120
        while not set(names) <= {worker.name for worker in Worker.all(connection=connection)}:
            assert time.monotonic() < deadline, "grid workers did not register"
            assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
            time.sleep(0.2)
        connection.close()
        yield logs
    finally:
        codes = []
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                # Generous: a worker finishes its job, then stops its victim service (up to 20 s of
                # grace); on a loaded 2-core machine that took a worker over 60 s once.
                codes.append(process.wait(timeout=180))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        for handle in handles:
            handle.close()
    assert codes == [0] * count, [log.read_text() for log in logs]
