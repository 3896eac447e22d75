"""API-level output policies: what a caller sees of a model's probabilities.

A policy is a list of steps applied in order, set per model and overridable per
API key (docs/api.md, "Output policies")::

    policy = parse_policy([{"name": "top_k", "k": 3}, {"name": "round", "decimals": 2}])
    answer = policy.apply(probabilities, rng)    # answer.kind == "probabilities"

The steps live in :mod:`defense.steps`, one module each, registered in
:data:`defense.steps.STEPS`; each says through its hooks what it does, so this
module never asks which step it holds. Every step is a small frozen pydantic model
with a pure ``apply(p, rng) -> p`` on float arrays ``[N, K]`` (rows summing to 1).
``label_only`` ends a policy: its answer is the arg-max label per row. The
detectors ``prada`` (:mod:`defense.prada`), ``seat`` (:mod:`defense.seat`) and
``ood_rate`` (:mod:`defense.ood_rate`) are not transforms but turn on per-key
query detectors; they leave outputs alone.

Steps that need more than the probabilities (the defender's own models, the
queried images, the key) implement ``apply_with(p, rng, context)`` and get a
:class:`PolicyContext` from the service: ``prediction_poisoning``
(:mod:`defense.poisoning`), ``adaptive_misinformation``
(:mod:`defense.misinformation`) and ``watermark`` (:mod:`defense.watermark`),
whose marked rows come back in :attr:`PolicyAnswer.marks` for the server's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from defense.steps import (
    STEP_LIST,
    STEPS,
    DetectorStep,
    OutputKind,
    PolicyContext,
    PolicyStep,
    WatermarkMarks,
)
from stealsim.errors import ConfigError

__all__ = ["OutputPolicy", "PolicyAnswer", "PolicyContext", "parse_policy"]


@dataclass(frozen=True)
class PolicyAnswer:
    """What a policy serves: ``probabilities`` float32 ``[N, K]`` or ``label`` int64 ``[N]``."""

    kind: OutputKind
    values: np.ndarray
    marks: WatermarkMarks | None = None
    """The rows a ``watermark`` step marked (None without one)."""


@dataclass(frozen=True)
class OutputPolicy:
    """An ordered list of steps; :meth:`describe` is what the audit log records."""

    steps: tuple[PolicyStep, ...] = ()

    @property
    def output_kind(self) -> OutputKind:
        return "label" if any(s.output_kind == "label" for s in self.steps) else "probabilities"

    @property
    def detectors(self) -> list[DetectorStep]:
        """The per-key detectors this policy turns on."""
        return [s for s in self.steps if isinstance(s, DetectorStep)]

    @property
    def needs_context(self) -> bool:
        return any(s.needs_context for s in self.steps)

    @property
    def needs_watermark_secret(self) -> bool:
        return any(s.needs_watermark_secret for s in self.steps)

    def checkpoints(self) -> list[Path]:
        """Every defender checkpoint the steps load (proxies, misinformation models, encoders)."""
        return [path for step in self.steps for path in step.checkpoints()]

    def describe(self) -> list[dict[str, Any]]:
        return [step.model_dump(mode="json") for step in self.steps]

    def apply(self, probabilities: np.ndarray, rng: np.random.Generator,
              context: PolicyContext | None = None) -> PolicyAnswer:
        """Apply every step in order to ``probabilities`` ``[N, K]``; never modifies its input."""
        p = probabilities
        marks: WatermarkMarks | None = None
        for step in self.steps:
            if step.output_kind == "label":
                return PolicyAnswer("label", np.argmax(p, axis=1).astype(np.int64), marks)
            p, step_marks = step.serve(p, rng, context)
            marks = step_marks if step_marks is not None else marks
        return PolicyAnswer("probabilities", np.ascontiguousarray(p, dtype=np.float32), marks)


def parse_policy(spec: Sequence[dict[str, Any]] | None) -> OutputPolicy:
    """Validate a policy given as a list of ``{"name": ..., **parameters}``.

    Raises:
        ConfigError: an unknown step, a bad parameter, a transform after ``label_only``,
            or two steps of a kind a policy may hold once.
    """
    if spec is None:
        return OutputPolicy()
    try:
        steps = STEP_LIST.validate_python(list(spec))
    except ValidationError as exc:
        raise ConfigError(f"invalid output policy {list(spec)!r} (steps: {sorted(STEPS)}): {exc}") from exc
    seen_label = False
    for step in steps:
        if seen_label and not step.may_follow_label_only:
            raise ConfigError(f"policy step {step.name!r} cannot follow 'label_only'")
        seen_label = seen_label or step.output_kind == "label"
    for name, cls in STEPS.items():
        if cls.at_most_one and sum(step.name == name for step in steps) > 1:
            raise ConfigError(f"a policy may hold at most one {name!r} step")
    return OutputPolicy(tuple(steps))
