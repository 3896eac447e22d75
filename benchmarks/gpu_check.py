"""Every CUDA path of stealsim in one short run: one line per path with its figure.

The paths, each bounded by ``--timeout`` seconds:

* ``train``: ``stealsim train --device D``; seconds of training and test accuracy.
* ``serve-local``: ``stealsim serve --device D`` with its in-process micro-batcher, under
  concurrent clients sending one image per request; images/s and the mean images per
  forward pass (from the server's ``/metrics``).
* ``serve-redis``: the same load through ``serve --batching redis`` and one
  ``stealsim worker --device D``, when a Redis answers (``STEALSIM_TEST_REDIS_URL``, else
  127.0.0.1:6379); skipped otherwise. No Redis is started here.
* ``attack``: ``stealsim attack dual-student --device D --url ...`` against the
  ``serve-local`` server; queries/s of the attack loop and fidelity (with its 95 % interval).
* ``bf16``: the same attack with ``--set precision=bfloat16`` (autocast); queries/s and
  their ratio to the float32 attack's.
* ``bench``: ``benchmarks/serve.py --device D`` at its smallest settings (one trial, no
  Redis measurements); the ratios it prints: the batcher over batch size 1 under
  concurrent single-image clients, binary HTTP over the in-process forward.

A last line names the device (``torch.cuda.get_device_name``, or the CPU model) and the
torch version. ``--device cpu`` runs the same paths at tiny sizes: the smoke test CI runs
(``tests/test_gpu_check.py``). Exit status 0 when every path passed or was skipped, 1
when one failed (its line says ``FAILED`` and why), 2 when the device is not usable.

Usage::

    scripts/gpu-check.sh                    # --device cuda
    scripts/gpu-check.sh --device cpu       # the smoke test
    python benchmarks/gpu_check.py --device cuda:1 --timeout 60 --workdir runs/gpu-check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "gpu-check-admin"
MODEL = "victim"
UNLIMITED_RATE, UNLIMITED_IMAGE_RATE = "1000000/second", "1000000000/second"
REQUIRED_MODULES = (
    "torch", "numpy", "scipy", "sklearn", "mlxtend", "safetensors", "matplotlib", "typer", "rich",
    "pydantic", "pydantic_settings", "yaml", "fastapi", "uvicorn", "httpx", "redis", "limits",
    "prometheus_client", "orjson", "rq", "stealsim",
)
"""The import names of pyproject's dependencies (and the project): checked before any path runs."""


@dataclass(frozen=True)
class Sizes:
    """How big each path's work is on one kind of device."""

    dataset: str
    epochs: int
    clients: int  # concurrent single-image clients of the serve paths
    load_seconds: float
    budget: int  # attack queries
    transfer_samples: int
    reference_epochs: int
    bench_clients: int
    bench_seconds: float
    bench_batch: int


SIZES = {
    "cuda": Sizes("mnist5k", 5, 32, 5.0, 10_000, 100, 2, 32, 2.0, 256),
    "cpu": Sizes("digits", 1, 8, 1.0, 512, 16, 1, 8, 0.5, 64),
}


class PathFailed(Exception):
    """A path did not complete; the message says why."""


class PathSkipped(Exception):
    """A path could not run here (e.g. no Redis answers); not a failure."""


@dataclass
class Server:
    url: str
    key: str
    process: subprocess.Popen[bytes]


