"""The defenses' commands: distillation checks, the Nasty Teacher study, DAWN watermark
verification and the Mahalanobis OOD fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.options import (
    DataDirOption,
    DatasetOption,
    DeviceOption,
    check_out_dir,
    parse_seeds,
)
from stealsim.errors import ConfigError

__all__ = ["distill", "nasty_study", "ood_fit", "verify_watermark"]


def distill(
    teacher: Annotated[Path, typer.Option(help="Checkpoint directory of the teacher.")],
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Directory for metrics.json and softmax.png.")],
    student: Annotated[
        str | None, typer.Option(help="Student architecture; default: a smaller net than the teacher.")
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the KD term.")] = 0.9,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 0,
    compare_teacher: Annotated[
        Path | None, typer.Option(help="Another teacher to plot beside this one (normal vs nasty).")
    ] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Distil a student from a teacher; compare with the same student trained on labels."""
    from stealsim.data import load_dataset
    from stealsim.distill import check_teacher
    from stealsim.training import resolve_device

    check_out_dir(out)
    torch_device = resolve_device(device)
    result = check_teacher(teacher, load_dataset(dataset, data_dir), out, student=student, alpha=alpha,
                           temperature=temperature, epochs=epochs, seed=seed, compare_teacher=compare_teacher,
                           device=torch_device, show_progress=not quiet)
    typer.echo(
        f"teacher {result.teacher_accuracy:.4f}  student {result.student_accuracy:.4f}  "
        f"baseline student {result.baseline_student_accuracy:.4f}  -> {out / 'metrics.json'}"
    )


def nasty_study(
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Directory for checkpoints, results.json, table.md, softmax.png.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    arch: Annotated[str | None, typer.Option(help="Teacher architecture.")] = None,
    student: Annotated[str | None, typer.Option(help="Student architecture.")] = None,
    tau: Annotated[float | None, typer.Option(help="Nasty Teacher temperature.")] = None,
    omega: Annotated[float | None, typer.Option(help="Nasty Teacher KL weight.")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Students' KD weight (default: the dataset's, else 0.9).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Students' KD temperature T (default: the dataset's, else the Nasty tau).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Teachers' epochs (and students', unless set apart).")] = 30,
    student_epochs: Annotated[
        int | None, typer.Option(min=1, help="Students' epochs, KD and labels-only (default: the dataset's, else --epochs).")
    ] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train normal and Nasty teachers and compare students distilled from each."""
    from defense.nasty_study import markdown_table, study_nasty_teachers
    from stealsim.data import load_dataset
    from stealsim.training import resolve_device

    check_out_dir(out)
    seed_list = parse_seeds(seeds)
    torch_device = resolve_device(device)
    results = study_nasty_teachers(
        load_dataset(dataset, data_dir), out, seed_list, architecture=arch, student=student, tau=tau,
        omega=omega, alpha=alpha, temperature=temperature, epochs=epochs, student_epochs=student_epochs,
        device=torch_device, show_progress=not quiet,
    )
    typer.echo(markdown_table(results))


def verify_watermark(
    suspects: Annotated[list[Path], typer.Argument(
        help="Suspected clones: run directories of `stealsim attack` (clone.ts), TorchScript files, "
             "or checkpoint directories (model.json).")],
    record: Annotated[Path | None, typer.Option(
        help="The key's watermark record (.npz), as saved by --save-record.")] = None,
    url: Annotated[str | None, typer.Option(help="Fetch the record from this victim service instead.")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="STEALSIM_ADMIN_KEY", help="Admin key of --url.")] = None,
    key_id: Annotated[str | None, typer.Option(help="The suspected thief's key id (key_...).")] = None,
    model: Annotated[str | None, typer.Option(help="The model name at --url.")] = None,
    save_record: Annotated[Path | None, typer.Option(help="Write the fetched record here (.npz).")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Significance level of the verdict.")] = 1e-3,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per suspect instead of a table.")] = False,
) -> None:
    """Test suspected clones for the DAWN watermark a key was served (Szyller et al., 2021):
    matches of the watermark labels against Binomial(n, 1/(K-1)), one-sided p-value."""
    from defense.watermark import ServedRecord, verify_suspects

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if (record is None) == (url is None):
        raise ConfigError("give either --record FILE or --url (with --admin-key, --key-id and --model)")
    source: Path | ServedRecord
    if record is not None:
        if not record.is_file():
            raise ConfigError(f"--record {record}: no such file")
        source = record
    elif url is not None and admin_key and key_id and model:
        source = ServedRecord(url, admin_key, key_id, model)
    else:
        raise ConfigError("--url needs --admin-key, --key-id and --model")
    report = verify_suspects(suspects, source, alpha, save_record)
    if json_out:
        for row in report.rows():
            typer.echo(json.dumps(row))
    else:
        typer.echo(report.markdown())


def ood_fit(
    checkpoint: Annotated[Path, typer.Option(help="The encoder: a checkpoint directory (the victim's own fits).")],
    dataset: Annotated[str, typer.Option(help="The defender's data (built-in or on disk): train split fits, "
                                              "validation split sets tau.")],
    out: Annotated[Path, typer.Option(help="Statistics file to write (.safetensors).")],
    data_dir: DataDirOption = None,
    honest_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of validation images over tau.")] = 0.01,
) -> None:
    """Fit the Mahalanobis OOD statistics of ood_rate's score=mahalanobis (Lee et al., NeurIPS 2018):
    class means and shared covariance of the checkpoint's penultimate features; prints them as JSON."""
    from stealsim.data import load_dataset
    from victim_server.defender_models import fit_ood_statistics

    fit = fit_ood_statistics(checkpoint, load_dataset(dataset, data_dir), out, honest_rate)
    gaussian = fit.gaussian
    typer.echo(json.dumps({"statistics": str(out), "encoder": str(checkpoint), "dataset": dataset,
                           "tau": gaussian.tau, "honest_rate": honest_rate, "dimension": gaussian.dimension,
                           "classes": len(gaussian.means), "test_share_over_tau": fit.test_share_over_tau}))
