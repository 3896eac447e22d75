"""IBM ART both ways against a real ``stealsim serve`` over HTTP: the ART adapter answers
exactly as the client does and never spends past its budget, and ART's KnockoffNets and
CopycatCNN run as ``stealsim attack art-*`` with the server's count equal to ART's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_support import ServerProcess, new_key

from attacker.art import art_classifier
from attacker.client import HttpVictim
from attacker.victims import BudgetedVictim
from stealsim.data import load_dataset
from stealsim.errors import BudgetExhaustedError


def used(server: ServerProcess, key: str) -> int:
    response = httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}, timeout=30)
    return int(response.json()["used"])


def test_adapter_predicts_what_the_client_answers(victim_server: ServerProcess, client: httpx.Client) -> None:
    images = load_dataset("digits").x_test[:100]
    key = new_key(client, budget=10_000)
    with HttpVictim(victim_server.url, key, "victim") as victim:
        classifier = art_classifier(victim, budget=150)
        predicted = classifier.predict(images.numpy(), batch_size=32)
        expected = victim.query(images)
        assert predicted.dtype == np.float32 and predicted.shape == (100, 10)
        np.testing.assert_allclose(predicted, expected.numpy(), atol=1e-6)
        assert classifier.meter.used == 100 and used(victim_server, key) == 200
        with pytest.raises(BudgetExhaustedError):  # 50 left: refused whole, before the server
            classifier.predict(images.numpy(), batch_size=100)
        assert classifier.meter.used == 100 and used(victim_server, key) == 200
    labels_key = new_key(client, budget=1000, policy=[{"name": "label_only"}])
    with HttpVictim(victim_server.url, labels_key, "victim") as labels_victim:
        one_hot = art_classifier(BudgetedVictim(labels_victim, 50)).predict(images[:50].numpy())
        assert one_hot.argmax(1).tolist() == labels_victim.query(images[:50]).tolist()
        assert (one_hot.sum(1) == 1).all() and set(np.unique(one_hot)) == {0.0, 1.0}


@pytest.mark.parametrize("name", ["art-knockoff", "art-copycat"])
def test_art_attacks_never_exceed_their_budget(name: str, victim_server: ServerProcess, client: httpx.Client,
                                               tmp_path: Path) -> None:
    budget = 700  # not a multiple of the query batch
    key, eval_key = new_key(client, budget=budget), new_key(client, budget=10_000)
    out = tmp_path / name
    command = [sys.executable, "-m", "stealsim", "attack", name, "--url", victim_server.url, "--api-key", key,
               "--eval-api-key", eval_key, "--model", "victim", "--budget", str(budget), "--out", str(out),
               "--batch-size", "128", "--set", "nb_epochs=3", "--set", "student_width=8",
               "--transfer-samples", "10", "--reference-epochs", "1", "--threads", "1", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == budget == used(victim_server, key)  # ART's images = the server's count
    assert metrics["server_count_matches"] is True and metrics["stop_reason"] == "budget_spent"
    assert metrics["fidelity"] > 0.3  # the thief learned something (chance: 0.1)
    assert (out / "report.md").is_file() and (out / "progress.png").is_file()
