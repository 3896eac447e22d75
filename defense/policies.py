"""API-level output policies: what a caller sees of a model's probabilities.

A policy is a list of steps applied in order, set per model and overridable per
API key (docs/api.md, "Output policies")::

    policy = parse_policy([{"name": "top_k", "k": 3}, {"name": "round", "decimals": 2}])
    answer = policy.apply(probabilities, rng)    # answer.kind == "probabilities"

Every step is a small frozen pydantic model with a pure ``apply(p, rng) -> p``
on float arrays ``[N, K]`` (rows summing to 1). ``label_only`` ends a policy: its
answer is the arg-max label per row. ``prada`` is not a transform but configures
the per-key query-pattern detector (:mod:`defense.prada`); it leaves outputs alone,
and so do ``seat`` (:mod:`defense.seat`) and ``ood_rate`` (:mod:`defense.ood_rate`).

Steps that need more than the probabilities (the defender's own models, the
queried images, the key) implement ``apply_with(p, rng, context)`` and get a
:class:`PolicyContext` from the service: ``prediction_poisoning``
(:mod:`defense.poisoning`), ``adaptive_misinformation``
(:mod:`defense.misinformation`) and ``watermark`` (:mod:`defense.watermark`),
whose marked rows come back in :attr:`PolicyAnswer.marks` for the server's record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from defense import misinformation, poisoning, watermark
from defense.mahalanobis import FeatureGaussian
from defense.ood_rate import OodRateDetector
from defense.prada import PradaDetector
from defense.seat import SeatDetector
from stealsim.errors import ConfigError

__all__ = [
    "AdaptiveMisinformation",
    "GaussianNoise",
    "LabelOnly",
    "OodRateStep",
    "OutputKind",
    "OutputPolicy",
    "PolicyAnswer",
    "PolicyContext",
    "PolicyStep",
    "PradaStep",
    "PredictionPoisoning",
    "Probabilities",
    "ReverseSigmoid",
    "Round",
    "SeatStep",
    "TopK",
    "Watermark",
    "WatermarkMarks",
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

    def checkpoints(self) -> list[Path]:
        """The defender's checkpoints this step loads (checked when the policy is set)."""
        return []


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


@dataclass(frozen=True)
class PolicyContext:
    """What the service gives the steps that need more than the probabilities."""

    images: np.ndarray
    """The queried images ``[N, C, H, W]`` in [0, 1]."""
    key_id: str
    watermark_secret: bytes | None
    defender_probabilities: Callable[[Path, np.ndarray], np.ndarray]
    """Softmax ``[N, K]`` of a defender's checkpoint (loaded once) on images."""


@dataclass(frozen=True)
class WatermarkMarks:
    """The rows a ``watermark`` step marked in one answer."""

    rows: np.ndarray  # int64 [M]
    labels: np.ndarray  # int64 [M]: the watermark labels served
    victim_labels: np.ndarray  # int64 [M]: the labels the steps before the watermark gave


class _ContextStep(_Step):
    name: str

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise ConfigError(f"policy step {self.name!r} needs the service's context (images, key)")

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        raise NotImplementedError


class PredictionPoisoning(_ContextStep):
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


class AdaptiveMisinformation(_ContextStep):
    """Kariyappa and Qureshi (CVPR 2020, Eq. 4-5); see :mod:`defense.misinformation`.

    ``model``: the misinformation model's checkpoint (``stealsim train --objective
    misinformation``); ``tau``: the maximum-softmax-probability threshold below which
    answers turn to misinformation; ``nu``: the sigmoid's sharpness (authors: 10000).
    """

    name: Literal["adaptive_misinformation"] = "adaptive_misinformation"
    model: Path
    tau: float = Field(default=0.9, ge=0.0, le=1.0)
    nu: float = Field(default=10000.0, gt=0.0)

    def checkpoints(self) -> list[Path]:
        return [self.model]

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        wrong = context.defender_probabilities(self.model, context.images)
        return misinformation.misinform(p, wrong, self.tau, self.nu)


class Watermark(_ContextStep):
    """DAWN of Szyller et al. (ACM MM 2021); see :mod:`defense.watermark`.

    ``fraction``: the share of each key's distinct inputs answered with a watermark
    label; ``mode``: ``swap`` (the top probability moves to the watermark label) or
    ``one_hot``. The server keeps the marked queries per key for
    ``stealsim verify-watermark``; the hash's secret is the server's ``watermark_secret``.
    """

    name: Literal["watermark"] = "watermark"
    fraction: float = Field(default=0.02, gt=0.0, le=0.5)
    mode: watermark.WatermarkMode = "swap"

    def select(self, p: np.ndarray, context: PolicyContext) -> tuple[np.ndarray, np.ndarray]:
        if context.watermark_secret is None:
            raise ConfigError("the watermark step needs the server's watermark_secret")
        return watermark.select(context.watermark_secret, context.key_id, context.images,
                                p.argmax(axis=1), self.fraction, p.shape[1])

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        marked, labels = self.select(p, context)
        return watermark.mark(p, marked, labels, self.mode)


