"""What every output-policy step is, and the hooks through which a policy and the server use it.

A step is a small frozen pydantic model named by its ``name`` field (a
``Literal``, the tag of the policy's discriminated union). It declares what it
does through class attributes and methods, so neither the policy
(:mod:`defense.policies`) nor the server asks which step it holds:

- :meth:`PolicyStep.apply` — a pure transform of probabilities ``[N, K]``;
  :attr:`PolicyStep.transforms` says whether it changes them at all and
  :attr:`PolicyStep.keeps_row_sums` whether its rows still sum to 1.
- :class:`ContextStep` — a transform that needs the service's context (the
  queried images, the key, the defender's models): :meth:`ContextStep.apply_with`.
- :class:`DetectorStep` — a per-key detector that leaves outputs alone and
  observes a :class:`DetectorInput` of each query (:meth:`PolicyStep.observes`,
  None for every other step); :class:`PooledDetectorStep` — one detector per model
  over the traffic of every key whose policy holds the step.
- :attr:`PolicyStep.output_kind` — ``label`` for a step that ends the policy
  with arg-max labels; :attr:`PolicyStep.may_follow_label_only` and
  :attr:`PolicyStep.at_most_one` are the policy's validation rules.
- :meth:`PolicyStep.checkpoints` — the defender checkpoints the step loads, which
  the server checks when the policy is set.

A new step is one module in :mod:`defense.steps` plus its entry in
:data:`defense.steps.STEPS`; ``tests/test_defense_steps.py`` holds it to this contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict

from stealsim.errors import ConfigError

__all__ = [
    "ContextStep",
    "Detector",
    "DetectorInput",
    "DetectorInputKind",
    "DetectorStep",
    "OutputKind",
    "PolicyContext",
    "PolicyStep",
    "PooledDetector",
    "PooledDetectorStep",
    "WatermarkMarks",
    "renormalise",
]

OutputKind = Literal["probabilities", "label"]

DetectorInputKind = Literal["images", "probabilities", "pixels", "features", "mahalanobis"]
"""What a detector observes of each query:

- ``images``: the queried images ``[N, C, H, W]`` in [0, 1];
- ``probabilities``: the served model's softmax ``[N, K]``, before the policy;
- ``pixels``: the images flattened and scaled by ``1/sqrt(C*H*W)`` (RMS distances);
- ``features``: ``encoder``'s penultimate features ``[N, D]``, L2-normalised per row;
- ``mahalanobis``: each image's Mahalanobis distance ``[N]`` in ``encoder``'s raw
  penultimate features to the nearest class of ``statistics`` (``stealsim ood-fit``).
"""

_EPS = 1e-12


def renormalise(p: np.ndarray) -> np.ndarray:
    """Rows divided by their sums; a row that lost all its mass becomes uniform."""
    total = p.sum(axis=1, keepdims=True)
    # A row that lost all its mass (cannot happen for top-k; guards the noise step) becomes uniform.
    uniform = np.full_like(p, 1.0 / p.shape[1])
    return np.where(total > _EPS, p / np.maximum(total, _EPS), uniform)


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


@dataclass(frozen=True)
class DetectorInput:
    """What a detector observes, with the defender's files that compute it."""

    kind: DetectorInputKind
    encoder: Path | None = None
    """The checkpoint whose penultimate features ``features`` and ``mahalanobis`` use."""
    statistics: Path | None = None
    """The ``stealsim ood-fit`` statistics ``mahalanobis`` measures against."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(DetectorInputKind):
            raise ValueError(f"unknown detector input {self.kind!r}; choose one of {get_args(DetectorInputKind)}")
        if (self.encoder is None) == (self.kind in ("features", "mahalanobis")):
            raise ValueError(f"detector input {self.kind!r}: an encoder goes with features and mahalanobis only")
        if (self.statistics is None) == (self.kind == "mahalanobis"):
            raise ValueError(f"detector input {self.kind!r}: statistics go with mahalanobis only")


class Detector(Protocol):
    """A per-key detector's state: what it has seen and whether it flags the key."""

    @property
    def flagged(self) -> bool: ...

    def observe(self, inputs: np.ndarray, labels: np.ndarray) -> Any: ...

    def to_bytes(self) -> bytes: ...


