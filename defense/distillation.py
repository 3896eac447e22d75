"""Distillation as the defense's test: a teacher checkpoint checked (``stealsim distill``), and
the Nasty Teacher study set up from its flags (``stealsim nasty-study``).

A Nasty Teacher is judged by how well a student learns from its soft outputs
(Ma et al., ICLR 2021, Sec. 4; :func:`stealsim.distill.distillation_check`): this
runs that check on a checkpoint directory and writes what it found::

    result = check_teacher(Path("runs/nasty"), load_dataset("digits"), Path("runs/distill"),
                           compare_teacher=Path("runs/victim"))

``out/metrics.json`` holds the three accuracies and the KD settings;
``out/softmax.png`` draws the teacher's (and the compared teacher's) softened
outputs on one test image per class. :func:`study_nasty_teachers` resolves the
study's settings (the dataset's Nasty Teacher defaults, the given overrides) and
runs :func:`defense.nasty_study.run_nasty_study`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from defense.nasty_study import SeedResult, run_nasty_study
from defense.nasty_teacher import settings_for
from stealsim.architectures import default_architecture, default_student_architecture
from stealsim.checkpoint import load_checkpoint
from stealsim.data import Dataset
from stealsim.distill import DistillConfig, DistillResult, distillation_check
from stealsim.errors import ConfigError
from stealsim.plots import one_image_per_class, plot_softmax_distributions
from stealsim.training import TrainConfig, augmentation_shift

__all__ = ["check_teacher", "study_nasty_teachers"]


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


def study_nasty_teachers(
    data: Dataset,
    out: Path,
    seeds: Sequence[int],
    *,
    architecture: str | None = None,
    student: str | None = None,
    tau: float | None = None,
    omega: float | None = None,
    alpha: float | None = None,
    temperature: float | None = None,
    epochs: int = 30,
    student_epochs: int | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> list[SeedResult]:
    """The Nasty Teacher study (:func:`defense.nasty_study.run_nasty_study`) on ``data`` for ``seeds``.

    ``None`` takes the dataset's Nasty Teacher settings (:func:`defense.nasty_teacher.settings_for`):
    ``alpha`` and ``temperature`` of the students' KD, ``student_epochs`` (else ``epochs``, the
    teachers'); architectures default to those of the input shape.
    """
    protocol: dict[str, Any] = {"kd_alpha": alpha, "kd_temperature": temperature, "student_epochs": student_epochs}
    settings = replace(settings_for(data.name, tau, omega), **{k: v for k, v in protocol.items() if v is not None})
    channels, size, _ = data.input_shape
    config = DistillConfig(settings.student_alpha, settings.student_temperature,
                           TrainConfig(epochs=epochs, max_shift=augmentation_shift(size)))
    return run_nasty_study(
        data, architecture or default_architecture(channels, size),
        student or default_student_architecture(channels, size), settings, config, seeds, out,
        device, show_progress,
    )