@dataclass
class Check:
    """What the paths share: settings, the scratch folder, the processes started."""

    device: str
    sizes: Sizes
    timeout: float
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    local: Server | None = None
    local_error: str | None = None

    @property
    def checkpoint(self) -> Path:
        return self.workdir / "victim"

    def start(self, command: list[str], log: str, *, capture: bool = False) -> subprocess.Popen[bytes]:
        """Start ``command`` in a process group of its own, its output to ``workdir/log``
        (stdout piped back instead when ``capture``). A ``stealsim`` command also dies with
        this process (its parent-death signal), even after a SIGKILL."""
        from stealsim.processes import child_environment

        stealsim = command[1:3] == ["-m", "stealsim"]
        environment = child_environment() if stealsim else dict(os.environ)
        with (self.workdir / log).open("ab") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE if capture else stderr, stderr=stderr,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def finish(self, command: list[str], log: str, deadline: float) -> str:
        """Run ``command`` to its end within ``deadline``; its stdout. Raises PathFailed."""
        process = self.start(command, log, capture=True)
        try:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise PathFailed(f"timed out after {self.timeout:g} s") from None
        finally:
            self.stop(process)  # and whatever it left running in its group
        if process.returncode != 0:
            raise PathFailed(f"exit status {process.returncode}: {last_line(self.workdir / log)}")
        return out.decode(errors="replace")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process in self.processes:
            self.processes.remove(process)
            stop(process)

    def stop_all(self) -> None:
        while self.processes:
            self.stop(self.processes[-1])

    def stealsim(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "stealsim", "--log-level", "WARNING", *arguments]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``process`` (its children too), SIGKILL what is left after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group's stragglers, if any
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def last_line(log: Path) -> str:
    """The last line of a log that says something (the ``error: ...`` of a command)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(check: Check, log: str, deadline: float, *extra: str,
                 worker: subprocess.Popen[bytes] | None = None) -> Server:
    """``stealsim serve`` of the checkpoint on the device, ready, with an unmetered-rate key
    (the wait ends early when the server, or the ``worker`` it needs, exits)."""
    from stealsim.service_client import ServiceClient

    port = free_port()
    process = check.start(check.stealsim(
        "serve", "--model", f"{MODEL}={check.checkpoint}", "--port", str(port), "--admin-key", ADMIN_KEY,
        "--device", check.device, *extra), log)
    url = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if (code := process.poll()) is not None:
            return f"the server exited with status {code}: {last_line(check.workdir / log)}"
        if worker is not None and (code := worker.poll()) is not None:
            return f"the worker exited with status {code}: {last_line(check.workdir / 'worker.log')}"
        return None

    try:
        with ServiceClient(url, ADMIN_KEY) as service:
            service.wait_ready(max(1.0, deadline - time.monotonic()), give_up=exited)
            key = service.create_key(10**12, rate=UNLIMITED_RATE, image_rate=UNLIMITED_IMAGE_RATE)
    except Exception as exc:
        raise PathFailed(f"server not ready: {exc}") from exc
    return Server(url, key.api_key, process)


def local_server(check: Check, deadline: float) -> Server:
    """The one local-batching server of serve-local, attack and bf16 (started once)."""
    if check.local is None and check.local_error is None:
        try:
            check.local = start_server(check, "serve-local.log", deadline)
        except PathFailed as exc:
            check.local_error = str(exc)
    if check.local is None:
        raise PathFailed(check.local_error or "no server")
    return check.local


def single_image_load(server: Server, shape: tuple[int, ...], clients: int, seconds: float) -> float:
    """``clients`` concurrent clients, one image per binary request, for ``seconds``; images/s."""
    import httpx
    import numpy as np

    from stealsim.wire import API_KEY_HEADER, BINARY_CONTENT_TYPE, HEADER_LENGTH, infer_path

    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    raw = image.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(image.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": BINARY_CONTENT_TYPE, API_KEY_HEADER: server.key}

    async def run() -> int:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            stop_at = time.monotonic() + seconds

            async def one_client() -> int:
                served = 0
                while time.monotonic() < stop_at:
                    response = await client.post(infer_path(MODEL), content=header + raw, headers=headers)
                    if response.status_code != 200:
                        raise PathFailed(f"HTTP {response.status_code}: {response.text[:200]}")
                    served += 1
                return served

            return sum(await asyncio.gather(*(one_client() for _ in range(clients))))

    started = time.monotonic()
    served = asyncio.run(run())
    return served / (time.monotonic() - started)


def batch_histogram(server: Server) -> tuple[float, float]:
    """(images, forward passes) of the model so far, from the server's Prometheus metrics."""
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = {name: float(value) for name, value in re.findall(
        rf'^stealsim_batch_images_(sum|count){{model="{MODEL}"}} (\S+)$', text, re.MULTILINE)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def input_shape(check: Check) -> tuple[int, ...]:
    from stealsim.checkpoint import read_meta

    if not (check.checkpoint / "model.json").is_file():
        raise PathFailed("no victim checkpoint (train failed)")
    return tuple(read_meta(check.checkpoint).input_shape)


# -- the paths ------------------------------------------------------------------------------


def path_train(check: Check, deadline: float) -> str:
    sizes = check.sizes
    started = time.monotonic()
    check.finish(check.stealsim("train", "--dataset", sizes.dataset, "--out", str(check.checkpoint),
                                "--epochs", str(sizes.epochs), "--device", check.device, "--quiet"),
                 "train.log", deadline)
    wall = time.monotonic() - started
    metrics = json.loads((check.checkpoint / "metrics.json").read_text())
    return (f"{metrics['train_seconds']:.1f} s training ({wall:.1f} s with start-up), test accuracy "
            f"{metrics['test_accuracy']:.3f} ({sizes.dataset}, {sizes.epochs} epoch{'s' if sizes.epochs != 1 else ''})")


def path_serve_local(check: Check, deadline: float) -> str:
    shape = input_shape(check)
    server = local_server(check, deadline)
    images_before, passes_before = batch_histogram(server)
    rate = single_image_load(server, shape, check.sizes.clients, check.sizes.load_seconds)
    images, passes = batch_histogram(server)
    mean_batch = (images - images_before) / max(1.0, passes - passes_before)
    return (f"{rate:,.0f} images/s, {check.sizes.clients} clients of 1 image per request, "
            f"mean batch {mean_batch:.1f} images per forward")


def redis_url() -> str:
    return os.environ.get("STEALSIM_TEST_REDIS_URL") or "redis://127.0.0.1:6379"


def path_serve_redis(check: Check, deadline: float) -> str:
    import redis

    url = redis_url()
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise PathSkipped(f"no Redis answers at {url}: {exc}") from None
    shape = input_shape(check)
    prefix = f"stealsim-gpu-check-{uuid.uuid4().hex[:8]}"
    worker = check.start(check.stealsim("worker", "--redis-url", url, "--redis-prefix", prefix, "--model",
                                        f"{MODEL}={check.checkpoint}", "--device", check.device),
                         "worker.log")
    server = None
    try:
        server = start_server(check, "serve-redis.log", deadline,
                              "--redis-url", url, "--redis-prefix", prefix, "--batching", "redis", worker=worker)
        rate = single_image_load(server, shape, check.sizes.clients, check.sizes.load_seconds)
    finally:
        if server is not None:
            check.stop(server.process)
        check.stop(worker)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    return f"{rate:,.0f} images/s, {check.sizes.clients} clients of 1 image per request, 1 worker"


def attack(check: Check, deadline: float, name: str, *extra: str) -> dict[str, Any]:
    sizes = check.sizes
    input_shape(check)
    server = local_server(check, deadline)
    out = check.workdir / name
    check.finish(check.stealsim(
        "attack", "dual-student", "--url", server.url, "--api-key", server.key, "--model", MODEL,
        "--budget", str(sizes.budget), "--out", str(out), "--device", check.device, "--quiet",
        "--eval-every", str(sizes.budget), "--transfer-epsilon", "0.1",
        "--transfer-samples", str(sizes.transfer_samples), "--reference-epochs", str(sizes.reference_epochs),
        *extra), f"{name}.log", deadline)
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    if metrics.get("queries_used") != sizes.budget or metrics.get("server_count_matches") is False:
        raise PathFailed(f"queries used {metrics.get('queries_used')} of {sizes.budget}, "
                         f"server count matches: {metrics.get('server_count_matches')}")
    return metrics


def describe_attack(metrics: dict[str, Any]) -> str:
    return (f"{metrics['queries_per_second']:,.0f} queries/s, fidelity {metrics['fidelity']:.3f} "
            f"[{metrics['fidelity_ci95_low']:.3f}, {metrics['fidelity_ci95_high']:.3f}] "
            f"(dual-student, {metrics['queries_used']:,} queries)")


def path_attack(check: Check, deadline: float) -> str:
    metrics = attack(check, deadline, "attack")
    check.results["attack"] = {"queries_per_second": float(metrics["queries_per_second"])}
    return describe_attack(metrics)


def path_bf16(check: Check, deadline: float) -> str:
    metrics = attack(check, deadline, "bf16", "--set", "precision=bfloat16")
    fp32 = check.results.get("attack", {}).get("queries_per_second")
    ratio = (f", {metrics['queries_per_second'] / fp32:.2f}x the float32 attack's queries/s" if fp32
             else " (no float32 figure to compare: attack failed)")
    return describe_attack(metrics) + ratio


def path_bench(check: Check, deadline: float) -> str:
    sizes = check.sizes
    input_shape(check)
    if check.local is not None:  # the benchmark starts servers of its own: the device is theirs
        check.stop(check.local.process)
        check.local = None
    out = check.finish([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--json",
                        "--checkpoint", str(check.checkpoint), "--device", check.device,
                        "--clients", str(sizes.bench_clients), "--seconds", str(sizes.bench_seconds),
                        "--repeats", "1", "--batch", str(sizes.bench_batch), "--redis-workers", "",
                        "--kill-clients", "0"], "bench.log", deadline)
    results = json.loads(out.strip().splitlines()[-1])
    clients = sizes.bench_clients
    return (f"batched {results[f'ratio_concurrent{clients}_batched_vs_batch1']:.2f}x batch size 1 at "
            f"{clients} clients; HTTP binary {results['ratio_http_binary_vs_inprocess']:.2f}x in-process "
            f"({results['inprocess_images_per_s']:,.0f} images/s in-process, batch {sizes.bench_batch})")


PATHS: list[tuple[str, Callable[[Check, float], str]]] = [
    ("train", path_train),
    ("serve-local", path_serve_local),
    ("serve-redis", path_serve_redis),
    ("attack", path_attack),
    ("bf16", path_bf16),
    ("bench", path_bench),
]


def device_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        name = f"cpu ({models[0] if models else platform.processor() or 'unknown model'}, {os.cpu_count()} cores)"
    return f"device: {name}, torch {torch.__version__}"


def usable_device(device: str) -> str | None:
    """Why this Python or ``device`` cannot run the check, or None."""
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"{sys.executable} lacks {', '.join(missing)} (see docs/server.md#gpu-check)"
    import torch

    if device == "cpu":
        return None
    if not re.fullmatch(r"cuda(:\d+)?", device):
        return f"--device {device!r}: expected cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"CUDA is not available to {sys.executable} (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    return None


def run(check: Check) -> list[str]:
    """Every path in order, one line each; the names of the paths that failed."""
    failed = []
    for name, path in PATHS:
        deadline = time.monotonic() + check.timeout
        try:
            line = path(check, deadline)
        except PathSkipped as exc:
            line = f"skipped ({exc})"
        except Exception as exc:  # one path's failure is its line, and the others still run
            reason = str(exc) if isinstance(exc, PathFailed) else f"{type(exc).__name__}: {exc}"
            line = f"FAILED ({reason})"
            failed.append(name)
        print(f"{name}: {line}", flush=True)
    return failed


def terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the tiny smoke test)")
    parser.add_argument("--timeout", type=float, default=75.0,
                        help="seconds each path may take (default 75: six paths stay under 8 minutes)")
    parser.add_argument("--sizes", choices=sorted(SIZES),
                        help="how big each path's work is (default: cpu's on cpu, else cuda's)")
    parser.add_argument("--workdir", type=Path,
                        help="folder of the checkpoint, runs and logs (default: a temporary folder, removed)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminate)
    if (problem := usable_device(args.device)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sizes = SIZES[args.sizes or ("cpu" if args.device == "cpu" else "cuda")]
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stealsim-gpu-check-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        check = Check(args.device, sizes, args.timeout, workdir)
        stack.callback(check.stop_all)
        try:
            failed = run(check)
        except KeyboardInterrupt:
            print("interrupted: every process this check started is stopped", file=sys.stderr)
            sys.exit(130)
        check.stop_all()
        print("result: " + (f"FAILED: {', '.join(failed)}" if failed else "every path passed or was skipped"))
        print(device_line(args.device), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
