"""The ``top_k`` step: only the ``k`` largest probabilities of each row."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from defense.steps.base import PolicyStep, renormalise

__all__ = ["TopK"]


class TopK(PolicyStep):
    """Keep the ``k`` largest probabilities of each row, zero the rest, renormalise."""

    name: Literal["top_k"] = "top_k"
    k: int = Field(default=1, ge=1)

    transforms: ClassVar[bool] = True

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.k >= p.shape[1]:
            return p
        # Indices of the K-k smallest per row; ties are broken by position, deterministically.
        drop = np.argpartition(p, p.shape[1] - self.k, axis=1)[:, : p.shape[1] - self.k]
        kept = p.copy()
        np.put_along_axis(kept, drop, 0.0, axis=1)
        return renormalise(kept)
