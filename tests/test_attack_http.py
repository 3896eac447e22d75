"""The attacker against a real ``stealsim serve`` over HTTP: the client's error handling,
every attack end to end within its budget (server-side usage = the attacker's count),
a spent server budget, and resume after a kill. Nothing here mocks HTTP; the one fake
server is a tiny local HTTP server that answers 503, which the real one does not on demand."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from server_support import ServerProcess, new_key

from attacker.attacks import ATTACKS
from attacker.client import HttpVictim, RetryPolicy
from attacker.endpoint import EndpointOptions
from attacker.victims import BudgetedVictim, InProcessVictim, KeyUsage
from stealsim.data import load_dataset
from stealsim.errors import BudgetExhaustedError, VictimAPIError

DIGITS_TEST = 360  # images in the digits test split: the evaluation's one-off cost
TRANSFER = 20
EPSILONS = 3  # the default transfer sweep, each untargeted and targeted
EVAL_COST = DIGITS_TEST + 2 * TRANSFER * EPSILONS * 2  # the split, the clone's and the reference's PGD
TINY_FLAGS = ["--set", "student_width=8", "--batch-size", "64", "--transfer-samples", str(TRANSFER),
              "--reference-epochs", "1", "--threads", "1", "--quiet"]
GENERATOR_FLAGS = ["--set", "generator_width=8", "--set", "latent_dim=16"]


def usage(server: ServerProcess, key: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def attack_command(name: str, server: ServerProcess, key: str, out: Path, budget: int, *extra: str) -> list[str]:
    flags = TINY_FLAGS + (GENERATOR_FLAGS if name in ("dual-student", "dfme", "ensemble") else [])
    return [sys.executable, "-m", "stealsim", "attack", name, "--url", server.url, "--api-key", key,
            "--model", "victim", "--budget", str(budget), "--out", str(out), *flags, *extra]


def run_cli(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


# -- the client ----------------------------------------------------------------------------------


def test_client_answers_like_the_model(victim_server: ServerProcess, client: httpx.Client, digits_checkpoint: Path) -> None:
    key = new_key(client, budget=10_000)
    images = load_dataset("digits").x_test[:300]
    expected = InProcessVictim.from_checkpoint(digits_checkpoint).query(images)
    with HttpVictim(victim_server.url, key, "victim") as victim:
        assert victim.info.input_shape == (1, 8, 8)
        assert victim.info.num_classes == 10
        assert victim.info.output_kind == "probabilities"
        assert victim.info.max_images_per_request == 512
        torch.testing.assert_close(victim.query(images), expected, atol=1e-5, rtol=1e-4)
        json_victim = HttpVictim(victim_server.url, key, "victim", options=EndpointOptions(wire="json"))
        assert victim.endpoint.wire == "binary" and json_victim.endpoint.wire == "json"
        assert victim.metering == "server"
        torch.testing.assert_close(json_victim.query(images[:10]), expected[:10], atol=1e-5, rtol=1e-4)
        json_victim.close()
        assert victim.usage()["used"] == 310
        assert victim.key_usage() == KeyUsage(used=310, remaining=10_000 - 310)
        assert victim.request_metrics() == {"http_retries": 0}
        record = victim.endpoint_record()
        assert (record["wire"], record["api_key"], record["headers"]) == ("binary", True, [])


def test_client_sends_extra_headers_and_no_key_unless_given(victim_server: ServerProcess,
                                                            client: httpx.Client) -> None:
    key = new_key(client, budget=100)
    with pytest.raises(VictimAPIError) as unauthorized:
        HttpVictim(victim_server.url, None, "victim")
    assert unauthorized.value.status == 401
    with HttpVictim(victim_server.url, None, "victim", headers={"X-API-Key": key}) as victim:  # a gateway's header
        assert victim.query(torch.rand(4, 1, 8, 8)).shape == (4, 10)
        assert victim.usage()["used"] == 4


def test_client_reports_label_only_models(victim_server: ServerProcess, client: httpx.Client, digits_checkpoint: Path) -> None:
    key = new_key(client, budget=1000, policy=[{"name": "label_only"}])
    images = load_dataset("digits").x_test[:50]
    with HttpVictim(victim_server.url, key, "victim") as victim:
        assert victim.info.output_kind == "label"
        labels = victim.query(images)
    assert labels.dtype == torch.int64 and labels.shape == (50,)
    assert labels.tolist() == InProcessVictim.from_checkpoint(digits_checkpoint).query(images).argmax(1).tolist()


def test_client_errors_401_404_413(victim_server: ServerProcess, client: httpx.Client) -> None:
    with pytest.raises(VictimAPIError) as unauthorized:
        HttpVictim(victim_server.url, "sk-wrong", "victim")
    assert unauthorized.value.status == 401 and unauthorized.value.code == "unauthorized"
    key = new_key(client, budget=2000)
    with pytest.raises(VictimAPIError) as missing:
        HttpVictim(victim_server.url, key, "no-such-model")
    assert missing.value.status == 404 and missing.value.code == "model_not_found"
    with HttpVictim(victim_server.url, key, "victim") as victim:
        with pytest.raises(VictimAPIError) as too_large:
            victim.query(torch.rand(513, 1, 8, 8))  # max_images_per_request is 512
        assert too_large.value.status == 413 and too_large.value.code == "payload_too_large"
        assert victim.usage()["used"] == 0  # refused whole, never charged
        # The meter splits what one request cannot carry.
        metered = BudgetedVictim(victim, budget=2000)
        assert metered.query(torch.rand(700, 1, 8, 8)).shape == (700, 10)
        assert metered.requests == 2 and victim.usage()["used"] == 700


def test_client_budget_exhausted_is_not_retried(victim_server: ServerProcess, client: httpx.Client) -> None:
    key = new_key(client, budget=100)
    slept: list[float] = []
    with HttpVictim(victim_server.url, key, "victim", retry=RetryPolicy(sleep=slept.append)) as victim:
        victim.query(torch.rand(64, 1, 8, 8))
        with pytest.raises(BudgetExhaustedError) as exhausted:
            victim.query(torch.rand(64, 1, 8, 8))
        assert exhausted.value.remaining == 36 and exhausted.value.status == 429
        assert slept == [] and victim.usage()["used"] == 64


def test_client_waits_out_rate_limits(victim_server: ServerProcess, client: httpx.Client) -> None:
    key = new_key(client, budget=1000, rate="2/3seconds")
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    with HttpVictim(victim_server.url, key, "victim", retry=RetryPolicy(sleep=sleep)) as victim:
        for _ in range(4):
            assert victim.query(torch.rand(5, 1, 8, 8)).shape == (5, 10)
        assert victim.retries >= 1
        assert victim.usage()["used"] == 20  # rate-limited requests are not charged
    assert all(1 <= seconds <= 3 for seconds in slept)  # the server's Retry-After, honoured


class _Unavailable(BaseHTTPRequestHandler):
    """Model metadata, then 503 + Retry-After for the first ``failures`` inferences."""

    failures = 2
    posts = 0

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v2":
            self._send(200, {"name": "fake", "version": "0", "extensions": ["binary_tensor_data"]})
            return
        self._send(200, {
            "name": "m", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
            "parameters": {"num_classes": 2, "output_kind": "probabilities", "max_images_per_request": 8},
        })

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        type(self).posts += 1
        if type(self).posts <= type(self).failures:
            self._send(503, {"error": "backend busy", "code": "unavailable"}, {"Retry-After": "0"})
            return
        header = json.loads(body[: int(self.headers["Inference-Header-Content-Length"])])
        count = header["inputs"][0]["shape"][0]
        self._send(200, {"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [count, 2],
                                      "data": [0.25, 0.75] * count}]})


@pytest.fixture
def unavailable_server() -> Iterator[tuple[str, type[_Unavailable]]]:
    handler = type("Handler", (_Unavailable,), {"posts": 0, "failures": 2})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_client_retries_503_honouring_retry_after(unavailable_server: tuple[str, type[_Unavailable]]) -> None:
    url, handler = unavailable_server
    slept: list[float] = []
    with HttpVictim(url, "k", "m", retry=RetryPolicy(sleep=slept.append)) as victim:
        answers = victim.query(torch.rand(3, 1, 8, 8))
    assert answers.tolist() == [[0.25, 0.75]] * 3
    assert slept == [0.0, 0.0] and handler.posts == 3


def test_client_gives_up_after_its_retries(unavailable_server: tuple[str, type[_Unavailable]]) -> None:
    url, handler = unavailable_server
    handler.failures = 100
    slept: list[float] = []
    victim = HttpVictim(url, "k", "m", retry=RetryPolicy(max_retries=3, sleep=slept.append))
    with victim, pytest.raises(VictimAPIError) as unavailable:
        victim.query(torch.rand(3, 1, 8, 8))
    assert unavailable.value.status == 503 and unavailable.value.code == "unavailable"
    assert len(slept) == 3 and handler.posts == 4


def test_client_backoff_without_retry_after() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    assert [policy.delay(i, None) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.delay(0, "7") == 7.0


# -- every attack end to end over HTTP ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_within_its_budget_over_http(
    name: str, victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 1200
    key = new_key(client, budget=budget + EVAL_COST)
    out = tmp_path / name
    result = run_cli(attack_command(name, victim_server, key, out, budget, "--eval-every", "500"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == budget
    assert metrics["eval_queries"] == metrics["planned_eval_queries"] == EVAL_COST
    server_used = usage(victim_server, key)["used"]
    assert server_used == metrics["queries_used"] + metrics["eval_queries"]
    assert metrics["server_count_matches"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["metering"] == metrics["metering"] == "server-reconciled"
    assert config["endpoint"]["wire"] == "binary"  # our server advertises binary_tensor_data
    assert key not in (out / "config.json").read_text()  # no secrets
    for required in ("fidelity", "accuracy", "victim_accuracy", "transfer_success_rate", "wall_seconds"):
        assert required in metrics
    assert (out / "report.md").is_file() and (out / "progress.png").is_file()


def test_label_only_victim_and_separate_evaluation_key(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    key = new_key(client, budget=800, policy=[{"name": "label_only"}])
    eval_key = new_key(client, budget=1000)
    out = tmp_path / "run"
    result = run_cli(attack_command("dual-student", victim_server, key, out, 800, "--eval-api-key", eval_key))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert usage(victim_server, key)["used"] == metrics["queries_used"] == 800
    assert usage(victim_server, eval_key)["used"] == metrics["eval_queries"] == EVAL_COST
    assert json.loads((out / "config.json").read_text())["victim_info"]["output_kind"] == "label"


# -- evaluation accounting: refused before any query, never lost at the end ----------------------


def test_a_key_that_cannot_cover_budget_and_evaluation_is_refused(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 1000
    key = new_key(client, budget=budget + EVAL_COST - 1)  # one image short
    out = tmp_path / "run"
    refused = run_cli(attack_command("random", victim_server, key, out, budget))
    assert refused.returncode == 2, refused.stderr
    message = " ".join(refused.stderr.split())
    assert "error: the attack key has 1,599 images left, but this run needs 1,600" in message
    assert f"up to {EVAL_COST} evaluation queries" in message
    assert "--eval-api-key KEY" in message and "--budget 999 is the largest that fits" in message
    assert usage(victim_server, key)["used"] == 0  # nothing charged
    assert not out.exists()  # nothing written, not even the directory

    # The suggested budget fits exactly: the key ends spent to its last image.
    fits = run_cli(attack_command("random", victim_server, key, out, budget - 1))
    assert fits.returncode == 0, fits.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_queries"] == metrics["planned_eval_queries"] == EVAL_COST
    assert usage(victim_server, key)["remaining"] == 0 and "fidelity" in metrics

    # The other way out: evaluation on a key of its own.
    key = new_key(client, budget=budget)
    eval_key = new_key(client, budget=EVAL_COST)
    separate = run_cli(attack_command("random", victim_server, key, tmp_path / "separate", budget,
                                      "--eval-api-key", eval_key))
    assert separate.returncode == 0, separate.stderr
    assert usage(victim_server, key)["used"] == budget
    assert usage(victim_server, eval_key)["used"] == EVAL_COST


def test_a_budget_beyond_the_keys_remaining_is_refused(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    key = new_key(client, budget=700)
    eval_key = new_key(client, budget=EVAL_COST)
    out = tmp_path / "run"
    out.mkdir()
    refused = run_cli(attack_command("random", victim_server, key, out, 5000, "--eval-api-key", eval_key))
    assert refused.returncode == 2, refused.stderr
    message = " ".join(refused.stderr.split())
    assert "the attack key has 700 images left, fewer than --budget 5000" in message
    assert "--budget 700" in message
    small_eval_key = new_key(client, budget=EVAL_COST - 1)
    refused_eval = run_cli(attack_command("random", victim_server, key, out, 700, "--eval-api-key", small_eval_key))
    assert refused_eval.returncode == 2, refused_eval.stderr
    assert f"the evaluation key has {EVAL_COST - 1} images left" in " ".join(refused_eval.stderr.split())
    for one in (key, eval_key, small_eval_key):
        assert usage(victim_server, one)["used"] == 0
    assert list(out.iterdir()) == []


def drain(server: ServerProcess, key: str) -> None:
    """Someone else spends what is left on ``key`` (racing the run for it)."""
    with HttpVictim(server.url, key, "victim") as other:
        while (left := int(other.usage()["remaining"])) > 0:
            with contextlib.suppress(BudgetExhaustedError):  # the run took some in between: ask again
                other.query(torch.rand(min(left, 512), 1, 8, 8))


@pytest.mark.parametrize("separate_eval_key", [True, False], ids=["eval-key", "attack-key"])
def test_a_key_drained_mid_run_stops_cleanly_and_keeps_what_it_has(
    separate_eval_key: bool, victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 2000
    # Four requests a second keep the run going (32 requests of 64) while the key is drained.
    key = new_key(client, budget=budget if separate_eval_key else budget + EVAL_COST, rate="4/second")
    extra = ["--eval-api-key", new_key(client, budget=EVAL_COST)] if separate_eval_key else []
    out = tmp_path / "run"
    process = subprocess.Popen(attack_command("random", victim_server, key, out, budget, *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((out / "ledger.json").read_text())["attack_queries"] > 0:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the key could be drained"
    drain(victim_server, key)
    _, stderr = process.communicate(timeout=240)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stop_reason"] == "server_budget_exhausted"
    assert metrics["queries_used"] < budget and usage(victim_server, key)["remaining"] == 0
    assert (out / "report.md").is_file()
    if separate_eval_key:
        assert process.returncode == 0, stderr
        assert "fidelity" in metrics and "evaluation_error" not in metrics
        assert metrics["eval_queries"] == metrics["planned_eval_queries"] == EVAL_COST
    else:  # the final evaluation had nothing left to spend: written, reported, exit 1
        assert process.returncode == 1, stderr
        assert "error: final evaluation failed:" in stderr
        assert "fidelity" not in metrics and "does not fit the remaining budget" in metrics["evaluation_error"]
        assert "Evaluation error" in (out / "report.md").read_text()


def test_resume_after_a_kill_over_http(victim_server: ServerProcess, client: httpx.Client, tmp_path: Path) -> None:
    budget = 12_000
    key = new_key(client, budget=budget + EVAL_COST)  # the resumed run plans only what remains
    out = tmp_path / "run"
    command = attack_command("dual-student", victim_server, key, out, budget, "--eval-every", "1000")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger_path = out / "ledger.json"
    deadline = time.monotonic() + 180
    spent = 0
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "checkpoint.pt").is_file() and ledger_path.is_file():
            try:
                spent = json.loads(ledger_path.read_text())["attack_queries"]
            except (json.JSONDecodeError, KeyError):
                spent = 0
            if spent >= 2500:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    ledger_at_kill = json.loads(ledger_path.read_text())
    at_kill = ledger_at_kill["attack_queries"]
    assert 2500 <= at_kill < budget
    server_at_kill = usage(victim_server, key)["used"]
    # A request in flight at the kill may be charged by the server yet unrecorded.
    unrecorded = server_at_kill - at_kill - ledger_at_kill["eval_queries"]
    assert unrecorded >= 0

    result = run_cli(attack_command("dual-student", victim_server, key, out, budget, "--resume"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == budget
    # The resumed run counted on from the kill (plus any request charged but never recorded).
    assert metrics["lost_queries"] == unrecorded
    assert usage(victim_server, key)["used"] == budget + metrics["eval_queries"]
    assert metrics["server_count_matches"] is True
    queries = [json.loads(line)["queries"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert queries == sorted(queries) and queries[-1] == budget
