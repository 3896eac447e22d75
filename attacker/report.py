"""Reports of attack runs: one run's report.md and plot, and comparisons of several runs.

Runs that differ only by their seed form a *group* (:func:`seed_group_key`); a
comparison aggregates each group over its seeds: per metric the mean, the
sample standard deviation (n - 1) and the minimum, and the number of seeds::

    runs = read_runs([Path("runs/ds-s0"), Path("runs/ds-s1"), Path("runs/random-s0")])
    groups = group_runs(runs)                 # or group_runs(runs, labels=[...])
    print(seed_table(groups))                 # "mean ± std (min)" cells, an n column
    plot_groups(groups, Path("cmp.png"), "attacks")   # mean curves with a ±1 std band

Every aggregated table shows the random-noise baseline (``random``, run with
the same victim, budget and evaluation set) beside each attack.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stealsim.errors import AttackError

__all__ = [
    "BASELINE_ATTACK",
    "COMPARED_METRICS",
    "CURVE_METRICS",
    "SEED_METRICS",
    "Curve",
    "ReferencePoint",
    "Run",
    "RunGroup",
    "Spread",
    "aggregate_runs",
    "compare_runs",
    "format_spread",
    "group_runs",
    "load_run",
    "mean_curve",
    "plot_groups",
    "plot_runs",
    "queries_to_reach",
    "read_reference_points",
    "read_runs",
    "seed_group_key",
    "seed_table",
    "spread",
    "write_run_report",
]

COMPARED_METRICS = (
    "queries_used",
    "fidelity",
    "accuracy",
    "victim_accuracy",
    "normalised_accuracy",
    "transfer_success_rate",
    "reference_transfer_success_rate",
    "queries_to_90_fidelity",
    "queries_to_95_fidelity",
    "queries_per_second",
    "wall_seconds",
)
SEED_METRICS = (
    "fidelity",
    "accuracy",
    "transfer_success_rate",
    "queries_to_90_fidelity",
    "queries_used",
    "eval_queries",
    "wall_seconds",
)
"""The metrics of an aggregated table (one "mean ± std (min)" cell each)."""
CURVE_METRICS = ("fidelity", "accuracy")
"""The metrics drawn against queries, one panel each."""
BASELINE_ATTACK = "random"
BAND = "±1 std over seeds"


def queries_to_reach(history: Sequence[dict[str, Any]], fidelity: float) -> int | None:
    """Queries at the first evaluation whose fidelity reaches ``fidelity`` (None: never)."""
    for line in history:
        if line.get("fidelity", -1.0) >= fidelity:
            return int(line["queries"])
    return None


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and abs(value) >= 10:
            return f"{int(value):,}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- runs and groups ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A finished run directory, read back."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def load_run(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, metrics, history)`` of a run directory.

    A run that was stopped (or is still running) has no ``metrics.json``: its metrics
    are its last evaluation in ``metrics.jsonl``, with ``stopped_at`` (the queries
    spent then) added, so tables can say the row is not a finished run.
    """
    try:
        config = json.loads((path / "config.json").read_text())
        history_path = path / "metrics.jsonl"
        lines = history_path.read_text().splitlines() if history_path.is_file() else []
        history = [json.loads(line) for line in lines if line.strip()]
        metrics_path = path / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
        else:
            evaluated = [entry for entry in history if "fidelity" in entry]
            if not evaluated:
                raise AttackError(f"{path} is not an attack run with results: no metrics.json and no "
                                  "evaluation in metrics.jsonl")
            metrics = {**evaluated[-1], "stopped_at": evaluated[-1].get("queries")}
    except (OSError, json.JSONDecodeError) as exc:
        raise AttackError(f"{path} is not an attack run with results: {exc}") from exc
    return config, metrics, history


def stopped_runs_note(runs: Sequence[Run]) -> str | None:
    """The note naming runs reported from their last evaluation (no ``metrics.json``)."""
    stopped = [f"{run.path.name} at {_format(run.metrics['stopped_at'])} queries"
               for run in runs if "stopped_at" in run.metrics]
    if not stopped:
        return None
    return ("Not finished (stopped or still running; values from the last evaluation, no final "
            f"transfer): {', '.join(stopped)}.")


