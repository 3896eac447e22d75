"""``scripts/gpu-check.sh`` as a user runs it, on CPU: the smoke test of the GPU check.

Behaviour only, never timings: one line per path with a number, the device line, the
exit status, a failing path named, and no process of the check left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from redis_support import redis_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
PATHS = ("train", "serve-local", "serve-redis", "attack", "bf16", "bench")


def gpu_check(*arguments: str, redis: str | None = None, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "STEALSIM_TEST_REDIS_URL": redis or "redis://127.0.0.1:1"}
    return subprocess.run(["bash", str(SCRIPT), *arguments], env=environment, capture_output=True,
                          text=True, timeout=timeout, check=False)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose arguments contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in command and state != "Z":
            found.append(command)
    return found


def wait_none_mentioning(text: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def path_lines(stdout: str) -> dict[str, str]:
    return {name: line for name, _, line in (row.partition(": ") for row in stdout.splitlines())}


@pytest.mark.slow
def test_cpu_smoke_prints_every_path_with_a_figure(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    workdir = tmp_path / "work"
    result = gpu_check("--device", "cpu", "--timeout", "150", "--workdir", str(workdir), redis=redis_url)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = path_lines(result.stdout)
    for name in PATHS:
        assert re.search(r"\d", lines.get(name, "")), f"no figure for {name}: {result.stdout}"
        assert "FAILED" not in lines[name] and "skipped" not in lines[name], result.stdout
    assert re.search(r"[\d,]+ images/s", lines["serve-local"]), result.stdout
    assert re.search(r"[\d,]+ images/s", lines["serve-redis"]), result.stdout
    assert re.search(r"[\d,]+ queries/s, fidelity 0\.\d+", lines["attack"]), result.stdout
    assert re.search(r"\d+\.\d+x the float32 attack's queries/s", lines["bf16"]), result.stdout
    assert re.search(r"batched \d+\.\d+x batch size 1", lines["bench"]), result.stdout
    assert result.stdout.splitlines()[-1] == f"device: {lines['device']}"
    assert f"torch {torch.__version__}" in lines["device"]
    assert (workdir / "attack" / "metrics.json").is_file() and (workdir / "bf16" / "metrics.json").is_file()
    assert wait_none_mentioning(str(workdir)) == []


def test_without_redis_the_redis_path_is_skipped_and_a_failing_path_is_named(tmp_path: Path) -> None:
    """--timeout 1: training cannot finish, so it fails and every path that needs its
    checkpoint fails with that reason; serve-redis is skipped (no Redis at the URL); exit 1."""
    workdir = tmp_path / "work"
    result = gpu_check("--device", "cpu", "--timeout", "1", "--workdir", str(workdir), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = path_lines(result.stdout)
    assert lines["train"] == "FAILED (timed out after 1 s)", result.stdout
    for name in ("serve-local", "attack", "bf16", "bench"):
        assert lines[name] == "FAILED (no victim checkpoint (train failed))", result.stdout
    assert lines["serve-redis"].startswith("skipped (no Redis answers at redis://127.0.0.1:1"), result.stdout
    assert lines["result"] == "FAILED: train, serve-local, attack, bf16, bench"
    assert wait_none_mentioning(str(workdir)) == []


def test_sigterm_stops_every_process_the_check_started(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    script = subprocess.Popen(["bash", str(SCRIPT), "--device", "cpu", "--workdir", str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not processes_mentioning(f"--out {workdir}/victim") and time.monotonic() < deadline:
            assert script.poll() is None, script.communicate()
            time.sleep(0.1)
        assert processes_mentioning(f"--out {workdir}/victim"), "training never started"
        script.send_signal(signal.SIGTERM)
        out, err = script.communicate(timeout=60)
    finally:
        if script.poll() is None:
            script.kill()
        script.communicate()
    assert script.returncode == 143, out + err
    assert wait_none_mentioning(str(workdir)) == []


def test_an_unknown_device_is_refused(tmp_path: Path) -> None:
    result = gpu_check("--device", "tpu", "--workdir", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "--device 'tpu': expected cpu, cuda or cuda:N" in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_cuda_without_a_gpu_is_refused_before_any_path(tmp_path: Path) -> None:
    result = gpu_check("--device", "cuda", "--workdir", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "error: CUDA is not available to" in result.stderr
    assert result.stdout == ""
