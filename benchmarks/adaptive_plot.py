"""The Pareto plot of issue #38: what each defense costs honest users against what it leaves the best thief.

One panel per dataset. x: the honest user's accuracy lost (points, test split); y: the fidelity
of the best attacker (over attacks and their plain and adaptive variants, mean over seeds, bar =
std). A hollow marker shows the best *plain* attacker where it did worse: the line between them
is what adapting to the defense bought. Labels sit in a column beside the points, spread so they
never overlap, each tied to its point by a thin line. The Pareto front (no other defense costs
less and leaves less) is the dashed step line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.grid_report import pareto_front


def best_over_attacks(entry: dict[str, Any], attacks: list[str], which: str) -> tuple[float, float, str]:
    """The highest mean fidelity among ``attacks`` (``which``: ``best`` or ``plain``), its std and attack."""
    found = [(entry["attacks"][a][which][0], entry["attacks"][a][which][1], a) for a in attacks
             if a in entry["attacks"] and entry["attacks"][a][which][2]]
    return max(found, default=(float("nan"), float("nan"), ""))


def spread_labels(positions: list[float], gap: float, low: float, high: float) -> list[float]:
    """``positions`` moved apart (in their order) so that neighbours are ``gap`` or more apart, within [low, high]."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    placed = [0.0] * len(positions)
    previous = low - gap
    for i in order:
        placed[i] = max(positions[i], previous + gap)
        previous = placed[i]
    overflow = previous - high
    if overflow > 0:  # shift the column down, keeping the gaps
        for i in order:
            placed[i] -= overflow
    return placed


def pareto_plot(summaries: dict[str, dict[str, Any]], attacks: list[str], out: Path) -> None:
    """Draw one panel per dataset of ``summaries`` (:func:`benchmarks.adaptive_defenses.summarize`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summaries), figsize=(9.0 * len(summaries), 5.6), squeeze=False)
    for axis, (dataset, summary) in zip(axes[0], summaries.items(), strict=True):
        rows = []
        for defense, entry in summary["defenses"].items():
            if defense == "detectors":  # flags only: its blocking rows are the defenses drawn
                continue
            best, std, attack = best_over_attacks(entry, attacks, "best")
            plain, _, _ = best_over_attacks(entry, attacks, "plain")
            if best == best:  # not NaN
                rows.append((defense, max(0.0, entry["honest_cost_points"]), best, std, plain, attack))
        if not rows:
            continue
        for _defense, cost, best, std, plain, _ in rows:
            axis.errorbar(cost, best, yerr=std if std == std else None, fmt="o", color="tab:red", capsize=3, zorder=3)
            if plain == plain and plain < best - 0.005:
                axis.plot([cost, cost], [plain, best], color="tab:gray", linewidth=1, zorder=2)
                axis.plot(cost, plain, "o", markerfacecolor="white", markeredgecolor="tab:gray", zorder=3)
        points = [(cost, best) for _, cost, best, *_ in rows]
        front = sorted(points[i] for i in pareto_front(points))
        xs = [x for x, _ in front]
        ys = [y for _, y in front]
        axis.step(xs, ys, where="post", linestyle="--", color="tab:blue", linewidth=1, label="Pareto front")
        axis.axvline(1.0, linestyle=":", color="0.5", linewidth=1, label="1 point of honest accuracy")
        left, right = -0.2, max(1.5, max(cost for _, cost, *_ in rows) * 1.1)
        column = right + 0.15 * (right - left)
        values = [r[2] - (r[3] if r[3] == r[3] else 0.0) for r in rows] + [r[4] for r in rows if r[4] == r[4]]
        low, high = min(values) - 0.05, 1.02
        # One label per point: defenses that leave the same thief the same fidelity share it.
        groups: dict[tuple[float, float, str], list[str]] = {}
        for defense, cost, best, _, _, attack in rows:
            groups.setdefault((round(cost, 2), round(best, 3), attack), []).append(defense)
        gap = (high - low) / 22
        labels = spread_labels([best for _, best, _ in groups], gap=gap, low=low + gap / 2, high=high - gap / 2)
        for ((cost, best, attack), defenses), label_y in zip(groups.items(), labels, strict=True):
            axis.annotate(f"{', '.join(defenses)} ({attack})", xy=(cost, best), xytext=(column, label_y),
                          fontsize=8, va="center",
                          arrowprops={"arrowstyle": "-", "color": "0.7", "linewidth": 0.6})
        axis.set_xlim(left, column + 0.9 * (right - left))
        axis.set_ylim(low, high)
        axis.set_xlabel("honest accuracy lost (points, test split)")
        axis.set_ylabel("fidelity of the best attacker (test split)")
        axis.set_title(f"{dataset}: red = the best thief that knows the defense, white = the best plain one",
                       fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
