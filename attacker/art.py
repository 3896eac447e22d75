"""IBM's Adversarial Robustness Toolbox (ART) both ways: our victims as ART classifiers,
and ART's extraction attacks as stealsim attacks.

Needs the optional extra: ``pip install 'stealsim[art]'`` (ART 1.20).

- :func:`art_classifier` turns any :class:`~attacker.victims.Victim` (the HTTP
  client, an in-process checkpoint) into an ART ``BlackBoxClassifier`` whose
  every prediction goes through a :class:`~attacker.victims.BudgetedVictim`: ART
  code never spends more than the budget, and the count is exact::

      classifier = art_classifier(HttpVictim(url, key, "victim"), budget=5_000)
      KnockoffNets(classifier, nb_stolen=5_000, ...).extract(x, thieved_classifier=thief)

- :class:`ArtExtraction` is the base of ``art-knockoff`` and ``art-copycat``
  (:mod:`attacker.attacks.art_knockoff`, :mod:`attacker.attacks.art_copycat`):
  ART's own attack code runs inside our loop as one step that spends the budget,
  so the run directory, the evaluation and the report are those of every other
  attack, on the same victim and budget.

Departures from ART's defaults, each a named setting with ART's value reachable:
``batch_size`` (images per victim request) 256 instead of ART's
``batch_size_query=1`` (one HTTP request per image), and ``train_batch`` 64
instead of ART's ``batch_size_fit=1``. ART's ``nb_epochs`` default (10) is kept.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.loop import Attack, AttackSettings
from attacker.students import StudentSettings, build_student
from attacker.surrogate import SurrogateSettings
from attacker.victims import BudgetedVictim, Victim, VictimInfo
from stealsim.errors import AttackError

__all__ = ["ArtExtraction", "ArtSettings", "art_classifier", "require_art"]


def require_art() -> None:
    """Fail with a clear message when ART is not installed."""
    try:
        import art  # noqa: F401
    except ImportError:
        raise AttackError("the ART attacks need IBM's Adversarial Robustness Toolbox: "
                          "pip install 'stealsim[art]' (adversarial-robustness-toolbox>=1.20)") from None


def art_classifier(victim: Victim, budget: int | None = None) -> Any:
    """An ART ``BlackBoxClassifier`` answering with ``victim``, metered.

    Args:
        victim: any victim; a :class:`~attacker.victims.BudgetedVictim` is used as
            it is (its budget and count), anything else is wrapped in one.
        budget: images ART may spend (when ``victim`` is not metered already;
            ``None``: unlimited, still counted).

    ART sees probabilities ``[N, K]`` as float32 numpy arrays (one-hot rows for a
    label-only victim), for inputs ``[N, C, H, W]`` in [0, 1]. A prediction that
    does not fit the budget raises :class:`~stealsim.errors.BudgetExhaustedError`
    before it reaches the victim. The meter is the classifier's ``meter`` attribute.
    """
    require_art()
    from art.estimators.classification import BlackBoxClassifier

    meter = victim if isinstance(victim, BudgetedVictim) else BudgetedVictim(victim, budget)
    classes = meter.info.num_classes

    def predict(x: np.ndarray) -> np.ndarray:
        answers = meter.query(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if answers.dim() == 1:
            answers = torch.nn.functional.one_hot(answers.long(), classes).float()
        return answers.numpy().astype(np.float32)

    classifier = BlackBoxClassifier(predict, input_shape=tuple(meter.info.input_shape), nb_classes=classes,
                                    clip_values=(0.0, 1.0))
    classifier.meter = meter
    return classifier


@dataclass(frozen=True)
class ArtSettings(AttackSettings):
    """Settings of an ART extraction attack.

    Attributes:
        students: the thief ART fits (:class:`~attacker.students.StudentSettings`:
            architecture, width, learning rate, label smoothing). ART trains its own way, so
            the replay, moving-average and ``updates_per_batch`` settings do not apply.
        surrogate: the images ART draws its queries from
            (:class:`~attacker.surrogate.SurrogateSettings`; by default the other built-in
            dataset, as for ``knockoff``). ART draws each image at most once, so a budget
            above the pool's size spends only the pool.
        nb_epochs: ART's ``nb_epochs``: epochs of the thief over the answered images (ART: 10).
        train_batch: ART's ``batch_size_fit`` (ART's default: 1).

    ``batch_size`` is ART's ``batch_size_query`` (ART's default: 1). ``hard_label``
    is ART's ``use_probability=False``; by default the thief trains on the
    probabilities (cross-entropy with soft targets).
    """

    students: StudentSettings = field(default_factory=StudentSettings)
    surrogate: SurrogateSettings = field(default_factory=SurrogateSettings)
    nb_epochs: int = 10
    train_batch: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nb_epochs < 1 or self.train_batch < 1:
            raise AttackError(f"nb_epochs and train_batch must be >= 1, got {self.nb_epochs}, {self.train_batch}")

    def student_settings(self) -> StudentSettings:
        return self.students


class ArtExtraction(Attack):
    """An ART extraction attack as one step of our loop: it spends the budget once, then stops."""

    settings_type = ArtSettings
    one_shot = True
    extra = "art"

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        super().__init__(settings, info, device)
        require_art()
        assert isinstance(settings, ArtSettings)
        self.s: ArtSettings = settings
        self.surrogate = settings.surrogate.load(info.input_shape)
        self.network = build_student(info, settings.students, settings.memory_format).to(device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=settings.students.learning_rate)
        self.track("network", self.network)
        self.track("optimizer", self.optimizer)

    @abstractmethod
    def extraction(self, classifier: Any, nb_stolen: int) -> Any:
        """The ART attack object, querying ``classifier`` for ``nb_stolen`` images."""

    def extract(self, extraction: Any, x: np.ndarray, thief: Any) -> None:
        """Run ``extraction`` on the surrogate images ``x`` (override to pass labels)."""
        extraction.extract(x, thieved_classifier=thief)

    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        from art.estimators.classification import PyTorchClassifier

        nb_stolen = min(victim.remaining or 0, len(self.surrogate))
        if nb_stolen == 0:
            return {}
        thief = PyTorchClassifier(
            model=self.network, loss=nn.CrossEntropyLoss(label_smoothing=self.s.students.label_smoothing), optimizer=self.optimizer,
            input_shape=tuple(self.info.input_shape), nb_classes=self.info.num_classes, clip_values=(0.0, 1.0),
            device_type="gpu" if self.device.type == "cuda" else "cpu",
        )
        self.network.train()
        self.extract(self.extraction(art_classifier(victim), nb_stolen), self.surrogate.images.numpy(), thief)
        self.finished = True
        return {}

    def clone(self) -> nn.Module:
        return self.network.eval()
