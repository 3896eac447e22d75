"""The multi-run report: runs grouped over seeds, compared, and drawn as mean curves.

Runs that differ only by their seed form a *group* (:func:`seed_group_key`); a
comparison aggregates each group over its seeds: per metric the mean, the
sample standard deviation (n - 1) and the minimum, and the number of seeds
(:mod:`experiments.stats`)::

    runs = read_runs([Path("runs/ds-s0"), Path("runs/ds-s1"), Path("runs/random-s0")])
    groups = group_runs(runs)                 # or group_runs(runs, labels=[...])
    print(seed_table(groups))                 # "mean ± std (min)" cells, an n column
    plot_groups(groups, Path("cmp.png"), "attacks")   # mean curves with a ±1 std band

Every table names each group's victim and evaluation dataset (columns) and shows
the random-noise baseline (``random``, run with the same victim, budget and
evaluation set) beside each attack. A group of one run shows accuracy and
fidelity with their 95 % interval over the evaluation split (``(low–high)``,
Wilson's), a note gives the split's resolution, and a one-run curve is drawn
with that interval as its band (a group of several seeds: ±1 std). ``stealsim report``
prints :func:`aggregate_runs` (or, per run, :func:`compare_runs`). One run's own
``report.md`` is :func:`attacker.report.write_run_report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attacker.report import (
    COMPARED_METRICS,
    CURVE_METRICS,
    SAME_PANEL,
    Line,
    format_interval,
    format_value,
    interval_band,
    plot_panels,
    resolution_note,
    victim_is_perfect,
)
from attacker.rundir import RunDirectory, RunRecord
from experiments.stats import X_AXES, format_spread, mean_curve, seed_groups, spread
from stealsim.errors import AttackError

__all__ = [
    "BASELINE_ATTACK",
    "SEED_METRICS",
    "ReferencePoint",
    "RunGroup",
    "aggregate_runs",
    "compare_runs",
    "group_runs",
    "plot_groups",
    "plot_runs",
    "read_reference_points",
    "read_runs",
    "seed_group_key",
    "seed_table",
    "stopped_runs_note",
]

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

BASELINE_ATTACK = "random"
BAND = "±1 std over seeds"
INTERVAL_BAND = "95 % interval of the evaluation split (Wilson)"
INTERVAL_METRICS = ("fidelity", "accuracy", "victim_accuracy")
"""The metrics whose single-run cells carry their interval."""


# -- runs and groups ----------------------------------------------------------------------


def stopped_runs_note(runs: Sequence[RunRecord]) -> str | None:
    """The note naming runs reported from their last evaluation (no ``metrics.json``)."""
    stopped = [f"{run.path.name} at {format_value(run.metrics['stopped_at'])} queries"
               for run in runs if "stopped_at" in run.metrics]
    if not stopped:
        return None
    return ("Not finished (stopped or still running; values from the last evaluation, no final "
            f"transfer): {', '.join(stopped)}.")


def read_runs(paths: Sequence[Path]) -> list[RunRecord]:
    if not paths:
        raise AttackError("give at least one run directory")
    return [RunDirectory(path).read_record() for path in paths]


def _victim_id(config: Mapping[str, Any]) -> str:
    """The victim without the service's address: ``http model NAME`` or the checkpoint path."""
    victim = str(config.get("victim"))
    if config.get("victim_kind") == "http":
        return "http model " + victim.rsplit(" model ", 1)[-1]
    return victim


def victim_name(config: Mapping[str, Any]) -> str:
    """The victim for a table: ``MODEL (HTTP)`` or the checkpoint's path (in process)."""
    if config.get("victim_kind") == "http":
        return f"{_victim_id(config).removeprefix('http model ')} (HTTP)"
    return _victim_id(config)


def dataset_name(config: Mapping[str, Any]) -> str:
    """The evaluation set for a table: ``DATASET SPLIT`` (``digits test``)."""
    return f"{config.get('eval_dataset')} {config.get('eval_split') or (config.get('evaluation') or {}).get('split', 'test')}"


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


