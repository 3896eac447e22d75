"""The new API defenses through a real ``stealsim serve``: the watermark record and its
verification against a real Knockoff clone, bad defender settings, and SEAT's state in Redis
across an API restart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis_support import prefix, redis_url  # noqa: F401
from server_support import ServerProcess, admin, binary_request, decode_binary_response, new_key
from test_attack_http import attack_command, run_cli

from stealsim.checkpoint import save_checkpoint
from stealsim.data import load_dataset
from stealsim.training import TrainConfig, train_classifier

SECRET = "test-watermark-secret"


@pytest.fixture(scope="module")
def watermark_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    logs = tmp_path_factory.mktemp("watermark-server")
    server = ServerProcess({"victim": digits_checkpoint}, args=["--watermark-secret", SECRET],
                           log_path=logs / "server.log")
    yield server
    server.stop()


def _infer(server: ServerProcess, key: str, images: np.ndarray) -> httpx.Response:
    content, headers = binary_request(images)
    return httpx.post(f"{server.url}/v2/models/victim/infer", content=content,
                      headers={"X-API-Key": key, **headers}, timeout=60)


def test_bad_defender_settings_are_refused_with_a_named_reason(
    watermark_server: ServerProcess, digits_checkpoint: Path, tmp_path: Path,
) -> None:
    with httpx.Client(base_url=watermark_server.url, timeout=30) as client:
        missing = client.post("/v1/admin/keys", headers=admin(), json={"budget": 10, "policy": [
            {"name": "adaptive_misinformation", "model": str(tmp_path / "nowhere")}]})
        assert missing.status_code == 400 and "defender checkpoint" in missing.json()["error"]
        bad = client.post("/v1/admin/keys", headers=admin(), json={"budget": 10, "policy": [
            {"name": "prediction_poisoning", "epsilon": 3.0, "objective": "gradient_distance"}]})
        assert bad.status_code == 400 and "epsilon" in bad.json()["error"]
        unknown = client.get("/v1/admin/keys/key_nobody/watermark", params={"model": "victim"}, headers=admin())
        assert unknown.status_code == 404 and unknown.json()["error"]


def test_a_server_without_a_watermark_secret_refuses_watermark_keys(client: httpx.Client) -> None:
    response = client.post("/v1/admin/keys", headers=admin(), json={"budget": 10, "policy": [{"name": "watermark"}]})
    assert response.status_code == 400 and "watermark_secret" in response.json()["error"]


def test_verify_watermark_tells_a_knockoff_clone_from_independent_models(
    watermark_server: ServerProcess, digits_checkpoint: Path, tmp_path: Path,
) -> None:
    policy = [{"name": "watermark", "fraction": 0.3, "mode": "one_hot"}]
    with httpx.Client(base_url=watermark_server.url) as client:
        key = new_key(client, budget=3000, policy=policy)
    # The record holds exactly the rows answered with a watermark label, and asking again changes nothing.
    images = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    first, second = _infer(watermark_server, key, images), _infer(watermark_server, key, images)
    assert first.status_code == second.status_code == 200
    answers = decode_binary_response(first)[1]
    assert np.array_equal(answers, decode_binary_response(second)[1])
    record = httpx.get(f"{watermark_server.url}/v1/admin/keys/{_key_id(watermark_server, key)}/watermark",
                       params={"model": "victim"}, headers=admin(), timeout=30)
    assert record.status_code == 200
    from defense.watermark import WatermarkRecord

    marked = WatermarkRecord.from_bytes(record.content)
    assert len(marked) == 2 * len(marked.distinct()) > 0  # both requests recorded, the same inputs
    one_hot_rows = np.flatnonzero(answers.max(axis=1) == 1.0)
    assert np.array_equal(np.sort(answers[one_hot_rows].argmax(axis=1)), np.sort(marked.distinct().labels))

    out = tmp_path / "clone"
    result = run_cli(attack_command("knockoff", watermark_server, key, out, 2000, "--set", "updates_per_batch=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "clone.ts").is_file()

    data = load_dataset("digits")
    innocent, meta = train_classifier(data, "small-cnn", TrainConfig(epochs=2, seed=7), "cpu", show_progress=False)
    save_checkpoint(tmp_path / "innocent", innocent, meta)
    command = [sys.executable, "-m", "stealsim", "verify-watermark", str(out), str(digits_checkpoint),
               str(tmp_path / "innocent"), "--url", watermark_server.url, "--admin-key", admin()["X-API-Key"],
               "--key-id", _key_id(watermark_server, key), "--model", "victim",
               "--save-record", str(tmp_path / "record.npz"), "--json"]
    verdicts = [json.loads(line) for line in run_cli(command).stdout.splitlines()]
    assert [v["stolen"] for v in verdicts] == [True, False, False], verdicts
    assert verdicts[0]["p_value"] < 1e-3 and min(v["p_value"] for v in verdicts[1:]) > 1e-3
    assert verdicts[0]["marked"] > 100  # the distinct marked inputs of ~2,000 queries at 30 %
    # The saved record verifies the same way without the server.
    offline = run_cli([sys.executable, "-m", "stealsim", "verify-watermark", str(out), "--record",
                       str(tmp_path / "record.npz")])
    assert offline.returncode == 0 and "copy (watermark found)" in offline.stdout, offline.stderr


def _key_id(server: ServerProcess, key: str) -> str:
    return str(httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}, timeout=30).json()["key_id"])


def test_seat_state_survives_an_api_restart_with_redis(
    digits_checkpoint: Path, redis_url: str, prefix: str, tmp_path: Path,  # noqa: F811
) -> None:
    args = ["--redis-url", redis_url, "--redis-prefix", prefix]
    policy = [{"name": "seat", "threshold": 0.01, "max_pairs": 6}]
    same = np.full((1, 1, 8, 8), 0.5, np.float32)
    server = ServerProcess({"victim": digits_checkpoint}, args=args, log_path=tmp_path / "api1.log")
    try:
        with httpx.Client(base_url=server.url) as client:
            key = new_key(client, budget=100, policy=policy)
        for _ in range(3):  # three identical queries: 0 + 1 + 2 = 3 similar pairs
            assert _infer(server, key, same).status_code == 200
        assert httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}).json()["flags"] == []
    finally:
        server.stop()
    restarted = ServerProcess({"victim": digits_checkpoint}, args=args, log_path=tmp_path / "api2.log")
    try:
        # The fourth makes 3 more pairs with the three before the restart: 6, flagged.
        # (A detector that forgot them would count 0.)
        assert _infer(restarted, key, same).status_code == 200
        flags = httpx.get(f"{restarted.url}/v1/usage", headers={"X-API-Key": key}).json()["flags"]
        assert flags == ["seat"]
    finally:
        restarted.stop()
