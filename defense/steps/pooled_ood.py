"""The ``pooled_ood`` step: the OOD share of all the traffic to a model, over a sliding window."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from defense.pooled_ood import PooledOodDetector
from defense.steps.base import DetectorInput, PooledDetectorStep
from defense.steps.ood_rate import check_ood_score, ood_score_input, ood_threshold

__all__ = ["PooledOodStep"]


class PooledOodStep(PooledDetectorStep):
    """Turn on the pooled OOD detector of the model; see :mod:`defense.pooled_ood`.

    One detector per model sees the queries of every key whose policy holds the step
    (set it in the model's policy so every key shares it, with the same parameters).
    ``score``, ``tau``, ``encoder``, ``statistics``, ``honest_rate``: as ``ood_rate``.
    ``window``: the pool's last queries tested; ``alpha``: the pool test's level per look;
    ``min_queries``: queries in the window before the first test; ``attribution_alpha``:
    the level of each key's own test while the pool's alarm holds; ``block``: refuse a key
    once flagged.
    """

    name: Literal["pooled_ood"] = "pooled_ood"
    score: Literal["msp", "mahalanobis"] = "msp"
    tau: float | None = Field(default=None, gt=0.0)
    encoder: Path | None = None
    statistics: Path | None = None
    window: int = Field(default=2048, ge=1, le=1_000_000)
    honest_rate: float = Field(default=0.01, gt=0.0, lt=1.0)
    alpha: float = Field(default=1e-6, gt=0.0, lt=1.0)
    min_queries: int = Field(default=256, ge=1)
    attribution_alpha: float = Field(default=1e-3, gt=0.0, lt=1.0)
    block: bool = False

    checkpoints_have_classes: ClassVar[bool] = False
    example: ClassVar[dict[str, Any]] = {"tau": 0.5}

    @model_validator(mode="after")
    def _check_settings(self) -> PooledOodStep:
        check_ood_score(self.score, self.tau, self.encoder, self.statistics)
        if self.min_queries > self.window:
            raise ValueError(f"min_queries {self.min_queries} exceeds the window of {self.window} queries")
        return self

    def checkpoints(self) -> list[Path]:
        return [] if self.encoder is None else [self.encoder]

    def observes(self) -> DetectorInput:
        return ood_score_input(self.score, self.encoder, self.statistics)

    def threshold(self) -> float:
        """``tau``, or the one stored in the Mahalanobis statistics."""
        return ood_threshold(self.tau, self.statistics)

    def _settings(self) -> tuple[float, float, float, int, int, float]:
        return (self.threshold(), self.honest_rate, self.alpha, self.min_queries, self.window,
                self.attribution_alpha)

    def new_detector(self) -> PooledOodDetector:
        return PooledOodDetector(*self._settings(), score=self.score)

    def load_detector(self, data: bytes) -> PooledOodDetector:
        return PooledOodDetector.from_bytes(data, *self._settings(), score=self.score)
