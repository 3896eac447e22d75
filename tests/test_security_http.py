"""The victim API against what an anonymous client, a key holder or a careless admin can send.

Each test replays one way of abusing a real ``stealsim serve`` (over real sockets,
with raw HTTP where httpx would refuse to send it) and checks the answer the service
must give: a bounded 4xx, never a hang, a crash, an unbounded metric or a lost refund.
Tests that concern the state backend run on the in-memory store and on Redis.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis_support import WorkerProcess, delete_prefix, redis_url  # noqa: F401
from server_support import ADMIN_KEY, ServerProcess, admin, json_request, new_key

MODEL = "victim"
READ_TIMEOUT_S = 1.0
BATCH_WAIT_MS = 1000  # an inference waits this long in the batcher: time to disconnect while charged
FAILURES_ALLOWED = 5  # wrong keys per address and window
FAILURE_WINDOW_S = 2

_ENV = {
    "STEALSIM_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
    "STEALSIM_AUTH_FAILURE_RATE": f"{FAILURES_ALLOWED}/{FAILURE_WINDOW_S} seconds",
    "STEALSIM_MAX_JSON_BODY_BYTES": str(64 * 1024),
}


def _start(checkpoint: Path, log: Path, args: Sequence[str] = ()) -> ServerProcess:
    return ServerProcess({MODEL: checkpoint, "other": checkpoint}, log_path=log,
                         args=["--max-wait-ms", str(BATCH_WAIT_MS), *args], env=_ENV)


@pytest.fixture(scope="module")
def memory_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = _start(digits_checkpoint, tmp_path_factory.mktemp("security") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(digits_checkpoint: Path, redis_url: str,  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    prefix = "stealsim-test-" + uuid.uuid4().hex[:10]
    server = _start(digits_checkpoint, tmp_path_factory.mktemp("security-redis") / "server.log",
                    ["--redis-url", redis_url, "--redis-prefix", prefix])
    yield server
    server.stop()
    delete_prefix(redis_url, prefix)


@pytest.fixture(scope="module")
def redis_batching_server(digits_checkpoint: Path, redis_url: str,  # noqa: F811
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Redis state and Redis batching, with one worker that waits BATCH_WAIT_MS to fill a batch."""
    prefix = "stealsim-test-" + uuid.uuid4().hex[:10]
    logs = tmp_path_factory.mktemp("security-redis-batching")
    worker = WorkerProcess(redis_url, prefix, {MODEL: digits_checkpoint, "other": digits_checkpoint},
                           args=["--max-wait-ms", str(BATCH_WAIT_MS)], log_path=logs / "worker.log")
    try:
        worker.wait_seen(redis_url, prefix, MODEL)
        server = _start(digits_checkpoint, logs / "server.log",
                        ["--redis-url", redis_url, "--redis-prefix", prefix, "--batching", "redis"])
        yield server
        server.stop()
    finally:
        worker.stop()
        delete_prefix(redis_url, prefix)


@pytest.fixture(params=["memory", "redis"])
def any_server(request: pytest.FixtureRequest) -> ServerProcess:
    """The service on each state backend: in memory, and in Redis."""
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture(params=["memory", "redis", "redis_batching"])
def any_backend(request: pytest.FixtureRequest) -> ServerProcess:
    """The service on each backend: in memory, Redis state, Redis state and batching."""
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def http(memory_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=memory_server.url, timeout=15.0) as client:
        yield client


