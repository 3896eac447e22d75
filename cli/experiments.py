"""The experiments' commands: the demo, grids, the UQ study, honest traffic and run reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.options import DataDirOption, announce, check_out_dir
from stealsim.errors import ConfigError

__all__ = ["audit", "demo", "grid", "grid_worker", "honest", "report", "uq_study"]


def honest(
    url: Annotated[str, typer.Option(help="The victim service (http://HOST:PORT).")],
    api_key: Annotated[str, typer.Option(envvar="STEALSIM_API_KEY", help="The honest user's API key.")],
    model: Annotated[str, typer.Option(help="Model name at --url.")] = "victim",
    dataset: Annotated[str, typer.Option(help="Dataset whose natural images are sent (built-in or on disk).")] = "digits",
    data_dir: DataDirOption = None,
    split: Annotated[str, typer.Option(help="Split sent: test, or validation while calibrating a detector.")] = "test",
    batch: Annotated[int, typer.Option(min=1, help="Images per request.")] = 32,
    rate: Annotated[float, typer.Option(min=0.0, help="Requests per second at most (0: back to back).")] = 0.0,
    passes: Annotated[int, typer.Option(min=1, help="Passes over the split (a longer stream).")] = 1,
    shuffle: Annotated[bool, typer.Option(help="A new random order in every pass.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --shuffle's order.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """An honest user: natural images through a key like any client; accuracy, ECE and latency of the
    answers, and whether a detector flagged or blocked the key (false positives of a defense)."""
    from experiments.honest import HonestSettings, honest_traffic
    from stealsim.data import load_dataset

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if split not in ("test", "validation"):
        raise ConfigError(f"--split must be test or validation, got {split!r}")
    settings = HonestSettings(split=split, batch=batch, rate=rate, passes=passes, shuffle=shuffle,  # type: ignore[arg-type]
                              seed=seed)
    result = honest_traffic(url.rstrip("/"), api_key, model, load_dataset(dataset, data_dir), settings)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"{result.images} images in {result.requests} requests: accuracy {result.accuracy:.4f}, "
                   f"ECE {result.ece:.4f}, latency {result.latency_ms_mean:.1f} ms mean / "
                   f"{result.latency_ms_p95:.1f} ms p95; flags: {result.flags or 'none'}"
                   + (f"; refused after {result.blocked_at} images: {result.refusal}"
                      if result.blocked_at is not None else ""))
    if result.flags or result.blocked_at is not None:
        raise typer.Exit(code=3)


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `stealsim attack`.")],
    plot: Annotated[Path | None, typer.Option(
        help="Also draw fidelity and accuracy against queries into this PNG file (its folder must exist): a panel "
             "per metric, each group's mean over seeds with a ±1 std band (one seed: its 95 % interval).")] = None,
    per_run: Annotated[bool, typer.Option(
        "--per-run", help="One row (and curve) per run instead of aggregating over seeds.")] = False,
    label: Annotated[list[str] | None, typer.Option(
        metavar="LABEL", help="Group by these labels instead of by config: one per RUN, in order (repeat the option).")] = None,
    reference: Annotated[list[Path] | None, typer.Option(
        metavar="CSV", help="Published points drawn as markers on --plot: a CSV of method,queries,accuracy_percent "
                            "(or fidelity[_percent]), # comments citing the source (repeatable).")] = None,
    curve: Annotated[list[str] | None, typer.Option(
        metavar="METRIC", help="History metrics drawn on --plot, a panel each (repeatable; default fidelity "
                               "and accuracy; e.g. answer_top_share, student_disagreement).")] = None,
    x: Annotated[str, typer.Option(
        "--x", help="What --plot draws the curves against: queries, cost (money spent), hours (simulated, under "
                    "the rate limits) or accounts (accounts used).")] = "queries",
) -> None:
    """Compare attack runs in one markdown table: runs that differ only by seed are one group
    (mean ± std (min) per metric, n seeds, the random baseline beside each attack)."""
    from experiments.report import aggregate_runs, compare_runs, read_reference_points

    if plot is not None and not plot.parent.is_dir():
        raise ConfigError(f"--plot {plot}: the folder {plot.parent} does not exist; create it first")
    if plot is not None and plot.is_dir():
        raise ConfigError(f"--plot {plot} is a folder; give the PNG file to write, e.g. {plot / 'runs.png'}")
    from experiments.stats import X_AXES

    if x not in X_AXES:
        raise ConfigError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    if x != "queries" and (plot is None or per_run):
        raise ConfigError("--x chooses the axis of --plot's curves over seeds: give --plot, without --per-run")
    references = [point for path in reference or [] for point in read_reference_points(path)]
    if references and plot is None:
        raise ConfigError("--reference draws markers on --plot: give --plot too")
    if per_run:
        if label or references or curve:
            raise ConfigError("--label, --reference and --curve work on groups; they have no meaning with --per-run")
        typer.echo(compare_runs(runs, plot), nl=False)
    else:
        typer.echo(aggregate_runs(runs, plot, labels=label or None, references=references,
                                  curves=curve or ("fidelity", "accuracy"), x=x), nl=False)


def demo(
    quick: Annotated[bool, typer.Option(help="Small victims and budgets (about 1-2 minutes; the CI smoke test).")] = False,
    out: Annotated[Path, typer.Option(help="Directory of the runs, summary.json and report.md.")] = Path("runs/demo"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims, keyed by their settings.")] = Path("runs/cache"),
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", metavar="NAME[=BUDGET]", help="NAME or NAME=BUDGET: attack to run (repeatable; default: every registered attack)."),
    ] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="Attack queries per run [default: 20000; --quick 1000].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Victim training epochs [default: 30; --quick 4].")] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of the attacks.")] = 2,
    url: Annotated[str | None, typer.Option(help="Attack this running service instead of starting one.")] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar="STEALSIM_ADMIN_KEY", help="Admin key of the service at --url.")
    ] = None,
    normal_model: Annotated[str, typer.Option(help="Model name of the normal victim at --url.")] = "normal",
    nasty_model: Annotated[str, typer.Option(help="Model name of the Nasty Teacher at --url.")] = "nasty",
    victims_only: Annotated[
        bool, typer.Option(help="Only train (or reuse) the victims and copy them to OUT/victims/{normal,nasty}.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The end-to-end demo: victims, the service, every attack over HTTP, one table and a report."""
    from experiments.demo import DemoConfig, run_demo
    from experiments.victims import VictimSettings

    check_out_dir(out)
    victims = None
    if epochs is not None:
        victims = VictimSettings(epochs=epochs, nasty_epochs=epochs)
    attacks: dict[str, int | None] = {}
    for text in attack or []:
        name, sep, value = text.partition("=")
        try:
            attacks[name] = int(value) if sep else None
        except ValueError as exc:
            raise ConfigError(f"--attack {text!r}: expected NAME or NAME=BUDGET (an integer)") from exc
    config = DemoConfig.standard(
        out, quick, victims=victims, cache_dir=cache_dir, attacks=tuple(attacks) or None,
        budgets={name: value for name, value in attacks.items() if value is not None},
        budget=budget, seed=seed, threads=threads, url=url, admin_key=admin_key,
        models={"normal": normal_model, "nasty": nasty_model}, victims_only=victims_only,
        show_progress=not quiet,
    )
    result = run_demo(config, announce=announce)
    typer.echo(f"{result.summary_path}  {result.report_path}  ({result.wall_seconds:.0f} s)")
    if result.status != "done":
        raise typer.Exit(code=1)


