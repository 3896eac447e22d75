"""The ``prada`` step: PRADA's per-key test of the queries' distance distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defense.prada import PradaDetector
from defense.steps.base import DetectorInput, DetectorStep

__all__ = ["PradaStep"]


class PradaStep(DetectorStep):
    """Turn on the PRADA detector (Juuti et al., 2019) for the key; see :mod:`defense.prada`.

    ``delta``: Shapiro-Wilk threshold (flag when W < delta); ``min_queries``: distances
    needed before testing; ``block``: refuse the key's requests once flagged.
    """

    name: Literal["prada"] = "prada"
    delta: float = Field(default=0.95, gt=0.0, lt=1.0)
    min_queries: int = Field(default=100, ge=3)
    block: bool = False

    def observes(self) -> DetectorInput:
        return DetectorInput("images")

    def new_detector(self) -> PradaDetector:
        return PradaDetector(self.delta, self.min_queries)

    def load_detector(self, data: bytes) -> PradaDetector:
        return PradaDetector.from_bytes(data, self.delta, self.min_queries)
