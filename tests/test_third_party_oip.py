"""The attacker against third-party Open Inference Protocol v2 servers over real HTTP: a real
Seldon MLServer 1.7 process serving scikit-learn models, and a real KServe 0.21 custom-model
server (tests/kserve_support.py), each in its own venv. They have none of stealsim's
extensions: JSON only, no keys, no /v1/usage; the counts compared are the servers' own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from kserve_support import KServeModel, KServeServer, digits_split, softmax, start_kserve
from mlserver_support import MLServer

from attacker.client import HttpVictim
from attacker.endpoint import EndpointOptions
from stealsim.errors import AttackError, VictimAPIError

Server = tuple[MLServer, np.ndarray, np.ndarray]
FLAGS = ["--batch-size", "100", "--transfer-samples", "10",
         "--reference-epochs", "1", "--threads", "1", "--quiet"]


def attack(server: MLServer | KServeServer, model: str, out: Path, budget: int,
           *extra: str) -> subprocess.CompletedProcess[str]:
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
    assert ("'predict' came back INT64 [3, 1], the metadata declares FP64; if these are class labels, "
            "pass --output-kind label") in str(refused.value)
    server, probe, expected = mlserver
    options = EndpointOptions(input_range=(0.0, 16.0), output_kind="label")  # the flag wins
    with HttpVictim(server.url, None, "digits-mislabeled", options=options) as victim:
        assert victim.info.num_classes == 10  # the declared score dimension
        labels = victim.query(torch.from_numpy(probe / 16.0).float().reshape(-1, 1, 8, 8))
    assert labels.tolist() == expected.argmax(1).tolist()


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
    assert "stopped in the probe: 32 images of the test split were sent" in refused.stderr
    assert not out.exists()
    bare = attack(server, "digits-bare", out, 500)
    assert bare.returncode == 2 and "--input-shape" in bare.stderr
    assert not out.exists()
    forced = attack(server, "digits", out, 500, "--wire", "binary")  # MLServer has no binary tensors
    assert forced.returncode == 2 and "does not advertise binary_tensor_data: try --wire auto or json" in forced.stderr
    assert not out.exists()


def test_another_float_width_completes_with_one_warning(mlserver: Server, tmp_path: Path) -> None:
    # MLServer declares predict_proba FP64 and answers FP32 for a model trained on float32 pixels.
    server, _, _ = mlserver
    out = tmp_path / "fp32"
    done = attack(server, "digits-fp32", out, 600, "--input-range", "0,16")
    assert done.returncode == 0, done.stderr
    warning = "output 'predict_proba' came back FP32, the metadata declares FP64: read as sent"
    assert " ".join(done.stderr.split()).count(warning) == 1, done.stderr  # the log wraps lines
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == 600 and metrics["victim_accuracy"] > 0.9


# -- KServe 0.21: a custom-model server (kserve.Model subclasses) ---------------------------------

KSERVE_MODELS = [
    KServeModel("digits"),  # declares and answers logits FP32 [-1, 10]
    # declares "logits" FP32, answers probabilities named "predict_proba" in FP64
    KServeModel("renamed", answers="probabilities", answered_output="predict_proba", answered_datatype="FP64"),
    # declares scores FP32 [-1, 10] named "scores", answers INT64 labels [N, 1] under that name
    KServeModel("retyped", answers="labels", declared_output="scores", declared_datatype="FP32",
                declared_shape=(-1, 10)),
]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeServer]:
    with start_kserve(KSERVE_MODELS, tmp_path_factory.mktemp("kserve")) as server:
        yield server


def test_kserve_answers_through_the_overriding_flags(kserve: KServeServer) -> None:
    pixels, _ = digits_split("test")
    pixels = pixels[:20]
    images = torch.from_numpy(pixels / 16.0).float().reshape(-1, 1, 8, 8)
    expected = softmax(kserve.expected(pixels))
    options = EndpointOptions(input_range=(0.0, 16.0), output_kind="logits")
    with HttpVictim(kserve.url, None, "digits", options=options) as victim:
        assert victim.endpoint.server == "kserve 0.21.0" and victim.endpoint.wire == "json"
        assert victim.metering == "client" and victim.info.num_classes == 10
        before = kserve.counts("digits")
        np.testing.assert_allclose(victim.query(images).numpy(), expected, atol=1e-5)
    assert kserve.counts("digits")["images"] - before["images"] == 20
    with HttpVictim(kserve.url, None, "renamed", options=EndpointOptions(input_range=(0.0, 16.0))) as victim, \
            pytest.raises(VictimAPIError, match="the answer holds 'predict_proba'; pass --output-name "
                                                "predict_proba --num-classes 10"):
        victim.query(images)
    options = EndpointOptions(input_range=(0.0, 16.0), output_name="predict_proba", num_classes=10)
    with HttpVictim(kserve.url, None, "renamed", options=options) as victim:
        np.testing.assert_allclose(victim.query(images).numpy(), expected, atol=1e-5)
    with HttpVictim(kserve.url, None, "retyped", options=EndpointOptions(input_range=(0.0, 16.0))) as victim, \
            pytest.raises(VictimAPIError, match="came back INT64 \\[20, 1\\], the metadata declares FP32; "
                                                "if these are class labels, pass --output-kind label"):
        victim.query(images)
    options = EndpointOptions(input_range=(0.0, 16.0), output_kind="label")
    with HttpVictim(kserve.url, None, "retyped", options=options) as victim:
        assert victim.query(images).tolist() == expected.argmax(1).tolist()


def test_kserve_pixel_range_mistake_stops_after_the_probe(kserve: KServeServer, tmp_path: Path) -> None:
    out = tmp_path / "range"
    before = kserve.counts("digits")
    refused = attack(kserve, "digits", out, 1000, "--output-kind", "logits")  # no --input-range 0,16
    assert refused.returncode == 2, refused.stderr
    assert "no better than chance" in refused.stderr and "pass --input-range LOW,HIGH" in refused.stderr
    assert "The check sent 32 images of the test split of digits" in refused.stderr
    after = kserve.counts("digits")
    assert (after["requests"] - before["requests"], after["images"] - before["images"]) == (1, 32)
    assert not out.exists()


def test_kserve_renamed_output_is_stolen_with_output_name(kserve: KServeServer, tmp_path: Path) -> None:
    out = tmp_path / "renamed"
    before = kserve.counts("renamed")
    refused = attack(kserve, "renamed", out, 600, "--input-range", "0,16")
    assert refused.returncode == 2, refused.stderr
    assert "pass --output-name predict_proba --num-classes 10" in refused.stderr
    assert "32 images of the test split were sent" in refused.stderr and not out.exists()
    assert kserve.counts("renamed")["images"] - before["images"] == 32
    before = kserve.counts("renamed")
    done = attack(kserve, "renamed", out, 600, "--input-range", "0,16", "--output-name", "predict_proba",
                  "--num-classes", "10")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["endpoint"]["output_name"] == "predict_proba" and config["endpoint"]["server"] == "kserve 0.21.0"
    # the answers were read right: the victim's labels of the split score as the model does (0.961)
    assert metrics["queries_used"] == 600 and metrics["victim_accuracy"] > 0.9
    assert metrics["planned_eval_queries"] == metrics["eval_queries"]
    assert kserve.counts("renamed")["images"] - before["images"] == 600 + metrics["eval_queries"]
