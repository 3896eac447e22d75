"""The ``ood_rate`` step: a per-key binomial test of the share of out-of-distribution queries."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from defense.mahalanobis import FeatureGaussian
from defense.ood_rate import OodRateDetector
from defense.steps.base import DetectorInput, DetectorStep

__all__ = ["OodRateStep", "check_ood_score", "ood_score_input", "ood_threshold"]


class OodRateStep(DetectorStep):
    """Turn on the per-account OOD-rate detector; see :mod:`defense.ood_rate`.

    ``score``: ``msp`` (the served model's maximum softmax probability; a query under
    ``tau`` is out-of-distribution) or ``mahalanobis`` (the distance in ``encoder``'s
    penultimate features to the nearest class, with the ``statistics`` that
    ``stealsim ood-fit`` wrote for it; a query over ``tau`` is out-of-distribution;
    ``tau`` defaults to the statistics' own). ``tau``: choose it on validation images;
    ``honest_rate``: the share of natural images past ``tau`` the test allows;
    ``alpha``: the binomial test's level per look; ``min_queries``: queries before the
    first test; ``block``: refuse the key once flagged.
    """

    name: Literal["ood_rate"] = "ood_rate"
    score: Literal["msp", "mahalanobis"] = "msp"
    tau: float | None = Field(default=None, gt=0.0)
    encoder: Path | None = None
    statistics: Path | None = None
    honest_rate: float = Field(default=0.01, gt=0.0, lt=1.0)
    alpha: float = Field(default=1e-6, gt=0.0, lt=1.0)
    min_queries: int = Field(default=64, ge=1)
    block: bool = False

    checkpoints_have_classes: ClassVar[bool] = False
    example: ClassVar[dict[str, Any]] = {"tau": 0.5}

    @model_validator(mode="after")
    def _score_settings(self) -> OodRateStep:
        check_ood_score(self.score, self.tau, self.encoder, self.statistics)
        return self

    def checkpoints(self) -> list[Path]:
        return [] if self.encoder is None else [self.encoder]

    def observes(self) -> DetectorInput:
        return ood_score_input(self.score, self.encoder, self.statistics)

    def threshold(self) -> float:
        """``tau``, or the one stored in the Mahalanobis statistics."""
        return ood_threshold(self.tau, self.statistics)

    def new_detector(self) -> OodRateDetector:
        return OodRateDetector(self.threshold(), self.honest_rate, self.alpha, self.min_queries, self.score)

    def load_detector(self, data: bytes) -> OodRateDetector:
        return OodRateDetector.from_bytes(data, self.threshold(), self.honest_rate, self.alpha,
                                          self.min_queries, self.score)


def check_ood_score(score: str, tau: float | None, encoder: Path | None, statistics: Path | None) -> None:
    """The OOD score's settings (``ood_rate``, ``pooled_ood``): ValueError naming what is missing or misplaced."""
    if score == "msp":
        if tau is None or tau > 1:
            raise ValueError("score msp needs tau, a maximum softmax probability in (0, 1]")
        if encoder is not None or statistics is not None:
            raise ValueError("encoder and statistics belong to score mahalanobis")
    elif encoder is None or statistics is None:
        raise ValueError("score mahalanobis needs encoder (a checkpoint) and statistics "
                         "(its `stealsim ood-fit` file)")


def ood_score_input(score: str, encoder: Path | None, statistics: Path | None) -> DetectorInput:
    """What an OOD score observes: the served model's own answer (``msp``), or Mahalanobis distances."""
    if score == "msp":
        return DetectorInput("probabilities")  # the served model's own answer, before the policy
    return DetectorInput("mahalanobis", encoder=encoder, statistics=statistics)


def ood_threshold(tau: float | None, statistics: Path | None) -> float:
    """``tau``, or the one stored in the Mahalanobis statistics."""
    if tau is not None:
        return tau
    assert statistics is not None
    return _statistics_tau(str(Path(statistics).resolve()))


@functools.lru_cache(maxsize=64)
def _statistics_tau(path: str) -> float:
    """The ``tau`` stored in OOD statistics (read once per path)."""
    return FeatureGaussian.load(Path(path)).tau