class PradaStep(_Step):
    """Turn on the PRADA detector (Juuti et al., 2019) for the key; see :mod:`defense.prada`.

    ``delta``: Shapiro-Wilk threshold (flag when W < delta); ``min_queries``: distances
    needed before testing; ``block``: refuse the key's requests once flagged.
    """

    name: Literal["prada"] = "prada"
    delta: float = Field(default=0.95, gt=0.0, lt=1.0)
    min_queries: int = Field(default=100, ge=3)
    block: bool = False

    def new_detector(self) -> PradaDetector:
        return PradaDetector(self.delta, self.min_queries)

    def load_detector(self, data: bytes) -> PradaDetector:
        return PradaDetector.from_bytes(data, self.delta, self.min_queries)


class SeatStep(_Step):
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

    def checkpoints(self) -> list[Path]:
        return [] if self.encoder == "pixels" else [Path(self.encoder)]

    def new_detector(self) -> SeatDetector:
        return SeatDetector(self.threshold, self.max_pairs, self.history)

    def load_detector(self, data: bytes) -> SeatDetector:
        return SeatDetector.from_bytes(data, self.threshold, self.max_pairs, self.history)


class OodRateStep(_Step):
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

    @model_validator(mode="after")
    def _score_settings(self) -> OodRateStep:
        if self.score == "msp":
            if self.tau is None or self.tau > 1:
                raise ValueError("score msp needs tau, a maximum softmax probability in (0, 1]")
            if self.encoder is not None or self.statistics is not None:
                raise ValueError("encoder and statistics belong to score mahalanobis")
        elif self.encoder is None or self.statistics is None:
            raise ValueError("score mahalanobis needs encoder (a checkpoint) and statistics "
                             "(its `stealsim ood-fit` file)")
        return self

    def checkpoints(self) -> list[Path]:
        return [] if self.encoder is None else [self.encoder]

    def threshold(self) -> float:
        if self.tau is not None:
            return self.tau
        assert self.statistics is not None
        return _statistics_tau(str(Path(self.statistics).resolve()))

    def new_detector(self) -> OodRateDetector:
        return OodRateDetector(self.threshold(), self.honest_rate, self.alpha, self.min_queries, self.score)

    def load_detector(self, data: bytes) -> OodRateDetector:
        return OodRateDetector.from_bytes(data, self.threshold(), self.honest_rate, self.alpha,
                                          self.min_queries, self.score)


@functools.lru_cache(maxsize=64)
def _statistics_tau(path: str) -> float:
    """The ``tau`` stored in OOD statistics (read once per path)."""
    return FeatureGaussian.load(Path(path)).tau


PolicyStep = Annotated[
    Probabilities | TopK | LabelOnly | Round | GaussianNoise | ReverseSigmoid | PredictionPoisoning
    | AdaptiveMisinformation | Watermark | PradaStep | SeatStep | OodRateStep,
    Field(discriminator="name"),
]
_STEPS: TypeAdapter[list[PolicyStep]] = TypeAdapter(list[PolicyStep])


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

    steps: tuple[_Step, ...] = ()

    @property
    def output_kind(self) -> OutputKind:
        return "label" if any(isinstance(s, LabelOnly) for s in self.steps) else "probabilities"

    @property
    def prada(self) -> PradaStep | None:
        return next((s for s in self.steps if isinstance(s, PradaStep)), None)

    @property
    def detectors(self) -> list[PradaStep | SeatStep | OodRateStep]:
        """The per-key detectors this policy turns on."""
        return [s for s in self.steps if isinstance(s, (PradaStep, SeatStep, OodRateStep))]

    @property
    def needs_context(self) -> bool:
        return any(isinstance(s, _ContextStep) for s in self.steps)

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
            if isinstance(step, LabelOnly):
                return PolicyAnswer("label", np.argmax(p, axis=1).astype(np.int64), marks)
            if isinstance(step, _ContextStep):
                if context is None:
                    raise ConfigError(f"policy step {step.name!r} needs the service's context (images, key)")
                if isinstance(step, Watermark):
                    marked, labels = step.select(p, context)
                    rows = np.flatnonzero(marked)
                    marks = WatermarkMarks(rows, labels[rows], p[rows].argmax(axis=1).astype(np.int64))
                    p = watermark.mark(p, marked, labels, step.mode)
                else:
                    p = step.apply_with(p, rng, context)
            else:
                p = step.apply(p, rng)
        return PolicyAnswer("probabilities", np.ascontiguousarray(p, dtype=np.float32), marks)


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
                        "reverse_sigmoid", "prediction_poisoning", "adaptive_misinformation",
                        "watermark", "prada", "seat", "ood_rate"))
        raise ConfigError(f"invalid output policy {list(spec)!r} (steps: {names}): {exc}") from exc
    seen_label = False
    for step in steps:
        if seen_label and not isinstance(step, (PradaStep, SeatStep, OodRateStep, LabelOnly)):
            raise ConfigError(f"policy step {step.name!r} cannot follow 'label_only'")
        seen_label = seen_label or isinstance(step, LabelOnly)
    for kind in (PradaStep, SeatStep, OodRateStep, Watermark):
        if sum(isinstance(step, kind) for step in steps) > 1:
            raise ConfigError(f"a policy may hold at most one {kind.model_fields['name'].default!r} step")
    return OutputPolicy(tuple(steps))
