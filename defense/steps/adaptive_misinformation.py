"""The ``adaptive_misinformation`` step: misinformation for queries the victim is unsure of."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from defense import misinformation
from defense.steps.base import ContextStep, PolicyContext

__all__ = ["AdaptiveMisinformation"]


class AdaptiveMisinformation(ContextStep):
    """Kariyappa and Qureshi (CVPR 2020, Eq. 4-5); see :mod:`defense.misinformation`.

    ``model``: the misinformation model's checkpoint (``stealsim train --objective
    misinformation``); ``tau``: the maximum-softmax-probability threshold below which
    answers turn to misinformation; ``nu``: the sigmoid's sharpness (authors: 10000).
    """

    name: Literal["adaptive_misinformation"] = "adaptive_misinformation"
    model: Path
    tau: float = Field(default=0.9, ge=0.0, le=1.0)
    nu: float = Field(default=10000.0, gt=0.0)

    example: ClassVar[dict[str, Any]] = {"model": "runs/misinformation"}

    def checkpoints(self) -> list[Path]:
        return [self.model]

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        wrong = context.defender_probabilities(self.model, context.images)
        return misinformation.misinform(p, wrong, self.tau, self.nu)