def read_runs(paths: Sequence[Path]) -> list[Run]:
    if not paths:
        raise AttackError("give at least one run directory")
    return [Run(path, *load_run(path)) for path in paths]


def _victim_id(config: Mapping[str, Any]) -> str:
    """The victim without the service's address: ``http model NAME`` or the checkpoint path."""
    victim = str(config.get("victim"))
    if config.get("victim_kind") == "http":
        return "http model " + victim.rsplit(" model ", 1)[-1]
    return victim


def seed_group_key(config: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal for two runs to be seeds of one experiment.

    The attack, the victim (for HTTP runs its model name, not the service's
    address, which changes between services), the victim's public metadata, the
    budget, the evaluation dataset, every attack setting and every evaluation
    setting. Left out: ``seed``, ``device``, ``eval_every`` (where the curve is
    sampled, not what is trained) and how the victim was reached. Runs against two
    services that serve different models under one name therefore share a key;
    separate them with labels (:func:`group_runs`).
    """
    info = dict(config.get("victim_info") or {})
    info.pop("max_images_per_request", None)
    key: dict[str, Any] = {
        "attack": config.get("attack"),
        "victim": _victim_id(config),
        "victim_info": info,
        "budget": config.get("budget"),
        "eval_dataset": config.get("eval_dataset"),
    }
    for name, value in sorted((config.get("settings") or {}).items()):
        key[f"settings.{name}"] = value
    for name, value in sorted((config.get("evaluation") or {}).items()):
        key[f"evaluation.{name}"] = value
    return key


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class RunGroup:
    """Runs of one experiment over seeds (or of one user-given label)."""

    label: str
    runs: list[Run]

    @property
    def attack(self) -> str:
        attacks = {str(run.config.get("attack")) for run in self.runs}
        return attacks.pop() if len(attacks) == 1 else "mixed"

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    def values(self, metric: str) -> list[Any]:
        return [run.metrics.get(metric) for run in self.runs]


_CONTEXT_FIELDS = ("victim", "victim_info", "budget", "eval_dataset")


def _short_value(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= 40 else "…" + text[-39:]


def group_runs(runs: Sequence[Run], labels: Sequence[str] | None = None) -> list[RunGroup]:
    """Runs grouped over seeds, in the order of their first run.

    Without ``labels``, by :func:`seed_group_key`; a group is named by its attack
    and whatever tells it apart from the other groups (settings that differ from
    another group of the same attack; victim, budget or evaluation set that differ
    at all). With ``labels`` (one per run), runs of one label form one group,
    whatever their configs.
    """
    if labels is not None:
        if len(labels) != len(runs):
            raise AttackError(f"give one label per run: {len(labels)} labels for {len(runs)} runs")
        named: dict[str, list[Run]] = {}
        for run, label in zip(runs, labels, strict=True):
            named.setdefault(label, []).append(run)
        return [RunGroup(label, members) for label, members in named.items()]
    keyed: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        key = seed_group_key(run.config)
        keyed.setdefault(_canonical(key), (key, []))[1].append(run)
    keys = [key for key, _ in keyed.values()]
    groups = []
    for key, members in keyed.values():
        shown = []
        for field, value in key.items():
            if field == "attack":
                continue
            if field in _CONTEXT_FIELDS:
                others = keys
            else:  # settings differ between attacks anyway: compare with the same attack
                others = [other for other in keys if other["attack"] == key["attack"]]
            if any(_canonical(other.get(field)) != _canonical(value) for other in others):
                name = field.split(".", 1)[1] if field.startswith("settings.") else field
                shown.append(f"{name}={_short_value(value)}")
        label = str(key["attack"]) + (f" ({', '.join(shown)})" if shown else "")
        groups.append(RunGroup(label, members))
    return groups


# -- aggregation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """One metric over the seeds of a group."""

    n: int
    """Runs with a value."""
    of: int
    """Runs in the group."""
    mean: float
    std: float
    """Sample standard deviation (n - 1); NaN for a single value."""
    min: float


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def spread(values: Sequence[Any]) -> Spread | None:
    """Mean, sample std and min of the numbers in ``values`` (None, NaN and non-numbers skipped).

    None when no value is a number.
    """
    numbers = [number for number in map(_number, values) if number is not None]
    if not numbers:
        return None
    std = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
    return Spread(n=len(numbers), of=len(values), mean=statistics.fmean(numbers), std=std, min=min(numbers))


def format_spread(value: Spread | None) -> str:
    """``mean ± std (min)``; a single value alone; ``[k/n]`` when only k of n runs have one."""
    if value is None:
        return "—"
    if value.n == 1:
        text = _format(value.mean)
    else:
        std = "0" if value.std == 0 else _format(value.std)
        text = f"{_format(value.mean)} ± {std} ({_format(value.min)})"
    return text + (f" [{value.n}/{value.of}]" if value.n < value.of else "")


def _context(group: RunGroup) -> str:
    key = seed_group_key(group.runs[0].config)
    return _canonical({field: key[field] for field in _CONTEXT_FIELDS}
                      | {"hard_label": key.get("settings.hard_label")})


def _baselines(groups: Sequence[RunGroup]) -> dict[int, RunGroup | None]:
    """For each group (by position), the first random-noise group with the same victim, budget and evaluation set."""
    found: dict[int, RunGroup | None] = {}
    for index, group in enumerate(groups):
        found[index] = next((other for other in groups if other.attack == BASELINE_ATTACK
                             and _context(other) == _context(group)), None)
    return found


def seed_table(groups: Sequence[RunGroup], metrics: Sequence[str] = SEED_METRICS) -> str:
    """A markdown table of the groups: ``mean ± std (min)`` per metric, the seeds, the baseline.

    The last column is the group's mean fidelity minus that of the random-noise
    baseline with the same victim, budget and evaluation set. Notes below the
    table say what the cells mean, which groups have a single seed or no
    baseline, and which runs report an evaluation error.
    """
    baselines = _baselines(groups)
    header = ("| group | attack | n | seeds | " + " | ".join(metrics)
              + f" | fidelity − {BASELINE_ATTACK} |")
    lines = [header, "| --- " * (len(metrics) + 5) + "|"]
    for index, group in enumerate(groups):
        count = len(group.runs)
        cells = " | ".join(format_spread(spread(group.values(name))) for name in metrics)
        baseline = baselines[index]
        if baseline is group:
            versus = "baseline"
        elif baseline is None:
            versus = "no baseline"
        else:
            ours, theirs = spread(group.values("fidelity")), spread(baseline.values("fidelity"))
            versus = f"{ours.mean - theirs.mean:+.4f}" if ours and theirs else "—"
        seeds = ", ".join(str(seed) for seed in group.seeds)
        lines.append(f"| {group.label} | {group.attack} | {'1 seed' if count == 1 else count} | {seeds} "
                     f"| {cells} | {versus} |")
    notes = [
        "",
        f"Cells: mean ± sample std (n − 1) (min) over the seeds of a group; n: runs in the group; "
        f"[k/n]: only k runs have the value; fidelity − {BASELINE_ATTACK}: difference of the mean fidelities "
        f"from the random-noise baseline with the same victim, budget and evaluation set.",
    ]
    single = [group.label for group in groups if len(group.runs) == 1]
    if single:
        notes.append(f"1 seed (no spread): {', '.join(single)}.")
    repeated = [group.label for group in groups if len(set(map(str, group.seeds))) < len(group.runs)]
    if repeated:
        notes.append(f"Seeds repeat within: {', '.join(repeated)} (n counts runs, not distinct seeds).")
    if any(baselines[index] is None for index in range(len(groups))):
        notes.append(f"No baseline: run `stealsim attack {BASELINE_ATTACK}` with the same victim, budget "
                     "and evaluation set beside those groups.")
    stopped = stopped_runs_note([run for group in groups for run in group.runs])
    if stopped:
        notes.append(stopped)
    for group in groups:
        for run in group.runs:
            if run.metrics.get("evaluation_error"):
                notes.append(f"{run.path.name}: evaluation error: {run.metrics['evaluation_error']}.")
    return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


# -- curves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One metric against queries, the mean over a group's runs with a ±1 std band."""

    queries: list[float]
    mean: list[float]
    std: list[float]
    """Sample std per point (0 for a single run)."""
    runs: int
    interpolated: bool
    """True when the runs were evaluated at different queries and are interpolated
    (linearly) onto the union of their query counts where all of them overlap."""


def _points(history: Sequence[dict[str, Any]], metric: str) -> list[tuple[float, float]]:
    points = []
    for line in history:
        value = _number(line.get(metric))
        if value is not None and "queries" in line:
            points.append((float(line["queries"]), value))
    return sorted(points)


def mean_curve(histories: Sequence[Sequence[dict[str, Any]]], metric: str = "fidelity") -> Curve | None:
    """The mean of ``metric`` over the histories at common query counts (None: no common point).

    Histories evaluated at the same queries are averaged there; otherwise each is
    interpolated onto the union of the query counts inside the range they all
    cover (no extrapolation). Histories without a point of ``metric`` are left out.
    """
    import numpy as np

    series = [points for points in (_points(history, metric) for history in histories) if points]
    if not series:
        return None
    grids = [[query for query, _ in points] for points in series]
    interpolated = any(grid != grids[0] for grid in grids)
    if interpolated:
        low, high = max(grid[0] for grid in grids), min(grid[-1] for grid in grids)
        queries = sorted({query for grid in grids for query in grid if low <= query <= high})
        if not queries:
            return None
        values = np.array([np.interp(queries, [q for q, _ in points], [v for _, v in points])
                           for points in series])
    else:
        queries = grids[0]
        values = np.array([[value for _, value in points] for points in series])
    std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(queries))
    return Curve(queries=list(map(float, queries)), mean=values.mean(axis=0).tolist(), std=std.tolist(),
                 runs=len(series), interpolated=interpolated)


