"""The defender's own models that policy steps use: MAD proxies, misinformation models, encoders.

Each is a checkpoint directory (``stealsim train``), loaded once per API process
on the CPU and checked against the served model it defends (input shape; class
count for the ones that answer with probabilities)::

    models = DefenderModels()
    models.check(Path("runs/misinformation"), runner.meta, needs_classes=True)
    probabilities = models.probabilities(Path("runs/misinformation"), images)
    encodings = models.features(Path("runs/encoder"), images)   # penultimate, L2-normalised
    distances = models.mahalanobis(Path("runs/victim"), Path("runs/victim/ood.safetensors"), images)

:func:`fit_ood_statistics` fits the Mahalanobis statistics of an encoder (``stealsim ood-fit``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defense.mahalanobis import FeatureGaussian, fit_feature_gaussian
from stealsim.architectures import PixelClassifier
from stealsim.checkpoint import CheckpointMeta, load_checkpoint
from stealsim.data import Dataset
from stealsim.errors import ConfigError, StealsimError

__all__ = ["DefenderModels", "OodFit", "fit_ood_statistics"]

FEATURE_BATCH = 1024
"""Images per forward pass when features are taken of a whole split."""


class DefenderModels:
    """Checkpoints by path, loaded on first use (thread-safe: policies may run in a worker thread)."""

    def __init__(self) -> None:
        self._models: dict[Path, tuple[PixelClassifier, CheckpointMeta]] = {}
        self._gaussians: dict[Path, FeatureGaussian] = {}
        self._lock = threading.Lock()
        self._forward_lock = threading.Lock()

    def load(self, path: Path) -> tuple[PixelClassifier, CheckpointMeta]:
        key = Path(path).resolve()
        with self._lock:
            if key not in self._models:
                try:
                    self._models[key] = load_checkpoint(key, "cpu")
                except StealsimError as exc:
                    raise ConfigError(f"defender checkpoint {path}: {exc}") from exc
            return self._models[key]

    def check(self, path: Path, served: CheckpointMeta, needs_classes: bool) -> None:
        """Load ``path`` and check that it fits the served model's inputs (and classes)."""
        _, meta = self.load(path)
        if tuple(meta.input_shape) != tuple(served.input_shape):
            raise ConfigError(f"defender checkpoint {path} takes input {list(meta.input_shape)}, "
                              f"the served model {list(served.input_shape)}")
        if needs_classes and meta.num_classes != served.num_classes:
            raise ConfigError(f"defender checkpoint {path} has {meta.num_classes} classes, "
                              f"the served model {served.num_classes}")

    def probabilities(self, path: Path, images: np.ndarray) -> np.ndarray:
        model, _ = self.load(path)
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()

    def features(self, path: Path, images: np.ndarray, normalise: bool = True) -> np.ndarray:
        """The input of the model's last linear layer (L2-normalised per row unless ``normalise`` is off)."""
        model, _ = self.load(path)
        last = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
        captured: list[torch.Tensor] = []
        # One hooked forward at a time: a second thread's hook would capture this forward too.
        with self._forward_lock:
            handle = last.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
            try:
                with torch.inference_mode():
                    model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
            finally:
                handle.remove()
        features = captured[0].flatten(1).float()
        if not normalise:
            return features.numpy()
        return torch.nn.functional.normalize(features, dim=1).numpy()

    def split_features(self, path: Path, images: torch.Tensor) -> np.ndarray:
        """Un-normalised features of a whole split, :data:`FEATURE_BATCH` images per forward."""
        return np.concatenate([self.features(path, images[i:i + FEATURE_BATCH].numpy(), normalise=False)
                               for i in range(0, len(images), FEATURE_BATCH)])

    def gaussian(self, path: Path) -> FeatureGaussian:
        """The Mahalanobis statistics in ``path`` (``stealsim ood-fit``), read once."""
        key = Path(path).resolve()
        with self._lock:
            if key not in self._gaussians:
                self._gaussians[key] = FeatureGaussian.load(key)
            return self._gaussians[key]

    def check_gaussian(self, statistics: Path, encoder: Path) -> None:
        """The statistics can be read and fit the encoder's feature dimension."""
        gaussian = self.gaussian(statistics)
        _, meta = self.load(encoder)
        probe = np.zeros((1, *meta.input_shape), np.float32)
        dimension = self.features(encoder, probe, normalise=False).shape[1]
        if dimension != gaussian.dimension:
            raise ConfigError(f"OOD statistics {statistics} are of dimension {gaussian.dimension}, the "
                              f"features of {encoder} of {dimension}: fit them on that checkpoint")

    def mahalanobis(self, encoder: Path, statistics: Path, images: np.ndarray) -> np.ndarray:
        """Each image's Mahalanobis distance to the nearest class (:mod:`defense.mahalanobis`)."""
        return self.gaussian(statistics).distances(self.features(encoder, images, normalise=False))


@dataclass(frozen=True)
class OodFit:
    """Statistics fitted by :func:`fit_ood_statistics`, and how they score the test split."""

    gaussian: FeatureGaussian
    test_share_over_tau: float
    """Share of the test images whose distance exceeds ``tau`` (near ``honest_rate`` when it generalises)."""


def fit_ood_statistics(encoder: Path, data: Dataset, out: Path, honest_rate: float) -> OodFit:
    """Fit the Mahalanobis statistics of ``encoder``'s penultimate features (:mod:`defense.mahalanobis`):
    the training split fits the class means and covariance, the validation split sets ``tau``;
    write them to ``out`` (``.safetensors``) and score the test split."""
    models = DefenderModels()
    models.load(encoder)  # a clear error for a bad checkpoint before any work
    gaussian = fit_feature_gaussian(models.split_features(encoder, data.x_train), data.y_train.numpy(),
                                    models.split_features(encoder, data.x_val), honest_rate=honest_rate)
    gaussian.save(out, encoder=str(encoder))
    test_distances = gaussian.distances(models.split_features(encoder, data.x_test))
    return OodFit(gaussian, float((test_distances > gaussian.tau).mean()))
