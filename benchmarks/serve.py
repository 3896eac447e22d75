"""Throughput of the victim service, in images per second, measured side by side in one run.

What it measures (each for ``--seconds``):

* ``inprocess``: ``ModelRunner.predict_batch`` on batches of ``--batch`` images in this
  process: the ceiling the HTTP paths are compared with;
* ``http_binary`` / ``http_json``: one client sending batches of ``--batch`` images over
  HTTP (binary tensor extension / JSON), keep-alive, to ``stealsim serve``;
* ``concurrentC_<variant>``: C concurrent clients sending one image per request, for each
  server variant (``batch1``: ``--max-batch-size 1``; ``batched``: the default batcher);
* ``redis_1worker`` / ``redis_2workers``: ``serve --batching redis`` with 1 or 2
  ``stealsim worker`` processes, as many concurrent clients as workers, each sending
  batches of ``--batch`` images (binary); Redis at ``--redis-url`` under a prefix of
  this run, deleted afterwards.

Usage::

    python benchmarks/serve.py                 # a markdown table with the ratios
    python benchmarks/serve.py --json          # one JSON object (keys *_images_per_s, ratios)

A new batching backend adds a :class:`Variant` to :data:`VARIANTS` (its server flags);
its ``concurrentC_<name>_images_per_s`` keys then appear with the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

ADMIN_KEY = "bench-admin"
HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "bench"


@dataclass(frozen=True)
class Variant:
    """A way of running the server, compared under concurrent single-image clients."""

    name: str
    server_args: tuple[str, ...]


VARIANTS: list[Variant] = [
    Variant("batch1", ("--max-batch-size", "1")),
    Variant("batched", ()),  # the defaults: --max-batch-size 64 --max-wait-ms 0.5
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_checkpoint(directory: Path, dataset: str, arch: str, epochs: int) -> Path:
    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import TrainConfig, train_classifier

    data = load_dataset(dataset)
    model, meta = train_classifier(data, arch, TrainConfig(epochs=epochs), "cpu", show_progress=False)
    save_checkpoint(directory, model, meta)
    return directory


@contextmanager
def running_server(checkpoint: Path, args: argparse.Namespace, extra: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """Start ``stealsim serve``; yield ``(url, api_key)``; stop it with SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "stealsim", "--log-level", "WARNING", "serve",
               "--model", f"{MODEL}={checkpoint}", "--port", str(port), "--admin-key", ADMIN_KEY,
               "--device", args.device, "--torch-threads", str(args.torch_threads), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads),
           "STEALSIM_MAX_IMAGES_PER_REQUEST": str(max(1024, args.batch))}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)
        response = httpx.post(f"{url}/v1/admin/keys", headers={"X-API-Key": ADMIN_KEY},
                              json={"budget": 10**12, "rate": "1000000/second", "image_rate": "1000000000/second"})
        response.raise_for_status()
        yield url, response.json()["api_key"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_redis_stack(
    checkpoint: Path, args: argparse.Namespace, workers: int
) -> Iterator[tuple[str, str]]:
    """``workers`` ``stealsim worker`` processes and ``serve --batching redis``; yield ``(url, key)``."""
    import uuid

    import redis

    prefix = "stealsim-bench-" + uuid.uuid4().hex[:8]
    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "stealsim", "--log-level", "WARNING", "worker",
             "--redis-url", args.redis_url, "--redis-prefix", prefix, "--model", f"{MODEL}={checkpoint}",
             "--device", args.device, "--torch-threads", str(args.torch_threads),
             "--max-batch-size", str(args.batch), "--name", f"bench-{index}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for index in range(workers)
    ]
    try:
        deadline = time.monotonic() + 120
        while client.zcard(f"{prefix}:workers:{MODEL}") < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("workers did not start")
            time.sleep(0.1)
        with running_server(checkpoint, args, ("--redis-url", args.redis_url, "--redis-prefix", prefix,
                                               "--batching", "redis")) as (url, key):
            yield url, key
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def binary_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(images, dtype="<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def json_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                                   "data": images.reshape(-1).tolist()}]}).encode()


def timed(seconds: float, step: Any) -> float:
    """Run ``step() -> images`` repeatedly for ``seconds`` (after one warm-up); images/s."""
    step()
    images = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        images += step()
    return images / elapsed


def load_runner(checkpoint: Path, args: argparse.Namespace) -> Any:
    from stealsim.training import resolve_device
    from victim_server.runner import load_runners

    torch.set_num_threads(args.torch_threads)
    return load_runners({MODEL: checkpoint}, resolve_device(args.device))[MODEL]


def bench_inprocess(runner: Any, images: np.ndarray, seconds: float) -> float:
    """``predict_batch`` called the way the server calls it: from a worker thread.

    (Measured here, the same forward ran 15-35% slower from the main thread than from
    a worker thread, likely glibc's allocator arenas; the thread is the fair ceiling.)
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(timed, seconds, lambda: len(runner.predict_batch(images))).result()


def bench_http(url: str, key: str, images: np.ndarray, seconds: float, binary: bool) -> float:
    with httpx.Client(base_url=url, timeout=120) as client:
        def step() -> int:
            # The client encodes every request, as a real client does.
            if binary:
                content, headers = binary_body(images)
            else:
                content, headers = json_body(images), {"Content-Type": "application/json"}
            response = client.post(f"/v2/models/{MODEL}/infer", content=content,
                                   headers={"X-API-Key": key, **headers})
            response.raise_for_status()
            return len(images)
        return timed(seconds, step)


def bench_http_clients(url: str, key: str, images: np.ndarray, seconds: float, clients: int) -> float:
    """``clients`` threads, each a keep-alive binary client sending ``images``; images/s in all."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        rates = pool.map(lambda _: bench_http(url, key, images, seconds, True), range(clients))
        return float(sum(rates))


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def bench_concurrent(url: str, key: str, image: np.ndarray, clients: int, seconds: float) -> float:
    """``clients`` keep-alive connections, each sending one single-image request at a time.

    A lean asyncio HTTP/1.1 client with the request pre-encoded, so that the client
    (on the same cores) costs little next to the server being measured.
    """
    content, headers = binary_body(image)
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + f"Content-Length: {len(content)}\r\n\r\n"
    ).encode() + content

    async def run() -> float:
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(request)
            status = await _read_response(reader)
            if status != 200:
                raise RuntimeError(f"HTTP {status} from the server")

        await asyncio.gather(*(one(r, w) for r, w in connections))  # warm-up
        done = 0
        started = time.perf_counter()
        deadline = started + seconds

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await one(reader, writer)
                done += 1

        await asyncio.gather(*(worker(r, w) for r, w in connections))
        elapsed = time.perf_counter() - started
        for _, writer in connections:
            writer.close()
        return done / elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: train one)")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--arch", default="small-cnn")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="images per request (in-process, HTTP)")
    parser.add_argument("--clients", default="1,16,64", help="concurrent single-image clients")
    parser.add_argument("--seconds", type=float, default=3.0, help="per trial")
    parser.add_argument("--repeats", type=int, default=3, help="trials per measurement (the best counts)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--redis-url", default=os.environ.get("STEALSIM_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
                        help="Redis of the redis_* measurements")
    parser.add_argument("--redis-workers", default="1,2", help="worker counts of the redis_* measurements ('' skips them)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or make_checkpoint(Path(scratch) / "ckpt", args.dataset, args.arch, args.epochs)
        from stealsim.checkpoint import read_meta

        meta = read_meta(checkpoint)
        rng = np.random.default_rng(0)
        batch = rng.random((args.batch, *meta.input_shape), dtype=np.float32)
        results: dict[str, Any] = {
            "model": f"{meta.architecture} {meta.dataset} {list(meta.input_shape)}",
            "device": args.device, "torch_threads": args.torch_threads, "batch": args.batch,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        }
        runner = load_runner(checkpoint, args)
        clients = [int(c) for c in args.clients.split(",")]
        trials: dict[str, list[float]] = {}

        def record(name: str, value: float) -> None:
            trials.setdefault(f"{name}_images_per_s", []).append(value)

        # Each number is the best of --repeats trials (the machine may be shared), and the
        # in-process forward is measured between the HTTP trials, not once apart from them.
        for variant in VARIANTS:
            with running_server(checkpoint, args, variant.server_args) as (url, key):
                for _ in range(args.repeats):
                    if variant.name == "batched":
                        record("inprocess", bench_inprocess(runner, batch, args.seconds))
                        record("http_binary", bench_http(url, key, batch, args.seconds, True))
                        record("http_json", bench_http(url, key, batch, args.seconds, False))
                    for count in clients:
                        record(f"concurrent{count}_{variant.name}",
                               bench_concurrent(url, key, batch[:1], count, args.seconds))
        for workers in [int(w) for w in args.redis_workers.split(",") if w.strip()]:
            label = f"redis_{workers}worker" + ("s" if workers > 1 else "")
            with running_redis_stack(checkpoint, args, workers) as (url, key):
                for _ in range(args.repeats):
                    record("inprocess", bench_inprocess(runner, batch, args.seconds))
                    record(label, bench_http_clients(url, key, batch, args.seconds, workers))
        results.update({name: max(values) for name, values in trials.items()})
        results["trials"] = trials
        results["ratio_http_binary_vs_inprocess"] = (
            results["http_binary_images_per_s"] / results["inprocess_images_per_s"]
        )
        results["ratio_http_json_vs_inprocess"] = results["http_json_images_per_s"] / results["inprocess_images_per_s"]
        for name in list(results):
            if name.startswith("redis_") and name.endswith("_images_per_s"):
                label = name.removesuffix("_images_per_s")
                results[f"ratio_{label}_vs_inprocess"] = results[name] / results["inprocess_images_per_s"]
        if "redis_1worker_images_per_s" in results and "redis_2workers_images_per_s" in results:
            results["ratio_redis_2workers_vs_1worker"] = (
                results["redis_2workers_images_per_s"] / results["redis_1worker_images_per_s"]
            )
        for count in clients:
            base = results.get(f"concurrent{count}_batch1_images_per_s")
            for variant in VARIANTS:
                key = f"concurrent{count}_{variant.name}_images_per_s"
                if base and variant.name != "batch1" and key in results:
                    results[f"ratio_concurrent{count}_{variant.name}_vs_batch1"] = results[key] / base

    if args.json:
        print(json.dumps(results))
        return
    print(f"model {results['model']}, device {args.device}, torch threads {args.torch_threads}, "
          f"{results['cpu_count']} CPUs, best of {args.repeats} trials of {args.seconds:g} s\n")
    print("| measurement | images/s (best) | trials |\n| --- | ---: | --- |")
    for name, value in results.items():
        if name.endswith("_images_per_s"):
            spread = ", ".join(f"{v:,.0f}" for v in trials[name])
            print(f"| {name.removesuffix('_images_per_s')} | {value:,.0f} | {spread} |")
    print("\n| ratio | value |\n| --- | ---: |")
    for name, value in results.items():
        if name.startswith("ratio_"):
            print(f"| {name.removeprefix('ratio_')} | {value:.2f} |")


if __name__ == "__main__":
    main()
