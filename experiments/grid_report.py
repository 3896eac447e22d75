"""The grid's report: ``OUT/report.md`` with its tables over seeds and two plots.

Written by :func:`experiments.grid.run_grid` after every grid (and readable on
its own from a grid's directory)::

    write_grid_report(Path("runs/grid"))   # reads results.csv and defenses.csv

The tables aggregate the cells that differ only by seed (:mod:`experiments.stats`):
mean ± sample std (min) and n, beside the random-noise baseline. The plots draw
fidelity against budget per defense, and what each defense costs honest users
against the fidelity it leaves (with the Pareto-optimal defenses joined).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.stats import format_spread, parse_number, seed_groups, spread
from experiments.store import read_csv

__all__ = ["pareto_front", "write_grid_report"]

_SEED_COLUMNS = ("fidelity", "accuracy", "transfer_success_rate")
"""The metrics of the grid report's table over seeds."""
_BASELINE = "random"

SeedKey = tuple[str, str, str, int]
"""``(attack, victim, defense, budget)``: the cells that differ only by seed."""


def _seed_groups(results: Iterable[dict[str, str]]) -> dict[SeedKey, list[dict[str, str]]]:
    """Finished rows by (attack, victim, defense, budget); a cell counts once (its last line)."""
    latest = {row["cell"]: row for row in results}
    groups = seed_groups(latest.values(),
                         lambda row: (row["attack"], row["victim"], row["defense"], int(row["budget"])))
    return dict(sorted(groups.items()))


def _seed_table(groups: dict[SeedKey, list[dict[str, str]]]) -> str:
    """Markdown: ``mean ± std (min)`` per metric over each cell's seeds, n, and the random baseline."""
    def mean_fidelity(rows: list[dict[str, str]]) -> float | None:
        value = spread([parse_number(row["fidelity"]) for row in rows])
        return None if value is None else value.mean

    columns = ("attack", "victim", "defense", "budget", "n", "seeds", *_SEED_COLUMNS, f"fidelity − {_BASELINE}")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for (attack, victim, defense, budget), rows in groups.items():
        cells = [format_spread(spread([parse_number(row.get(name)) for row in rows])) for name in _SEED_COLUMNS]
        baseline = groups.get((_BASELINE, victim, defense, budget))
        ours, theirs = mean_fidelity(rows), mean_fidelity(baseline) if baseline else None
        if attack == _BASELINE:
            versus = "baseline"
        elif ours is None or theirs is None:
            versus = "no baseline"
        else:
            versus = f"{ours - theirs:+.3f}"
        seeds = ", ".join(row["seed"] for row in sorted(rows, key=lambda row: int(row["seed"])))
        count = "1 seed" if len(rows) == 1 else str(len(rows))
        lines.append("| " + " | ".join([attack, victim, defense, f"{budget:,}", count, seeds, *cells, versus]) + " |")
    return "\n".join(lines) + "\n"