@dataclass(frozen=True)
class ReferencePoint:
    """A published figure drawn beside our curves: ``method`` reached ``value`` of ``metric`` at ``queries``."""

    method: str
    queries: float
    metric: str
    value: float
    source: str


def read_reference_points(path: Path) -> list[ReferencePoint]:
    """Published points from a CSV: ``#`` comment lines, then ``method,queries,<metric>[_percent]``.

    ``<metric>`` is ``accuracy`` or ``fidelity``; ``_percent`` values are divided by 100.
    The source is the file's name (its comments should cite where the points come from).

    Raises:
        AttackError: a missing file, an unknown value column or a malformed row.
    """
    import csv

    try:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise AttackError(f"reference points {path}: {exc}") from exc
    reader = csv.DictReader(lines)
    columns = [c for c in reader.fieldnames or [] if c not in ("method", "queries")]
    if "method" not in (reader.fieldnames or []) or "queries" not in (reader.fieldnames or []) or len(columns) != 1:
        raise AttackError(f"reference points {path}: need columns method, queries and one value column, "
                          f"got {reader.fieldnames}")
    column = columns[0]
    metric = column.removesuffix("_percent")
    if metric not in CURVE_METRICS:
        raise AttackError(f"reference points {path}: value column {column!r} is not one of "
                          f"{', '.join(CURVE_METRICS)} (optionally _percent)")
    scale = 100.0 if column.endswith("_percent") else 1.0
    try:
        return [ReferencePoint(row["method"], float(row["queries"]), metric, float(row[column]) / scale, path.name)
                for row in reader]
    except (TypeError, ValueError) as exc:
        raise AttackError(f"reference points {path}: a malformed row ({exc})") from exc


