"""The victim service over real HTTP: a `stealsim serve` subprocess and httpx clients."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from server_support import (
    HEADER_LENGTH,
    ServerProcess,
    admin,
    binary_request,
    decode_binary_response,
    json_request,
    new_key,
)

from stealsim.checkpoint import load_checkpoint
from stealsim.data import load_dataset


@pytest.fixture(scope="module")
def digits_test() -> np.ndarray:
    return load_dataset("digits").x_test.numpy()


def expected_probabilities(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()


def usage(client: httpx.Client, key: str) -> dict[str, object]:
    response = client.get("/v1/usage", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


# --- protocol ---------------------------------------------------------------------


def test_health_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "stealsim"
    key = new_key(client)
    meta = client.get("/v2/models/victim", headers={"X-API-Key": key}).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["pixel_range"] == [0.0, 1.0]
    assert meta["parameters"]["num_classes"] == 10
    assert meta["parameters"]["max_images_per_request"] == 512  # from STEALSIM_* env
    ready = client.get("/v2/models/victim/ready", headers={"Authorization": f"Bearer {key}"})
    assert ready.json() == {"name": "victim", "ready": True}
    labels = new_key(client, policy=[{"name": "label_only"}])
    meta = client.get("/v2/models/victim", headers={"X-API-Key": labels}).json()
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"]["output_kind"] == "label"


def test_json_and_binary_inference_agree_with_the_model(
    client: httpx.Client, digits_checkpoint: Path, digits_test: np.ndarray
) -> None:
    key = new_key(client)
    images = digits_test[:40]
    as_json = client.post("/v2/models/victim/infer", json=json_request(images, id="req-1"),
                          headers={"X-API-Key": key})
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    assert body["id"] == "req-1" and body["model_name"] == "victim"
    output = body["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [40, 10]
    from_json = np.asarray(output["data"], dtype=np.float32).reshape(40, 10)

    content, headers = binary_request(images)
    as_binary = client.post("/v2/models/victim/infer", content=content,
                            headers={"X-API-Key": key, **headers})
    assert as_binary.status_code == 200, as_binary.text
    header, from_binary = decode_binary_response(as_binary)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 40 * 10 * 4

    # Binary input, JSON output.
    content, headers = binary_request(images, binary_output=False)
    mixed = client.post("/v2/models/victim/infer", content=content, headers={"X-API-Key": key, **headers})
    assert HEADER_LENGTH not in mixed.headers
    from_mixed = np.asarray(mixed.json()["outputs"][0]["data"], dtype=np.float32).reshape(40, 10)

    reference = expected_probabilities(digits_checkpoint, images)
    np.testing.assert_allclose(from_json, from_binary, atol=1e-6)
    np.testing.assert_allclose(from_mixed, from_binary, atol=1e-6)
    np.testing.assert_allclose(from_binary, reference, atol=1e-5)
    assert usage(client, key)["used"] == 120
    assert body["parameters"]["images_charged"] == 40


# --- metering -------------------------------------------------------------------------


def test_concurrent_clients_never_exceed_the_budget(client: httpx.Client, victim_server: ServerProcess) -> None:
    budget = 100
    key = new_key(client, budget=budget, rate="100000/second", image_rate="1000000/second")
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=96)  # 96 requests from 48 concurrent clients, ~4.5 images each

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=victim_server.url, timeout=60.0, limits=limits) as http:
            async def one_client(worker: int) -> list[httpx.Response]:
                answers = []
                for size in sizes[worker::48]:
                    images = rng.random((int(size), 1, 8, 8), dtype=np.float32)
                    content, headers = binary_request(images)
                    answers.append(await http.post("/v2/models/victim/infer", content=content,
                                                   headers={"X-API-Key": key, **headers}))
                return answers
            per_client = await asyncio.gather(*(one_client(w) for w in range(48)))
        return [answer for answers in per_client for answer in answers]

    responses = asyncio.run(run())
    served = 0
    for response in responses:
        if response.status_code == 200:
            header, values = decode_binary_response(response)
            served += len(values)
            assert header["parameters"]["images_charged"] == len(values)
        else:
            assert response.status_code == 429, response.text
            error = response.json()
            assert error["code"] == "budget_exhausted"
            assert isinstance(error["remaining"], int) and error["remaining"] >= 0
    assert 0 < served <= budget
    assert sum(sizes) > budget  # the test only means something if the budget runs out
    state = usage(client, key)
    assert state["used"] == served and state["remaining"] == budget - served


def test_a_request_that_does_not_fit_is_refused_whole(client: httpx.Client) -> None:
    key = new_key(client, budget=10)
    images = np.full((8, 1, 8, 8), 0.5, dtype=np.float32)
    assert client.post("/v2/models/victim/infer", json=json_request(images), headers={"X-API-Key": key}).status_code == 200
    refused = client.post("/v2/models/victim/infer", json=json_request(images), headers={"X-API-Key": key})
    assert refused.status_code == 429
    assert refused.json()["code"] == "budget_exhausted" and refused.json()["remaining"] == 2
    assert usage(client, key)["used"] == 8
    fits = client.post("/v2/models/victim/infer", json=json_request(images[:2]), headers={"X-API-Key": key})
    assert fits.status_code == 200 and fits.json()["parameters"]["remaining"] == 0


def test_rate_limit_answers_429_with_retry_after(client: httpx.Client) -> None:
    key = new_key(client, budget=100, rate="3/minute")
    images = np.zeros((1, 1, 8, 8), dtype=np.float32)
    statuses = [client.post("/v2/models/victim/infer", json=json_request(images),
                            headers={"X-API-Key": key}) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    limited = statuses[-1]
    assert limited.json()["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Limit"] == "3"
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["X-RateLimit-Reset"]) > 0
    assert usage(client, key)["used"] == 3  # the refused request was not charged

    images_key = new_key(client, budget=100, image_rate="10/minute")
    ok = client.post("/v2/models/victim/infer", json=json_request(np.zeros((8, 1, 8, 8), np.float32)),
                     headers={"X-API-Key": images_key})
    too_many = client.post("/v2/models/victim/infer", json=json_request(np.zeros((3, 1, 8, 8), np.float32)),
                           headers={"X-API-Key": images_key})
    assert ok.status_code == 200 and too_many.status_code == 429
    assert too_many.headers["X-RateLimit-Limit"] == "10"
    limits = usage(client, images_key)["rate_limits"]
    assert any(limit["kind"] == "images" and limit["remaining"] == 2 for limit in limits)  # type: ignore[union-attr, index]


def test_keys_admin_revoke_and_top_up(client: httpx.Client) -> None:
    assert client.post("/v2/models/victim/infer", json=json_request(np.zeros((1, 1, 8, 8), np.float32))).status_code == 401
    bad = client.post("/v2/models/victim/infer", json=json_request(np.zeros((1, 1, 8, 8), np.float32)),
                      headers={"X-API-Key": "sk-nope"})
    assert bad.status_code == 401 and bad.json()["code"] == "unauthorized"
    key = new_key(client, budget=1, name="alice", models=["victim"])
    assert client.post("/v1/admin/keys", json={"budget": 1}, headers={"X-API-Key": key}).status_code == 403
    assert client.get("/v1/admin/keys").status_code == 401
    listing = client.get("/v1/admin/keys", headers=admin()).json()["keys"]
    entry = next(k for k in listing if k["name"] == "alice")
    assert "api_key" not in entry and entry["budget"] == 1
    image = json_request(np.zeros((1, 1, 8, 8), np.float32))
    forbidden = client.post("/v2/models/guarded/infer", json=image, headers={"X-API-Key": key})
    assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"
    assert client.post("/v2/models/victim/infer", json=image, headers={"X-API-Key": key}).status_code == 200
    assert client.post("/v2/models/victim/infer", json=image, headers={"X-API-Key": key}).status_code == 429
    topped = client.post(f"/v1/admin/keys/{entry['key_id']}/topup", json={"images": 5}, headers=admin())
    assert topped.status_code == 200 and topped.json()["remaining"] == 5
    assert client.post("/v2/models/victim/infer", json=image, headers={"X-API-Key": key}).status_code == 200
    assert client.delete(f"/v1/admin/keys/{entry['key_id']}", headers=admin()).status_code == 200
    revoked = client.post("/v2/models/victim/infer", json=image, headers={"X-API-Key": key})
    assert revoked.status_code == 401
    assert client.get("/v1/usage", headers={"X-API-Key": key}).status_code == 401
    assert client.delete("/v1/admin/keys/key_missing", headers=admin()).status_code == 404
    invalid = client.post("/v1/admin/keys", json={"budget": 5, "rate": "lots"}, headers=admin())
    assert invalid.status_code == 400 and "lots" in invalid.json()["error"]
    invalid = client.post("/v1/admin/keys", json={"budget": 5, "policy": [{"name": "blur"}]}, headers=admin())
    assert invalid.status_code == 400


# --- bad input ----------------------------------------------------------------------------


def bad_requests() -> list[tuple[str, dict[str, object] | bytes, dict[str, str], int, str]]:
    good = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    raw = good.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    short = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                    "parameters": {"binary_data_size": len(raw)}}]}).encode()
    binary = {"Content-Type": "application/octet-stream"}
    return [
        ("malformed json", b"{not json", {"Content-Type": "application/json"}, 400, "malformed JSON"),
        ("no inputs", {"id": "x"}, {}, 400, "inputs"),
        ("wrong datatype", {"inputs": [{**json_request(good)["inputs"][0], "datatype": "FP64"}]}, {}, 400, "FP64"),
        ("wrong input name", {"inputs": [{**json_request(good)["inputs"][0], "name": "pixels"}]}, {}, 400, "pixels"),
        ("wrong shape", json_request(good.reshape(2, 1, 4, 16)), {}, 400, "shape"),
        ("three dims", json_request(good.reshape(2, 8, 8)), {}, 400, "shape"),
        ("data length", {"inputs": [{**json_request(good)["inputs"][0], "data": [0.5] * 100}]}, {}, 400, "100 values"),
        ("strings in data", {"inputs": [{**json_request(good)["inputs"][0], "data": ["a"] * 128}]}, {}, 400, "data"),
        ("nan", json.dumps(json_request(nan)).encode(), {"Content-Type": "application/json"}, 400, "NaN"),
        ("above one", json_request(good * 3), {}, 400, "[0, 1]"),
        ("below zero", json_request(good - 1), {}, 400, "[0, 1]"),
        ("header beyond body", header + raw, {**binary, HEADER_LENGTH: str(len(header) + len(raw) + 10)}, 400, "body has only"),
        ("binary size beyond body", short + raw[:100], {**binary, HEADER_LENGTH: str(len(short))}, 400, "binary_data_size"),
        ("header length not a number", header + raw, {**binary, HEADER_LENGTH: "abc"}, 400, "integer"),
        ("binary inf", header + np.full(128, np.inf, "<f4").tobytes(), {**binary, HEADER_LENGTH: str(len(header))}, 400, "infinite"),
        ("too many images", json_request(np.zeros((513, 1, 8, 8), np.float32)), {}, 413, "at most 512"),
        ("body over the limit", b"0" * ((1 << 20) + 1), {"Content-Type": "application/json"}, 413, "limit"),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_input_is_refused_and_not_charged(
    client: httpx.Client, case: tuple[str, dict[str, object] | bytes, dict[str, str], int, str]
) -> None:
    _, body, headers, status, fragment = case
    key = new_key(client, budget=1000)
    all_headers = {"X-API-Key": key, **headers}
    if isinstance(body, bytes):
        response = client.post("/v2/models/victim/infer", content=body, headers=all_headers)
    else:
        response = client.post("/v2/models/victim/infer", json=body, headers=all_headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert fragment in error["error"]
    assert error["code"] == {400: "invalid_request", 413: "payload_too_large"}[status]
    assert usage(client, key)["used"] == 0


def test_unknown_model_and_route(client: httpx.Client) -> None:
    key = new_key(client)
    response = client.post("/v2/models/nope/infer", json=json_request(np.zeros((1, 1, 8, 8), np.float32)),
                           headers={"X-API-Key": key})
    assert response.status_code == 404 and response.json()["code"] == "model_not_found"
    assert client.get("/v2/models/nope", headers={"X-API-Key": key}).status_code == 404
    assert client.get("/v3/anything").json()["code"] == "not_found"


# --- policies ---------------------------------------------------------------------------


def infer_json(client: httpx.Client, key: str, images: np.ndarray, model: str = "victim") -> dict[str, object]:
    response = client.post(f"/v2/models/{model}/infer", json=json_request(images), headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return dict(response.json()["outputs"][0])


def test_each_output_policy_over_http(
    client: httpx.Client, digits_checkpoint: Path, digits_test: np.ndarray
) -> None:
    images = digits_test[:16]
    reference = expected_probabilities(digits_checkpoint, images)
    top = reference.argmax(axis=1)

    label = infer_json(client, new_key(client, policy=[{"name": "label_only"}]), images)
    assert label["name"] == "label" and label["datatype"] == "INT64" and label["shape"] == [16]
    np.testing.assert_array_equal(label["data"], top)
    content, headers = binary_request(images, output="label")
    key = new_key(client, policy=[{"name": "label_only"}])
    _, labels = decode_binary_response(client.post("/v2/models/victim/infer", content=content,
                                                   headers={"X-API-Key": key, **headers}))
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, top)

    def probabilities(policy: list[dict[str, object]], model: str = "victim") -> np.ndarray:
        output = infer_json(client, new_key(client, policy=policy), images, model)
        return np.asarray(output["data"], dtype=np.float64).reshape(16, 10)

    full = probabilities([{"name": "probabilities"}])
    np.testing.assert_allclose(full, reference, atol=1e-5)
    top3 = probabilities([{"name": "top_k", "k": 3}])
    assert ((top3 > 0).sum(axis=1) <= 3).all()
    np.testing.assert_allclose(top3.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(top3.argmax(axis=1), top)
    rounded = probabilities([{"name": "round", "decimals": 1}])
    np.testing.assert_allclose(rounded, np.round(reference, 1), atol=1e-6)
    noisy = probabilities([{"name": "gaussian_noise", "std": 0.05}])
    assert not np.allclose(noisy, reference, atol=1e-3)
    np.testing.assert_allclose(noisy.sum(axis=1), 1.0, atol=1e-5)
    assert (noisy >= 0).all()
    reverse = probabilities([{"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.4}])
    assert not np.allclose(reverse, reference, atol=1e-3)
    np.testing.assert_allclose(reverse.sum(axis=1), 1.0, atol=1e-5)
    composed = probabilities([{"name": "top_k", "k": 2}, {"name": "round", "decimals": 2}])
    assert ((composed > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(composed, np.round(composed, 2), atol=1e-6)

    # The model-level policy of `guarded` (top-2), and a key's override of it.
    guarded = infer_json(client, new_key(client), images, "guarded")
    assert (np.count_nonzero(np.asarray(guarded["data"]).reshape(16, 10), axis=1) <= 2).all()
    override = infer_json(client, new_key(client, policy=[{"name": "label_only"}]), images, "guarded")
    assert override["name"] == "label"


# --- PRADA ----------------------------------------------------------------------------------


def synthetic_attack(seeds: np.ndarray, rounds: int, step: float = 0.1) -> list[np.ndarray]:
    """Papernot-style synthetic augmentation: each round perturbs every earlier query by ±step."""
    rng = np.random.default_rng(1)
    batches, pool = [seeds], seeds
    for _ in range(rounds):
        new = np.clip(pool + step * np.sign(rng.normal(size=pool.shape)), 0, 1).astype(np.float32)
        batches.append(new)
        pool = np.concatenate([pool, new])
    return batches


def test_prada_flags_a_synthetic_attack_not_natural_images(client: httpx.Client, digits_test: np.ndarray) -> None:
    policy = [{"name": "prada", "delta": 0.95, "min_queries": 100}]
    natural = new_key(client, budget=5000, policy=policy)
    for start in range(0, len(digits_test), 24):
        infer_json(client, natural, digits_test[start : start + 24])
    assert usage(client, natural)["flags"] == []

    attacker = new_key(client, budget=5000, policy=policy)
    for batch in synthetic_attack(digits_test[:10], rounds=5):
        infer_json(client, attacker, batch)
    state = usage(client, attacker)
    assert state["flags"] == ["prada"] and state["blocked"] is False
    audit = [json.loads(line) for line in client.get("/v1/admin/audit", headers=admin()).text.splitlines()]
    mine = [entry for entry in audit if entry["key_id"] == state["key_id"]]
    assert mine[-1]["flags"] == ["prada"] and mine[0]["flags"] == []

    blocking = new_key(client, budget=5000, policy=[{**policy[0], "block": True}])
    statuses = []
    for batch in synthetic_attack(digits_test[:10], rounds=5):
        response = client.post("/v2/models/victim/infer", json=json_request(batch), headers={"X-API-Key": blocking})
        statuses.append(response.status_code)
    assert statuses[-1] == 403 and 200 in statuses
    assert usage(client, blocking)["blocked"] is True


# --- audit and metrics --------------------------------------------------------------------


def test_audit_and_metrics_record_served_requests(client: httpx.Client, victim_server: ServerProcess) -> None:
    key = new_key(client, name="audited")
    images = np.full((3, 1, 8, 8), 0.25, dtype=np.float32)
    infer_json(client, key, images)
    key_id = usage(client, key)["key_id"]
    assert client.get("/v1/admin/audit", headers={"X-API-Key": key}).status_code == 403
    lines = client.get("/v1/admin/audit", headers=admin()).text.splitlines()
    entries = [json.loads(line) for line in lines if key_id in line]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["model"] == "victim" and entry["images"] == 3 and entry["policy"] == []
    assert len(entry["input_sha256"]) == 64 and entry["time"] > 0
    audit_file = Path(victim_server.log_path).parent / "audit.jsonl"
    assert key_id in audit_file.read_text()

    bad = client.post("/v2/models/victim/infer", json={"inputs": []}, headers={"X-API-Key": key})
    assert bad.status_code == 400
    metrics = client.get("/metrics").text
    assert 'stealsim_requests_total{model="victim",status="200"}' in metrics
    assert 'stealsim_images_served_total{model="victim"}' in metrics
    assert "stealsim_batch_images_bucket" in metrics and "stealsim_request_seconds_bucket" in metrics
    assert 'stealsim_queue_images{model="victim"}' in metrics
    assert 'stealsim_errors_total{code="invalid_request",status="400"}' in metrics


# --- configuration file and graceful shutdown ----------------------------------------------


def test_yaml_config_json_logs_and_graceful_shutdown_drains_queued_batches(
    digits_checkpoint: Path, tmp_path: Path
) -> None:
    """Requests waiting in the batcher when SIGTERM arrives are still answered."""
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"models:\n  victim: {{path: {digits_checkpoint}}}\n"
        "max_batch_size: 256\nmax_wait_ms: 4000\n"
        "api_keys:\n  - {api_key: sk-from-yaml, budget: 100, name: preset}\n"
    )
    server = ServerProcess({}, args=["--config", str(config), "--log-json"], log_path=tmp_path / "server.log")
    try:
        headers = {"X-API-Key": "sk-from-yaml"}
        responses: list[httpx.Response] = []

        def send(count: int) -> None:
            images = np.full((count, 1, 8, 8), 0.5, dtype=np.float32)
            responses.append(httpx.post(f"{server.url}/v2/models/victim/infer", json=json_request(images),
                                        headers=headers, timeout=60.0))

        threads = [threading.Thread(target=send, args=(count,)) for count in (1, 2, 3, 4)]
        for thread in threads:
            thread.start()
        # Wait until all 10 images sit in the batcher's queue (the batch closes after 4 s).
        for _ in range(300):
            metrics = httpx.get(f"{server.url}/metrics").text
            if 'stealsim_queue_images{model="victim"} 10.0' in metrics:
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("requests never reached the batcher queue")
        code = server.stop()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert code in (0, -signal.SIGTERM), server.log()
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200]
    assert sorted(r.json()["parameters"]["images_charged"] for r in responses) == [1, 2, 3, 4]
    logs = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # --log-json
    assert any("draining" in entry["message"] for entry in logs)
    assert {"time", "level", "logger", "message"} <= set(logs[0])


# --- an off-the-shelf OIP client ---------------------------------------------------------------


def test_triton_http_client_works_unmodified(client: httpx.Client, victim_server: ServerProcess,
                                             digits_checkpoint: Path, digits_test: np.ndarray) -> None:
    triton = pytest.importorskip("tritonclient.http")
    key = new_key(client)
    triton_client = triton.InferenceServerClient(victim_server.url.removeprefix("http://"))
    try:
        assert triton_client.is_server_live() and triton_client.is_server_ready()
        # tritonclient adds its own headers to the dict it is given: a fresh dict per call.
        assert triton_client.is_model_ready("victim", headers={"X-API-Key": key})
        meta = triton_client.get_model_metadata("victim", headers={"X-API-Key": key})
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        images = digits_test[:5]
        reference = expected_probabilities(digits_checkpoint, images)
        for binary in (True, False):
            tensor = triton.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images, binary_data=binary)
            wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
            result = triton_client.infer("victim", [tensor], outputs=[wanted], headers={"X-API-Key": key})
            np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-5)
    finally:
        triton_client.close()
    assert usage(client, key)["used"] == 10
