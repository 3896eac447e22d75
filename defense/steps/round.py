"""The ``round`` step: probabilities rounded to a few decimals."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from defense.steps.base import PolicyStep

__all__ = ["Round"]


class Round(PolicyStep):
    """Round every probability to ``decimals`` decimals (rows may no longer sum to exactly 1)."""

    name: Literal["round"] = "round"
    decimals: int = Field(default=2, ge=0, le=8)

    transforms: ClassVar[bool] = True
    keeps_row_sums: ClassVar[bool] = False

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.round(p, self.decimals)
