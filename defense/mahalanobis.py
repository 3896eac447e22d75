"""The Mahalanobis out-of-distribution score on a classifier's penultimate features.

Lee, Lee, Lee and Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018: fit one Gaussian per class with a
shared covariance to the features ``f(x)`` of the training images (their eq. 1),

    mu_c = mean of f(x) over class c,    Sigma = mean over all images of (f(x) - mu_y)(f(x) - mu_y)^T

and score a query by its distance to the nearest class (their eq. 2, negated)::

    D(x) = min_c (f(x) - mu_c)^T Sigma^-1 (f(x) - mu_c)

Large distances are out of distribution. The features are the input of the
model's last linear layer, un-normalised. We use the last layer only, without
the paper's input pre-processing or its ensemble of layers (both need the
defender to tune on OOD data, which it does not have). ``tau`` is the
``1 - honest_rate`` quantile of the distances of the validation split, so that
a share ``honest_rate`` of natural images score above it.

On mnist5k the score tells data-free thieves apart where the maximum softmax
probability does not: Dual Student's generator images are answered with
confidence (docs/defenses.md).

Usage::

    gaussian = fit_feature_gaussian(train_features, train_labels, validation_features, honest_rate=0.01)
    gaussian.save(Path("runs/victim/ood.safetensors"), encoder="runs/victim")
    FeatureGaussian.load(path).distances(features)   # [N]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from stealsim.errors import ConfigError

__all__ = ["FeatureGaussian", "fit_feature_gaussian"]

RIDGE = 1e-6
"""Added to the covariance's diagonal, times its mean eigenvalue, before inverting (dead ReLU units)."""


@dataclass(frozen=True)
class FeatureGaussian:
    """Class means ``[K, D]``, the shared precision ``[D, D]`` and the threshold ``tau``."""

    means: np.ndarray
    precision: np.ndarray
    tau: float
    honest_rate: float

    @property
    def dimension(self) -> int:
        return int(self.means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``D(x)`` per row of ``features`` ``[N, D]`` (float64 ``[N]``)."""
        if features.ndim != 2 or features.shape[1] != self.dimension:
            raise ConfigError(f"features of shape {list(features.shape)} do not fit statistics of "
                              f"dimension {self.dimension}")
        f = torch.from_numpy(np.asarray(features, np.float64))
        means = torch.from_numpy(self.means)
        precision = torch.from_numpy(self.precision)
        # (f - mu)^T P (f - mu) = f^T P f - 2 f^T P mu + mu^T P mu, for every class at once.
        fp = f @ precision
        squared = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(1)
        return squared.min(dim=1).values.clamp_min(0.0).numpy()

    def save(self, path: Path, encoder: str) -> None:
        """Write ``path`` (safetensors); the metadata names the encoder checkpoint it was fit on."""
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"means": self.means, "precision": self.precision}, str(path), metadata={
            "tau": repr(self.tau), "honest_rate": repr(self.honest_rate), "encoder": encoder,
            "score": "mahalanobis"})

    @classmethod
    def load(cls, path: Path) -> FeatureGaussian:
        """Read statistics written by :meth:`save` (``ConfigError`` when missing or malformed)."""
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
            gaussian = cls(tensors["means"].astype(np.float64), tensors["precision"].astype(np.float64),
                           float(metadata["tau"]), float(metadata["honest_rate"]))
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"OOD statistics {path}: cannot read them ({exc}); write them with "
                              "`stealsim ood-fit`") from exc
        if gaussian.precision.shape != (gaussian.dimension, gaussian.dimension):
            raise ConfigError(f"OOD statistics {path}: precision {list(gaussian.precision.shape)} does not "
                              f"fit means {list(gaussian.means.shape)}")
        return gaussian


def fit_feature_gaussian(features: np.ndarray, labels: np.ndarray, validation_features: np.ndarray,
                         honest_rate: float = 0.01) -> FeatureGaussian:
    """Class means and shared covariance (Lee et al. 2018, eq. 1); ``tau`` on the validation features.

    Raises:
        ConfigError: a class without training images, mismatched shapes, or a bad rate.
    """
    if not 0 < honest_rate < 1:
        raise ConfigError(f"honest_rate must be in (0, 1), got {honest_rate}")
    f = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or len(f) != len(y) or validation_features.shape[1:] != f.shape[1:]:
        raise ConfigError(f"features {list(f.shape)}, labels {list(y.shape)} and validation features "
                          f"{list(validation_features.shape)} do not fit together")
    classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=classes)
    if (counts == 0).any():
        raise ConfigError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training images")
    means = np.stack([f[y == c].mean(axis=0) for c in range(classes)])
    centred = f - means[y]
    covariance = centred.T @ centred / len(f)
    covariance += RIDGE * max(float(np.trace(covariance)) / len(covariance), 1e-12) * np.eye(len(covariance))
    precision = np.linalg.inv(covariance)
    unfitted = FeatureGaussian(means, precision, tau=float("inf"), honest_rate=honest_rate)
    tau = float(np.quantile(unfitted.distances(validation_features), 1.0 - honest_rate))
    return FeatureGaussian(means, precision, tau=tau, honest_rate=honest_rate)
