"""The defender's table at real budgets: every API defense against the plain and the adaptive attacker.

Issue #38. Run (digits, 50,000 queries, 3 seeds; see docs/results/adaptive-attacker.md for the
compute it took)::

    stealsim grid-worker --redis-url redis://127.0.0.1:6379/0 --queue adaptive &   # one per core
    stealsim grid-worker --redis-url redis://127.0.0.1:6379/0 --queue adaptive &
    python benchmarks/adaptive_defenses.py --out runs/adaptive --redis-url redis://127.0.0.1:6379/0
    python benchmarks/adaptive_defenses.py --out runs/adaptive --report-only     # table and plot again

Steps, all printed:

1. Train (or reuse) the victim and the defender's models (misinformation model, MAD proxy).
2. Choose every threshold and strength on the **validation** split (never the test split):
   adaptive misinformation's and ``pooled_ood``'s ``tau`` = the ``--honest-share`` quantile of the
   victim's maximum softmax probability; SEAT's ``threshold`` = the smallest RMS pixel distance
   between two validation images; the Mahalanobis statistics of ``ood_rate`` (``stealsim
   ood-fit``); the Gaussian noise's ``std`` = the largest of :data:`NOISE_STDS` whose validation
   accuracy stays within ``--honest-cost`` of the clean one. The other defenses run at their
   defaults (reverse sigmoid beta 1, gamma 0.1; rounding to 2 decimals; top-1; MAD epsilon 1).
3. One grid per attacker variant (:data:`VARIANTS`), each over the defenses it adapts to:

   - ``plain``: every defense, the attack as it is;
   - ``arg-max``: train on the arg-max only (``hard_label``), against the defenses that change
     labels. The others (top-k, rounding, reverse sigmoid, label-only, ``account_keyed``, the
     detectors, which do not block here) keep every arg-max, so an arg-max thief's answers and
     run under them are its run under no defense (checked to the last digit in the results
     log): that run's cell stands for them;
   - ``drop``: drop answers the clone confidently contradicts (``drop_contradicted``), against
     the watermark, whose clones are then tested with the watermark's own verification;
   - ``shaped``: query shaping (:data:`SHAPED`), against the detectors.

   Detectors only flag here (``block: false``), so all of them watch one policy
   (``detectors``) and the run records the queries at which each first flagged it.
4. The table (mean ± std over seeds, test split): per defense, honest accuracy and ECE, and per
   attack the plain and the best adaptive fidelity and the first flag of each detector; the
   verdict of issue #38 (does the defense still cost the best attacker >= 10 points of fidelity
   for <= 1 point of honest accuracy?) and the Pareto plot (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.defenses import calibrate, fit_mahalanobis, number
from experiments.grid import load_spec, run_grid
from experiments.store import read_csv
from experiments.victims import VictimSettings, prepare_defender_models, prepare_victims

NOISE_STDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
"""The Gaussian noise strengths tried on validation (the largest within the honest cost is served)."""

LABEL_CHANGING = ("gaussian-noise", "mad", "adaptive-misinfo", "watermark")
"""The defenses that may change an answer's arg-max: the only ones an arg-max thief must be run against."""

SHAPED: dict[str, Any] = {"shape_confidence": 1.0, "shape_min_distance": 0.1, "shape_history": 10_000}
"""The query-shaping settings of the ``shaped`` variant (docs/attacks.md#query-shaping-against-the-detectors):
jitter past SEAT's threshold (0.085 RMS on digits), against as many earlier queries as SEAT keeps
(10,000: the attacker knows the detector's settings), and the generator's confidence term (Dual
Student and DFME). No cover traffic: the rate tests allow
honest users 2 % out-of-distribution queries, so cover cannot hide a thief whose own queries are
all out of distribution (docs/results/adaptive-attacker.md)."""

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "arg-max": {"hard_label": True},
    "drop": {"drop_contradicted": True},
    "shaped": SHAPED,
}
"""Each attacker variant's settings (added to every attack's; an attack without one skips it)."""

DETECTOR_NAMES = ("prada", "seat", "ood_rate", "pooled_ood")

ORDER = ("none", "top-k", "rounding", "label-only", "gaussian-noise", "reverse-sigmoid", "mad", "adaptive-misinfo",
         "watermark", "account-keyed", "detectors")
"""The table's rows, in the order of :func:`defenses`."""


