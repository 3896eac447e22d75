"""Distillation check: how well does a student learn from a teacher's soft outputs?

This is how a Nasty Teacher is judged (Ma et al., ICLR 2021, Sec. 4): the
teacher's own accuracy, the accuracy of a student distilled from it by
knowledge distillation, and the same student trained on labels alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stealsim.architectures import PixelClassifier
from stealsim.data import Dataset
from stealsim.errors import ConfigError
from stealsim.losses import kd_loss
from stealsim.training import LossFn, TrainConfig, accuracy, train_classifier

__all__ = ["DistillConfig", "DistillResult", "distill_student", "distillation_check", "make_kd_loss"]


@dataclass(frozen=True)
class DistillConfig:
    """KD weight ``alpha``, temperature ``temperature`` and the student's training."""

    alpha: float = 0.9
    temperature: float = 4.0
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"need 0 <= alpha <= 1 and temperature > 0, got {self}")


@dataclass(frozen=True)
class DistillResult:
    teacher_accuracy: float
    student_accuracy: float
    baseline_student_accuracy: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "teacher_accuracy": self.teacher_accuracy,
            "student_accuracy": self.student_accuracy,
            "baseline_student_accuracy": self.baseline_student_accuracy,
        }


def make_kd_loss(teacher: nn.Module, config: DistillConfig) -> LossFn:
    """Hinton et al. (2015) KD on the teacher's logits for the same (augmented) batch."""
    teacher.eval()

    def loss(logits: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        return kd_loss(logits, teacher_logits, labels, config.alpha, config.temperature)

    return loss


def distill_student(
    teacher: nn.Module,
    dataset: Dataset,
    student_architecture: str,
    config: DistillConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> PixelClassifier:
    """Train ``student_architecture`` on ``dataset`` by KD from ``teacher``."""
    student, _ = train_classifier(
        dataset, student_architecture, config.train, device,
        loss_fn=make_kd_loss(teacher, config), description=f"distill {student_architecture}",
        show_progress=show_progress,
    )
    return student


def distillation_check(
    teacher: nn.Module,
    dataset: Dataset,
    student_architecture: str,
    config: DistillConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> DistillResult:
    """Teacher accuracy, KD-student accuracy and label-only baseline student accuracy."""
    teacher = teacher.to(device)
    student = distill_student(teacher, dataset, student_architecture, config, device, show_progress)
    baseline, _ = train_classifier(
        dataset, student_architecture, config.train, device,
        description=f"baseline {student_architecture}", show_progress=show_progress,
    )
    return DistillResult(
        teacher_accuracy=accuracy(teacher, dataset.x_test, dataset.y_test, device),
        student_accuracy=accuracy(student, dataset.x_test, dataset.y_test, device),
        baseline_student_accuracy=accuracy(baseline, dataset.x_test, dataset.y_test, device),
    )
