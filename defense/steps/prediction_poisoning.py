"""The ``prediction_poisoning`` step: MAD, the defender's perturbation against the thief's gradient."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from defense import poisoning
from defense.steps.base import ContextStep, PolicyContext

__all__ = ["PredictionPoisoning"]


class PredictionPoisoning(ContextStep):
    """MAD of Orekondy et al. (ICLR 2020, Eq. 5); see :mod:`defense.poisoning`.

    ``epsilon``: the largest ``||ỹ - y||`` in ``norm`` (L1: at most 2); ``objective``:
    ``angular`` (the paper's Eq. 5, needs ``proxy``) or ``gradient_distance`` (the
    authors' code's default); ``oracle``: ``argmax`` (MAD-argmax, keeps every top-1
    label) or ``extreme`` (MAD); ``proxy``: the defender's stand-in for the thief's
    model, a checkpoint directory (a randomly initialised one, as Kariyappa and
    Qureshi's comparison uses, is ``stealsim train --objective none``).
    """

    name: Literal["prediction_poisoning"] = "prediction_poisoning"
    epsilon: float = Field(default=0.5, ge=0.0, le=2.0)
    norm: Literal["l1", "l2"] = "l1"
    objective: poisoning.MadObjective = "angular"
    oracle: poisoning.MadOracle = "argmax"
    proxy: Path | None = None

    example: ClassVar[dict[str, Any]] = {"objective": "gradient_distance"}

    @model_validator(mode="after")
    def _needs_proxy(self) -> PredictionPoisoning:
        if self.objective == "angular" and self.proxy is None:
            raise ValueError("objective 'angular' needs a proxy checkpoint (proxy: DIR), "
                             "or use objective 'gradient_distance'")
        return self

    def checkpoints(self) -> list[Path]:
        return [] if self.proxy is None else [self.proxy]

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        proxy = None if self.proxy is None else context.defender_probabilities(self.proxy, context.images)
        return poisoning.mad_perturb(p, proxy, self.epsilon, self.norm, self.objective, self.oracle)