def raw_exchange(url: str, head: bytes, body: bytes = b"", *, chunk: int = 64 * 1024,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, int]:
    """Send ``head`` and then ``body`` (stopping where the server closes); read the answer.

    Returns the status, the headers, the body of the answer and how many bytes were sent.
    """
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            for data in (head, body):
                for start in range(0, len(data), chunk):
                    sock.sendall(data[start:start + chunk])
                    sent += len(data[start:start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer) < _expected_length(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    head_part, _, content = answer.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"no HTTP answer: {answer[:200]!r}"
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, content, sent


def _expected_length(answer: bytes) -> int:
    head, _, _ = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 0


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def metric(client: httpx.Client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def used(client: httpx.Client, key: str) -> int:
    response = client.get("/v1/usage", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return int(response.json()["used"])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).random((count, 1, 8, 8), dtype=np.float32)


# --- limits on what a client sends ---------------------------------------------------------------


def test_oversized_headers_are_refused_before_they_are_buffered(memory_server: ServerProcess) -> None:
    # A 50 MiB header would be accepted whole; the server must stop at its limit (64 KiB).
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: "
    status, headers, content, sent = raw_exchange(memory_server.url, head, b"a" * (4 << 20) + b"\r\n\r\n")
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(content)["code"] == "headers_too_large"
    assert sent < 4 << 20  # the server closed before taking it all
    assert httpx.get(memory_server.url + "/v2/health/ready").status_code == 200


def test_admin_bodies_are_refused_before_they_are_read(memory_server: ServerProcess) -> None:
    # 100 MB announced, 1 KiB sent: the answer must come without the rest of the body.
    for key, status in ((None, 401), ("not-the-admin-key", 403), (ADMIN_KEY, 413)):
        headers = {"Content-Type": "application/json", "Content-Length": str(100_000_000)}
        if key is not None:
            headers["X-API-Key"] = key
        got, answer_headers, content, _ = raw_exchange(
            memory_server.url, request_head("POST", "/v1/admin/keys", headers), b" " * 1024, timeout=5)
        assert got == status, content
        assert answer_headers["connection"] == "close"


def test_a_65_mib_key_name_is_refused_at_once_and_the_service_stays_ready(memory_server: ServerProcess) -> None:
    body = b'{"budget": 1, "name": "' + b"n" * (65 << 20) + b'"}'
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-API-Key": ADMIN_KEY}
    status, _, content, _ = raw_exchange(memory_server.url, request_head("POST", "/v1/admin/keys", headers),
                                         body, timeout=10)
    assert status == 413 and json.loads(content)["code"] == "payload_too_large"
    assert httpx.get(memory_server.url + "/v2/health/ready", timeout=2).status_code == 200


def test_a_stalled_body_gets_408_within_the_read_timeout(http: httpx.Client, memory_server: ServerProcess) -> None:
    key = new_key(http)
    cases = [("POST", f"/v2/models/{MODEL}/infer", key), ("POST", "/v1/admin/keys", ADMIN_KEY)]
    for method, path, secret in cases:
        headers = {"Content-Type": "application/json", "Content-Length": "1000", "X-API-Key": secret}
        # the client waits a bounded time: a server that held the body would leave it unanswered
        status, answer_headers, content, _ = raw_exchange(
            memory_server.url, request_head(method, path, headers), b'{"in', timeout=READ_TIMEOUT_S + 9)
        assert status == 408 and json.loads(content)["code"] == "request_timeout", content
        assert answer_headers["connection"] == "close"
    # An anonymous partial body is refused at once, before any of it is awaited.
    headers = {"Content-Type": "application/json", "Content-Length": "1000"}
    assert raw_exchange(memory_server.url, request_head("POST", "/v1/admin/keys", headers), b"{")[0] == 401
    assert raw_exchange(memory_server.url, request_head("POST", f"/v2/models/{MODEL}/infer", headers), b"{")[0] == 401


@pytest.mark.parametrize(("name", "body", "expected"), [
    ("nested 5,000 deep", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed JSON"),
    ("an integer of 400 digits", json.dumps(json_request(np.zeros((1, 1, 8, 8), np.float32))).replace(
        "0.0", "1" * 400, 1).encode(), "list of numbers"),
    ("binary_data_output as a string", json.dumps(json_request(
        np.zeros((1, 1, 8, 8), np.float32), parameters={"binary_data_output": "false"})).encode(), "true or false"),
    ("binary_data as a number", json.dumps(json_request(
        np.zeros((1, 1, 8, 8), np.float32), outputs=[{"name": "probabilities", "parameters": {"binary_data": 1}}]
    )).encode(), "true or false"),
])
def test_malformed_inference_bodies_get_400_and_are_not_charged(
    http: httpx.Client, name: str, body: bytes, expected: str,
) -> None:
    key = new_key(http)
    response = http.post(f"/v2/models/{MODEL}/infer", content=body,
                         headers={"X-API-Key": key, "Content-Type": "application/json"})
    assert response.status_code == 400, (name, response.text)
    assert response.json()["code"] == "invalid_request" and expected in response.json()["error"]
    assert used(http, key) == 0


# --- metrics and logs ---------------------------------------------------------------------------


async def _anonymous_flood(url: str, count: int) -> set[int]:
    rng = random.Random(0)
    names = [f"m{rng.getrandbits(64):016x}" for _ in range(count)]
    statuses: set[int] = set()
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        async def worker(part: list[str]) -> None:
            for name in part:
                statuses.add((await client.post(f"/v2/models/{name}/infer", content=b"{}")).status_code)
        await asyncio.gather(*(worker(names[i::16]) for i in range(16)))
    return statuses


def test_anonymous_requests_with_random_model_names_do_not_grow_metrics(
    http: httpx.Client, memory_server: ServerProcess,
) -> None:
    http.post("/v2/models/warm-up/infer", content=b"{}")  # every series of an anonymous 401 exists now
    before = len(http.get("/metrics").content)
    assert asyncio.run(_anonymous_flood(memory_server.url, 3000)) == {401}
    growth = len(http.get("/metrics").content) - before
    assert growth < 1024, f"/metrics grew by {growth} bytes"
    assert 'stealsim_requests_total{model="unknown",status="401"}' in http.get("/metrics").text


def test_user_strings_in_logs_cannot_forge_lines(http: httpx.Client, memory_server: ServerProcess) -> None:
    forged = "FORGED-LINE-" + uuid.uuid4().hex[:8]
    response = http.post("/v1/admin/keys", json={"budget": 1, "name": f"x\n{forged} ERROR root: pwned"},
                         headers=admin())
    assert response.status_code in (201, 400)  # a name with a newline may be refused outright
    path = f"/v2/models/a%0A{forged}/infer"
    assert http.post(path, content=b"{}", headers={"X-API-Key": new_key(http)}).status_code == 404
    time.sleep(0.2)
    # (the CLI's log handler indents a message's later lines: a forged line would start after spaces)
    assert not [line for line in memory_server.log().splitlines() if line.strip().startswith(forged)]
    if response.status_code == 201:
        assert f"\\n{forged}" in memory_server.log()  # logged, escaped


# --- disconnects and refunds ---------------------------------------------------------------------


def test_a_client_gone_mid_body_counts_as_499_without_a_traceback(
    http: httpx.Client, memory_server: ServerProcess,
) -> None:
    key = new_key(http)
    gone = 'stealsim_errors_total{code="client_disconnected",status="499"}'
    before = metric(http, gone)
    host, port = memory_server.url.removeprefix("http://").split(":")
    headers = {"Content-Type": "application/json", "Content-Length": "50000", "X-API-Key": key}
    admin_headers = {**headers, "X-API-Key": ADMIN_KEY}
    for path, sent in ((f"/v2/models/{MODEL}/infer", headers), ("/v1/admin/keys", admin_headers)):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request_head("POST", path, sent) + b'{"inputs": [')
            time.sleep(0.2)
    assert wait_for(lambda: metric(http, gone) == before + 2), http.get("/metrics").text
    assert metric(http, 'stealsim_errors_total{code="internal",status="500"}') == 0
    assert "Traceback" not in memory_server.log()
    assert used(http, key) == 0


def test_a_caller_that_resets_after_being_charged_is_refunded(any_backend: ServerProcess) -> None:
    any_server = any_backend
    with httpx.Client(base_url=any_server.url, timeout=15.0) as client:
        key = new_key(client)
        images_served = metric(client, f'stealsim_images_served_total{{model="{MODEL}"}}')
        content = json.dumps(json_request(images(8))).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(content)), "X-API-Key": key}
        host, port = any_server.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        try:
            sock.sendall(request_head("POST", f"/v2/models/{MODEL}/infer", headers) + content)
            # Charged, and waiting in the batcher (BATCH_WAIT_MS) when the caller resets.
            assert wait_for(lambda: used(client, key) == 8, timeout=BATCH_WAIT_MS / 1000 * 0.8)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.close()
        assert wait_for(lambda: used(client, key) == 0), f"still charged: {used(client, key)}"
        # A caller that stays gets its answer and is charged as before.
        served = client.post(f"/v2/models/{MODEL}/infer", json=json_request(images(3)), headers={"X-API-Key": key})
        assert served.status_code == 200 and used(client, key) == 3
        assert metric(client, f'stealsim_images_served_total{{model="{MODEL}"}}') == images_served + 3


# --- paths, authentication, documentation, enumeration ------------------------------------------


def test_the_model_name_is_decoded_once(http: httpx.Client) -> None:
    key = new_key(http)
    body = json_request(images(1))
    response = http.post("/v2/models/%2576ictim/infer", json=body, headers={"X-API-Key": key})
    assert response.status_code == 404 and "%76ictim" in response.json()["error"]
    assert http.get("/v2/models/%2576ictim", headers={"X-API-Key": key}).status_code == 404
    assert used(http, key) == 0


def test_wrong_keys_are_throttled_per_address(any_server: ServerProcess) -> None:
    with httpx.Client(base_url=any_server.url, timeout=15.0) as client:
        key = new_key(client)
        statuses = [client.get("/v1/admin/keys", headers={"X-API-Key": f"guess-{i}"}).status_code
                    for i in range(FAILURES_ALLOWED + 3)]
        # (a wrong key of an earlier test may share the window: count from the first 403)
        assert statuses[0] == 403 and statuses[-1] == 429 and statuses == sorted(statuses)
        refused = client.get("/v1/usage", headers={"X-API-Key": key})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert client.get("/v1/admin/keys", headers=admin()).status_code == 429  # even the right one
        assert client.get("/v2/health/ready").status_code == 200  # no key, nothing to throttle
        # The block ends with its window.
        assert wait_for(lambda: client.get("/v1/usage", headers={"X-API-Key": key}).status_code == 200,
                        timeout=FAILURE_WINDOW_S + 5)
        statuses = [client.post(f"/v2/models/{MODEL}/infer", content=b"{}", headers={"X-API-Key": f"sk-{i}"}).status_code
                    for i in range(FAILURES_ALLOWED + 1)]
        assert statuses[0] == 401 and statuses[-1] == 429 and statuses == sorted(statuses)
        assert wait_for(lambda: client.get("/v1/usage", headers={"X-API-Key": key}).status_code == 200,
                        timeout=FAILURE_WINDOW_S + 5)


def test_api_documentation_is_off_by_default(http: httpx.Client) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path).status_code == 404, path


def test_a_404_does_not_list_models_the_key_may_not_use(http: httpx.Client) -> None:
    key = new_key(http, models=[MODEL])
    response = http.post("/v2/models/nope/infer", json=json_request(images(1)), headers={"X-API-Key": key})
    assert response.status_code == 404
    assert "other" not in response.json()["error"] and MODEL in response.json()["error"]
    unrestricted = new_key(http)
    response = http.get("/v2/models/nope", headers={"X-API-Key": unrestricted})
    assert response.status_code == 404 and "other" in response.json()["error"]
