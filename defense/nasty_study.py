"""The Nasty Teacher experiment: normal vs nasty teacher, and students distilled from each.

For each seed: train a normal teacher, a Nasty Teacher against it (Ma et al.,
ICLR 2021, eq. 3), a student by KD from each (Hinton et al., 2015) and the same
student on labels alone. As in the paper, students distil at the temperature
the teacher was made nasty at (``T = tau``) unless the dataset's defaults or
the caller say otherwise (mnist5k: ``T = 2 tau``). Every network is scored on
the validation split (where the study's settings are chosen) and on the test
split (the reported table, docs/results/nasty-teacher-study.md).
:func:`study_nasty_teachers` (``stealsim nasty-study``) resolves the study's
settings from the dataset's Nasty Teacher defaults and the given overrides.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from defense.nasty_teacher import NastySettings, settings_for, train_nasty_teacher
from stealsim.architectures import default_architecture, default_student_architecture
from stealsim.checkpoint import save_checkpoint
from stealsim.data import Dataset
from stealsim.distill import DistillConfig, distill_student
from stealsim.plots import one_image_per_class, plot_softmax_distributions
from stealsim.training import TrainConfig, accuracy, augmentation_shift, train_classifier

__all__ = ["SeedResult", "markdown_table", "run_nasty_study", "study_nasty_teachers", "summarise"]

logger = logging.getLogger(__name__)

COLUMNS = ("teacher", "nasty_teacher", "student_from_teacher", "student_from_nasty", "baseline_student")


@dataclass(frozen=True)
class SeedResult:
    """Test accuracies of one seed's five networks."""

    seed: int
    teacher: float
    nasty_teacher: float
    student_from_teacher: float
    student_from_nasty: float
    baseline_student: float


def run_nasty_study(
    dataset: Dataset,
    architecture: str,
    student_architecture: str,
    settings: NastySettings,
    distill: DistillConfig,
    seeds: Sequence[int],
    out: Path,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> list[SeedResult]:
    """Run the experiment for every seed; write checkpoints, results.json, table.md, softmax.png.

    Returns the test-split results; results.json and table.md also hold the validation split's.
    """
    results: list[SeedResult] = []
    validation: list[SeedResult] = []
    for seed in seeds:
        train = TrainConfig(**(asdict(distill.train) | {"seed": seed}))
        student_train = settings.student_config(train)
        kd = DistillConfig(distill.alpha, distill.temperature, student_train)
        teacher, teacher_meta = train_classifier(
            dataset, architecture, train, device, description=f"seed {seed} teacher",
            show_progress=show_progress,
        )
        nasty, nasty_meta = train_nasty_teacher(
            dataset, architecture, train, teacher, teacher_meta, settings, device, show_progress
        )
        from_teacher = distill_student(teacher, dataset, student_architecture, kd, device, show_progress)
        from_nasty = distill_student(nasty, dataset, student_architecture, kd, device, show_progress)
        baseline, _ = train_classifier(
            dataset, student_architecture, student_train, device, description=f"seed {seed} baseline",
            show_progress=show_progress,
        )
        save_checkpoint(out / f"seed{seed}" / "teacher", teacher, teacher_meta)
        save_checkpoint(out / f"seed{seed}" / "nasty", nasty, nasty_meta)
        networks = (teacher, nasty, from_teacher, from_nasty, baseline)
        result = SeedResult(seed, *(accuracy(n, dataset.x_test, dataset.y_test, device) for n in networks))
        validation.append(SeedResult(seed, *(accuracy(n, dataset.x_val, dataset.y_val, device) for n in networks)))
        logger.info("seed %d: test %s; validation %s", seed, result, validation[-1])
        results.append(result)
        if seed == seeds[0]:
            picks = one_image_per_class(dataset.y_test, 4)
            plot_softmax_distributions(
                {"normal teacher": teacher, "nasty teacher": nasty},
                dataset.x_test[picks], dataset.y_test[picks], dataset.class_names,
                distill.temperature, out / "softmax.png",
            )
    summary = {
        "dataset": dataset.name,
        "architecture": architecture,
        "student_architecture": student_architecture,
        "nasty": asdict(settings),
        "kd": {"alpha": distill.alpha, "temperature": distill.temperature},
        "training": asdict(distill.train),
        "student_training": asdict(settings.student_config(distill.train)),
        "seeds": [asdict(r) for r in results],
        "mean": summarise(results),
        "validation_seeds": [asdict(r) for r in validation],
        "validation_mean": summarise(validation),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(
        "Test split (reported):\n\n" + markdown_table(results)
        + "\nValidation split (where settings are chosen):\n\n" + markdown_table(validation)
    )
    return results


def summarise(results: Sequence[SeedResult]) -> dict[str, float]:
    """Mean accuracy of each column over the seeds."""
    return {c: statistics.fmean(getattr(r, c) for r in results) for c in COLUMNS}


def markdown_table(results: Sequence[SeedResult]) -> str:
    header = "| seed | " + " | ".join(COLUMNS) + " |\n|" + " --- |" * (len(COLUMNS) + 1) + "\n"
    rows = [f"| {r.seed} | " + " | ".join(f"{100 * getattr(r, c):.2f}" for c in COLUMNS) + " |" for r in results]
    mean = summarise(results)
    rows.append("| mean | " + " | ".join(f"{100 * mean[c]:.2f}" for c in COLUMNS) + " |")
    if len(results) > 1:
        std = {c: statistics.stdev(getattr(r, c) for r in results) for c in COLUMNS}
        rows.append("| std | " + " | ".join(f"{100 * std[c]:.2f}" for c in COLUMNS) + " |")
    return header + "\n".join(rows) + "\n"


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
    """The Nasty Teacher study (:func:`run_nasty_study`) on ``data`` for ``seeds``.

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
