"""The attacker against a third-party Open Inference Protocol v2 server: a real Seldon
MLServer 1.7 process (own venv) serving scikit-learn models, over real HTTP. It has none
of stealsim's extensions: JSON only, no keys, no /v1/usage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlserver_support import MLServer

from attacker.client import HttpVictim
from attacker.endpoint import EndpointOptions
from stealsim.errors import AttackError, VictimAPIError

Server = tuple[MLServer, np.ndarray, np.ndarray]
FLAGS = ["--batch-size", "100", "--transfer-samples", "10",
         "--reference-epochs", "1", "--threads", "1", "--quiet"]


def attack(server: MLServer, model: str, out: Path, budget: int, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "stealsim", "attack", "random", "--url", server.url, "--model", model,
               "--budget", str(budget), "--out", str(out), *FLAGS, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_metadata_and_json_answers_equal_mlservers_own(mlserver: Server) -> None:
    server, probe, expected = mlserver
    options = EndpointOptions(input_range=(0.0, 16.0))
    with HttpVictim(server.url, None, "digits", options=options) as victim:
        endpoint = victim.endpoint
        assert endpoint.server.startswith("mlserver 1.7")
        assert endpoint.wire == "json" and victim.metering == "client"  # no extensions advertised
        assert (endpoint.input_name, endpoint.input_datatype, endpoint.wire_shape) == ("pixels", "FP64", (64,))
        assert victim.info.input_shape == (1, 8, 8) and victim.info.num_classes == 10
        assert victim.info.pixel_range == (0.0, 16.0)
        images = torch.from_numpy(probe / 16.0).float().reshape(-1, 1, 8, 8)  # the attacks' [0, 1]
        answers = victim.query(images)
    assert answers.dtype == torch.float32 and answers.shape == (20, 10)
    np.testing.assert_allclose(answers.numpy(), expected, atol=1e-5)


def test_labels_output_with_the_classes_given(mlserver: Server) -> None:
    server, probe, expected = mlserver
    with pytest.raises(AttackError, match="--num-classes"):
        HttpVictim(server.url, None, "digits-labels")
    options = EndpointOptions(input_range=(0.0, 16.0), num_classes=10)
    with HttpVictim(server.url, None, "digits-labels", options=options) as victim:
        assert victim.info.output_kind == "label" and victim.endpoint.input_datatype == "FP32"
        labels = victim.query(torch.from_numpy(probe / 16.0).float().reshape(-1, 1, 8, 8))
    assert labels.dtype == torch.int64 and labels.tolist() == expected.argmax(1).tolist()


def test_undeclared_model_needs_shape_and_output(mlserver: Server) -> None:
    server, probe, expected = mlserver
    with pytest.raises(AttackError, match="declares no input; pass --input-shape"):
        HttpVictim(server.url, None, "digits-bare")
    options = EndpointOptions(input_shape=(64,), input_range=(0.0, 16.0), output_name="predict_proba",
                              num_classes=10)
    with HttpVictim(server.url, None, "digits-bare", options=options) as victim:
        assert victim.info.input_shape == (1, 8, 8)  # 64 = 8 x 8, sent flat as declared by --input-shape
        answers = victim.query(torch.from_numpy(probe / 16.0).float().reshape(-1, 1, 8, 8))
    np.testing.assert_allclose(answers.numpy(), expected, atol=1e-5)


def test_mismatched_output_is_refused_clearly(mlserver: Server) -> None:
    server, _, _ = mlserver
    with HttpVictim(server.url, None, "digits-mislabeled") as victim, pytest.raises(VictimAPIError) as refused:
        victim.query(torch.rand(3, 1, 8, 8))
    assert refused.value.code == "output_mismatch"
    assert "'predict' came back INT64 [3, 1], the metadata declares FP64" in str(refused.value)


def test_attack_completes_within_its_client_side_budget(mlserver: Server, tmp_path: Path) -> None:
    server, _, _ = mlserver
    out = tmp_path / "run"
    done = attack(server, "digits", out, 3000, "--input-range", "0,16")
    assert done.returncode == 0, done.stderr
    ledger = json.loads((out / "ledger.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert ledger["attack_queries"] == metrics["queries_used"] == 3000
    assert config["metering"] == metrics["metering"] == "client-only"
    assert config["endpoint"]["wire"] == "json" and config["endpoint"]["api_key"] is False
    assert "server_queries" not in metrics
    assert "client-only" in (out / "report.md").read_text()
    assert metrics["fidelity"] > 0.5  # learning from a real sklearn model (chance: 0.1; 0.74 measured)


def test_refused_run_writes_nothing(mlserver: Server, tmp_path: Path) -> None:
    server, _, _ = mlserver
    out = tmp_path / "mislabeled"
    refused = attack(server, "digits-mislabeled", out, 500)
    assert refused.returncode == 2, refused.stderr
    assert "does not match its metadata" in refused.stderr and "INT64" in refused.stderr
    assert not out.exists()
    bare = attack(server, "digits-bare", out, 500)
    assert bare.returncode == 2 and "--input-shape" in bare.stderr
    assert not out.exists()
    forced = attack(server, "digits", out, 500, "--wire", "binary")  # MLServer has no binary tensors
    assert forced.returncode == 2 and "does not advertise binary_tensor_data: try --wire auto or json" in forced.stderr
    assert not out.exists()
