"""What an anonymous client or a careless admin can make the victim service spend, as one JSON document.

Each case runs against a real ``stealsim serve`` (in-memory backend, a digits
checkpoint trained for one epoch) over raw loopback sockets, while a thread samples
the server's resident memory (``/proc/PID/status``) every few milliseconds:

* ``body_100mb_admin`` / ``body_100mb_infer``: 100 MB POSTed without a key to
  ``/v1/admin/keys`` and to ``/v2/models/victim/infer``: the answer, the bytes the
  server took before answering, the peak RSS growth (target: < 20 MB);
* ``header_50mib``: one 50 MiB header without a key to ``/v2/health/live``: the
  same figures (target: < 20 MB);
* ``key_name_65mib``: a 65 MiB key name POSTed with the admin key: the time to the
  answer (target: < 1 s) and the slowest ``/v2/health/ready`` answer while it ran
  (the service must stay ready throughout);
* ``metrics_flood``: /metrics growth in bytes after 3,000 anonymous inference
  requests with random model names (target: < 1 KB).

``--baseline DIR`` runs the same cases against another source tree (e.g. ``git
archive`` of an older commit) in the same run, side by side, each case bounded by
``--case-timeout-s``: a server that does not answer in time is reported as such and
killed at the end::

    python benchmarks/security.py
    python benchmarks/security.py --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ADMIN_KEY = "bench-admin-key"
MODEL = "victim"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_checkpoint(directory: Path) -> Path:
    import torch

    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import TrainConfig, train_classifier

    torch.set_num_threads(1)
    model, meta = train_classifier(load_dataset("digits"), "small-cnn", TrainConfig(epochs=1), "cpu",
                                   show_progress=False)
    save_checkpoint(directory, model, meta)
    return directory


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The highest RSS of ``pid`` seen while the ``with`` block runs, sampled every 2 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_bytes(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.002)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.2)  # what the server still holds after the answer
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.before) / 1e6, 1)


@contextmanager
def running_server(checkpoint: Path, source: Path | None, log: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    command = [sys.executable, "-m", "stealsim", "serve", "--model", f"{MODEL}={checkpoint}", "--port", str(port),
               "--admin-key", ADMIN_KEY, "--device", "cpu", "--torch-threads", "1"]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   cwd=source or Path.cwd())
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield url, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a frozen server ignores SIGTERM
                process.kill()
                process.wait()


def raw_send(url: str, head: bytes, body_size: int, timeout: float, body_prefix: bytes = b"",
             body_suffix: bytes = b"", filler: bytes = b"a") -> dict[str, Any]:
    """Send ``head``, then a body of ``body_size`` bytes in 1 MiB chunks until the server closes.

    Returns the status (None without an answer within ``timeout``), the bytes sent and the seconds
    from the first byte to the answer.
    """
    host, port = url.removeprefix("http://").split(":")
    chunk = filler * MIB
    started = time.monotonic()
    sent = 0
    status: int | None = None
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(head + body_prefix)
            sent = len(head) + len(body_prefix)
            remaining = body_size
            while remaining > 0:
                part = chunk[:remaining]
                sock.sendall(part)
                sent += len(part)
                remaining -= len(part)
            sock.sendall(body_suffix)
            sent += len(body_suffix)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        try:
            answer = sock.recv(4096)
            if answer.startswith(b"HTTP/1.1 "):
                status = int(answer.split()[1])
        except (ConnectionResetError, TimeoutError):
            pass
    return {"status": status, "sent_mb": round(sent / 1e6, 1), "seconds": round(time.monotonic() - started, 3)}


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def body_case(url: str, pid: int, path: str, timeout: float) -> dict[str, Any]:
    size = 100_000_000
    with RssSampler(pid) as rss:
        result = raw_send(url, head("POST", path, {"Content-Type": "application/json",
                                                   "Content-Length": str(size)}), size, timeout)
    return {**result, "peak_rss_growth_mb": rss.growth_mb}


def header_case(url: str, pid: int, timeout: float) -> dict[str, Any]:
    start = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: "
    with RssSampler(pid) as rss:
        result = raw_send(url, start, 50 * MIB, timeout, body_suffix=b"\r\n\r\n")
    return {**result, "peak_rss_growth_mb": rss.growth_mb}


def key_name_case(url: str, timeout: float) -> dict[str, Any]:
    size = 65 * MIB
    prefix, suffix = b'{"budget": 1, "name": "', b'"}'
    headers = {"Content-Type": "application/json", "X-API-Key": ADMIN_KEY,
               "Content-Length": str(len(prefix) + size + len(suffix))}
    slowest = 0.0
    failures = 0
    stop = threading.Event()

    def watch_readiness() -> None:
        nonlocal slowest, failures
        with httpx.Client(timeout=timeout) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(url + "/v2/health/ready").status_code == 200
                except httpx.TransportError:
                    ok = False
                slowest = max(slowest, time.monotonic() - started)
                failures += not ok
                time.sleep(0.02)

    watcher = threading.Thread(target=watch_readiness, daemon=True)
    watcher.start()
    time.sleep(0.1)
    result = raw_send(url, head("POST", "/v1/admin/keys", headers), size, timeout,
                      body_prefix=prefix, body_suffix=suffix, filler=b"n")
    time.sleep(0.2)
    stop.set()
    watcher.join(timeout + 1)
    return {**result, "ready_slowest_s": round(slowest, 3), "ready_failures": failures,
            "ready_throughout": failures == 0 and not watcher.is_alive()}


async def _flood(url: str, count: int) -> None:
    rng = random.Random(0)
    names = [f"m{rng.getrandbits(64):016x}" for _ in range(count)]
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        async def worker(part: list[str]) -> None:
            for name in part:
                await client.post(f"/v2/models/{name}/infer", content=b"{}")
        await asyncio.gather(*(worker(names[i::16]) for i in range(16)))


def metrics_case(url: str, count: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        client.post("/v2/models/warm-up/infer", content=b"{}")
        before = len(client.get("/metrics").content)
        started = time.monotonic()
        asyncio.run(_flood(url, count))
        seconds = time.monotonic() - started
        after = len(client.get("/metrics").content)
    return {"requests": count, "metrics_bytes_before": before, "metrics_growth_bytes": after - before,
            "seconds": round(seconds, 2)}


def run_cases(checkpoint: Path, source: Path | None, workdir: Path, timeout: float) -> dict[str, Any]:
    name = "baseline" if source is not None else "current"
    results: dict[str, Any] = {}
    # A fresh server for the key name: a baseline that freezes on it must not spoil the others.
    with running_server(checkpoint, source, workdir / f"{name}.log") as (url, pid):
        results["body_100mb_admin"] = body_case(url, pid, "/v1/admin/keys", timeout)
        results["body_100mb_infer"] = body_case(url, pid, f"/v2/models/{MODEL}/infer", timeout)
        results["header_50mib"] = header_case(url, pid, timeout)
        results["metrics_flood"] = metrics_case(url, 3000)
    with running_server(checkpoint, source, workdir / f"{name}-keyname.log") as (url, _):
        results["key_name_65mib"] = key_name_case(url, timeout)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another source tree to measure side by side")
    parser.add_argument("--case-timeout-s", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stealsim-security-") as tmp:
        workdir = Path(tmp)
        checkpoint = make_checkpoint(workdir / "digits")
        report: dict[str, Any] = {
            "targets": {"peak_rss_growth_mb": "< 20", "key_name_65mib.seconds": "< 1",
                        "metrics_growth_bytes": "< 1024"},
            "current": run_cases(checkpoint, None, workdir, args.case_timeout_s),
        }
        if args.baseline is not None:
            report["baseline"] = run_cases(checkpoint, args.baseline.resolve(), workdir, args.case_timeout_s)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