def plot_groups(
    groups: Sequence[RunGroup] | Sequence[tuple[str, Sequence[Sequence[dict[str, Any]]]]],
    path: Path,
    title: str,
    metrics: Sequence[str] = CURVE_METRICS,
    references: Sequence[ReferencePoint] = (),
) -> list[str]:
    """One panel per metric against queries: each group's mean over seeds with a ±1 std band.

    ``groups`` are :class:`RunGroup` or ``(label, histories)`` pairs. The legend
    sits outside the panels. Writes nothing when no group has an evaluated point.
    ``references`` (published points) are drawn as black markers on their metric's panel.
    Returns notes on what was drawn (empty list: nothing was written).
    """
    named: list[tuple[str, Sequence[Sequence[dict[str, Any]]]]] = [
        (group.label, [run.history for run in group.runs]) if isinstance(group, RunGroup) else group
        for group in groups
    ]
    curves = {metric: [(label, mean_curve(histories, metric)) for label, histories in named]
              for metric in metrics}
    if not any(curve is not None for drawn in curves.values() for _, curve in drawn):
        path.unlink(missing_ok=True)  # never leave a plot of an earlier, longer history
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics) + 2.4, 4), squeeze=False)
    handles: dict[str, Any] = {}
    interpolated: set[str] = set()
    for axis, metric in zip(axes[0], metrics, strict=True):
        for index, (label, curve) in enumerate(curves[metric]):
            if curve is None:
                continue
            colour = f"C{index % 10}"
            name = f"{label} ({curve.runs} seed{'s' if curve.runs > 1 else ''})"
            (line,) = axis.plot(curve.queries, curve.mean, "-o", ms=3, color=colour)
            if curve.runs > 1:
                axis.fill_between(curve.queries, [m - s for m, s in zip(curve.mean, curve.std, strict=True)],
                                  [m + s for m, s in zip(curve.mean, curve.std, strict=True)],
                                  color=colour, alpha=0.2, linewidth=0)
            handles.setdefault(name, line)
            if curve.interpolated:
                interpolated.add(label)
        methods = sorted({point.method for point in references if point.metric == metric})
        for index, method in enumerate(methods):
            points = [p for p in references if p.metric == metric and p.method == method]
            (marker,) = axis.plot([p.queries for p in points], [p.value for p in points],
                                  marker="xs^vDo"[index % 6], color="black", ls="none", ms=7, mew=1.5)
            handles.setdefault(f"{method}, published ({points[0].source})", marker)
        axis.set_xlabel("attack queries (images)")
        axis.set_ylabel(metric)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.set_title(metric)
    seeds = {curve.runs for drawn in curves.values() for _, curve in drawn if curve is not None}
    caption = "one run per curve (no band)" if seeds == {1} else f"mean over seeds, band {BAND}"
    if interpolated:
        caption += "; interpolated onto common queries: " + ", ".join(sorted(interpolated))
    figure.suptitle(f"{title}\n{caption}", fontsize=9)
    figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                  fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    notes = [f"{path}: {', '.join(metrics)} against queries, {caption}"]
    return notes


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> bool:
    """One curve per run (no aggregation), a panel per metric; False (nothing written) without any point."""
    return bool(plot_groups([(label, [history]) for label, history in runs], path, title))


