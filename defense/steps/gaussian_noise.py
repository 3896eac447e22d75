"""The ``gaussian_noise`` step: a renormalised Gaussian perturbation of the probabilities."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from defense.steps.base import PolicyStep, renormalise

__all__ = ["GaussianNoise"]


class GaussianNoise(PolicyStep):
    """Add N(0, std²) to every probability, clip at 0, renormalise each row."""

    name: Literal["gaussian_noise"] = "gaussian_noise"
    std: float = Field(default=0.01, ge=0.0)

    transforms: ClassVar[bool] = True

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = p + rng.normal(0.0, self.std, size=p.shape).astype(p.dtype)
        return renormalise(np.clip(noisy, 0.0, None))
