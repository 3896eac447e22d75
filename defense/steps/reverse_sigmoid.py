"""The ``reverse_sigmoid`` step: Lee et al.'s deceptive perturbation of the probabilities."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from defense.steps.base import PolicyStep, renormalise

__all__ = ["ReverseSigmoid"]


class ReverseSigmoid(PolicyStep):
    """Reverse-sigmoid perturbation of Lee et al. (2019), "Defending Against NN Model
    Stealing Attacks Using Deceptive Perturbations" (IEEE S&P Workshops).

    Eq. (3) of the paper defines the perturbation of a probability ``y``::

        r(y) = beta * (sigmoid(gamma * logit(y)) - 1/2),   logit(y) = log(y / (1 - y))

    and the served vector is ``alpha * (y - r(y))`` with ``alpha`` normalising each
    row to sum 1 (values clipped to [0, 1] first). ``beta`` (>= 0) scales the
    perturbation, ``gamma`` (> 0) its slope; the top-1 label is usually preserved
    but, as in the paper, not guaranteed for large ``beta``.
    """

    name: Literal["reverse_sigmoid"] = "reverse_sigmoid"
    beta: float = Field(default=1.0, ge=0.0)
    gamma: float = Field(default=0.1, gt=0.0)

    transforms: ClassVar[bool] = True

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        y = np.clip(p.astype(np.float64), 1e-9, 1.0 - 1e-9)
        logit = np.log(y) - np.log1p(-y)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        perturbed = np.clip(y - r, 0.0, 1.0)
        return renormalise(perturbed).astype(p.dtype)