def write_grid_report(out: Path) -> Path:
    """``report.md`` with the tables and two plots: fidelity against budget per defense, and the trade-off.

    Cells that differ only by seed are aggregated: mean ± sample std (min) and n
    in the table, the mean with a ±1 std band in the plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results = [row for row in read_csv(out / "results.csv") if row["status"] == "done"]
    costs = read_csv(out / "defenses.csv")
    groups = _seed_groups(results)
    fidelity = {key: spread([parse_number(row["fidelity"]) for row in rows]) for key, rows in groups.items()}
    defenses = sorted({key[2] for key in groups})
    lines = sorted({(key[0], key[1]) for key in groups})
    plots = []
    if any(value is not None for value in fidelity.values()):
        figure, axes = plt.subplots(1, len(defenses), figsize=(4.5 * len(defenses) + 2, 4), squeeze=False)
        handles: dict[str, Any] = {}
        for axis, defense in zip(axes[0], defenses, strict=True):
            for index, (attack, victim) in enumerate(lines):
                points = sorted((budget, value) for (a, v, d, budget), value in fidelity.items()
                                if (a, v, d) == (attack, victim, defense) and value is not None)
                if not points:
                    continue
                colour = f"C{index % 10}"
                budgets = [budget for budget, _ in points]
                means = [value.mean for _, value in points]
                (line,) = axis.plot(budgets, means, "-o" if victim == "normal" else "--s", color=colour, ms=4)
                spreads = [value.band() for _, value in points]
                axis.fill_between(budgets, [low for low, _ in spreads], [high for _, high in spreads],
                                  color=colour, alpha=0.2, linewidth=0)
                seeds = max(value.n for _, value in points)
                handles.setdefault(f"{attack} / {victim} ({seeds} seed{'s' if seeds > 1 else ''})", line)
            axis.set_xscale("log")
            axis.set_ylim(0, 1.02)
            axis.set_title(f"defense: {defense}")
            axis.set_xlabel("attack budget (queries)")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel("fidelity: mean over seeds, band ±1 std")
        figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                      fontsize=7, frameon=False)
        figure.tight_layout()
        figure.savefig(out / "fidelity_vs_budget.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        plots.append("![fidelity against budget, one panel per defense: mean over seeds, band ±1 std]"
                     "(fidelity_vs_budget.png)")
    fronts: dict[str, list[str]] = {}
    if costs and any(value is not None for value in fidelity.values()):
        top = max(key[3] for key, value in fidelity.items() if value is not None)
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for panel, (axis, (column, label)) in enumerate(zip(axes, (("accuracy", "honest users' error rate (1 − accuracy)"),
                                                                   ("ece", "honest users' calibration error (ECE)")),
                                                        strict=True)):
            for index, (attack, victim) in enumerate(lines):
                placed: list[tuple[float, Any, str]] = []
                for cost in costs:
                    value = fidelity.get((attack, victim, cost["defense"], top))
                    if cost["victim"] == victim and value is not None:
                        harm = parse_number(cost[column])
                        placed.append((1.0 - harm if column == "accuracy" else harm, value, cost["defense"]))
                if not placed:
                    continue
                colour = f"C{index % 10}"
                front = pareto_front([(x, value.mean) for x, value, _ in placed])
                if panel == 0:
                    fronts[f"{attack} / {victim}"] = [placed[i][2] for i in front]
                ordered = sorted(front, key=lambda i: placed[i][0])
                axis.step([placed[i][0] for i in ordered], [placed[i][1].mean for i in ordered], where="post",
                          color=colour, alpha=0.6, linewidth=1)
                # Defenses that change nothing here (detectors, say) share one point: one label for all.
                names_at: dict[tuple[float, float], list[str]] = {}
                for x, value, name in placed:
                    names_at.setdefault((round(x, 6), round(value.mean, 6)), []).append(name)
                for i, (x, value, name) in enumerate(placed):
                    axis.errorbar([x], [value.mean], yerr=[value.std if value.n > 1 else 0.0], capsize=3,
                                  fmt="o" if victim == "normal" else "s", color=colour,
                                  markerfacecolor=colour if i in front else "white",
                                  label=f"{attack} / {victim}" if i == 0 else None)
                    shared = names_at[(round(x, 6), round(value.mean, 6))]
                    if shared[0] == name:
                        axis.annotate(", ".join(shared), (x, value.mean), fontsize=7, xytext=(3, 3),
                                      textcoords="offset points")
            axis.set_xlabel(label)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel(f"attacker's fidelity at budget {top:,}\n(mean over seeds, bar ±1 std)")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        figure.suptitle("defenses: cost to honest users against fidelity left to the attacker; filled and "
                        "joined: Pareto-optimal (nothing cheaper stops it better)", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "tradeoff.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        plots.append("![what a defense costs honest users against the fidelity it leaves](tradeoff.png)")
    if not plots:
        plots.append("No plots: no finished cell has a fidelity yet.")

    def table(rows: Iterable[dict[str, str]], columns: Sequence[str]) -> str:
        head = "| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns) + "\n"
        body = "\n".join("| " + " | ".join(_short(row.get(c, "")) for c in columns) + " |" for row in rows)
        return head + body + "\n"

    single = sum(1 for rows in groups.values() if len(rows) == 1)
    text = f"""# Grid report

{len(results)} finished cells (`results.csv`) in {len(groups)} groups of seeds
({single} with a single seed); defended answers' cost to honest users on the
test set (`defenses.csv`): accuracy and ECE (15 bins; label-only answers count
as one-hot, confidence 1).

{chr(10).join(plots)}

## Over seeds

Each row: the cells that differ only by seed. Cells: mean ± sample std (n − 1)
(min) over the seeds; `fidelity − {_BASELINE}`: mean fidelity minus that of the
random-noise baseline with the same victim, defense and budget.

{_seed_table(groups)}
## What each defense costs honest users

{table(costs, ("victim", "defense", "accuracy", "ece", "flags", "latency_ms"))}
## Pareto-optimal defenses

Per attack, at the largest budget: the defenses no other defense beats on both
honest error rate and the attacker's mean fidelity.

{chr(10).join(f"- {line}: {', '.join(names)}" for line, names in fronts.items()) or "None yet."}

## Cells (one line per seed)

{table(results, ("attack", "victim", "defense", "budget", "seed", "queries", "accuracy", "fidelity",
                 "transfer_success_rate", "wall_seconds"))}"""
    path = out / "report.md"
    path.write_text(text)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, leak)`` no other point dominates (both lower is better).

    A point is dominated when another is no worse on both and better on one; ties
    (the same point twice) both stay on the front.
    """
    front = []
    for i, (cost, leak) in enumerate(points):
        dominated = any(other_cost <= cost and other_leak <= leak and (other_cost < cost or other_leak < leak)
                        for j, (other_cost, other_leak) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "." not in value:
        return value
    return f"{number:.3f}"
