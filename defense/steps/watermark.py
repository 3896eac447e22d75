"""The ``watermark`` step: DAWN's per-key watermark labels, recorded for verification."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from defense import watermark
from defense.steps.base import ContextStep, PolicyContext, WatermarkMarks
from stealsim.errors import ConfigError

__all__ = ["Watermark"]


class Watermark(ContextStep):
    """DAWN of Szyller et al. (ACM MM 2021); see :mod:`defense.watermark`.

    ``fraction``: the share of each key's distinct inputs answered with a watermark
    label; ``mode``: ``swap`` (the top probability moves to the watermark label) or
    ``one_hot``. The server keeps the marked queries per key for
    ``stealsim verify-watermark``; the hash's secret is the server's ``watermark_secret``.
    """

    name: Literal["watermark"] = "watermark"
    fraction: float = Field(default=0.02, gt=0.0, le=0.5)
    mode: watermark.WatermarkMode = "swap"

    at_most_one: ClassVar[bool] = True
    needs_watermark_secret: ClassVar[bool] = True

    def select(self, p: np.ndarray, context: PolicyContext) -> tuple[np.ndarray, np.ndarray]:
        """Which rows to mark (bool ``[N]``) and each row's watermark label (int64 ``[N]``)."""
        if context.watermark_secret is None:
            raise ConfigError("the watermark step needs the server's watermark_secret")
        return watermark.select(context.watermark_secret, context.key_id, context.images,
                                p.argmax(axis=1), self.fraction, p.shape[1])

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        marked, labels = self.select(p, context)
        return watermark.mark(p, marked, labels, self.mode)

    def serve(
        self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext | None,
    ) -> tuple[np.ndarray, WatermarkMarks | None]:
        if context is None:
            return super().serve(p, rng, context)  # refused: no context
        marked, labels = self.select(p, context)
        rows = np.flatnonzero(marked)
        marks = WatermarkMarks(rows, labels[rows], p[rows].argmax(axis=1).astype(np.int64))
        return watermark.mark(p, marked, labels, self.mode), marks