class PooledDetector(Protocol):
    """A detector of every key's traffic to one model: ``observe`` also takes the request's key."""

    @property
    def flagged(self) -> bool:
        """Whether the pool's alarm holds."""

    def observe(self, inputs: np.ndarray, labels: np.ndarray, key_id: str = "") -> Any:
        """Feed one request of ``key_id``. The verdict's ``flagged`` says whether that key is
        flagged; its ``newly_flagged`` (a tuple of key ids) names every key the request's look
        flags first, which the server flags too."""

    def to_bytes(self) -> bytes: ...


class PolicyStep(BaseModel):
    """One step of an output policy (see the module docstring for its hooks).

    Subclasses set ``name: Literal["..."] = "..."``, their parameters as fields with
    defaults, and override the class attributes below where they differ.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str

    transforms: ClassVar[bool] = False
    """Whether the step changes the probabilities it is given (False: ``apply`` is the identity)."""
    keeps_row_sums: ClassVar[bool] = True
    """Whether every row it serves still sums to 1 (up to float error)."""
    output_kind: ClassVar[OutputKind] = "probabilities"
    """``label``: the policy ends here and serves each row's arg-max label."""
    needs_context: ClassVar[bool] = False
    """Whether it needs the service's :class:`PolicyContext` (images, key, defender models)."""
    may_follow_label_only: ClassVar[bool] = False
    """Whether it may come after ``label_only`` (detectors may: they leave outputs alone)."""
    at_most_one: ClassVar[bool] = False
    """Whether a policy may hold at most one step of this name (one state per key)."""
    checkpoints_have_classes: ClassVar[bool] = True
    """Whether its defender checkpoints must answer with the served model's classes
    (False for encoders, whose features are all the step uses)."""
    needs_watermark_secret: ClassVar[bool] = False
    """Whether the server must hold a ``watermark_secret`` to run it."""
    example: ClassVar[dict[str, Any]] = {}
    """The fewest parameters beside ``name`` that make a valid step (the contract test builds it)."""

    @classmethod
    def step_name(cls) -> str:
        """The step's name in a policy (its ``name`` field's default)."""
        default = cls.model_fields["name"].default
        if not isinstance(default, str):
            raise TypeError(f"{cls.__name__} needs name: Literal['...'] = '...'")
        return default

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The probabilities ``[N, K]`` this step serves for ``p``; never modifies ``p``."""
        return p

    def serve(
        self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext | None,
    ) -> tuple[np.ndarray, WatermarkMarks | None]:
        """What the step makes of ``p`` inside a policy: new probabilities, and any rows it marked."""
        return self.apply(p, rng), None

    def checkpoints(self) -> list[Path]:
        """The defender's checkpoints this step loads (checked when the policy is set)."""
        return []

    def observes(self) -> DetectorInput | None:
        """What a detector step observes of each query; None for the steps that are no detector."""
        return None


class ContextStep(PolicyStep):
    """A transform that needs the service's context: implement :meth:`apply_with`."""

    transforms: ClassVar[bool] = True
    needs_context: ClassVar[bool] = True

    def apply(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise ConfigError(f"policy step {self.name!r} needs the service's context (images, key)")

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        raise NotImplementedError

    def serve(
        self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext | None,
    ) -> tuple[np.ndarray, WatermarkMarks | None]:
        if context is None:
            raise ConfigError(f"policy step {self.name!r} needs the service's context (images, key)")
        return self.apply_with(p, rng, context), None


class DetectorStep(PolicyStep):
    """A per-key query detector: it leaves outputs alone and says what it observes.

    The server feeds each query's :meth:`observes` input and the served model's
    arg-max labels to the key's detector (:meth:`new_detector`, or
    :meth:`load_detector` from the bytes of its state); once it flags, the key is
    flagged under the step's name and, with ``block``, refused.
    """

    may_follow_label_only: ClassVar[bool] = True
    at_most_one: ClassVar[bool] = True

    if TYPE_CHECKING:  # a field of every detector, declared there to keep its place after the settings
        block: bool

    def observes(self) -> DetectorInput:
        raise NotImplementedError

    def new_detector(self) -> Detector:
        raise NotImplementedError

    def load_detector(self, data: bytes) -> Detector:
        raise NotImplementedError


class PooledDetectorStep(DetectorStep):
    """A detector over ALL the traffic to a model: one state per (step, model), shared by every
    key whose policy holds the step (``DetectorStates.observe_pooled``). Its verdict's ``flagged``
    is the request's key's, and ``newly_flagged`` names every key the request's look flags first;
    the server flags each under the step's name, as for a per-key detector.
    """

    def new_detector(self) -> PooledDetector:
        raise NotImplementedError

    def load_detector(self, data: bytes) -> PooledDetector:
        raise NotImplementedError