def grid(
    spec: Annotated[Path, typer.Argument(help="Grid spec (YAML; see examples/grid.yaml).")],
    out: Annotated[Path, typer.Option(help="Directory of results.csv, defenses.csv, report.md (resumed).")] = Path("runs/grid"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims (in-process runs).")] = Path("runs/cache"),
    redis_url: Annotated[
        str | None, typer.Option(help="Run the cells as jobs on this Redis (consumed by `stealsim grid-worker`).")
    ] = None,
    queue: Annotated[str, typer.Option(help="rq queue name of the jobs (with --redis-url).")] = "stealsim-grid",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Attacks x victims x API defenses x budgets x seeds: resumable, in-process or on Redis workers."""
    from experiments.grid import load_spec, run_grid

    check_out_dir(out)
    rows = run_grid(load_spec(spec), out, cache_dir=cache_dir, redis_url=redis_url, queue=queue,
                    show_progress=not quiet, announce=announce)
    failed = sum(row["status"] != "done" for row in rows)
    typer.echo(f"{out / 'results.csv'}: {len(rows)} rows ({failed} failed), report {out / 'report.md'}")
    if failed:
        raise typer.Exit(code=1)


def grid_worker(
    redis_url: Annotated[str, typer.Option(help="Redis holding the grid's queue (redis://HOST:6379).")],
    queue: Annotated[list[str] | None, typer.Option("--queue", metavar="NAME", help="rq queue to consume (repeatable).")] = None,
    work_dir: Annotated[Path, typer.Option(help="Directory of this worker's runs and service log.")] = Path("runs/grid-worker"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims on this host.")] = Path("runs/cache"),
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker name (default: rq's).")] = None,
) -> None:
    """Run grid cells from a Redis queue (rq), with a victim service of this worker's own."""
    from experiments.queue import WorkerOptions, run_worker

    run_worker(redis_url, queue or ["stealsim-grid"], WorkerOptions(work_dir, cache_dir),
                    burst=burst, name=name)


def uq_study(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML; see examples/uq-study-digits.yaml).")],
    out: Annotated[Path, typer.Option(help="Directory of results.csv, curves.jsonl, report.md (resumed).")] = Path("runs/uq-study"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims (local runs).")] = Path("runs/cache"),
    jobs: Annotated[int, typer.Option(min=1, help="Cells run at once in local processes (one per core).")] = 1,
    redis_url: Annotated[
        str | None, typer.Option(help="Run the cells as jobs on this Redis (consumed by `stealsim grid-worker`).")
    ] = None,
    queue: Annotated[str, typer.Option(help="rq queue name of the jobs (with --redis-url).")] = "stealsim-grid",
) -> None:
    """The UQ stealing study (Pape et al. 2023): UQ kinds x query sources x diversity x seeds, resumable."""
    from experiments.uq_study import load_uq_spec, run_uq_study

    check_out_dir(out)
    rows = run_uq_study(load_uq_spec(spec), out, cache_dir=cache_dir, jobs=jobs, redis_url=redis_url, queue=queue,
                        announce=announce)
    failed = sum(row["status"] != "done" for row in rows)
    typer.echo(f"{out / 'results.csv'}: {len(rows)} rows ({failed} failed), report {out / 'report.md'}")
    if failed:
        raise typer.Exit(code=1)


def audit(
    spec: Annotated[Path, typer.Argument(help="Audit spec (YAML; see examples/audit.yaml).")],
    out: Annotated[Path | None, typer.Option(help="Directory of the runs and report.md (resumed) [default: the "
                                                  "spec's out, else runs/audit].")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of trained victims [default: the spec's cache_dir].")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """A security team's one command: the attackers of SPEC against your model, limits, price and defenses,
    through 1 to many accounts, honest users beside them; report.md with plots and a verdict."""
    from experiments.audit import load_audit_spec, run_audit

    loaded = load_audit_spec(spec)
    directory = out or loaded.out or Path("runs/audit")
    check_out_dir(directory)
    result = run_audit(loaded, directory, cache_dir=cache_dir, show_progress=not quiet, announce=announce)
    typer.echo(f"{result.report}: {len(result.runs)} runs ({result.failed} failed)")
    if result.failed:
        raise typer.Exit(code=1)
