"""Commands as a user (or a script) starts and stops them: ``serve`` refuses a bad start in
one line before uvicorn runs, and Ctrl-C on ``attack`` says where it stopped and how to go
on, even when the launcher left SIGINT ignored. (The demo's children: tests/test_demo.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server_support import ServerProcess, new_key
from test_attack_http import attack_command


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stealsim", "serve", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "uvicorn" not in result.stderr


def test_serve_refuses_a_missing_checkpoint() -> None:
    assert_one_line_error(serve("--model", "victim=/nonexistent/checkpoint"), "'victim'", "/nonexistent")


def test_serve_refuses_a_truncated_checkpoint(digits_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(digits_checkpoint, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(serve("--model", f"good={digits_checkpoint}", "--model", f"bad={broken}"),
                          "'bad'", str(weights))


def test_serve_refuses_a_busy_port_before_loading_anything(digits_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model", f"victim={digits_checkpoint}", "--port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ctrl_c_on_attack_says_where_it_stopped_and_resume_continues(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 12_000
    key = new_key(client, budget=budget * 2)
    out = tmp_path / "run"
    # SIGINT inherited ignored, as under nohup or `cmd &` in a script: the CLI restores Ctrl-C.
    command = attack_command("random", victim_server, key, out, budget, "--eval-every", "1000")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_ignore_sigint)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if (out / "checkpoint.pt").is_file() and json.loads((out / "ledger.json").read_text())["attack_queries"] >= 2000:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    used = json.loads((out / "ledger.json").read_text())["attack_queries"]
    assert f"interrupted at {used:,} of {budget:,} queries" in stderr
    assert "training resumes from its checkpoint at" in stderr and "--resume" in stderr
    assert not (out / "metrics.json").exists()  # no final metrics for a run that did not finish

    result = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["queries_used"] == budget
