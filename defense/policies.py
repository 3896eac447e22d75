"""API-level output policies: what a caller sees of a model's probabilities.

A policy is a list of steps applied in order, set per model and overridable per
API key (docs/api.md, "Output policies")::

    policy = parse_policy([{"name": "top_k", "k": 3}, {"name": "round", "decimals": 2}])
    answer = policy.apply(probabilities, rng)    # answer.kind == "probabilities"

Every step is a small frozen pydantic model with a pure ``apply(p, rng) -> p``
on float arrays ``[N, K]`` (rows summing to 1). ``label_only`` ends a policy: its
answer is the arg-max label per row. ``prada`` is not a transform but configures
the per-key query-pattern detector (:mod:`defense.prada`); it leaves outputs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from stealsim.errors import ConfigError

__all__ = [
    "GaussianNoise",
    "LabelOnly",
    "OutputKind",
    "OutputPolicy",
    "PolicyAnswer",
    "PolicyStep",
    "PradaStep",
    "Probabilities",
    "ReverseSigmoid",
    "Round",
    "TopK",
    "parse_policy",
]

OutputKind = Literal["probabilities", "label"]

_EPS = 1e-12


def _renormalise(p: np.ndarray) -> np.ndarray:
    total = p.sum(axis=1, keepdims=True)
    # A row that lost all its mass (cannot happen for top-k; guards the noise step) becomes uniform.
    uniform = np.full_like(p, 1.0 / p.shape[1])
    return np.where(total > _EPS, p / np.maximum(total, _EPS), uniform)


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return p


class Probabilities(_Step):
    """The full probability vector, unchanged (the default)."""

    name: Literal["probabilities"] = "probabilities"


class TopK(_Step):
    """Keep the ``k`` largest probabilities of each row, zero the rest, renormalise."""

    name: Literal["top_k"] = "top_k"
    k: int = Field(default=1, ge=1)

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.k >= p.shape[1]:
            return p
        # Indices of the K-k smallest per row; ties are broken by position, deterministically.
        drop = np.argpartition(p, p.shape[1] - self.k, axis=1)[:, : p.shape[1] - self.k]
        kept = p.copy()
        np.put_along_axis(kept, drop, 0.0, axis=1)
        return _renormalise(kept)


class LabelOnly(_Step):
    """Only the arg-max label of each row (INT64); must be the last transform of a policy."""

    name: Literal["label_only"] = "label_only"


class Round(_Step):
    """Round every probability to ``decimals`` decimals (rows may no longer sum to exactly 1)."""

    name: Literal["round"] = "round"
    decimals: int = Field(default=2, ge=0, le=8)

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.round(p, self.decimals)


class GaussianNoise(_Step):
    """Add N(0, std²) to every probability, clip at 0, renormalise each row."""

    name: Literal["gaussian_noise"] = "gaussian_noise"
    std: float = Field(default=0.01, ge=0.0)

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = p + rng.normal(0.0, self.std, size=p.shape).astype(p.dtype)
        return _renormalise(np.clip(noisy, 0.0, None))


class ReverseSigmoid(_Step):
    """Reverse-sigmoid perturbation of Lee et al. (2019), "Defending Against NN Model
    Stealing Attacks Using Deceptive Perturbations" (IEEE S&P Workshops).

    Eq. (3) of the paper defines the perturbation of a probability ``y``::

        r(y) = beta * (sigmoid(gamma * logit(y)) - 1/2),   logit(y) = log(y / (1 - y))

    and the served vector is ``alpha * (y - r(y))`` with ``alpha`` normalising each
    row to sum 1 (values clipped to [0, 1] first). ``beta`` (>= 0) scales the
    perturbation, ``gamma`` (> 0) its slope; the top-1 label is usually preserved
    but, as in the paper, not guaranteed for large ``beta``.
    """

    name: Literal["reverse_sigmoid"] = "reverse_sigmoid"
    beta: float = Field(default=1.0, ge=0.0)
    gamma: float = Field(default=0.1, gt=0.0)

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        y = np.clip(p.astype(np.float64), 1e-9, 1.0 - 1e-9)
        logit = np.log(y) - np.log1p(-y)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        perturbed = np.clip(y - r, 0.0, 1.0)
        return _renormalise(perturbed).astype(p.dtype)


class PradaStep(_Step):
    """Turn on the PRADA detector (Juuti et al., 2019) for the key; see :mod:`defense.prada`.

    ``delta``: Shapiro-Wilk threshold (flag when W < delta); ``min_queries``: distances
    needed before testing; ``block``: refuse the key's requests once flagged.
    """

    name: Literal["prada"] = "prada"
    delta: float = Field(default=0.95, gt=0.0, lt=1.0)
    min_queries: int = Field(default=100, ge=3)
    block: bool = False


PolicyStep = Annotated[
    Probabilities | TopK | LabelOnly | Round | GaussianNoise | ReverseSigmoid | PradaStep,
    Field(discriminator="name"),
]
_STEPS: TypeAdapter[list[PolicyStep]] = TypeAdapter(list[PolicyStep])


@dataclass(frozen=True)
class PolicyAnswer:
    """What a policy serves: ``probabilities`` float32 ``[N, K]`` or ``label`` int64 ``[N]``."""

    kind: OutputKind
    values: np.ndarray


@dataclass(frozen=True)
class OutputPolicy:
    """An ordered list of steps; :meth:`describe` is what the audit log records."""

    steps: tuple[_Step, ...] = ()

    @property
    def output_kind(self) -> OutputKind:
        return "label" if any(isinstance(s, LabelOnly) for s in self.steps) else "probabilities"

    @property
    def prada(self) -> PradaStep | None:
        return next((s for s in self.steps if isinstance(s, PradaStep)), None)

    def describe(self) -> list[dict[str, Any]]:
        return [step.model_dump() for step in self.steps]

    def apply(self, probabilities: np.ndarray, rng: np.random.Generator) -> PolicyAnswer:
        """Apply every step in order to ``probabilities`` ``[N, K]``; never modifies its input."""
        p = probabilities
        for step in self.steps:
            if isinstance(step, LabelOnly):
                return PolicyAnswer("label", np.argmax(p, axis=1).astype(np.int64))
            p = step.apply(p, rng)
        return PolicyAnswer("probabilities", np.ascontiguousarray(p, dtype=np.float32))


def parse_policy(spec: Sequence[dict[str, Any]] | None) -> OutputPolicy:
    """Validate a policy given as a list of ``{"name": ..., **parameters}``.

    Raises:
        ConfigError: an unknown step, a bad parameter, or a transform after ``label_only``.
    """
    if spec is None:
        return OutputPolicy()
    try:
        steps = _STEPS.validate_python(list(spec))
    except ValidationError as exc:
        names = sorted(("probabilities", "top_k", "label_only", "round", "gaussian_noise",
                        "reverse_sigmoid", "prada"))
        raise ConfigError(f"invalid output policy {list(spec)!r} (steps: {names}): {exc}") from exc
    seen_label = False
    for step in steps:
        if seen_label and not isinstance(step, (PradaStep, LabelOnly)):
            raise ConfigError(f"policy step {step.name!r} cannot follow 'label_only'")
        seen_label = seen_label or isinstance(step, LabelOnly)
    if sum(isinstance(step, PradaStep) for step in steps) > 1:
        raise ConfigError("a policy may hold at most one 'prada' step")
    return OutputPolicy(tuple(steps))
