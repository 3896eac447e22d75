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
  this run, deleted afterwards;
* ``worker_kill``: 2 workers, ``--kill-clients`` concurrent clients sending small
  batches; one worker is SIGKILLed mid-run. Reported: the slowest request, failed
  requests, and whether the key's usage equals the images served (exactly-once).

The load generator never shares a process with the server or the ceiling: by
default ``wrk`` (Debian package ``wrk``, a compiled client) when it is on the PATH,
else this script's Python clients, each in a process of its own (``--load``). The
output names the generator and reports the CPU (in cores) it and the server used
during each measurement, so a saturated client shows.

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
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from stealsim.service_client import ServiceClient
from stealsim.wire import (
    API_KEY_HEADER,
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    infer_path,
)

ADMIN_KEY = "bench-admin"
UNLIMITED_RATE, UNLIMITED_IMAGE_RATE = "1000000/second", "1000000000/second"
"""The benchmark keys' rate limits: far above any measured rate, so they never throttle."""
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


@dataclass
class Server:
    url: str
    key: str
    pid: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running_server(checkpoint: Path, args: argparse.Namespace, extra: tuple[str, ...]) -> Iterator[Server]:
    """Start ``stealsim serve``; yield it (URL, an API key, its pid); stop it with SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "stealsim", "--log-level", "WARNING", "serve",
               "--model", f"{MODEL}={checkpoint}", "--port", str(port), "--admin-key", ADMIN_KEY,
               "--device", args.device, "--torch-threads", str(args.torch_threads),
               "--inference-graph", args.inference_graph, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads),
           "STEALSIM_MAX_IMAGES_PER_REQUEST": str(max(1024, args.batch)),
           "STEALSIM_GIL_SWITCH_INTERVAL_MS": str(args.gil_switch_interval_ms)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"server exited: {process.stderr.read().decode() if process.stderr else ''}"

    try:
        with ServiceClient(url, ADMIN_KEY) as service:
            service.wait_ready(120, give_up=exited)
            key = service.create_key(10**12, rate=UNLIMITED_RATE, image_rate=UNLIMITED_IMAGE_RATE)
        yield Server(url, key.api_key, process.pid)
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
) -> Iterator[tuple[Server, list[subprocess.Popen[bytes]]]]:
    """``workers`` ``stealsim worker`` processes and ``serve --batching redis``; yield both."""
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
             "--inference-graph", args.inference_graph,
             "--gil-switch-interval-ms", str(args.gil_switch_interval_ms),
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
                                               "--batching", "redis")) as server:
            yield server, processes
    finally:
        for process in processes:
            if process.poll() is None:
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
    return header + raw, {HEADER_LENGTH: str(len(header)), "Content-Type": BINARY_CONTENT_TYPE}


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
    return load_runners({MODEL: checkpoint}, resolve_device(args.device), args.inference_graph)[MODEL]


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
                content, headers = json_body(images), {"Content-Type": JSON_CONTENT_TYPE}
            response = client.post(infer_path(MODEL), content=content,
                                   headers={API_KEY_HEADER: key, **headers})
            response.raise_for_status()
            return len(images)
        return timed(seconds, step)




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
        f"POST {infer_path(MODEL)} HTTP/1.1\r\nHost: {host}\r\n{API_KEY_HEADER}: {key}\r\n"
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


# --- load generators, each in a process of its own --------------------------------------


@dataclass(frozen=True)
class Load:
    """What one measurement's clients achieved, and what they and the server cost."""

    images_per_s: float
    load_cpu_cores: float
    server_cpu_cores: float


def _child_rate(function: Any, *arguments: Any) -> tuple[float, float]:
    """In a spawned process: ``function(*arguments)`` (images/s) and this process's CPU in cores."""
    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.perf_counter()
    rate = function(*arguments)
    return float(rate), (time.process_time() - cpu) / (time.perf_counter() - wall)


