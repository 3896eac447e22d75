"""The uncertainty-quantification stealing study: every UQ kind x query source x diversity x seed.

Pape et al., "On the Limitations of Model Stealing with Uncertainty
Quantification Models" (ESANN 2023, arXiv 2305.05293) claim that (a) a UQ
substitute's combined prediction gains only marginally over a single member,
and (b) the members' prediction variance shrinks over training. The study
measures both at budgets where the clones are good::

    spec = load_uq_spec(Path("examples/uq-study-digits.yaml"))
    rows = run_uq_study(spec, Path("runs/uq-digits"))                  # in this process
    rows = run_uq_study(spec, Path("runs/uq-digits"), jobs=2)          # two local processes
    rows = run_uq_study(spec, Path("runs/uq-digits"), redis_url="redis://...", queue="uq")  # grid workers

A cell is one ``ensemble`` attack run in process against the spec's normally
trained victim (cached like the grid's, :func:`experiments.victims.prepare_victims`):
one UQ kind, one query source (``generator``: data-free, trained on the members'
disagreement; ``surrogate``: the other built-in dataset), one diversity weight,
one seed. Every evaluation records combined / best / mean member fidelity and
the members' spread (:func:`attacker.uq.member_spread`) on the evaluation split
and on the attacker's last answered queries (``query_*``).

Each cell runs through the experiments' one cell runner (:func:`experiments.cells.run_cell`).
Results go to ``OUT/results.csv`` (one line per cell, appended as cells finish,
:mod:`experiments.store`) and ``OUT/curves.jsonl`` (each cell's evaluation
history); a cell already in the CSV is skipped, so a study resumes where it
stopped. ``OUT/report.md`` has the table over seeds (:mod:`experiments.stats`)
and the figures ``uq-fidelity.png`` and ``uq-spread.png``. On Redis, the cells
are rq jobs (:func:`run_uq_job`, :mod:`experiments.queue`) for ``stealsim
grid-worker`` (any number, on any hosts; each trains or reuses the victim in
its own cache).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from experiments.cells import run_cell
from experiments.queue import Job, collect_jobs, worker_options
from experiments.spec import read_spec
from experiments.stats import format_mean_std, mean_curve, parse_number, seed_groups, spread
from experiments.store import ResultsStore
from experiments.victims import VictimSettings, prepare_victims
from stealsim.errors import ConfigError

if TYPE_CHECKING:
    from attacker.runner import RunSpec

__all__ = [
    "CURVE_KEYS",
    "UQ_COLUMNS",
    "UQCell",
    "UQStudySpec",
    "cells_of",
    "load_uq_spec",
    "peak_of",
    "run_uq_cell",
    "run_uq_study",
    "write_uq_report",
]

logger = logging.getLogger(__name__)

Source = Literal["generator", "surrogate"]

SPREAD_KEYS = ("member_variance", "member_disagreement", "member_pairwise_disagreement")
FIDELITY_KEYS = ("combined_fidelity", "member_fidelity_best", "member_fidelity_mean", "fidelity_gain")
CURVE_KEYS = ("queries", "fidelity", *FIDELITY_KEYS, *SPREAD_KEYS,
              *(f"query_{key}" for key in (*SPREAD_KEYS, "combined_fidelity")))
"""What ``curves.jsonl`` keeps of each evaluation line."""

UQ_COLUMNS = ("cell", "kind", "source", "diversity", "seed", "status", "queries", "split", "combined_fidelity",
              "combined_accuracy", "member_fidelity_best", "member_fidelity_mean", "fidelity_gain",
              *SPREAD_KEYS, *(f"query_{key}" for key in SPREAD_KEYS), "query_combined_fidelity",
              "variance_peak", "variance_peak_queries", "variance_final_over_peak",
              "query_variance_peak", "query_variance_peak_queries", "query_variance_final_over_peak",
              "transfer_success_rate", "victim_accuracy", "wall_seconds", "error")


class UQStudySpec(BaseModel):
    """The study's axes and the settings shared by its cells (the YAML file's keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = "digits"
    victim_epochs: int = Field(default=30, ge=1)
    budget: int = Field(default=100_000, ge=1)
    kinds: list[str] = Field(default_factory=lambda: ["deep-ensemble", "mc-dropout", "snapshot", "swag", "laplace"],
                             min_length=1)
    sources: list[Source] = Field(default_factory=lambda: list[Source](["generator", "surrogate"]), min_length=1)
    diversity: list[float] = Field(default_factory=lambda: [0.0, 0.5], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    members: int = Field(default=5, ge=2)
    split: Literal["validation", "test"] = "test"
    evaluations: int = Field(default=10, ge=1)
    attack_settings: dict[str, Any] = Field(default_factory=dict)
    source_settings: dict[Source, dict[str, Any]] = Field(default_factory=dict)
    transfer_samples: int = Field(default=100, ge=1)
    reference_epochs: int = Field(default=3, ge=1)
    threads: int = Field(default=1, ge=1)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        from attacker.uq import UQ_KINDS

        unknown = [kind for kind in kinds if kind not in UQ_KINDS]
        if unknown:
            raise ValueError(f"unknown UQ kinds {unknown}; choose from {list(UQ_KINDS)}")
        return kinds

    @field_validator("diversity")
    @classmethod
    def _non_negative(cls, weights: list[float]) -> list[float]:
        if any(weight < 0 or not math.isfinite(weight) for weight in weights):
            raise ValueError(f"diversity weights must be finite and >= 0, got {weights}")
        return weights

    def victim_settings(self) -> VictimSettings:
        return VictimSettings(dataset=self.dataset, epochs=self.victim_epochs)

    def settings_of(self, cell: UQCell) -> dict[str, Any]:
        """The ensemble attack's settings for ``cell``: shared, then per source, then the cell's axes."""
        return {**self.attack_settings, **self.source_settings.get(cell.source, {}),
                "uq": cell.kind, "source": cell.source, "diversity_weight": cell.diversity, "members": self.members}


def load_uq_spec(path: Path) -> UQStudySpec:
    """Read and validate a study spec; errors name the file and the bad field."""
    from attacker.attacks import make_settings

    spec = read_spec(path, UQStudySpec, "study")
    # The settings differ by kind, source and diversity, not by seed: the first seed's cells cover them.
    for cell in cells_of(spec)[: len(spec.kinds) * len(spec.sources) * len(spec.diversity)]:
        try:
            make_settings("ensemble", **spec.settings_of(cell))
        except Exception as exc:
            raise ConfigError(f"{path}: the ensemble settings of {cell.id}: {exc}") from exc
    return spec


@dataclass(frozen=True)
class UQCell:
    """One ensemble run of the study."""

    kind: str
    source: Source
    diversity: float
    seed: int

    @property
    def variant(self) -> str:
        """The cell without its seed: what the report averages over seeds."""
        return f"{self.kind}__{self.source}__div{self.diversity:g}"

    @property
    def id(self) -> str:
        return f"{self.variant}__s{self.seed}"


def cells_of(spec: UQStudySpec) -> list[UQCell]:
    """Seeds outermost: a study stopped early has whole seeds of every variant, not all seeds of a few."""
    return [UQCell(kind, source, diversity, seed) for seed in spec.seeds for kind in spec.kinds
            for source in spec.sources for diversity in spec.diversity]


def peak_of(history: Sequence[dict[str, Any]], metric: str) -> dict[str, float | None]:
    """Where ``metric`` peaks over a run: its largest value, the queries there, and final / peak."""
    points = [(line["queries"], line[metric]) for line in history
              if isinstance(line.get(metric), int | float) and math.isfinite(line[metric])]
    if not points:
        return {"peak": None, "peak_queries": None, "final_over_peak": None}
    queries, peak = max(points, key=lambda point: point[1])
    final = points[-1][1]
    return {"peak": peak, "peak_queries": queries, "final_over_peak": final / peak if peak > 0 else None}


def run_uq_cell(spec: UQStudySpec, cell: UQCell, work_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Run one cell (:func:`experiments.cells.run_cell`) in process against the cached normal victim;
    returns ``{"row": ..., "curve": ...}`` (a failed run: a row with status failed)."""
    import torch

    from attacker.evaluation import EvalConfig
    from attacker.rundir import RunDirectory
    from attacker.runner import RunSpec

    torch.set_num_threads(spec.threads)
    axes = {"cell": cell.id, **asdict(cell), "status": "failed", "split": spec.split}
    curve: list[dict[str, Any]] = []

    def attack(run_dir: Path) -> RunSpec:
        victims = prepare_victims(spec.victim_settings(), cache_dir, show_progress=False)
        return RunSpec(
            attack="ensemble", out=run_dir, budget=spec.budget, victim_checkpoint=victims.normal,
            eval_every=max(1, spec.budget // spec.evaluations), seed=cell.seed, device="cpu",
            show_progress=False, settings=spec.settings_of(cell),
            evaluation=EvalConfig(split=spec.split, transfer_samples=spec.transfer_samples,
                                  reference_epochs=spec.reference_epochs, seed=cell.seed),
        )

    def results(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        history = RunDirectory(run_dir).read_history()
        curve.extend({key: line[key] for key in CURVE_KEYS if key in line} for line in history)
        measured = {key: metrics.get(key) for key in UQ_COLUMNS if key in metrics and key not in axes}
        return measured | {"queries": int(metrics["queries_used"])}

    def peaks(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for prefix in ("", "query_"):
            peak = peak_of(curve, f"{prefix}member_variance")
            found.update({f"{prefix}variance_{name}": value for name, value in peak.items()})
        return found

    row = run_cell(axes, work_dir / "runs" / cell.id, attack, results, peaks)
    return {"row": row, "curve": curve}


def _run_in_child(spec_data: dict[str, Any], cell_data: dict[str, Any], work_dir: str, cache_dir: str) -> dict[str, Any]:
    """A local worker process's job (picklable arguments only)."""
    logging.getLogger("attacker").setLevel(logging.WARNING)
    return run_uq_cell(UQStudySpec.model_validate(spec_data), UQCell(**cell_data), Path(work_dir), Path(cache_dir))


def run_uq_job(spec_data: dict[str, Any], cell_data: dict[str, Any]) -> dict[str, Any]:
    """An rq job for ``stealsim grid-worker``: one study cell, in the worker's work and cache directories."""
    options = worker_options()
    return run_uq_cell(UQStudySpec.model_validate(spec_data), UQCell(**cell_data), options.work_dir,
                       options.cache_dir)


def _local(spec: UQStudySpec, todo: Sequence[UQCell], out: Path, cache_dir: Path, jobs: int) -> Iterator[dict[str, Any]]:
    if jobs == 1:
        for cell in todo:
            yield run_uq_cell(spec, cell, out, cache_dir)
        return
    prepare_victims(spec.victim_settings(), cache_dir, show_progress=False)  # once, before the children
    # spawn: the children start clean (no copy of this process's torch threads or open sockets).
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures: dict[Future[dict[str, Any]], UQCell] = {
            pool.submit(_run_in_child, spec.model_dump(), asdict(cell), str(out), str(cache_dir)): cell
            for cell in todo
        }
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                cell = futures.pop(future)
                try:
                    yield future.result()
                except Exception as exc:  # the child died (e.g. killed for memory)
                    yield _failure(cell)(f"worker process: {type(exc).__name__}: {exc}")


def _failure(cell: UQCell) -> Callable[[str], dict[str, Any]]:
    return lambda error: {"row": {"cell": cell.id, **asdict(cell), "status": "failed", "error": error}, "curve": []}


def _on_queue(spec: UQStudySpec, todo: Sequence[UQCell], redis_url: str, queue: str,
              poll_seconds: float) -> Iterator[dict[str, Any]]:
    jobs = [Job(f"{queue}-uq-{cell.id}", run_uq_job, (spec.model_dump(), asdict(cell)), _failure(cell))
            for cell in todo]
    for _, result in collect_jobs(jobs, redis_url, queue, poll_seconds):
        yield result


def run_uq_study(
    spec: UQStudySpec,
    out: Path,
    *,
    cache_dir: Path = Path("runs/cache"),
    jobs: int = 1,
    redis_url: str | None = None,
    queue: str = "stealsim-grid",
    announce: Callable[[str], None] | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, str]]:
    """Run every cell not yet in ``out/results.csv``; write the report; return all result rows."""
    say = announce or (lambda text: logger.info("%s", text))
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.yaml"
    results_store = ResultsStore(out / "results.csv", UQ_COLUMNS)
    if spec_path.is_file() and results_store.rows():
        earlier = yaml.safe_load(spec_path.read_text())
        shared = {key: value for key, value in spec.model_dump().items()
                  if key not in ("kinds", "sources", "diversity", "seeds", "evaluations")}
        changed = sorted(key for key, value in shared.items() if earlier.get(key) != value)
        if changed:
            raise ConfigError(f"{out} holds a study with other settings ({', '.join(changed)}); "
                              "use a new --out directory")
    spec_path.write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    finished = results_store.finished()
    todo = [cell for cell in cells_of(spec) if cell.id not in finished]
    total = len(cells_of(spec))
    where = f"on Redis queue {queue!r}" if redis_url else f"in {jobs} local process{'es' if jobs > 1 else ''}"
    say(f"uq-study: {total} cells, {total - len(todo)} already finished, {len(todo)} to run {where}")
    results = (_on_queue(spec, todo, redis_url, queue, poll_seconds) if redis_url
               else _local(spec, todo, out, cache_dir, jobs))
    for index, result in enumerate(results, start=1):
        row = result["row"]
        with (out / "curves.jsonl").open("a") as handle:
            handle.write(json.dumps({"cell": row["cell"], "history": result["curve"]}) + "\n")
        results_store.append(row)
        say(f"[{index}/{len(todo)}] {row['cell']}: {row['status']}"
            + (f", combined fidelity {row['combined_fidelity']:.3f}" if row["status"] == "done" else
               f" ({row.get('error')})"))
    write_uq_report(out)
    return results_store.rows()


# -- the report ------------------------------------------------------------------------------

REPORT_COLUMNS = ("combined_fidelity", "member_fidelity_best", "member_fidelity_mean", "fidelity_gain",
                  "member_variance", "member_disagreement", "query_member_variance", "query_member_disagreement",
                  "variance_peak_queries", "variance_final_over_peak", "query_variance_final_over_peak")


def _groups(rows: Sequence[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Finished rows by variant (the cell without its seed), in order of first appearance."""
    return seed_groups((row for row in rows if row.get("status") == "done"),
                       lambda row: row["cell"].rsplit("__s", 1)[0])


def _formats(column: str) -> tuple[str, str]:
    """Format specs of a column's mean and std: whole queries, variances in scientific notation, else 3 decimals."""
    if column.endswith("queries"):
        return ".0f", ".0f"
    if column.endswith("variance"):
        return ".2e", ".1e"
    return ".3f", ".3f"


def _finite(row: dict[str, str], column: str) -> float | None:
    value = parse_number(row.get(column))
    return value if math.isfinite(value) else None


def summary_table(rows: Sequence[dict[str, str]]) -> str:
    """Markdown: one line per variant, each column mean ± sample std over its seeds (those with a finite value)."""
    lines = ["| kind | source | diversity | seeds | " + " | ".join(REPORT_COLUMNS) + " |",
             "|" + "---|" * (4 + len(REPORT_COLUMNS))]
    for _, members in sorted(_groups(rows).items()):
        first = members[0]
        cells = []
        for column in REPORT_COLUMNS:
            values = [v for v in (_finite(row, column) for row in members) if v is not None]
            cells.append(format_mean_std(spread(values), *_formats(column)))
        lines.append(f"| {first['kind']} | {first['source']} | {first['diversity']} | {len(members)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curves(out: Path) -> dict[str, list[dict[str, Any]]]:
    path = out / "curves.jsonl"
    if not path.is_file():
        return {}
    curves = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            if entry["history"]:
                curves[entry["cell"]] = entry["history"]  # a rerun cell: its latest history
    return curves


def _plot(rows: Sequence[dict[str, str]], curves: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = _groups(rows)
    kinds = list(dict.fromkeys(row["kind"] for members in groups.values() for row in members))
    if not kinds or not curves:
        return []
    variants = sorted(dict.fromkeys(variant.split("__", 1)[1] for variant in groups))
    colours = {variant: f"C{index}" for index, variant in enumerate(variants)}

    def band(axis: Any, histories: list[list[dict[str, Any]]], metric: str, colour: str, style: str,
             label: str | None) -> Any:
        curve = mean_curve(histories, metric)
        if curve is None:
            return None
        axis.plot(curve.queries, curve.mean, style, color=colour, lw=1.4, label=label)
        if curve.runs > 1:
            axis.fill_between(curve.queries, *curve.band(), color=colour, alpha=0.15, linewidth=0)
        return curve

    written = []
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False, sharey=True)
    for axis, kind in zip(axes[0], kinds, strict=True):
        for variant in variants:
            histories = [curves[row["cell"]] for row in groups.get(f"{kind}__{variant}", []) if row["cell"] in curves]
            if not histories:
                continue
            seeds = len(histories)
            band(axis, histories, "combined_fidelity", colours[variant], "-",
                 f"{variant.replace('__', ', ')} ({seeds} seed{'s' if seeds > 1 else ''}): combined")
            band(axis, histories, "member_fidelity_best", colours[variant], "--", "best member")
        axis.set_title(kind)
        axis.set_xlabel("queries")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("fidelity (mean over seeds, band ±1 std)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False,
                  bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 4)))
    figure.suptitle("combined prediction (solid) vs best single member (dashed)")
    figure.tight_layout()
    figure.savefig(out / "uq-fidelity.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    written.append("uq-fidelity.png")

    figure, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 7.0), squeeze=False, sharey="row")
    for column, kind in enumerate(kinds):
        for variant in variants:
            histories = [curves[row["cell"]] for row in groups.get(f"{kind}__{variant}", []) if row["cell"] in curves]
            if not histories:
                continue
            for row_index, metric in enumerate(("member_variance", "member_disagreement")):
                axis = axes[row_index][column]
                curve = band(axis, histories, metric, colours[variant], "-",
                             f"{variant.replace('__', ', ')}: test split" if column == 0 and row_index == 0 else None)
                band(axis, histories, f"query_{metric}", colours[variant], ":",
                     "on the last queries" if column == 0 and row_index == 0 else None)
                if curve is not None and row_index == 0:  # the variance peak of the mean curve
                    peak = max(range(len(curve.mean)), key=lambda i: curve.mean[i])
                    axis.plot([curve.queries[peak]], [curve.mean[peak]], "v", color=colours[variant], ms=6)
        axes[0][column].set_title(kind)
        axes[0][column].set_yscale("log")
        axes[1][column].set_xlabel("queries")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("members' prediction variance")
    axes[1][0].set_ylabel("share of images the members split on")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False,
                  bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 4)))
    figure.suptitle("members' spread on the test split (solid) and on the attacker's last 1024 queries (dotted); "
                    "▼ variance peak")
    figure.tight_layout()
    figure.savefig(out / "uq-spread.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    written.append("uq-spread.png")
    return written


def write_uq_report(out: Path) -> Path:
    """``OUT/report.md``: the table over seeds and the two figures (when a cell finished)."""
    rows = ResultsStore(out / "results.csv", UQ_COLUMNS).rows()
    failed = [row for row in rows if row.get("status") != "done"]
    spec = yaml.safe_load((out / "spec.yaml").read_text()) if (out / "spec.yaml").is_file() else {}
    figures = _plot(rows, _curves(out), out) if len(failed) < len(rows) else []
    lines = [
        "# UQ stealing study", "",
        f"Dataset {spec.get('dataset')}, {spec.get('budget')} queries per run, {spec.get('members')} members, "
        f"evaluated on the {spec.get('split')} split; {len(rows) - len(failed)} runs done, {len(failed)} failed.",
        "Each line: mean ± sample std over seeds. `*_variance`: mean over images and classes of the members' "
        "probability variance; `*_disagreement`: share of images on which not all members agree; `query_*`: on the "
        "attacker's last 1024 answered queries; `variance_peak_queries`: where the test variance peaked; "
        "`*_final_over_peak`: final variance / peak variance (1: still rising at the end).", "",
        summary_table(rows), "",
    ]
    lines += [f"![{name}]({name})" for name in figures]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {row['cell']}: {row.get('error')}" for row in failed]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
