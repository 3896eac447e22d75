"""Adaptive misinformation: wrong answers for out-of-distribution queries only.

Kariyappa and Qureshi (2020), "Defending Against Model Stealing Attacks with
Adaptive Misinformation", CVPR. Stealing attacks query out-of-distribution (OOD)
inputs (surrogate data, synthetic images); honest users query in-distribution.
With an OOD score ``S(x)`` (the maximum softmax probability of the served model,
high in distribution), the served answer is (Eq. 4-5)::

    ŷ = (1 - α) f(x) + α f̂(x),     α = 1 / (1 + exp(ν (S(x) - τ)))

where ``f̂`` is a *misinformation model* trained to put little mass on the true
class, by minimising (Eq. 3)::

    L(x, y) = -log(1 - f̂(x)_y)

``τ`` sets the trade-off (queries with ``S(x) < τ`` get mostly misinformation),
``ν`` the sharpness (the authors' code uses ν = 10000, a near step).

Departure, a named setting: the paper trains the served model with Outlier
Exposure so that MSP separates in- from out-of-distribution better; stealsim
serves the checkpoint as it is and scores it with plain MSP.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["misinform", "misinformation_loss", "misinformation_weight"]


def misinformation_loss(logits: Tensor, images: Tensor, labels: Tensor) -> Tensor:
    """Eq. 3: ``mean(-log(1 - softmax(logits)_y))``, the misinformation model's loss.

    (The ``images`` argument is unused; it matches :func:`stealsim.training.fit`'s loss signature.)
    """
    true_class = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log1p(-true_class.clamp(max=1.0 - 1e-6)).mean()


def misinformation_weight(score: np.ndarray, tau: float, nu: float) -> np.ndarray:
    """Eq. 5: ``α = sigmoid(ν (τ - S(x)))``, computed without overflow."""
    z = np.clip(nu * (tau - score.astype(np.float64)), -500.0, 500.0)
    return 1.0 / (1.0 + np.exp(-z))


def misinform(probabilities: np.ndarray, misinformation: np.ndarray, tau: float, nu: float) -> np.ndarray:
    """Eq. 4 with the served model's MSP as the OOD score: ``[N, K]`` answers."""
    alpha = misinformation_weight(probabilities.max(axis=1), tau, nu)[:, None]
    answer = (1.0 - alpha) * probabilities + alpha * misinformation
    return (answer / answer.sum(axis=1, keepdims=True)).astype(probabilities.dtype)
