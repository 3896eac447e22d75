"""The ``probabilities`` step: the full probability vector, unchanged (the default policy)."""

from __future__ import annotations

from typing import Literal

from defense.steps.base import PolicyStep

__all__ = ["Probabilities"]


class Probabilities(PolicyStep):
    """The full probability vector, unchanged (the default)."""

    name: Literal["probabilities"] = "probabilities"
