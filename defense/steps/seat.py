"""The ``seat`` step: SEAT's per-key count of similar query pairs."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from defense.seat import SeatDetector
from defense.steps.base import DetectorInput, DetectorStep

__all__ = ["SeatStep"]


class SeatStep(DetectorStep):
    """Turn on the SEAT-style similar-pair detector (Zhang et al., AISec 2021); see :mod:`defense.seat`.

    ``threshold``: the encoder distance under which two queries are a similar pair;
    ``max_pairs``: pairs that flag the key; ``history``: encodings kept per key;
    ``encoder``: ``pixels`` (RMS pixel difference) or a checkpoint directory whose
    penultimate features (L2-normalised) encode; ``block``: refuse the key once flagged.
    """

    name: Literal["seat"] = "seat"
    threshold: float = Field(default=0.02, gt=0.0)
    max_pairs: int = Field(default=50, ge=1)
    history: int = Field(default=10_000, ge=1)
    encoder: Literal["pixels"] | Path = "pixels"
    block: bool = False

    checkpoints_have_classes: ClassVar[bool] = False

    def checkpoints(self) -> list[Path]:
        return [] if self.encoder == "pixels" else [Path(self.encoder)]

    def observes(self) -> DetectorInput:
        if self.encoder == "pixels":
            return DetectorInput("pixels")
        return DetectorInput("features", encoder=Path(self.encoder))

    def new_detector(self) -> SeatDetector:
        return SeatDetector(self.threshold, self.max_pairs, self.history)

    def load_detector(self, data: bytes) -> SeatDetector:
        return SeatDetector.from_bytes(data, self.threshold, self.max_pairs, self.history)
