"""The output-policy steps: one module per step, one registry entry each.

::

    step = step_class("top_k")(k=3)
    steps = STEP_LIST.validate_python([{"name": "top_k", "k": 3}, {"name": "prada"}])

:data:`STEPS` is the one list of steps: the policy's discriminated union
(:data:`STEP_LIST`), the names its error messages offer and its validation rules
(the hooks of :class:`~defense.steps.base.PolicyStep`) all come from it. A new
step is a module here plus its entry below; ``tests/test_defense_steps.py``
checks every entry against the contract.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any, get_args

from pydantic import Field, TypeAdapter

from defense.steps.account_keyed import AccountKeyed
from defense.steps.adaptive_misinformation import AdaptiveMisinformation
from defense.steps.base import (
    ContextStep,
    Detector,
    DetectorInput,
    DetectorInputKind,
    DetectorStep,
    OutputKind,
    PolicyContext,
    PolicyStep,
    PooledDetector,
    PooledDetectorStep,
    WatermarkMarks,
)
from defense.steps.gaussian_noise import GaussianNoise
from defense.steps.label_only import LabelOnly
from defense.steps.ood_rate import OodRateStep
from defense.steps.pooled_ood import PooledOodStep
from defense.steps.prada import PradaStep
from defense.steps.prediction_poisoning import PredictionPoisoning
from defense.steps.probabilities import Probabilities
from defense.steps.reverse_sigmoid import ReverseSigmoid
from defense.steps.round import Round
from defense.steps.seat import SeatStep
from defense.steps.top_k import TopK
from defense.steps.watermark import Watermark
from stealsim.errors import ConfigError

__all__ = [
    "STEPS",
    "STEP_LIST",
    "AccountKeyed",
    "AdaptiveMisinformation",
    "ContextStep",
    "Detector",
    "DetectorInput",
    "DetectorInputKind",
    "DetectorStep",
    "GaussianNoise",
    "LabelOnly",
    "OodRateStep",
    "OutputKind",
    "PolicyContext",
    "PolicyStep",
    "PooledDetector",
    "PooledDetectorStep",
    "PooledOodStep",
    "PradaStep",
    "PredictionPoisoning",
    "Probabilities",
    "ReverseSigmoid",
    "Round",
    "SeatStep",
    "TopK",
    "Watermark",
    "WatermarkMarks",
    "step_class",
]


def _registry(*classes: type[PolicyStep]) -> dict[str, type[PolicyStep]]:
    """Steps by name, each checked to be tagged by its own ``name: Literal[...]`` field."""
    registry: dict[str, type[PolicyStep]] = {}
    for cls in classes:
        name = cls.step_name()
        if get_args(cls.model_fields["name"].annotation) != (name,):
            raise TypeError(f"{cls.__name__}.name must be Literal[{name!r}] = {name!r}")
        if name in registry:
            raise TypeError(f"two policy steps named {name!r}: {registry[name].__name__}, {cls.__name__}")
        registry[name] = cls
    return registry


STEPS: dict[str, type[PolicyStep]] = _registry(
    Probabilities, TopK, LabelOnly, Round, GaussianNoise, ReverseSigmoid, PredictionPoisoning,
    AdaptiveMisinformation, Watermark, AccountKeyed, PradaStep, SeatStep, OodRateStep, PooledOodStep,
)
"""Every policy step by name, in the order the union tries them."""

_STEP_UNION: Any = Annotated[functools.reduce(operator.or_, STEPS.values()), Field(discriminator="name")]
STEP_LIST: TypeAdapter[list[PolicyStep]] = TypeAdapter(list[_STEP_UNION])
"""Validates a list of ``{"name": ..., **parameters}`` into steps (pydantic's errors)."""


def step_class(name: str) -> type[PolicyStep]:
    try:
        return STEPS[name]
    except KeyError:
        raise ConfigError(f"unknown policy step {name!r}; choose one of {sorted(STEPS)}") from None
