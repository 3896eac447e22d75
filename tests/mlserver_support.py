"""A real Seldon MLServer 1.7 process serving scikit-learn digits models, for the client tests.

MLServer lives in a venv of its own (``scripts/third-party-servers.sh``, run by the test
command, exports ``STEALSIM_MLSERVER``); the models are trained and pickled by
that venv's Python so that its scikit-learn reads them back. It is a conformant
Open Inference Protocol v2 server without stealsim's extensions: no binary
tensors, no keys, no ``/v1/usage``.

Models (logistic regressions on raw digits pixels, 0..16):

- ``digits``: input ``pixels`` FP64 ``[-1, 64]``, output ``predict_proba`` FP64 ``[-1, 10]``;
- ``digits-labels``: input FP32 ``[-1, 64]``, output ``predict`` INT64 ``[-1, 1]`` (labels);
- ``digits-mislabeled``: declares ``predict`` as FP64 ``[-1, 10]``, answers INT64 ``[N, 1]``;
- ``digits-bare``: declares no inputs or outputs;
- ``digits-fp32``: the same regression trained on float32 pixels: input FP32, output
  ``predict_proba`` declared FP64 ``[-1, 10]``, answered FP32 (the same probabilities
  in another float width).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_support import LoggedProcess, free_port

from stealsim.wire import model_ready_path

TRAIN = """
import sys, joblib, numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
x, y = load_digits(return_X_y=True)
model = LogisticRegression(max_iter=3000).fit(x[:1200], y[:1200])
joblib.dump(model, sys.argv[1])
joblib.dump(LogisticRegression(max_iter=3000).fit(x[:1200].astype(np.float32), y[:1200]), sys.argv[4])
probe = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict_proba(probe))
"""

PROBA = {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 10]}
MODELS = {
    "digits": {"inputs": [{"name": "pixels", "datatype": "FP64", "shape": [-1, 64]}], "outputs": [PROBA]},
    "digits-labels": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                      "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}]},
    "digits-mislabeled": {"inputs": [{"name": "pixels", "datatype": "FP64", "shape": [-1, 64]}],
                          "outputs": [{"name": "predict", "datatype": "FP64", "shape": [-1, 10]}]},
    "digits-bare": {},
    "digits-fp32": {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}], "outputs": [PROBA]},
}
FLOAT32_MODELS = {"digits-fp32"}
"""Served by the model trained on float32 pixels: its predict_proba answers FP32 (declared FP64)."""


class MLServer(LoggedProcess):
    """``mlserver start`` on free ports; ``url`` once every model is ready."""

    def __init__(self, executable: str, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "settings.json").write_text(json.dumps({
            "http_port": self.port, "grpc_port": free_port(), "metrics_port": free_port(),
            "parallel_workers": 0, "host": "127.0.0.1",
        }))
        super().__init__([executable, "start", str(root)], root / "mlserver.log",
                         {**os.environ, "OMP_NUM_THREADS": "1"})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        self.wait_until_ready([self.url + model_ready_path(name) for name in MODELS], timeout, "mlserver")


@pytest.fixture(scope="session")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MLServer, np.ndarray, np.ndarray]]:
    """``(server, probe images [N, 64] in 0..16, MLServer's own predict_proba of them)``."""
    executable = os.environ.get("STEALSIM_MLSERVER")
    if not executable:
        pytest.skip("MLServer's venv is installed by the test command (bash scripts/test.sh)")
    root = tmp_path_factory.mktemp("mlserver")
    from sklearn.datasets import load_digits

    probe = load_digits().data[1500:1520]
    np.save(root / "probe.npy", probe)
    python = str(Path(executable).with_name("python"))
    subprocess.run([python, "-c", TRAIN, str(root / "model.joblib"), str(root / "probe.npy"),
                    str(root / "expected.npy"), str(root / "model32.joblib")], check=True, timeout=120)
    for name, metadata in MODELS.items():
        (root / name).mkdir()
        (root / name / "model.joblib").symlink_to(root / ("model32.joblib" if name in FLOAT32_MODELS
                                                           else "model.joblib"))
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib"}, **metadata,
        }))
    server = MLServer(executable, root)
    try:
        yield server, probe, np.load(root / "expected.npy")
    finally:
        server.stop()
