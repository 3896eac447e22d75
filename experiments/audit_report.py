"""The audit's report: fidelity against money and hours, when each detector fired, what honest users
paid, and a verdict in plain words computed from those numbers.

Everything here is a pure function of :class:`AuditRun` records (what one attack run of the audit
left in its directory: the final metrics, the evaluation history, the honest users beside it), so
the report can be written again from ``OUT/runs`` at any time::

    runs = [AuditRun.read(out / "runs" / cell.id, cell.attacker, cell.accounts, cell.seed) for cell in cells]
    write_audit_report(out, runs, detectors=["ood_rate", "pooled_ood"], currency="USD")

Over seeds, every number is a mean ± sample std (:mod:`experiments.stats`) with the count of seeds
it comes from; a detector that fired in only k of n seeds shows ``[k/n]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.stats import Spread, format_spread, mean_curve, number, seed_groups, spread

__all__ = [
    "AuditRun",
    "DetectorSummary",
    "detector_summaries",
    "format_duration",
    "format_money",
    "honest_summary",
    "spread_limit",
    "verdict",
    "write_audit_report",
]

GroupKey = tuple[str, int]
"""``(attacker, accounts)``: the runs that differ only by seed."""


@dataclass(frozen=True)
class AuditRun:
    """One attack run of an audit: an attacker through ``accounts`` accounts with one seed.

    ``metrics``: the run's final metrics (``metrics.json``; empty when it failed); ``history``:
    its evaluation lines (``metrics.jsonl``); ``honest``: one dict per honest user who sent
    traffic beside it (``images``, ``accuracy``, ``paid``, ``flags``: "+"-joined detector names).
    """

    attacker: str
    accounts: int
    seed: int
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    honest: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None and bool(self.metrics)

    def first_flag(self, detector: str) -> dict[str, Any] | None:
        """``{"queries", "simulated_seconds"}`` when ``detector`` flagged an account of this run."""
        found = (self.metrics.get("first_flag") or {}).get(detector)
        return found if isinstance(found, dict) else None

    def flagged_share(self, detector: str) -> float:
        """Accounts ``detector`` flagged over the accounts that sent queries (the cell's count if none said)."""
        flagged = number((self.metrics.get("flags_by_detector") or {}).get(detector, 0)) or 0.0
        used = number(self.metrics.get("accounts_used")) or float(self.accounts)
        return flagged / used if used else 0.0

    @classmethod
    def read(cls, run_dir: Path, attacker: str, accounts: int, seed: int) -> AuditRun:
        """The run in ``run_dir`` (``metrics.json``, ``metrics.jsonl`` and the audit's ``honest.json``)."""
        from attacker.rundir import RunDirectory

        directory = RunDirectory(run_dir)
        metrics = directory.finished_metrics() or {}
        honest_path = run_dir / "honest.json"
        honest = json.loads(honest_path.read_text()) if honest_path.is_file() else []
        return cls(attacker, accounts, seed, metrics, directory.read_history(), list(honest),
                   None if metrics else "unfinished")


def format_money(value: float | None, currency: str) -> str:
    """``12.50 USD``; ``—`` for none."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.2f} {currency}"


def format_duration(seconds: float | None) -> str:
    """A simulated duration in words: ``45 s``, ``12 min``, ``3.5 hours``, ``50.0 hours (2.1 days)``."""
    if seconds is None or math.isnan(seconds):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:,.1f} hours" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600.0


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _groups(runs: Sequence[AuditRun]) -> dict[GroupKey, list[AuditRun]]:
    finished = [run for run in runs if run.finished]
    return dict(sorted(seed_groups(finished, lambda run: (run.attacker, run.accounts)).items()))


def _final(runs: Sequence[AuditRun], metric: str, scale: float = 1.0) -> Spread | None:
    values = [number(run.metrics.get(metric)) for run in runs]
    return spread([None if value is None else value * scale for value in values])


# -- detectors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorSummary:
    """One detector against one attacker through one account count, over seeds."""

    detector: str
    attacker: str
    accounts: int
    runs: int
    fired: int
    """Seeds in which the detector flagged at least one account."""
    queries: Spread | None
    """Attack queries when it first flagged an account (over the seeds where it fired)."""
    hours: Spread | None
    """Simulated hours when it first flagged an account (likewise)."""
    share: Spread | None
    """Accounts flagged over accounts used (over every seed)."""

    @property
    def quiet(self) -> bool:
        """No account flagged in any seed."""
        return self.fired == 0 and (self.share is None or self.share.mean == 0.0)


def detector_summaries(runs: Sequence[AuditRun], detectors: Sequence[str]) -> list[DetectorSummary]:
    """Per detector, attacker and account count: when the detector fired and what share it flagged."""
    summaries = []
    for detector in detectors:
        for (attacker, accounts), group in _groups(runs).items():
            flags = [run.first_flag(detector) for run in group]
            fired = [flag for flag in flags if flag is not None]
            queries = spread([flag.get("queries") for flag in fired]) if fired else None
            hours = spread([_hours(number(flag.get("simulated_seconds"))) for flag in fired]) if fired else None
            share = spread([run.flagged_share(detector) for run in group])
            summaries.append(DetectorSummary(detector, attacker, accounts, len(group), len(fired), queries, hours,
                                             share))
    return summaries


def spread_limit(summaries: Sequence[DetectorSummary]) -> int | None:
    """The smallest tested account count from which on the detector flagged no account (at it and at
    every larger count tested, in every seed); None when it flagged accounts at the largest count."""
    limit = None
    for summary in sorted(summaries, key=lambda item: item.accounts, reverse=True):
        if not summary.quiet:
            break
        limit = summary.accounts
    return limit


# -- honest users ---------------------------------------------------------------------------


def honest_summary(runs: Sequence[AuditRun]) -> dict[str, Any]:
    """Honest users over every run: user-runs, accuracy and paid (mean ± std), flagged user-runs and
    the detectors that flagged them."""
    users = [user for run in runs if run.finished for user in run.honest]
    flagged = [user for user in users if user.get("flags")]
    detectors = sorted({name for user in flagged for name in str(user["flags"]).split("+") if name})
    return {"user_runs": len(users), "accuracy": spread([user.get("accuracy") for user in users]),
            "paid": spread([user.get("paid") for user in users]), "flagged": len(flagged),
            "blocked": sum(user.get("blocked_at") is not None for user in users), "detectors": detectors,
            "errors": sum(bool(user.get("error")) for user in users)}


# -- the verdict ----------------------------------------------------------------------------


def _attack_sentence(attacker: str, accounts: int, group: Sequence[AuditRun], currency: str) -> str:
    fidelity = _final(group, "fidelity")
    cost = _final(group, "cost")
    seconds = _final(group, "simulated_seconds")
    queries = _final(group, "queries_used")
    money = format_money(cost.mean if cost else None, currency)
    spent = f"{queries.mean:,.0f} queries" if queries else "its queries"
    plural = "s" if accounts != 1 else ""
    return (f"With {money} and {accounts:,} account{plural}, {attacker} reaches fidelity "
            f"{_mean_std(fidelity, '.3f')} in {format_duration(seconds.mean if seconds else None)} under the "
            f"rate limits ({spent}; mean over {_seeds(len(group))}).")


def _count_spread(value: Spread | None) -> str:
    """Whole numbers the same in every seed as one number (``4``), else :func:`format_spread`."""
    if value is not None and float(value.mean).is_integer() and (value.n == 1 or value.std == 0):
        return f"{int(value.mean):,}" + (f" [{value.n}/{value.of}]" if value.n < value.of else "")
    return format_spread(value)


def _duration_spread(value: Spread | None) -> str:
    """A spread of seconds as durations: ``15 min ± 30 s`` (``[k/n]`` as :func:`format_spread`)."""
    if value is None:
        return "—"
    text = format_duration(value.mean)
    if value.n > 1 and value.std > 0:
        text += f" ± {format_duration(value.std)}"
    return text + (f" [{value.n}/{value.of}]" if value.n < value.of else "")


def _mean_std(value: Spread | None, spec: str) -> str:
    if value is None:
        return "—"
    if value.n == 1 or value.std == 0 or math.isnan(value.std):
        return f"{value.mean:{spec}}"
    return f"{value.mean:{spec}} ± {value.std:{spec}}"


def _detector_sentence(detector: str, attacker: str, summaries: Sequence[DetectorSummary]) -> str:
    tested = sorted(summary.accounts for summary in summaries)
    counts = ", ".join(f"{count:,}" for count in tested)
    fired = [summary for summary in sorted(summaries, key=lambda item: item.accounts) if summary.fired]
    if not fired:
        runs = sum(summary.runs for summary in summaries)
        return f"{detector} never fired against {attacker} ({runs} runs through {counts} accounts)."
    first = fired[0]
    plural = "s" if first.accounts != 1 else ""
    queries = f"{first.queries.mean:,.0f}" if first.queries else "?"
    hours = format_duration(first.hours.mean * 3600) if first.hours else "?"
    when = (f"{detector} fires against {attacker} after {queries} queries and {hours} of simulated time "
            f"(through {first.accounts:,} account{plural}, in {first.fired} of {_seeds(first.runs)})")
    limit = spread_limit(summaries)
    if limit is None:
        return f"{when}, at every tested spread ({counts} accounts)."
    return (f"{when} unless the queries are spread over {limit:,} accounts or more "
            f"(it flagged no account from {limit:,} on; tested: {counts}).")


def verdict(runs: Sequence[AuditRun], detectors: Sequence[str], currency: str) -> list[str]:
    """The audit's findings in plain words, one sentence each, every number from ``runs``.

    Per attacker: the account count at which it reached its best mean fidelity, with the money
    and the simulated hours it took. Per detector and attacker: the queries (and hours) to its
    first flag at the fewest accounts where it fired, and the spread (account count) from which
    on it flagged no account. Then what honest users saw.
    """
    groups = _groups(runs)
    sentences = []
    for attacker in dict.fromkeys(key[0] for key in groups):
        options = {accounts: group for (name, accounts), group in groups.items() if name == attacker}

        def best(accounts: int, options: dict[int, list[AuditRun]] = options) -> tuple[float, int]:
            fidelity = _final(options[accounts], "fidelity")
            return (fidelity.mean if fidelity else -1.0, -accounts)

        accounts = max(options, key=best)
        sentences.append(_attack_sentence(attacker, accounts, options[accounts], currency))
    summaries = detector_summaries(runs, detectors)
    for detector in detectors:
        for attacker in dict.fromkeys(key[0] for key in groups):
            mine = [item for item in summaries if item.detector == detector and item.attacker == attacker]
            if mine:
                sentences.append(_detector_sentence(detector, attacker, mine))
    honest = honest_summary(runs)
    if honest["user_runs"]:
        detectors_named = f" (by {', '.join(honest['detectors'])})" if honest["detectors"] else ""
        sentences.append(
            f"Honest users sending the test split beside the attacks got accuracy "
            f"{_mean_std(honest['accuracy'], '.3f')}, paid {format_money(honest['paid'].mean if honest['paid'] else None, currency)} "
            f"each, and {honest['flagged']} of {honest['user_runs']} were flagged{detectors_named}.")
    failed = [run for run in runs if not run.finished]
    if failed:
        sentences.append(f"{len(failed)} of {len(runs)} runs did not finish; the numbers above leave them out.")
    return sentences


# -- tables and plots -----------------------------------------------------------------------


def _attack_table(groups: dict[GroupKey, list[AuditRun]], currency: str) -> str:
    columns = ("attacker", "accounts", "n", "seeds", "queries", f"cost ({currency})", "simulated time",
               "fidelity", "accuracy", "accounts used", "stop reasons")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for (attacker, accounts), group in groups.items():
        seeds = ", ".join(str(run.seed) for run in sorted(group, key=lambda run: run.seed))
        reasons = ", ".join(sorted({str(run.metrics.get("stop_reason", "—")) for run in group}))
        cells = [_count_spread(_final(group, "queries_used")), format_spread(_final(group, "cost")),
                 _duration_spread(_final(group, "simulated_seconds")), format_spread(_final(group, "fidelity")),
                 format_spread(_final(group, "accuracy")), _count_spread(_final(group, "accounts_used"))]
        lines.append("| " + " | ".join([attacker, f"{accounts:,}", str(len(group)), seeds, *cells, reasons]) + " |")
    return "\n".join(lines) + "\n"


def _detector_table(summaries: Sequence[DetectorSummary]) -> str:
    columns = ("detector", "attacker", "accounts", "fired in", "queries to first flag", "simulated time to first flag",
               "share of accounts flagged")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for item in summaries:
        lines.append("| " + " | ".join([item.detector, item.attacker, f"{item.accounts:,}",
                                        f"{item.fired} of {_seeds(item.runs)}", format_spread(item.queries),
                                        _duration_spread(_scaled(item.hours, 3600.0)),
                                        format_spread(item.share)]) + " |")
    return "\n".join(lines) + "\n"


def _scaled(value: Spread | None, factor: float) -> Spread | None:
    if value is None:
        return None
    return Spread(value.n, value.of, value.mean * factor, value.std * factor, value.min * factor)


def _plot(out: Path, groups: dict[GroupKey, list[AuditRun]], metric: str, scale: float, label: str,
          name: str) -> bool:
    """Fidelity against ``metric`` (times ``scale``): a panel per attacker, a line per account count,
    the mean over seeds with a ±1 std band. False when no run has such points."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    attackers = list(dict.fromkeys(key[0] for key in groups))
    curves = {}
    for key, group in groups.items():
        histories = [[{"queries": x * scale, "fidelity": line.get("fidelity")}
                      for line in run.history if (x := number(line.get(metric))) is not None]
                     for run in group]
        curve = mean_curve(histories, "fidelity")
        if curve is not None:
            curves[key] = curve
    if not curves:
        return False
    points = [x for curve in curves.values() for x in curve.queries]
    logarithmic = min(points) > 0 and max(points) > 20 * min(points)  # e.g. minutes through 1 account, seconds through 256
    figure, axes = plt.subplots(1, len(attackers), figsize=(5 * len(attackers) + 1.5, 4), squeeze=False)
    for axis, attacker in zip(axes[0], attackers, strict=True):
        for index, ((name_, accounts), curve) in enumerate(sorted(curves.items())):
            if name_ != attacker:
                continue
            colour = f"C{index % 10}"
            plural = "s" if accounts != 1 else ""
            axis.plot(curve.queries, curve.mean, "-o", ms=3, color=colour,
                      label=f"{accounts:,} account{plural} ({_seeds(curve.runs)})")
            low, high = curve.band()
            axis.fill_between(curve.queries, low, high, color=colour, alpha=0.2, linewidth=0)
        axis.set_title(attacker)
        axis.set_xlabel(label)
        if logarithmic:
            axis.set_xscale("log")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("fidelity: mean over seeds, band ±1 std")
    figure.tight_layout()
    figure.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def write_audit_report(out: Path, runs: Sequence[AuditRun], detectors: Sequence[str], currency: str,
                       setting: Sequence[str] = ()) -> Path:
    """``out/report.md`` with ``fidelity_vs_money.png`` and ``fidelity_vs_hours.png``; ``setting``: lines
    describing what was audited (victim, limits, price, defenses), shown above the verdict."""
    groups = _groups(runs)
    plots = []
    if _plot(out, groups, "cost", 1.0, f"money spent ({currency})", "fidelity_vs_money.png"):
        plots.append("![fidelity against money spent, a panel per attacker, a line per account count]"
                     "(fidelity_vs_money.png)")
    longest = max((number(line.get("simulated_seconds")) or 0.0 for run in runs for line in run.history), default=0.0)
    unit, seconds = (("hours", 3600.0) if longest >= 7200 else ("minutes", 60.0) if longest >= 120
                     else ("seconds", 1.0))
    if _plot(out, groups, "simulated_seconds", 1 / seconds, f"simulated {unit} under the rate limits",
             "fidelity_vs_hours.png"):
        plots.append("![fidelity against simulated hours, a panel per attacker, a line per account count]"
                     "(fidelity_vs_hours.png)")
    summaries = detector_summaries(runs, detectors)
    honest = honest_summary(runs)
    failed = [run for run in runs if not run.finished]
    honest_lines = (
        f"{honest['user_runs']} honest user-runs (each user sends the test split through a key of its own, "
        f"priced like every account, beside one attack run): accuracy {format_spread(honest['accuracy'])}, "
        f"paid {format_spread(honest['paid'])} {currency} each, flagged {honest['flagged']} of "
        f"{honest['user_runs']}" + (f" (by {', '.join(honest['detectors'])})" if honest["detectors"] else "")
        + f", refused a request {honest['blocked']} times."
        + (f" {honest['errors']} honest users failed (see the run directories' honest.json)." if honest["errors"] else "")
        if honest["user_runs"] else "No honest users ran.")
    text = "\n".join([
        "# Audit report", "",
        *setting, *([""] if setting else []),
        "## Verdict", "",
        *[f"- {sentence}" for sentence in verdict(runs, detectors, currency)], "",
        "Every number is a mean (± sample std) over the seeds named; times are simulated from the "
        "rate limits (the accounts in parallel) and the measured latency, not waited for.", "",
        *plots, *([""] if plots else []),
        "## Attacks", "",
        "Final numbers per attacker and account count: mean ± std (min) over seeds; [k/n]: only k of n "
        "seeds have the number.", "",
        _attack_table(groups, currency),
        "## Detectors", "",
        "When each detector first flagged an account of the run (over the seeds in which it fired), and the "
        "share of the accounts used that it flagged (over every seed).", "",
        _detector_table(summaries) if summaries else "No detector in the audited policy.\n",
        "## Honest users", "",
        honest_lines, "",
        *(["## Runs that did not finish", "",
           *[f"- {run.attacker}, {run.accounts:,} accounts, seed {run.seed}: {run.error}" for run in failed], ""]
          if failed else []),
    ])
    path = out / "report.md"
    path.write_text(text)
    return path
