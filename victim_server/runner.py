"""Model runners: ``predict_batch(images) -> probabilities`` for one served checkpoint.

The batching backends (in-process now, Redis workers later) call only
:meth:`ModelRunner.predict_batch`; they know nothing of models, and this module
knows nothing of batching.

**Why a graph.** ``predict_batch`` runs in a worker thread while the event loop
decodes and answers requests in the main thread. In eager mode every operator
drops the GIL and must win it back from the busy event loop, waiting up to
Python's switch interval (5 ms) each time: a busy Python thread cut the eager
forward of the small CNN from ~1,900 to 160-480 images/s (``benchmarks/gil_contention.py``). A frozen
TorchScript graph (``inference_graph="torchscript"``, the default) runs the whole
forward in C++ with the GIL released once, and folds batch norm into the
convolutions; ``"eager"`` keeps the plain module. ``torch.jit`` is deprecated in
favour of ``torch.export``; it still works in the pinned torch, and a model that
cannot be traced (or that a future torch refuses) falls back to eager with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stealsim.architectures import PixelClassifier
from stealsim.checkpoint import CheckpointMeta, load_checkpoint
from stealsim.errors import ConfigError

__all__ = ["InferenceGraph", "ModelRunner", "load_runners"]

logger = logging.getLogger(__name__)

InferenceGraph = Literal["torchscript", "eager"]


@dataclass
class ModelRunner:
    """One classifier on one device, answering batches of pixels in [0, 1]."""

    name: str
    model: PixelClassifier
    meta: CheckpointMeta
    device: torch.device
    graph: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    """The frozen TorchScript forward, when built (see the module's docstring)."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.meta.input_shape

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 ``[N, K]``, of float32 images ``[N, C, H, W]``.

        Runs synchronously (the batcher calls it from a worker thread).
        """
        if not images.flags.writeable:
            # A zero-copy view of a request body is read-only; torch wants writable memory.
            images = images.copy()
        forward = self.graph if self.graph is not None else self.model
        with torch.inference_mode():
            batch = torch.from_numpy(images).to(self.device, non_blocking=True)
            logits = forward(batch)
            probabilities = torch.softmax(logits.float(), dim=1)
            return probabilities.cpu().numpy()


def _frozen_graph(model: PixelClassifier, example: torch.Tensor, name: str) -> torch.jit.ScriptModule | None:
    """``model`` traced on ``example`` and frozen, if it gives the eager answers; else None."""
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice (see the docstring)
            graph = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
            graph(example)  # the first calls optimise the graph
            expected, got = model(example), graph(example)
    except Exception as exc:  # any failure: eager still serves
        logger.warning("model %s: no TorchScript graph (%s: %s); serving eager", name, type(exc).__name__, exc)
        return None
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        logger.warning("model %s: the TorchScript graph differs from eager by %.2g; serving eager",
                       name, float((expected - got).abs().max()))
        return None
    return graph


def load_runners(
    models: Mapping[str, Path], device: torch.device, inference_graph: InferenceGraph = "torchscript"
) -> dict[str, ModelRunner]:
    """Load every checkpoint of ``models`` (name -> directory) onto ``device``.

    Raises:
        ConfigError: no models given; CheckpointError: a checkpoint cannot be loaded.
    """
    if not models:
        raise ConfigError("no models to serve: give at least one --model NAME=DIR")
    runners: dict[str, ModelRunner] = {}
    for name, directory in models.items():
        model, meta = load_checkpoint(directory, device)
        graph = None
        if inference_graph == "torchscript":
            example = torch.rand((8, *meta.input_shape), device=device)
            graph = _frozen_graph(model, example, name)
        runners[name] = ModelRunner(name, model, meta, device, graph)
        # One warm-up forward so the first request does not pay for lazy initialisation.
        runners[name].predict_batch(np.zeros((1, *meta.input_shape), dtype=np.float32))
        logger.info(
            "loaded model %s from %s (%s, input %s, %d classes) on %s, %s",
            name, directory, meta.architecture, meta.input_shape, meta.num_classes, device,
            "TorchScript graph" if graph is not None else "eager",
        )
    return runners