def defenses(chosen: dict[str, float], statistics_path: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every defense's policy, its thresholds and strength chosen on validation (``chosen``)."""
    return {
        "none": [],
        "top-k": [{"name": "top_k", "k": 1}],
        "rounding": [{"name": "round", "decimals": 2}],
        "label-only": [{"name": "label_only"}],
        "gaussian-noise": [{"name": "gaussian_noise", "std": chosen["noise_std"]}],
        "reverse-sigmoid": [{"name": "reverse_sigmoid", "beta": 1.0, "gamma": 0.1}],
        "mad": [{"name": "prediction_poisoning", "epsilon": args.mad_epsilon, "objective": "angular",
                 "oracle": "argmax", "proxy": "@proxy"}],
        "adaptive-misinfo": [{"name": "adaptive_misinformation", "model": "@misinformation",
                              "tau": round(chosen["tau"], 6), "nu": 10000.0}],
        "watermark": [{"name": "watermark", "fraction": args.watermark_fraction, "mode": "one_hot"}],
        "account-keyed": [{"name": "account_keyed"}],
        "detectors": [
            {"name": "prada", "delta": 0.95, "min_queries": 100},
            {"name": "seat", "threshold": round(chosen["seat_threshold"], 6), "max_pairs": 50},
            # The per-key rate on the Mahalanobis score, the pooled one on the MSP: both scores watched.
            {"name": "ood_rate", "score": "mahalanobis", "encoder": "@victim",
             "statistics": str(statistics_path.resolve()), "honest_rate": 2 * args.honest_share,
             "alpha": 1e-6, "min_queries": 64},
            {"name": "pooled_ood", "tau": round(chosen["tau"], 6), "honest_rate": 2 * args.honest_share},
        ],
    }


def variant_defenses(variant: str, every: list[str]) -> list[str]:
    """The defenses a variant runs against, in ``every``'s order (``none`` with each, as its own
    baseline; last, so that the defenses' cells run first where ``every`` puts it last)."""
    chosen = {"plain": every, "arg-max": ["none", *LABEL_CHANGING], "drop": ["watermark"],
              "shaped": ["detectors"]}[variant]
    return [name for name in every if name in chosen]


def noise_std(victim_dir: Path, dataset: str, honest_cost: float) -> float:
    """The largest of :data:`NOISE_STDS` whose validation accuracy is within ``honest_cost`` of the clean one."""
    from defense.steps.gaussian_noise import GaussianNoise
    from stealsim.checkpoint import load_checkpoint
    from stealsim.data import load_dataset

    data = load_dataset(dataset)
    model, _ = load_checkpoint(victim_dir, "cpu")
    with torch.no_grad():
        probabilities = torch.softmax(model(data.x_val), dim=1).numpy()
    labels = data.y_val.numpy()
    clean = float((probabilities.argmax(1) == labels).mean())
    best = NOISE_STDS[0]
    for std in NOISE_STDS:
        noisy = GaussianNoise(std=std).apply(probabilities, np.random.default_rng(0))
        accuracy = float((noisy.argmax(1) == labels).mean())
        print(f"  gaussian noise std {std}: validation accuracy {accuracy:.4f} (clean {clean:.4f})", flush=True)
        if clean - accuracy <= honest_cost:
            best = std
    return best


def spec_for(args: argparse.Namespace, variant: str, policies: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    names = variant_defenses(variant, args.defenses or list(policies))
    return {
        "dataset": args.dataset, "victim_epochs": args.epochs, "victims": ["normal"], "attacks": args.attacks,
        "defenses": {name: policies[name] for name in names}, "budgets": [args.budget],
        "seeds": list(range(args.seeds)), "attack_settings": {"batch_size": 128, **VARIANTS[variant]},
        "transfer_samples": 100, "reference_epochs": 3, "threads": 1,
    }


# -- the table ------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def text(cell: tuple[float, float, int]) -> str:
    mean, std, count = cell
    if count == 0:
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if count > 1 else f"{mean:.3f} (1 seed)"


def collect(out: Path) -> tuple[list[dict[str, str]], dict[str, dict[str, str]]]:
    """Every done result row (with its ``variant``) and the honest user's cost per defense."""
    rows: list[dict[str, str]] = []
    costs: dict[str, dict[str, str]] = {}
    for variant in VARIANTS:
        folder = out / variant
        if not (folder / "results.csv").is_file():
            continue
        rows += [{**row, "variant": variant} for row in read_csv(folder / "results.csv") if row["status"] == "done"]
        if (folder / "defenses.csv").is_file():
            for row in read_csv(folder / "defenses.csv"):
                costs.setdefault(row["defense"], row)
    return rows, costs


def fidelity(rows: list[dict[str, str]], attack: str, defense: str, variant: str,
             column: str = "fidelity") -> tuple[float, float, int]:
    """Mean ± std over seeds of ``attack``'s fidelity (or another ``column``) under ``defense`` as
    ``variant``; an arg-max thief under a defense that keeps every arg-max is its run under ``none``
    (see the module docstring)."""
    if variant == "arg-max" and defense not in LABEL_CHANGING:
        defense = "none"
    return mean_std([number(row[column]) for row in rows
                     if row["attack"] == attack and row["defense"] == defense and row["variant"] == variant])


def summarize(out: Path, attacks: list[str]) -> dict[str, Any]:
    """The table of issue #38 as data: per defense, the honest cost and per attack plain and best adaptive."""
    rows, costs = collect(out)
    clean = number(costs.get("none", {}).get("accuracy"))
    table: dict[str, Any] = {}
    measured = {row["defense"] for row in rows if row["variant"] == "plain"}
    for defense in sorted(costs, key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER)):
        if defense not in measured:  # no plain run: the thief's best against it is unknown
            continue
        entry: dict[str, Any] = {"honest_accuracy": number(costs[defense]["accuracy"]),
                                 "honest_ece": number(costs[defense]["ece"]),
                                 "honest_flags": costs[defense]["flags"], "attacks": {}}
        entry["honest_cost_points"] = 100 * (clean - entry["honest_accuracy"])
        for attack in attacks:
            plain = fidelity(rows, attack, defense, "plain")
            tried = {variant: cell for variant in VARIANTS if variant != "plain"
                     for cell in [fidelity(rows, attack, defense, variant)] if cell[2]}
            best_name, best = max([("plain", plain), *tried.items()], key=lambda item: item[1][0]
                                  if item[1][2] else -1.0)
            flags = [row["first_flags"] for row in rows
                     if row["attack"] == attack and row["defense"] == defense and row["variant"] in ("plain", "shaped")]
            entry["attacks"][attack] = {
                "plain": plain, "variants": tried, "best_variant": best_name, "best": best,
                "best_transfer": fidelity(rows, attack, defense, best_name, "transfer_success_rate"),
                "watermark_p_values": {variant: [number(row["watermark_p_value"]) for row in rows
                                                 if row["attack"] == attack and row["defense"] == defense
                                                 and row["variant"] == variant and row.get("watermark_p_value")]
                                       for variant in VARIANTS} if defense == "watermark" else {},
                "first_flags": {variant: _first_flags([row for row in rows if row["attack"] == attack
                                                       and row["defense"] == defense and row["variant"] == variant])
                                for variant in ("plain", "shaped")} if defense == "detectors" or any(flags) else {},
            }
        table[defense] = entry
    if "detectors" in costs:
        for name in DETECTOR_NAMES:
            table[f"{name} (blocking)"] = blocking_detector(name, rows, costs["detectors"], clean, attacks)
    return {"clean_accuracy": clean, "defenses": table}


def blocking_detector(name: str, rows: list[dict[str, str]], cost: dict[str, str], clean: float,
                      attacks: list[str]) -> dict[str, Any]:
    """One detector of the ``detectors`` policy as a defense that blocks the key at its first flag:
    the thief keeps the fidelity it had then (``fidelity_at_flags``; its final one if never flagged).
    The honest user it flags is blocked: counted as all its accuracy lost."""
    blocked_honest = name in cost["flags"].split("+")
    accuracy = number(cost["accuracy"])
    entry: dict[str, Any] = {"honest_accuracy": accuracy, "honest_ece": number(cost["ece"]),
                             "honest_flags": cost["flags"], "attacks": {},
                             "honest_cost_points": 100 * clean if blocked_honest else 100 * (clean - accuracy)}
    for attack in attacks:
        cells = {}
        for variant in ("plain", "shaped"):
            values = []
            for row in rows:
                if row["attack"] == attack and row["defense"] == "detectors" and row["variant"] == variant:
                    kept = dict(part.split(":") for part in (row.get("fidelity_at_flags") or "").split())
                    values.append(float(kept[name]) if name in kept else number(row["fidelity"]))
            cells[variant] = mean_std(values)
        tried = {variant: cell for variant, cell in cells.items() if variant != "plain" and cell[2]}
        best_name, best = max([("plain", cells["plain"]), *tried.items()],
                              key=lambda item: item[1][0] if item[1][2] else -1.0)
        entry["attacks"][attack] = {"plain": cells["plain"], "variants": tried, "best_variant": best_name,
                                    "best": best, "first_flags": {}}
    return entry


def _first_flags(rows: list[dict[str, str]]) -> dict[str, list[int | None]]:
    """Per detector, the queries at its first flag in each seed's run (``None``: never flagged)."""
    result: dict[str, list[int | None]] = {}
    for name in DETECTOR_NAMES:
        seen: list[int | None] = []
        for row in sorted(rows, key=lambda r: int(r["seed"])):
            found = dict(part.split(":") for part in (row.get("first_flags") or "").split())
            seen.append(int(found[name]) if name in found else None)
        if rows:
            result[name] = seen
    return result


def strongest(entry: dict[str, Any], attacks: list[str]) -> tuple[str, str, float]:
    """The attack (and its variant) with the highest mean fidelity against ``entry``'s defense."""
    found = [(entry["attacks"][a]["best"][0], a, entry["attacks"][a]["best_variant"]) for a in attacks
             if entry["attacks"][a]["best"][2]]
    if not found:
        return "", "", math.nan
    fidelity_kept, attack, variant = max(found)
    return attack, variant, fidelity_kept


def verdict(entry: dict[str, Any], none_entry: dict[str, Any], attacks: list[str], honest_points: float,
            fidelity_points: float) -> str:
    """Issue #38's question: does the defense cost the thief >= ``fidelity_points`` of fidelity for
    <= ``honest_points`` of honest accuracy? The thief knows the defense and picks the attack and
    variant that do best against it; the reference is the best attack against no defense."""
    if entry["honest_cost_points"] > honest_points:
        return f"no: costs honest users {entry['honest_cost_points']:.1f} points"
    attack, variant, kept = strongest(entry, attacks)
    _, _, undefended = strongest(none_entry, attacks)
    if not attack or math.isnan(undefended):
        return "not measured"
    cut = 100 * (undefended - kept)
    thief = f"{attack} ({variant}) keeps {kept:.3f}"
    if cut >= fidelity_points:
        return f"yes: the best thief, {thief}, {cut:.1f} points under {undefended:.3f}"
    return f"no: {thief}, {max(cut, 0.0):.1f} points under {undefended:.3f}"


def verdict_table(summary: dict[str, Any], attacks: list[str], honest_points: float, fidelity_points: float) -> str:
    """The verdicts as a markdown table: per defense, what it costs honest users, the best thief that
    knows it (attack, variant, fidelity ± std over seeds) and the verdict."""
    table = summary["defenses"]
    lines = ["| defense | honest accuracy lost (points) | honest ECE | best thief (variant) | its fidelity | verdict |",
             "| --- | ---: | ---: | --- | ---: | --- |"]
    for defense, entry in table.items():
        if defense == "detectors":
            continue
        attack, variant, _ = strongest(entry, attacks)
        cell = entry["attacks"][attack]["best"] if attack else (math.nan, math.nan, 0)
        judged = "—" if defense == "none" else verdict(entry, table["none"], attacks, honest_points, fidelity_points)
        lines.append(f"| {defense} | {entry['honest_cost_points']:.1f} | {entry['honest_ece']:.3f} | "
                     f"{attack} ({variant}) | {text(cell)} | {judged.split(':')[0]} |")
    return "\n".join(lines)


def print_table(summary: dict[str, Any], attacks: list[str], args: argparse.Namespace) -> None:
    table = summary["defenses"]
    if "none" not in table:
        print("no results yet")
        return
    print("\n| defense | honest acc. | honest ECE | "
          + " | ".join(f"{attack}: plain / best adaptive" for attack in attacks) + " | verdict |")
    print("|---|---:|---:|" + "---|" * len(attacks) + "---|")
    for defense, entry in table.items():
        cells = []
        for attack in attacks:
            found = entry["attacks"][attack]
            cells.append(f"{text(found['plain'])} / {text(found['best'])} ({found['best_variant']})")
        judged = "—" if defense == "none" else "flags only: see the blocking rows" if defense == "detectors" else verdict(entry, table["none"], attacks, args.honest_points,
                                                          args.fidelity_points)
        print(f"| {defense} | {entry['honest_accuracy']:.4f} | {entry['honest_ece']:.3f} | "
              + " | ".join(cells) + f" | {judged} |")
    print("\nUntargeted transfer of the best attacker's clone (mean ± std):")
    for defense, entry in table.items():
        print(f"  {defense}: " + ", ".join(f"{attack} {text(entry['attacks'][attack]['best_transfer'])}"
                                          for attack in attacks if "best_transfer" in entry["attacks"][attack]))
    for attack, found in table.get("watermark", {}).get("attacks", {}).items():
        for variant, p_values in found["watermark_p_values"].items():
            if p_values:
                print(f"  watermark verification, {attack}, {variant}: p = "
                      + ", ".join(f"{p:.1e}" for p in p_values)
                      + f" ({sum(p < 1e-3 for p in p_values)}/{len(p_values)} identified at p < 1e-3)")
    for defense, entry in table.items():
        for attack in attacks:
            flags = entry["attacks"][attack]["first_flags"]
            for variant, by_detector in flags.items():
                if by_detector:
                    print(f"  first flags, {defense}, {attack}, {variant}: "
                          + ", ".join(f"{name} {seen}" for name, seen in by_detector.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive"))
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--budget", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--attacks", nargs="+", default=["dual-student", "dfme", "knockoff", "random"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--defenses", nargs="+", default=None, help="only these defenses (and none); default: all")
    parser.add_argument("--honest-share", type=float, default=0.01)
    parser.add_argument("--honest-cost", type=float, default=0.01,
                        help="validation accuracy the Gaussian noise may cost (its std is chosen by it)")
    parser.add_argument("--mad-epsilon", type=float, default=1.0)
    parser.add_argument("--watermark-fraction", type=float, default=0.02)
    parser.add_argument("--honest-points", type=float, default=1.0, help="the verdict's honest-accuracy allowance")
    parser.add_argument("--fidelity-points", type=float, default=10.0, help="the verdict's fidelity cut")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--queue", default="adaptive")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", type=Path, default=None, help="write the Pareto plot here (PNG)")
    parser.add_argument("--also", nargs="*", default=[], metavar="DATASET=OUT",
                        help="another dataset's --out folder, drawn as a panel of its own beside this one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.defenses:
        args.defenses = [*[name for name in args.defenses if name != "none"], "none"]

    if not args.report_only:
        settings = VictimSettings(dataset=args.dataset, epochs=args.epochs)
        victims = prepare_victims(settings, args.cache)
        prepare_defender_models(settings, args.cache)
        chosen = calibrate(victims.normal, args.dataset, args.honest_share)
        args.out.mkdir(parents=True, exist_ok=True)
        statistics_path = args.out / "ood-mahalanobis.safetensors"
        chosen["mahalanobis_tau"] = fit_mahalanobis(victims.normal, args.dataset, args.honest_share, statistics_path)
        chosen["noise_std"] = noise_std(victims.normal, args.dataset, args.honest_cost)
        print(f"validation choices: {json.dumps(chosen)}", flush=True)
        (args.out / "validation.json").write_text(json.dumps(chosen, indent=2))
        policies = defenses(chosen, statistics_path, args)
        for variant in args.variants:
            spec_path = args.out / f"{variant}.yaml"
            spec_path.write_text(yaml.safe_dump(spec_for(args, variant, policies), sort_keys=False))
            print(f"\n== {variant}: {spec_path}", flush=True)
            run_grid(load_spec(spec_path), args.out / variant, cache_dir=args.cache, redis_url=args.redis_url,
                     queue=args.queue, announce=lambda line: print(line, flush=True))

    summary = summarize(args.out, args.attacks)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary, args.attacks, args)
    print("\nVerdicts:\n" + verdict_table(summary, args.attacks, args.honest_points, args.fidelity_points))
    if args.plot:
        from benchmarks.adaptive_plot import pareto_plot

        panels = {args.dataset: summary}
        for also in args.also:
            name, _, folder = also.partition("=")
            panels[name] = summarize(Path(folder), args.attacks)
        pareto_plot(panels, args.attacks, args.plot)
        print(f"\nPareto plot: {args.plot}")


if __name__ == "__main__":
    main()