def python_load(server: Server, processes: int, function: Any, *arguments: Any) -> Load:
    """``function(*arguments)`` in ``processes`` spawned processes at once; their images/s summed."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        list(pool.map(abs, range(processes)))  # start the processes before the clock runs
        before, started = cpu_seconds(server.pid), time.perf_counter()
        results = [future.result() for future in
                   [pool.submit(_child_rate, function, *arguments) for _ in range(processes)]]
        server_cores = (cpu_seconds(server.pid) - before) / (time.perf_counter() - started)
    return Load(sum(rate for rate, _ in results), sum(cores for _, cores in results), server_cores)


_WRK_SCRIPT = """
wrk.method = "POST"
local file = io.open("{body}", "rb")
wrk.body = file:read("*a")
file:close()
{headers}
"""


def wrk_load(server: Server, images: np.ndarray, connections: int, seconds: float, scratch: Path) -> Load:
    """``wrk`` (one thread) keeping ``connections`` keep-alive connections busy with one binary request."""
    content, headers = binary_body(images)
    body = scratch / f"body-{len(images)}.bin"
    body.write_bytes(content)
    script = scratch / f"wrk-{len(images)}.lua"
    all_headers = {API_KEY_HEADER: server.key, **headers}
    script.write_text(_WRK_SCRIPT.format(body=body, headers="\n".join(
        f'wrk.headers["{name}"] = "{value}"' for name, value in all_headers.items())))
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
               server.url + infer_path(MODEL)]
    subprocess.run([*command[:3], "-d1s", *command[4:]], check=True, capture_output=True)  # warm-up
    before, started = cpu_seconds(server.pid), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    server_cores = (cpu_seconds(server.pid) - before) / elapsed
    output = (process.stdout.read() if process.stdout else "") + (process.stderr.read() if process.stderr else "")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk failed or got errors:\n{output}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{output}")
    return Load(float(found.group(1)) * len(images), (usage.ru_utime + usage.ru_stime) / elapsed, server_cores)


def measure(server: Server, args: argparse.Namespace, images: np.ndarray, connections: int, scratch: Path) -> Load:
    """``connections`` binary clients, each sending ``images`` one request at a time."""
    if args.load == "wrk":
        return wrk_load(server, images, connections, args.seconds, scratch)
    if len(images) == 1:  # many tiny requests: the lean asyncio client, one process
        return python_load(server, 1, bench_concurrent, server.url, server.key, images, connections, args.seconds)
    return python_load(server, connections, bench_http, server.url, server.key, images, args.seconds, True)


# --- a worker killed under load ----------------------------------------------------------


def bench_worker_kill(server: Server, workers: list[subprocess.Popen[bytes]], args: argparse.Namespace,
                      image_shape: tuple[int, ...]) -> dict[str, Any]:
    """``--kill-clients`` clients send batches of 4 for ``2 * --seconds``; worker 0 is SIGKILLed halfway.

    Returns the slowest request, how many failed, and the key's usage against the
    images answered (exactly-once charging).
    """
    with ServiceClient(server.url, ADMIN_KEY) as service:
        key = service.create_key(10**9, rate=UNLIMITED_RATE, image_rate=UNLIMITED_IMAGE_RATE).api_key
    images = np.random.default_rng(1).random((4, *image_shape), dtype=np.float32)
    content, headers = binary_body(images)
    latencies: list[float] = []
    failures: list[int] = []
    served = 0

    async def client(http: Any, stop_at: float) -> None:
        nonlocal served
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await http.post(infer_path(MODEL), content=content,
                                       headers={API_KEY_HEADER: key, **headers})
            latencies.append(time.perf_counter() - started)
            if response.status_code == 200:
                served += len(images)
            else:
                failures.append(response.status_code)

    async def run() -> float:
        limits = httpx.Limits(max_connections=args.kill_clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            stop_at = time.perf_counter() + 2 * args.seconds
            tasks = [asyncio.create_task(client(http, stop_at)) for _ in range(args.kill_clients)]
            await asyncio.sleep(args.seconds)
            killed_at = time.perf_counter()
            workers[0].kill()
            await asyncio.gather(*tasks)
            return killed_at

    asyncio.run(run())
    with ServiceClient(server.url, key) as service:
        used = service.usage()["used"]
    ordered = sorted(latencies)
    return {
        "worker_kill_slowest_request_s": ordered[-1],
        "worker_kill_p99_request_s": ordered[int(0.99 * (len(ordered) - 1))],
        "worker_kill_requests": len(latencies), "worker_kill_failed_requests": len(failures),
        "worker_kill_usage_equals_served": used == served,
    }


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
    parser.add_argument("--inference-graph", choices=("torchscript", "eager"), default="torchscript",
                        help="how the server, the workers and the in-process ceiling run the model")
    parser.add_argument("--gil-switch-interval-ms", type=float, default=1.0,
                        help="the server's and workers' sys.setswitchinterval (Python's default: 5)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk (compiled), python (this script's clients, own processes); "
                             "auto: wrk when on the PATH")
    parser.add_argument("--redis-url", default=os.environ.get("STEALSIM_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
                        help="Redis of the redis_* measurements")
    parser.add_argument("--redis-workers", default="1,2", help="worker counts of the redis_* measurements ('' skips them)")
    parser.add_argument("--kill-clients", type=int, default=24, help="clients of the worker-kill measurement (0 skips it)")
    args = parser.parse_args()
    if args.load == "auto":
        args.load = "wrk" if shutil.which("wrk") else "python"

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        checkpoint = args.checkpoint or make_checkpoint(scratch / "ckpt", args.dataset, args.arch, args.epochs)
        from stealsim.checkpoint import read_meta

        meta = read_meta(checkpoint)
        rng = np.random.default_rng(0)
        batch = rng.random((args.batch, *meta.input_shape), dtype=np.float32)
        generator = ("wrk (compiled, 1 thread, own process)" if args.load == "wrk" else
                     "python (asyncio / httpx clients in spawned processes)")
        results: dict[str, Any] = {
            "model": f"{meta.architecture} {meta.dataset} {list(meta.input_shape)}",
            "device": args.device, "torch_threads": args.torch_threads, "batch": args.batch,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_generator": generator, "inference_graph": args.inference_graph,
            "gil_switch_interval_ms": args.gil_switch_interval_ms,
        }
        runner = load_runner(checkpoint, args)
        clients = [int(c) for c in args.clients.split(",")]
        trials: dict[str, list[float]] = {}
        cpu: dict[str, dict[str, float]] = {}

        def record(name: str, load: Load) -> None:
            trials.setdefault(f"{name}_images_per_s", []).append(load.images_per_s)
            if load.images_per_s >= max(trials[f"{name}_images_per_s"]):  # the CPU of the best trial
                cpu[name] = {"load_cores": round(load.load_cpu_cores, 2),
                             "server_cores": round(load.server_cpu_cores, 2)}

        def record_inprocess() -> None:
            rate = bench_inprocess(runner, batch, args.seconds)
            trials.setdefault("inprocess_images_per_s", []).append(rate)

        # Each number is the best of --repeats trials (the machine may be shared), and the
        # in-process forward is measured between the HTTP trials, not once apart from them.
        for variant in VARIANTS:
            with running_server(checkpoint, args, variant.server_args) as server:
                for _ in range(args.repeats):
                    if variant.name == "batched":
                        record_inprocess()
                        record("http_binary", measure(server, args, batch, 1, scratch))
                        record("http_json", python_load(server, 1, bench_http, server.url, server.key,
                                                        batch, args.seconds, False))
                    for count in clients:
                        record(f"concurrent{count}_{variant.name}", measure(server, args, batch[:1], count, scratch))
        for workers in [int(w) for w in args.redis_workers.split(",") if w.strip()]:
            label = f"redis_{workers}worker" + ("s" if workers > 1 else "")
            with running_redis_stack(checkpoint, args, workers) as (server, _):
                for _ in range(args.repeats):
                    record_inprocess()
                    record(label, measure(server, args, batch, workers, scratch))
        if args.kill_clients > 0:
            with running_redis_stack(checkpoint, args, 2) as (server, processes):
                results.update(bench_worker_kill(server, processes, args, meta.input_shape))
        results.update({name: max(values) for name, values in trials.items()})
        results["trials"] = trials
        results["cpu_cores"] = cpu
        ceiling = results["inprocess_images_per_s"]
        for name in list(results):
            if name.endswith("_images_per_s") and name != "inprocess_images_per_s" and "batch1" not in name:
                label = name.removesuffix("_images_per_s")
                results[f"ratio_{label}_vs_inprocess"] = results[name] / ceiling
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
          f"{results['cpu_count']} CPUs, {args.inference_graph}, GIL switch interval {args.gil_switch_interval_ms:g} ms, "
          f"best of {args.repeats} trials of {args.seconds:g} s; "
          f"load generator: {generator}\n")
    print("| measurement | images/s (best) | trials | load CPU (cores) | server CPU (cores) |\n"
          "| --- | ---: | --- | ---: | ---: |")
    for name, value in results.items():
        if name.endswith("_images_per_s"):
            label = name.removesuffix("_images_per_s")
            spread = ", ".join(f"{v:,.0f}" for v in trials[name])
            use = cpu.get(label, {})
            print(f"| {label} | {value:,.0f} | {spread} | {use.get('load_cores', '')} | {use.get('server_cores', '')} |")
    print("\n| ratio | value |\n| --- | ---: |")
    for name, value in results.items():
        if name.startswith("ratio_"):
            print(f"| {name.removeprefix('ratio_')} | {value:.2f} |")
    if "worker_kill_slowest_request_s" in results:
        print(f"\nA worker SIGKILLed under {args.kill_clients} clients: slowest request "
              f"{results['worker_kill_slowest_request_s']:.2f} s (p99 {results['worker_kill_p99_request_s']:.2f} s), "
              f"{results['worker_kill_failed_requests']} of {results['worker_kill_requests']} requests failed, "
              f"usage equals images served: {results['worker_kill_usage_equals_served']}")


if __name__ == "__main__":
    main()
