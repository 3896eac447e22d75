"""One attack run's report: ``report.md`` and ``progress.png`` in its run directory.

The runner (:func:`attacker.runner.run_attack`) writes them when a run ends::

    write_run_report(Path("runs/ds"), config, metrics, history)

The figure style (:func:`plot_panels`: one panel per metric against queries, the
legend outside) and the number format (:func:`format_value`) are shared with the
reports over several runs (:mod:`experiments.report`), which aggregate seeds.
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
    "Line",
    "format_value",
    "plot_panels",
    "plot_run",
    "queries_to_reach",
    "run_title",
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


def plot_panels(panels: Mapping[str, Sequence[Line]], path: Path, title: str) -> None:
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
        axis.set_xlabel("attack queries (images)")
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
    """``history``'s fidelity and accuracy against queries, a panel each; False (and no file) without a point."""
    points = {metric: _points(history, metric) for metric in CURVE_METRICS}
    if not any(points.values()):
        path.unlink(missing_ok=True)  # never leave a plot of an earlier, longer history
        return False
    plot_panels({metric: [Line(f"{label} (1 seed)", [q for q, _ in drawn], [v for _, v in drawn], "C0")]
                         if drawn else [] for metric, drawn in points.items()},
                path, f"{title}\none run per curve (no band)")
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
        f"| {name} | {format_value(metrics.get(name))} |"
        for name in (*COMPARED_METRICS, "eval_queries", "planned_eval_queries", "evaluation_error",
                     "stop_reason", "server_queries", "server_count_matches", "lost_queries",
                     "transfer_epsilon")
        if name in metrics
    )
    settings = "\n".join(f"| {k} | {format_value(v)} |" for k, v in sorted(config.get("settings", {}).items()))
    evaluations = "\n".join(
        f"| {format_value(line.get('queries'))} | {format_value(line.get('fidelity'))} | {format_value(line.get('accuracy'))} "
        f"| {format_value(line.get('attack_seconds'))} |"
        for line in history
    ) or "| — | — | — | — |"
    text = f"""# {title}

Budget {format_value(config.get('budget'))} queries, seed {config.get('seed')} (a single seed:
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


