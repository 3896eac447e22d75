"""A real KServe 0.21 Python model server serving small digits models, for the client tests.

KServe lives in a venv of its own (``scripts/third-party-servers.sh``, sourced by the test
command, exports ``STEALSIM_KSERVE_PYTHON``). The server is KServe's own
``kserve.ModelServer`` with ``kserve.Model`` subclasses (a custom-model server,
as a user writes one), REST only, bound to 127.0.0.1 on a free port. It is a
conformant Open Inference Protocol v2 server without stealsim's extensions: JSON
tensors only (``GET /v2`` advertises no ``binary_tensor_data``), no keys, no
``/v1/usage``.

The model (every served model is the same): a multinomial logistic regression
with standardisation inside it, trained by scikit-learn on the training split of
stealsim's ``digits`` with pixels 0..16 (as scikit-learn ships them), so an
input sent in [0, 1] lands far outside what it was trained on (the wrong pixel
range of issue #36). The weights are plain numpy arrays (``model.npz``); the
server computes ``logits = ((x - mean) / scale) @ coef.T + intercept``.

API (all in this module)::

    spec = KServeModel("digits", answers="logits")         # what one model declares and answers
    with start_kserve([spec, KServeModel("flaky", fail_every=20)], tmp_path) as server:
        server.url                                          # http://127.0.0.1:PORT
        server.counts("flaky")                              # the server's own count (see below)
        server.expected(images_0_16)                        # the model's logits, computed here

- :class:`KServeModel` fields (the knobs):

  - ``name``: the model name (``/v2/models/{name}``);
  - ``answers``: ``"logits"`` (the default), ``"probabilities"`` (softmax) or
    ``"labels"`` (argmax, ``[N, 1]``);
  - ``declared_output`` / ``declared_datatype``: the output its metadata
    declares (``declared_output=None``: no output declared at all);
  - ``answered_output`` / ``answered_datatype``: the output name and datatype
    the answers carry (``None``: the declared name, else ``output``; INT64 for
    labels, the declared datatype for scores). ``declared_datatype=None``
    declares INT64 for labels and FP32 for scores. The requested output name
    is ignored, as many custom servers do;
  - ``declared_shape``: the declared output shape (default ``[-1, 10]``, or
    ``[-1, 1]`` for labels);
  - ``input_shape`` (default ``[-1, 64]``) and ``input_datatype`` (``FP32``):
    the declared input; the server reshapes whatever it gets to ``[N, 64]``;
  - ``fail_every``: ``N > 0`` answers HTTP 500 (a model exception, KServe's
    ``InferenceError``) on every N-th inference request to this model, counted
    from the server's start: requests N, 2N, 3N, ... fail, the others answer.

- :func:`start_kserve` (a context manager) trains the weights (cached per
  folder), writes the server script and the models' settings under ``root``,
  starts the server with the KServe venv's Python and yields a
  :class:`KServeServer` once every model is ready; it stops the server on exit.
  It skips the test when ``STEALSIM_KSERVE_PYTHON`` is not set (the test
  command sets it).
- :meth:`KServeServer.counts` reads the server's own count for one model, a
  dict ``{"requests": R, "images": I, "failed": F}``: inference requests
  received (failed ones included), images *answered* (a failed request's images
  are not), and requests answered with HTTP 500. The server writes it to a JSON
  file after every request, before the response leaves.
- :meth:`KServeServer.expected` computes the model's logits of ``[N, 64]``
  pixels in 0..16 in this process (the same numpy formula), for comparisons;
  :func:`softmax` turns them into probabilities.
- :func:`digits_split` gives stealsim's ``digits`` split as ``[N, 64]`` pixels
  in 0..16 with their labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from server_support import LoggedProcess, free_port

from stealsim.wire import model_ready_path

Answers = Literal["logits", "probabilities", "labels"]

SERVER = r'''
import json, sys, threading
from pathlib import Path

import numpy as np
from kserve import Model, ModelServer
from kserve.errors import InferenceError
from kserve.protocol.infer_type import InferOutput, InferResponse
from kserve.protocol.rest import server as rest_server

root = Path(sys.argv[1])
settings = json.loads((root / "models.json").read_text())
weights = np.load(root / "model.npz")
TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}

# KServe binds 0.0.0.0; these tests talk over loopback only.
_init = rest_server.RESTServer.__init__
def _loopback_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.config.host = "127.0.0.1"
rest_server.RESTServer.__init__ = _loopback_init


class Digits(Model):
    def __init__(self, spec):
        super().__init__(spec["name"])
        self.spec = spec
        self.lock = threading.Lock()
        self.count = {"requests": 0, "images": 0, "failed": 0}
        self.count_file = root / f"{spec['name']}.count.json"
        self.load()

    def load(self):
        self.ready = True
        self._write_count()
        return True

    def _write_count(self):
        partial = self.count_file.with_suffix(".tmp")
        partial.write_text(json.dumps(self.count))
        partial.replace(self.count_file)

    def get_input_types(self):
        return [{"name": "pixels", "datatype": self.spec["input_datatype"], "shape": self.spec["input_shape"]}]

    def get_output_types(self):
        if self.spec["declared_output"] is None:
            return []
        return [{"name": self.spec["declared_output"], "datatype": self.spec["declared_datatype"],
                 "shape": self.spec["declared_shape"]}]

    def predict(self, payload, headers=None, response_headers=None):
        spec = self.spec
        with self.lock:
            self.count["requests"] += 1
            fail = spec["fail_every"] > 0 and self.count["requests"] % spec["fail_every"] == 0
            if fail:
                self.count["failed"] += 1
                self._write_count()
        if fail:
            raise InferenceError(f"model {spec['name']}: simulated failure of request {self.count['requests']}")
        pixels = np.asarray(payload.inputs[0].as_numpy(), dtype=np.float64)
        pixels = pixels.reshape(len(pixels), -1)
        logits = ((pixels - weights["mean"]) / weights["scale"]) @ weights["coef"].T + weights["intercept"]
        if spec["answers"] == "labels":
            values = logits.argmax(axis=1).reshape(-1, 1)
        elif spec["answers"] == "probabilities":
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            values = shifted / shifted.sum(axis=1, keepdims=True)
        else:
            values = logits
        values = values.astype(TYPES[spec["answered_datatype"]])
        with self.lock:
            self.count["images"] += len(values)
            self._write_count()
        output = InferOutput(name=spec["answered_output"], shape=list(values.shape),
                             datatype=spec["answered_datatype"], data=values.reshape(-1).tolist())
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])


if __name__ == "__main__":
    models = [Digits(spec) for spec in settings["models"]]
    ModelServer(http_port=settings["http_port"], enable_grpc=False, workers=1,
                enable_latency_logging=False).start(models)
'''

TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class KServeModel:
    """What one served model declares in its metadata and what it answers (see the module docstring)."""

    name: str
    answers: Answers = "logits"
    declared_output: str | None = "logits"
    declared_datatype: str | None = None
    answered_output: str | None = None
    answered_datatype: str | None = None
    declared_shape: tuple[int, ...] | None = None
    input_shape: tuple[int, ...] = (-1, 64)
    input_datatype: str = "FP32"
    fail_every: int = 0

    def settings(self) -> dict[str, object]:
        """The resolved settings the server script reads (defaults filled in)."""
        scores_type = "INT64" if self.answers == "labels" else "FP32"
        declared_type = self.declared_datatype or scores_type
        return {
            **asdict(self),
            "declared_datatype": declared_type,
            "answered_output": self.answered_output or self.declared_output or "output",
            "answered_datatype": self.answered_datatype or ("INT64" if self.answers == "labels" else declared_type),
            "declared_shape": list(self.declared_shape or ((-1, 1) if self.answers == "labels" else (-1, 10))),
            "input_shape": list(self.input_shape),
        }


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """stealsim's ``digits`` split as ``([N, 64] float64 pixels in 0..16, [N] int64 labels)``."""
    from stealsim.data import load_dataset

    images, labels = load_dataset("digits").split(split)
    return images.reshape(len(images), -1).double().numpy() * 16.0, labels.numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def train_weights(path: Path) -> None:
    """Standardisation + logistic regression on the digits training split (0..16), as numpy arrays."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    pixels, labels = digits_split(TRAIN_SPLIT)
    scaler = StandardScaler().fit(pixels)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    model = LogisticRegression(max_iter=2000).fit((pixels - scaler.mean_) / scale, labels)
    np.savez(path, mean=scaler.mean_, scale=scale, coef=model.coef_, intercept=model.intercept_)


class KServeServer(LoggedProcess):
    """KServe's ``ModelServer`` on a free loopback port; ``url`` once every model is ready."""

    def __init__(self, python: str, root: Path, models: Sequence[KServeModel]) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models = {model.name: model for model in models}
        self._weights = dict(np.load(root / "model.npz"))
        (root / "serve.py").write_text(SERVER)
        (root / "models.json").write_text(json.dumps({
            "http_port": self.port, "models": [model.settings() for model in models]}))
        for name in self.models:
            (root / f"{name}.count.json").unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        super().__init__([python, str(root / "serve.py"), str(root)], root / "kserve.log", env)
        self.wait_until_ready([self.url + model_ready_path(name) for name in self.models], 120.0, "kserve")

    def counts(self, name: str) -> dict[str, int]:
        """The server's own count for model ``name``: ``requests`` (failed included), ``images`` answered, ``failed``."""
        return {key: int(value) for key, value in json.loads((self.root / f"{name}.count.json").read_text()).items()}

    def expected(self, pixels: np.ndarray) -> np.ndarray:
        """The served model's logits of ``[N, 64]`` pixels in 0..16, computed in this process."""
        w = self._weights
        return np.asarray(((pixels - w["mean"]) / w["scale"]) @ w["coef"].T + w["intercept"])


@contextmanager
def start_kserve(models: Sequence[KServeModel], root: Path) -> Iterator[KServeServer]:
    """A running KServe server with ``models`` under ``root`` (skips the test without KServe's venv)."""
    python = os.environ.get("STEALSIM_KSERVE_PYTHON")
    if not python:
        pytest.skip("KServe's venv is installed by the test command (bash scripts/test.sh)")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model.npz").is_file():
        train_weights(root / "model.npz")
    server = KServeServer(python, root, models)
    try:
        yield server
    finally:
        server.stop()