# -- reports ------------------------------------------------------------------------------


def _evaluation_cost(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """What evaluating the run cost, from the metrics (``planned_eval_queries`` and
    ``evaluation_error`` only when the run recorded them)."""
    spent = metrics.get("eval_queries")
    text = (f"Evaluation queries are counted apart from the attack budget: {_format(spent)} spent"
            if spent is not None else "The run did not record its evaluation queries")
    if metrics.get("planned_eval_queries") is not None:
        text += f" of {_format(metrics['planned_eval_queries'])} planned"
    metering = config.get("metering", "server-reconciled" if config.get("victim_kind") == "http" else "in-process")
    if metering == "client-only":
        text += (". Metering is **client-only**: the server does not meter keys (it advertises no "
                 "`stealsim_metering` extension), so every count here is the attacker's own")
    elif config.get("victim_kind") == "http":
        text += (", charged to the evaluation key" if config.get("separate_evaluation_key")
                 else ", charged to the attack's key (the server counts them too)")
        text += ". Metering is **server-reconciled**: the key's usage on the server is checked against the run's count"
    else:
        text += " (in-process victim: nobody is charged)"
    text += "."
    if metrics.get("evaluation_error"):
        text += (f"\n\n**Evaluation error:** {metrics['evaluation_error']}. Metrics it did not "
                 "measure are missing below.")
    return text


def run_title(config: Mapping[str, Any]) -> str:
    """``ATTACK against MODEL (over HTTP | in process)``: no URL, which is often a temporary port."""
    model = config.get("victim_model")
    if model is None:  # a run directory written before victim_model was recorded
        return f"{config.get('attack')} against {config.get('victim')}"
    where = "over HTTP" if config.get("victim_kind") == "http" else "in process"
    return f"{config.get('attack')} against model {model} ({where})"


def write_run_report(
    path: Path, config: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    """Write ``report.md`` and ``progress.png`` of the run in ``path``.

    Without an evaluated point there is no plot; ``report.md`` says so.
    """
    title = run_title(config)
    if plot_runs([(str(config.get("attack", "attack")), history)], path / "progress.png", title):
        figure = "![fidelity and accuracy against queries](progress.png)"
    else:
        figure = ("No plot: the run has no evaluated point (no line of `metrics.jsonl` holds a "
                  "fidelity), so there is nothing to draw.")
    rows = "\n".join(
        f"| {name} | {_format(metrics.get(name))} |"
        for name in (*COMPARED_METRICS, "eval_queries", "planned_eval_queries", "evaluation_error",
                     "stop_reason", "server_queries", "server_count_matches", "lost_queries",
                     "transfer_epsilon")
        if name in metrics
    )
    settings = "\n".join(f"| {k} | {_format(v)} |" for k, v in sorted(config.get("settings", {}).items()))
    evaluations = "\n".join(
        f"| {_format(line.get('queries'))} | {_format(line.get('fidelity'))} | {_format(line.get('accuracy'))} "
        f"| {_format(line.get('attack_seconds'))} |"
        for line in history
    ) or "| — | — | — | — |"
    text = f"""# {title}

Budget {_format(config.get('budget'))} queries, seed {config.get('seed')} (a single seed:
compare seeds with `stealsim report RUN...`), evaluated on `{config.get('eval_dataset')}`
(test split). {_evaluation_cost(config, metrics)}

{figure}

## Final metrics

| metric | value |
| --- | --- |
{rows}

## Evaluations

| queries | fidelity | accuracy | attack seconds |
| --- | --- | --- | --- |
{evaluations}

## Attack settings

| setting | value |
| --- | --- |
{settings}
"""
    (path / "report.md").write_text(text)


def compare_runs(paths: Sequence[Path], plot_path: Path | None = None) -> str:
    """A markdown table of runs, one row each (and, with ``plot_path``, one curve per run)."""
    runs = read_runs(paths)
    header = "| run | attack | seed | " + " | ".join(COMPARED_METRICS) + " |"
    rule = "| --- " * (len(COMPARED_METRICS) + 3) + "|"
    lines = [header, rule]
    for run in runs:
        cells = " | ".join(_format(run.metrics.get(name)) for name in COMPARED_METRICS)
        lines.append(f"| {run.path.name} | {run.config.get('attack')} | {run.seed} | {cells} |")
    text = "\n".join(lines) + "\n"
    stopped = stopped_runs_note(runs)
    if stopped:
        text += "\n" + stopped + "\n"
    if plot_path is not None and not plot_runs([(run.path.name, run.history) for run in runs],
                                               plot_path, "attack runs"):
        text += f"\nNo plot written to {plot_path}: no run has an evaluated point.\n"
    return text


def aggregate_runs(
    paths: Sequence[Path], plot_path: Path | None = None, labels: Sequence[str] | None = None,
    metrics: Sequence[str] = SEED_METRICS, references: Sequence[ReferencePoint] = (),
    curves: Sequence[str] = CURVE_METRICS,
) -> str:
    """Runs grouped over seeds (:func:`group_runs`) in one table (:func:`seed_table`); with
    ``plot_path``, their mean curves with a band (:func:`plot_groups`) and any published
    ``references`` as markers."""
    groups = group_runs(read_runs(paths), labels)
    text = seed_table(groups, metrics)
    if plot_path is not None:
        notes = plot_groups(groups, plot_path, "attack runs", metrics=curves, references=references)
        text += ("\nPlot: " + "; ".join(notes) + "\n" if notes
                 else f"\nNo plot written to {plot_path}: no run has an evaluated point.\n")
    return text
