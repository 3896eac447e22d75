"""``stealsim honest``: natural test images through a real key on a real server, as an honest user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from server_support import ServerProcess, admin, new_key

from attacker.victims import InProcessVictim
from experiments.honest import HonestSettings, expected_calibration_error, honest_traffic
from stealsim.data import load_dataset
from stealsim.errors import ConfigError


def usage_of(client: httpx.Client, key: str) -> dict[str, object]:
    return dict(client.get("/v1/usage", headers={"X-API-Key": key}).json())


def test_ece_of_fixed_answers() -> None:
    # Two bins hit: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, both right).
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_one_pass_answers_like_the_model_and_is_charged_exactly(
    victim_server: ServerProcess, client: httpx.Client, digits_checkpoint: Path
) -> None:
    data = load_dataset("digits")
    key = new_key(client, budget=len(data.y_test))
    result = honest_traffic(victim_server.url, key, "victim", data, HonestSettings(batch=32))
    expected = InProcessVictim.from_checkpoint(digits_checkpoint).query(data.x_test).argmax(dim=1)
    assert result.images == len(data.y_test) and result.requests == -(-len(data.y_test) // 32)
    assert result.accuracy == pytest.approx(float((expected == data.y_test).float().mean()))
    assert 0.0 <= result.ece <= 1.0
    assert result.flags == "" and result.blocked_at is None
    assert usage_of(client, key)["used"] == len(data.y_test)


def test_label_only_answers_are_one_hot(victim_server: ServerProcess, client: httpx.Client) -> None:
    data = load_dataset("digits")
    key = new_key(client, budget=len(data.y_test), policy=[{"name": "label_only"}])
    result = honest_traffic(victim_server.url, key, "victim", data)
    # Confidence 1 on every answer: the calibration error is the error rate.
    assert result.ece == pytest.approx(1.0 - result.accuracy, abs=1e-6)


def test_a_refused_request_stops_the_user_without_overcharging(
    victim_server: ServerProcess, client: httpx.Client
) -> None:
    data = load_dataset("digits")
    key = new_key(client, budget=100)
    result = honest_traffic(victim_server.url, key, "victim", data, HonestSettings(batch=32, passes=2, shuffle=True))
    assert result.blocked_at == 96 and result.images == 96 and result.requests == 3
    assert result.refusal and "budget" in result.refusal.lower()
    assert usage_of(client, key)["used"] == 96


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="passes >= 1"):
        HonestSettings(passes=0)
    with pytest.raises(ConfigError, match="rate >= 0"):
        HonestSettings(rate=-1.0)


def test_cli_reports_json_and_exits_3_when_flagged_or_refused(
    victim_server: ServerProcess, client: httpx.Client
) -> None:
    data = load_dataset("digits")
    key = new_key(client, budget=2 * len(data.y_test))
    command = [sys.executable, "-m", "stealsim", "honest", "--url", victim_server.url, "--api-key", key,
               "--passes", "2", "--shuffle", "--rate", "200", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["images"] == 2 * len(data.y_test) and result["flags"] == ""
    # The key is spent now: the next run is refused at once and says so with exit code 3.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 3, again.stdout + again.stderr
    assert json.loads(again.stdout)["blocked_at"] == 0
    bad = subprocess.run([*command[:-1], "--split", "train"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--split must be test or validation" in bad.stderr
    assert client.get("/v1/admin/keys", headers=admin()).status_code == 200


def test_ood_rate_detector_spares_the_honest_user_and_flags_noise(
    victim_server: ServerProcess, client: httpx.Client, digits_checkpoint: Path
) -> None:
    data = load_dataset("digits")
    victim = InProcessVictim.from_checkpoint(digits_checkpoint)
    # tau from the validation split: 1 % of natural images fall under it.
    tau = float(victim.query(data.x_val).max(dim=1).values.quantile(0.01))
    policy = [{"name": "ood_rate", "tau": tau, "honest_rate": 0.01, "alpha": 1e-6, "min_queries": 64}]
    honest_key = new_key(client, budget=len(data.y_test), policy=policy)
    result = honest_traffic(victim_server.url, honest_key, "victim", data)
    assert result.flags == "" and result.images == len(data.y_test)
    noise = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    share = float((victim.query(noise).max(dim=1).values < tau).float().mean())
    assert share > 0.05, f"the test victim is confident on noise ({share:.2f} under tau): pick other noise"
    thief_key = new_key(client, budget=256, policy=[{**policy[0], "block": True}])
    from attacker.client import HttpVictim

    with HttpVictim(victim_server.url, thief_key, "victim") as thief:
        thief.query(noise)
    assert usage_of(client, thief_key)["flags"] == ["ood_rate"]


def test_mahalanobis_ood_rate_spares_the_honest_user_and_flags_noise(
    victim_server: ServerProcess, client: httpx.Client, digits_checkpoint: Path, tmp_path: Path
) -> None:
    statistics = tmp_path / "ood.safetensors"
    fit = subprocess.run([sys.executable, "-m", "stealsim", "ood-fit", "--checkpoint", str(digits_checkpoint),
                          "--dataset", "digits", "--out", str(statistics)],
                         capture_output=True, text=True, timeout=120)
    assert fit.returncode == 0, fit.stderr
    fitted = json.loads(fit.stdout)
    assert fitted["honest_rate"] == 0.01 and fitted["tau"] > 0 and fitted["classes"] == 10
    policy = [{"name": "ood_rate", "score": "mahalanobis", "encoder": str(digits_checkpoint),
               "statistics": str(statistics), "honest_rate": 0.02, "alpha": 1e-6, "min_queries": 64}]
    data = load_dataset("digits")
    honest_key = new_key(client, budget=len(data.y_test), policy=policy)
    result = honest_traffic(victim_server.url, honest_key, "victim", data)
    assert result.flags == "" and result.images == len(data.y_test)
    thief_key = new_key(client, budget=256, policy=[{**policy[0], "block": True}])
    from attacker.client import HttpVictim

    with HttpVictim(victim_server.url, thief_key, "victim") as thief:
        thief.query(torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    usage = usage_of(client, thief_key)
    assert usage["flags"] == ["ood_rate"] and usage["used"] == 128
    # Statistics that cannot be read are refused when the key is made, with the reason.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"{}")
    response = client.post("/v1/admin/keys", headers=admin(),
                           json={"budget": 10, "policy": [{**policy[0], "statistics": str(broken)}]})
    assert response.status_code == 400 and "stealsim ood-fit" in response.json()["error"]
