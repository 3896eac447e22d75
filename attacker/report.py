"""One attack run's report: ``report.md`` and ``progress.png`` in its run directory.

The runner (:func:`attacker.runner.run_attack`) writes them when a run ends::

    write_run_report(Path("runs/ds"), config, metrics, history)

The figure style (:func:`plot_panels`: one panel per metric against queries, the
legend outside), the number format (:func:`format_value`, :func:`format_interval`)
and what the evaluation split resolves (:func:`resolution_note`,
:func:`victim_is_perfect`) are shared with the reports over several runs
(:mod:`experiments.report`), which aggregate seeds.

Accuracy and fidelity are proportions of the evaluation split: each is shown with
its 95 % interval (Wilson's, :func:`attacker.evaluation.proportion_interval`) as a
band in the plots and ``(low–high)`` in the tables. Where the victim is right on
every image of the split, accuracy equals fidelity at every evaluation: the plot
draws one panel for both and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COMPARED_METRICS",
    "CURVE_METRICS",
    "SAME_PANEL",
    "Line",
    "format_interval",
    "format_value",
    "interval_band",
    "plot_panels",
    "plot_run",
    "queries_to_reach",
    "resolution_note",
    "run_title",
    "victim_is_perfect",
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
CURVE_METRICS = ("fidelity", "accuracy")
"""The metrics drawn against queries, one panel each."""
SAME_PANEL = "fidelity = accuracy"
"""The one panel drawn for both when the victim is right on every image of the split."""

def queries_to_reach(history: Sequence[dict[str, Any]], fidelity: float) -> int | None:
    """Queries at the first evaluation whose fidelity reaches ``fidelity`` (None: never)."""
    for line in history:
        if line.get("fidelity", -1.0) >= fidelity:
            return int(line["queries"])
    return None


def format_value(value: Any) -> str:
    """A metric for a table: "—" for none or NaN, thousands separators, 4 decimals below 10."""
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def format_interval(record: Mapping[str, Any], metric: str) -> str | None:
    """``low–high``: the 95 % interval ``record`` holds for ``metric`` (None when it holds none)."""
    low, high = _number(record.get(f"{metric}_ci95_low")), _number(record.get(f"{metric}_ci95_high"))
    if low is None or high is None:
        return None
    return f"{low:.4f}–{high:.4f}"


def _with_interval(record: Mapping[str, Any], metric: str) -> str:
    """The value, followed by ``(low–high)`` when ``record`` holds its interval."""
    interval = format_interval(record, metric)
    value = format_value(record.get(metric))
    return value if interval is None or value == "—" else f"{value} ({interval})"


def victim_is_perfect(histories: Sequence[Sequence[Mapping[str, Any]]]) -> bool:
    """True when every evaluation of every history has ``victim_accuracy`` 1 (and there is one):
    the victim's labels are the true ones, so accuracy equals fidelity at every point."""
    evaluated = [line for history in histories for line in history if _number(line.get("fidelity")) is not None]
    return bool(evaluated) and all(_number(line.get("victim_accuracy")) == 1.0 for line in evaluated)


def resolution_note(records: Sequence[Mapping[str, Any]]) -> str | None:
    """What the evaluation split resolves: its size, one image in points, the widest fidelity interval.

    None when no record holds ``eval_images`` (a run written before it was recorded).
    """
    sizes = sorted({int(size) for record in records if (size := _number(record.get("eval_images")))})
    if not sizes:
        return None
    widths = [high - low for record in records
              if (low := _number(record.get("fidelity_ci95_low"))) is not None
              and (high := _number(record.get("fidelity_ci95_high"))) is not None]
    split = " or ".join(f"{size:,}" for size in sizes)
    text = (f"Resolution: accuracy and fidelity are proportions of {split} evaluation images, so one image moves "
            f"them by {100 / sizes[-1]:.2f} points{' or more' if len(sizes) > 1 else ''}; "
            "(low–high) is the 95 % interval of the split (Wilson's score interval)")
    if widths:
        text += f", {max(widths) / 2:.4f} half-width at most here"
    return text + "."


def interval_band(history: Sequence[Mapping[str, Any]], metric: str,
                  queries: Sequence[float]) -> tuple[list[float], list[float]] | None:
    """The 95 % interval of ``metric`` at each of ``queries`` from ``history`` (None if any is missing)."""
    by_queries = {float(line["queries"]): (_number(line.get(f"{metric}_ci95_low")),
                                           _number(line.get(f"{metric}_ci95_high")))
                  for line in history if "queries" in line and _number(line.get(metric)) is not None}
    lows: list[float] = []
    highs: list[float] = []
    for query in queries:
        low, high = by_queries.get(float(query), (None, None))
        if low is None or high is None:
            return None
        lows.append(low)
        highs.append(high)
    return (lows, highs) if lows else None


# -- the figure -------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One series of a panel: values against queries, with a legend name."""

    name: str
    queries: Sequence[float]
    values: Sequence[float]
    colour: str
    band: tuple[Sequence[float], Sequence[float]] | None = None
    """Lower and upper edge of a shaded band around the line (e.g. ±1 std over seeds)."""
    marker: str | None = None
    """Draw these markers alone (published points) instead of a line with dots."""


