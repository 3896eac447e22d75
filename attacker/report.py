"""Reports of attack runs: one run's report.md and plot, and a comparison of several runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stealsim.errors import AttackError

__all__ = [
    "COMPARED_METRICS",
    "compare_runs",
    "load_run",
    "plot_runs",
    "queries_to_reach",
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
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Fidelity (solid) and accuracy (dashed) against queries, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (label, history) in enumerate(runs):
        points = [line for line in history if "fidelity" in line]
        if not points:
            continue
        colour = f"C{index % 10}"
        queries = [line["queries"] for line in points]
        axis.plot(queries, [line["fidelity"] for line in points], "-o", ms=3, color=colour,
                  label=f"{label} fidelity")
        axis.plot(queries, [line["accuracy"] for line in points], "--", color=colour,
                  label=f"{label} accuracy")
    axis.set_xlabel("attack queries (images)")
    axis.set_ylabel("fidelity / accuracy on the test set")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_run_report(
    path: Path, config: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    """Write ``report.md`` and ``progress.png`` of the run in ``path``."""
    plot_runs([(str(config.get("attack", "attack")), history)], path / "progress.png",
              f"{config.get('attack')} against {config.get('victim')}")
    rows = "\n".join(
        f"| {name} | {_format(metrics.get(name))} |"
        for name in (*COMPARED_METRICS, "eval_queries", "stop_reason", "server_queries",
                     "server_count_matches", "lost_queries", "transfer_epsilon")
        if name in metrics
    )
    settings = "\n".join(f"| {k} | {_format(v)} |" for k, v in sorted(config.get("settings", {}).items()))
    evaluations = "\n".join(
        f"| {_format(line['queries'])} | {_format(line.get('fidelity'))} | {_format(line.get('accuracy'))} "
        f"| {_format(line.get('attack_seconds'))} |"
        for line in history
    )
    text = f"""# {config.get('attack')} against {config.get('victim')}

Budget {_format(config.get('budget'))} queries, seed {config.get('seed')}, evaluated on
`{config.get('eval_dataset')}` (test split). Evaluation queries are counted apart
from the attack budget ({_format(metrics.get('eval_queries'))} in this run).

![fidelity and accuracy against queries](progress.png)

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


def load_run(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, metrics, history)`` of a finished run directory."""
    try:
        config = json.loads((path / "config.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text())
        history = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise AttackError(f"{path} is not a finished attack run: {exc}") from exc
    return config, metrics, history


def compare_runs(paths: Sequence[Path], plot_path: Path | None = None) -> str:
    """A markdown table comparing runs (and, with ``plot_path``, one plot of all of them)."""
    if not paths:
        raise AttackError("give at least one run directory")
    loaded = [(path, *load_run(path)) for path in paths]
    header = "| run | attack | " + " | ".join(COMPARED_METRICS) + " |"
    rule = "| --- " * (len(COMPARED_METRICS) + 2) + "|"
    lines = [header, rule]
    for path, config, metrics, _ in loaded:
        cells = " | ".join(_format(metrics.get(name)) for name in COMPARED_METRICS)
        lines.append(f"| {path.name} | {config.get('attack')} | {cells} |")
    if plot_path is not None:
        plot_runs([(path.name, history) for path, _, _, history in loaded], plot_path, "attack runs")
    return "\n".join(lines) + "\n"