def _shown(value: Any) -> str:
    """A setting's value as a reader writes it: text as is, lists comma-joined, never cut."""
    if isinstance(value, list | tuple):
        return ",".join(_shown(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{name}={_shown(item)}" for name, item in sorted(value.items()))
    return value if isinstance(value, str) else _canonical(value)


@dataclass(frozen=True)
class RunGroup:
    """Runs of one experiment over seeds (or of one user-given label)."""

    label: str
    runs: list[RunRecord]

    @property
    def attack(self) -> str:
        attacks = {str(run.config.get("attack")) for run in self.runs}
        return attacks.pop() if len(attacks) == 1 else "mixed"

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    def values(self, metric: str) -> list[Any]:
        return [run.metrics.get(metric) for run in self.runs]

    def column(self, describe: Any) -> str:
        """``describe(config)`` of the group's runs: one value, or the distinct ones joined by " / "."""
        return " / ".join(dict.fromkeys(describe(run.config) for run in self.runs))


_CONTEXT_FIELDS = ("victim", "victim_info", "budget", "eval_dataset")
_COLUMN_FIELDS = {"victim": victim_name, "eval_dataset": dataset_name}
"""Context fields with a column of their own: named in a group's label only where the columns look alike."""


def _differences(field: str, value: Any, others: Sequence[Any]) -> list[str]:
    """``name=value`` parts telling ``value`` apart from ``others``: for a dict, only its entries that differ."""
    name = field.split(".", 1)[1] if "." in field else field
    if isinstance(value, dict) and all(isinstance(other, dict) for other in others):
        return [f"{key}={_shown(item)}" for key, item in sorted(value.items())
                if any(_canonical(other.get(key)) != _canonical(item) for other in others)]
    if any(_canonical(other) != _canonical(value) for other in others):
        return [f"{name}={_shown(value)}"]
    return []


def group_runs(runs: Sequence[RunRecord], labels: Sequence[str] | None = None) -> list[RunGroup]:
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
        named = seed_groups(zip(runs, labels, strict=True), lambda pair: pair[1])
        return [RunGroup(label, [run for run, _ in pairs]) for label, pairs in named.items()]
    keyed = seed_groups(runs, lambda run: _canonical(seed_group_key(run.config)))
    keys = [seed_group_key(members[0].config) for members in keyed.values()]
    firsts = [members[0].config for members in keyed.values()]
    groups = []
    for key, config, members in zip(keys, firsts, keyed.values(), strict=True):
        shown = []
        for field, value in key.items():
            if field == "attack":
                continue
            indices: list[int]
            if field in _CONTEXT_FIELDS:
                indices = list(range(len(keys)))
            else:  # settings differ between attacks anyway: compare with the same attack
                indices = [i for i, other in enumerate(keys) if other["attack"] == key["attack"]]
            describe = _COLUMN_FIELDS.get(field)
            if describe is not None:  # its column tells the groups apart unless it shows the same text
                indices = [i for i in indices if describe(firsts[i]) == describe(config)]
            shown += _differences(field, value, [keys[i].get(field) for i in indices])
        label = str(key["attack"]) + (f" ({', '.join(shown)})" if shown else "")
        groups.append(RunGroup(label, members))
    return groups


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


def _cell(group: RunGroup, metric: str) -> str:
    """``mean ± std (min)`` over the group; a single run's proportion with its 95 % interval."""
    text = format_spread(spread(group.values(metric)))
    if len(group.runs) == 1 and metric in INTERVAL_METRICS and text != "—":
        interval = format_interval(group.runs[0].metrics, metric)
        if interval is not None:
            text += f" ({interval})"
    return text


def _resolution_notes(runs: Sequence[RunRecord]) -> list[str]:
    """The evaluation split's resolution; that accuracy equals fidelity where the victim is perfect."""
    notes = [note for note in (resolution_note([run.metrics for run in runs]),) if note]
    if victim_is_perfect([run.history for run in runs]):
        notes.append("The victim is right on every image of the evaluation split in every run (victim_accuracy "
                     "1 at every evaluation), so accuracy equals fidelity throughout.")
    return notes


def seed_table(groups: Sequence[RunGroup], metrics: Sequence[str] = SEED_METRICS) -> str:
    """A markdown table of the groups: victim, evaluation set, ``mean ± std (min)`` per metric, the seeds,
    the baseline.

    The last column is the group's mean fidelity minus that of the random-noise
    baseline with the same victim, budget and evaluation set. A group of one run
    shows accuracy and fidelity with their 95 % interval. Notes below the table
    say what the cells mean, what the evaluation split resolves, which groups
    have a single seed or no baseline, and which runs report an evaluation error.
    """
    baselines = _baselines(groups)
    header = ("| group | attack | n | seeds | " + " | ".join(metrics)
              + f" | fidelity − {BASELINE_ATTACK} | victim | dataset |")
    lines = [header, "| --- " * (len(metrics) + 7) + "|"]
    for index, group in enumerate(groups):
        count = len(group.runs)
        cells = " | ".join(_cell(group, name) for name in metrics)
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
                     f"| {cells} | {versus} | {group.column(victim_name)} | {group.column(dataset_name)} |")
    notes = [
        "",
        f"Cells: mean ± sample std (n − 1) (min) over the seeds of a group, a single run's value alone "
        f"(accuracy and fidelity with their 95 % interval); n: runs in the group; "
        f"[k/n]: only k runs have the value; fidelity − {BASELINE_ATTACK}: difference of the mean fidelities "
        f"from the random-noise baseline with the same victim, budget and evaluation set.",
        *_resolution_notes([run for group in groups for run in group.runs]),
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
    x: str = "queries",
) -> list[str]:
    """One panel per metric against ``x`` (queries, cost, hours, accounts: :data:`~experiments.stats.X_AXES`):
    each group's mean over seeds with a ±1 std band.

    ``groups`` are :class:`RunGroup` or ``(label, histories)`` pairs. The legend
    sits outside the panels. Writes nothing when no group has an evaluated point.
    ``references`` (published points) are drawn as black markers on their metric's panel.
    Returns notes on what was drawn (empty list: nothing was written).
    """
    named: list[tuple[str, Sequence[Sequence[dict[str, Any]]]]] = [
        (group.label, [run.history for run in group.runs]) if isinstance(group, RunGroup) else group
        for group in groups
    ]
    curves = {metric: [(label, mean_curve(histories, metric, x)) for label, histories in named]
              for metric in metrics}
    if not any(curve is not None for drawn in curves.values() for _, curve in drawn):
        path.unlink(missing_ok=True)  # never leave a plot of an earlier, longer history
        return []
    panels: dict[str, list[Line]] = {}
    interpolated: set[str] = set()
    bands: set[str] = set()
    shown = {metric: metric for metric in metrics}
    if ("fidelity" in shown and "accuracy" in shown
            and victim_is_perfect([history for _, histories in named for history in histories])):
        del shown["accuracy"]  # the same curve twice: one panel says so
        shown["fidelity"] = SAME_PANEL
    for metric, panel in shown.items():
        lines = panels.setdefault(panel, [])
        for index, (label, curve) in enumerate(curves[metric]):
            if curve is None:
                continue
            band = curve.band() if curve.runs > 1 else None
            if band is not None:
                bands.add(BAND)
            else:
                drawn = [history for history in named[index][1] if any(metric in line for line in history)]
                band = interval_band(drawn[0], metric, curve.queries) if len(drawn) == 1 and x == "queries" \
                    else None
                if band is not None:
                    bands.add(INTERVAL_BAND)
            lines.append(Line(f"{label} ({curve.runs} seed{'s' if curve.runs > 1 else ''})", curve.queries,
                              curve.mean, f"C{index % 10}", band=band))
            if curve.interpolated:
                interpolated.add(label)
        methods = sorted({point.method for point in references if point.metric == metric and x == "queries"})
        for index, method in enumerate(methods):
            points = [p for p in references if p.metric == metric and p.method == method]
            lines.append(Line(f"{method}, published ({points[0].source})", [p.queries for p in points],
                              [p.value for p in points], "black", marker="xs^vDo"[index % 6]))
    seeds = {curve.runs for drawn in curves.values() for _, curve in drawn if curve is not None}
    caption = "one run per curve" if seeds == {1} else "mean over seeds"
    if bands == {BAND, INTERVAL_BAND}:
        caption += f", band {BAND} (several seeds) or the {INTERVAL_BAND} (one seed)"
    else:
        caption += f", band {bands.pop()}" if bands else " (no band)"
    if SAME_PANEL in panels:
        caption += "; the victim is right on every image of the split, so accuracy = fidelity"
    if interpolated:
        caption += "; interpolated onto common queries: " + ", ".join(sorted(interpolated))
    plot_panels(panels, path, f"{title}\n{caption}", xlabel=X_AXES[x][2])
    return [f"{path}: {', '.join(panels)} against {x}, {caption}"]


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> bool:
    """One curve per run (no aggregation), a panel per metric; False (nothing written) without any point."""
    return bool(plot_groups([(label, [history]) for label, history in runs], path, title))


# -- reports ------------------------------------------------------------------------------


def compare_runs(paths: Sequence[Path], plot_path: Path | None = None) -> str:
    """A markdown table of runs, one row each (accuracy and fidelity with their 95 % interval), and
    with ``plot_path`` one curve per run."""
    runs = read_runs(paths)
    header = "| run | attack | seed | " + " | ".join(COMPARED_METRICS) + " | victim | dataset |"
    rule = "| --- " * (len(COMPARED_METRICS) + 5) + "|"
    lines = [header, rule]
    for run in runs:
        cells = " | ".join(_cell(RunGroup(run.path.name, [run]), name) for name in COMPARED_METRICS)
        lines.append(f"| {run.path.name} | {run.config.get('attack')} | {run.seed} | {cells} "
                     f"| {victim_name(run.config)} | {dataset_name(run.config)} |")
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
    curves: Sequence[str] = CURVE_METRICS, x: str = "queries",
) -> str:
    """Runs grouped over seeds (:func:`group_runs`) in one table (:func:`seed_table`); with
    ``plot_path``, their mean curves with a band (:func:`plot_groups`) and any published
    ``references`` as markers."""
    groups = group_runs(read_runs(paths), labels)
    text = seed_table(groups, metrics)
    if plot_path is not None:
        notes = plot_groups(groups, plot_path, "attack runs", metrics=curves, references=references, x=x)
        text += ("\nPlot: " + "; ".join(notes) + "\n" if notes
                 else f"\nNo plot written to {plot_path}: no run has an evaluated point.\n")
    return text