def plot_panels(panels: Mapping[str, Sequence[Line]], path: Path, title: str,
                xlabel: str = "attack queries (images)") -> None:
    """One panel per metric (values in [0, 1]) against attack queries; one legend outside, by name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 2.4, 4), squeeze=False)
    handles: dict[str, Any] = {}
    for axis, (metric, lines) in zip(axes[0], panels.items(), strict=True):
        for line in lines:
            if line.marker is None:
                (drawn,) = axis.plot(line.queries, line.values, "-o", ms=3, color=line.colour)
            else:
                (drawn,) = axis.plot(line.queries, line.values, marker=line.marker, color=line.colour, ls="none",
                                     ms=7, mew=1.5)
            if line.band is not None:
                axis.fill_between(line.queries, *line.band, color=line.colour, alpha=0.2, linewidth=0)
            handles.setdefault(line.name, drawn)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.set_title(metric)
    figure.suptitle(title, fontsize=9)
    figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                  fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _points(history: Sequence[dict[str, Any]], metric: str) -> list[tuple[float, float]]:
    """The evaluations that recorded ``metric`` as a number, by queries."""
    return sorted((float(line["queries"]), float(line[metric])) for line in history
                  if "queries" in line and isinstance(line.get(metric), int | float)
                  and not isinstance(line[metric], bool) and not math.isnan(line[metric]))


def plot_run(label: str, history: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """``history``'s fidelity and accuracy against queries, a panel each, with their 95 % interval as a
    band; one panel for both when the victim is perfect on the split. False (and no file) without a point."""
    points = {metric: _points(history, metric) for metric in CURVE_METRICS}
    if not any(points.values()):
        path.unlink(missing_ok=True)  # never leave a plot of an earlier, longer history
        return False
    names = dict(zip(CURVE_METRICS, CURVE_METRICS, strict=True))
    if victim_is_perfect([history]):
        names = {"fidelity": SAME_PANEL}
    panels: dict[str, list[Line]] = {}
    banded = False
    for metric, panel in names.items():
        drawn = points[metric]
        queries = [q for q, _ in drawn]
        band = interval_band(history, metric, queries)
        banded = banded or band is not None
        panels[panel] = [Line(f"{label} (1 seed)", queries, [v for _, v in drawn], "C0", band=band)] if drawn else []
    caption = "one run; band: 95 % interval of the evaluation split (Wilson)" if banded else "one run (no band)"
    if SAME_PANEL in panels:
        caption += "; the victim is right on every image of the split, so accuracy = fidelity"
    plot_panels(panels, path, f"{title}\n{caption}")
    return True


# -- the report -------------------------------------------------------------------------


def _evaluation_cost(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """What evaluating the run cost, from the metrics (``planned_eval_queries`` and
    ``evaluation_error`` only when the run recorded them)."""
    spent = metrics.get("eval_queries")
    text = (f"Evaluation queries are counted apart from the attack budget: {format_value(spent)} spent"
            if spent is not None else "The run did not record its evaluation queries")
    if metrics.get("planned_eval_queries") is not None:
        text += f" of {format_value(metrics['planned_eval_queries'])} planned"
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
    if plot_run(str(config.get("attack", "attack")), history, path / "progress.png", title):
        figure = "![fidelity and accuracy against queries](progress.png)"
    else:
        figure = ("No plot: the run has no evaluated point (no line of `metrics.jsonl` holds a "
                  "fidelity), so there is nothing to draw.")
    rows = "\n".join(
        f"| {name} | {format_value(metrics.get(name))} | {format_interval(metrics, name) or ''} |"
        for name in (*COMPARED_METRICS, "eval_images", "eval_queries", "planned_eval_queries", "evaluation_error",
                     "stop_reason", "server_queries", "server_count_matches", "lost_queries",
                     "transfer_epsilon", "cost", "currency", "accounts_opened", "accounts_used",
                     "simulated_seconds", "rate_limit_wait_seconds", "accounts_flagged", "accounts_blocked")
        if name in metrics
    )
    settings = "\n".join(f"| {k} | {format_value(v)} |" for k, v in sorted(config.get("settings", {}).items()))
    evaluations = "\n".join(
        f"| {format_value(line.get('queries'))} | {_with_interval(line, 'fidelity')} | {_with_interval(line, 'accuracy')} "
        f"| {format_value(line.get('attack_seconds'))} |"
        for line in history
    ) or "| — | — | — | — |"
    notes = [note for note in (resolution_note([metrics, *history]),) if note]
    if victim_is_perfect([history]):
        notes.append("The victim is right on every image of the split (`victim_accuracy` 1 at every "
                     "evaluation), so accuracy equals fidelity throughout: the plot draws one panel for both.")
    resolution = "\n\n".join(notes) + ("\n\n" if notes else "")
    text = f"""# {title}

Budget {format_value(config.get('budget'))} queries, seed {config.get('seed')} (a single seed:
compare seeds with `stealsim report RUN...`), evaluated on `{config.get('eval_dataset')}`
({config.get('eval_split', 'test')} split). {_evaluation_cost(config, metrics)}

{resolution}{figure}

## Final metrics

| metric | value | 95 % interval |
| --- | --- | --- |
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


