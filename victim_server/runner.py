"""Model runners: ``predict_batch(images) -> probabilities`` for one served checkpoint.

The batching backends (in-process now, Redis workers later) call only
:meth:`ModelRunner.predict_batch`; they know nothing of models, and this module
knows nothing of batching.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stealsim.architectures import PixelClassifier
from stealsim.checkpoint import CheckpointMeta, load_checkpoint
from stealsim.errors import ConfigError

__all__ = ["ModelRunner", "load_runners"]

logger = logging.getLogger(__name__)


@dataclass
class ModelRunner:
    """One classifier on one device, answering batches of pixels in [0, 1]."""

    name: str
    model: PixelClassifier
    meta: CheckpointMeta
    device: torch.device

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
        with torch.inference_mode():
            batch = torch.from_numpy(images).to(self.device, non_blocking=True)
            logits = self.model(batch)
            probabilities = torch.softmax(logits.float(), dim=1)
            return probabilities.cpu().numpy()


def load_runners(models: Mapping[str, Path], device: torch.device) -> dict[str, ModelRunner]:
    """Load every checkpoint of ``models`` (name -> directory) onto ``device``.

    Raises:
        ConfigError: no models given; CheckpointError: a checkpoint cannot be loaded.
    """
    if not models:
        raise ConfigError("no models to serve: give at least one --model NAME=DIR")
    runners: dict[str, ModelRunner] = {}
    for name, directory in models.items():
        model, meta = load_checkpoint(directory, device)
        runners[name] = ModelRunner(name, model, meta, device)
        # One warm-up forward so the first request does not pay for lazy initialisation.
        runners[name].predict_batch(np.zeros((1, *meta.input_shape), dtype=np.float32))
        logger.info(
            "loaded model %s from %s (%s, input %s, %d classes) on %s",
            name, directory, meta.architecture, meta.input_shape, meta.num_classes, device,
        )
    return runners
