"""Distillation check: how well does a student learn from a teacher's soft outputs?

This is how a Nasty Teacher is judged (Ma et al., ICLR 2021, Sec. 4): the
teacher's own accuracy, the accuracy of a student distilled from it by
knowledge distillation, and the same student trained on labels alone.
:func:`check_teacher` runs it on a checkpoint directory (``stealsim distill``) and
writes ``metrics.json`` and ``softmax.png``::

    result = check_teacher(Path("runs/nasty"), load_dataset("digits"), Path("runs/distill"),
                           compare_teacher=Path("runs/victim"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from stealsim.architectures import PixelClassifier, default_student_architecture
from stealsim.checkpoint import load_checkpoint
from stealsim.data import Dataset
from stealsim.errors import ConfigError
from stealsim.losses import kd_loss
from stealsim.plots import one_image_per_class, plot_softmax_distributions
from stealsim.training import LossFn, TrainConfig, accuracy, augmentation_shift, train_classifier

__all__ = [
    "DistillConfig",
    "DistillResult",
    "check_teacher",
    "distill_student",
    "distillation_check",
    "make_kd_loss",
]


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


def check_teacher(
    teacher: Path,
    data: Dataset,
    out: Path,
    *,
    student: str | None = None,
    alpha: float = 0.9,
    temperature: float = 4.0,
    epochs: int = 30,
    seed: int = 0,
    compare_teacher: Path | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> DistillResult:
    """Distil a student (``None``: a smaller net than the teacher) from the checkpoint ``teacher``
    and train the same student on labels; write ``metrics.json`` and ``softmax.png`` to ``out``.

    Raises:
        ConfigError: a teacher that does not take the dataset's inputs or classes.
    """
    teachers = {"teacher": load_checkpoint(teacher, device)}
    if compare_teacher is not None:
        teachers["compared"] = load_checkpoint(compare_teacher, device)
    for path, (_, meta) in zip((teacher, compare_teacher), teachers.values(), strict=False):
        if tuple(meta.input_shape) != data.input_shape or meta.num_classes != data.num_classes:
            raise ConfigError(
                f"teacher {path} takes {tuple(meta.input_shape)} with {meta.num_classes} classes; "
                f"dataset {data.name} has {data.input_shape} with {data.num_classes}"
            )
    channels, size, _ = data.input_shape
    config = DistillConfig(alpha, temperature, TrainConfig(epochs=epochs, seed=seed, max_shift=augmentation_shift(size)))
    architecture = student or default_student_architecture(channels, size)
    result = distillation_check(teachers["teacher"][0], data, architecture, config, device, show_progress)
    metrics = result.as_metrics() | {"alpha": alpha, "temperature": temperature, "student_architecture": architecture}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    picks = one_image_per_class(data.y_test, 4)
    names = {"teacher": teacher.name, "compared": compare_teacher.name if compare_teacher else ""}
    plot_softmax_distributions(
        {names[key]: loaded[0] for key, loaded in teachers.items()},
        data.x_test[picks], data.y_test[picks], data.class_names, temperature, out / "softmax.png",
    )
    return result
