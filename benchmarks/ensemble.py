"""UQ ensembles and Knockoff against normal vs Nasty Teacher victims.

Prints one JSON document of what it measured and writes ``OUT/ensemble.png``.

1. UQ kinds: on ``digits`` and ``mnist5k`` (victims from ``stealsim train``), the
   ensemble attack with each of the five UQ substitutes at ``--uq-budget``
   queries (in process; queries from surrogate data by default, ``--uq-source
   generator`` for the data-free generator): combined vs best / mean single-member
   fidelity and accuracy, the members' prediction variance and disagreement, and
   their curves over training; plus the deep ensemble with the diversity term
   (``--diversity``) to see whether it turns the marginal gain into a real one.
2. Knockoff against a normal and a Nasty Teacher victim (``stealsim train
   --nasty``) served side by side by one real ``stealsim serve``, over HTTP, at
   ``--knockoff-budget``; surrogate data: the *other* built-in dataset's
   training split (mnist5k shrunk to 8x8 for the digits victims, digits grown to
   28x28 for the mnist5k ones); KD at the Nasty Teacher's temperature (4 for
   digits, 20 for mnist5k); probabilities and a label-only key.

Every configuration runs once per attack seed (``--seeds``, default 0,1,2; the
victims are trained once). Each row of the JSON holds ``per_seed`` values and,
per numeric metric, ``mean``, ``std`` (sample, n - 1), ``min`` and ``n``; the
figure shows means with ±1 std bars and bands. Every figure comes from a run
made here; budgets are flags::

    .venv/bin/python benchmarks/ensemble.py --out runs/bench-ens
    .venv/bin/python benchmarks/ensemble.py --quick --datasets digits --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attacker.evaluation import EvalConfig
from attacker.runner import RunSpec, run_attack
from attacker.uq import UQ_KINDS
from experiments.service import ServiceProcess, create_key, new_admin_key
from experiments.stats import mean_curve, spread

UQ_KEPT = (
    "queries_used", "fidelity", "accuracy", "victim_accuracy", "combined_fidelity", "member_fidelity_best",
    "member_fidelity_mean", "member_accuracy_best", "member_accuracy_mean", "fidelity_gain",
    "member_variance", "member_disagreement", "members", "transfer_success_rate", "attack_seconds",
)
KNOCKOFF_KEPT = (
    "queries_used", "fidelity", "accuracy", "victim_accuracy", "normalised_accuracy", "transfer_success_rate",
    "server_count_matches", "attack_seconds",
)
CURVE_KEPT = ("queries", "member_variance", "combined_fidelity", "member_fidelity_best")
KD_TEMPERATURE = {"digits": 4.0, "mnist5k": 20.0}  # the Nasty Teachers' tau (defense/nasty_teacher.py)


def train(dataset: str, root: Path, nasty: bool) -> Path:
    normal = root / f"victim-{dataset}"
    directory = root / (f"nasty-{dataset}" if nasty else f"victim-{dataset}")
    if not (directory / "model.json").is_file():
        extra = ["--nasty", "--adversary", str(normal)] if nasty else []
        subprocess.run([sys.executable, "-m", "stealsim", "train", "--dataset", dataset, "--out", str(directory),
                        "--quiet", *extra], check=True, stdout=sys.stderr)  # stdout holds only the JSON
    return directory


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def seeds_of(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A row: the per-seed values and, per numeric metric, mean, sample std, min and n."""
    row: dict[str, Any] = {"per_seed": {str(seed): values for seed, values in per_seed.items()},
                           "mean": {}, "std": {}, "min": {}, "n": {}}
    names = dict.fromkeys(name for values in per_seed.values() for name in values)
    for name in names:
        value = spread([values.get(name) for values in per_seed.values()])
        if value is not None:
            row["mean"][name], row["min"][name], row["n"][name] = value.mean, value.min, value.n
            row["std"][name] = None if value.n < 2 else value.std  # JSON has no NaN
    return row


def run(attack: str, out: Path, budget: int, args: argparse.Namespace, kept: tuple[str, ...], seed: int,
        **spec: Any) -> dict[str, Any]:
    if args.clone_arch:
        spec["settings"] = spec.get("settings", {}) | {"student_architecture": args.clone_arch}
    metrics = run_attack(RunSpec(
        attack=attack, out=fresh(out), budget=budget, seed=seed, show_progress=False,
        eval_every=max(1, budget // args.evaluations),
        evaluation=EvalConfig(transfer_samples=args.transfer_samples, reference_epochs=args.reference_epochs),
        **spec,
    ))
    result = {k: metrics.get(k) for k in kept}
    print(f"# {out.name}: " + json.dumps(result), file=sys.stderr, flush=True)
    return result


def history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def uq_study(dataset: str, victim: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every UQ variant once per seed: rows over seeds, and each run's evaluation history."""
    results, curves = {}, {}
    variants: list[tuple[str, dict[str, Any]]] = [(kind, {"uq": kind}) for kind in UQ_KINDS]
    variants.append((f"deep-ensemble+diversity{args.diversity:g}", {"uq": "deep-ensemble",
                                                                     "diversity_weight": args.diversity}))
    for label, settings in variants:
        per_seed, histories = {}, {}
        for seed in args.seeds:
            out = args.out / f"uq-{dataset}-{label}-s{seed}"
            per_seed[seed] = run("ensemble", out, args.uq_budget, args, UQ_KEPT, seed, victim_checkpoint=victim,
                                 settings={"members": args.members, "source": args.uq_source, "student_steps": 1,
                                           "updates_per_batch": args.updates_per_batch, **settings})
            histories[str(seed)] = [{key: line.get(key) for key in CURVE_KEPT} for line in history(out)]
        results[label] = over_seeds(per_seed)
        curves[label] = histories
    return results, curves


def knockoff_study(dataset: str, normal: Path, nasty: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Knockoff over HTTP against ``victim`` and ``nasty`` served side by side."""
    admin = new_admin_key()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    models = {"victim": normal, "nasty": nasty}
    with ServiceProcess(models, admin_key=admin, log_path=args.out / f"knockoff-{dataset}-service.log") as service:
        for output in ("probabilities", "label"):
            for model in models:
                label = f"{model}-{output}"
                policy = [{"name": "label_only"}] if output == "label" else None
                for seed in args.seeds:
                    key = create_key(service.url, admin, args.knockoff_budget + 10_000, name=f"{label}-s{seed}",
                                     policy=policy)
                    runs.setdefault(label, {})[seed] = run(
                        "knockoff", args.out / f"knockoff-{dataset}-{label}-s{seed}", args.knockoff_budget, args,
                        KNOCKOFF_KEPT, seed, url=service.url, api_key=key, model=model,
                        settings={"temperature": KD_TEMPERATURE[dataset], "sampling": args.sampling},
                    )
    results: dict[str, Any] = {label: over_seeds(per_seed) for label, per_seed in runs.items()}
    for output in ("probabilities", "label"):
        normal_runs, nasty_runs = runs[f"victim-{output}"], runs[f"nasty-{output}"]
        # paired by seed: the nasty and the normal clone of one seed
        results[f"nasty_minus_normal_{output}"] = over_seeds({
            seed: {metric: nasty_runs[seed][metric] - normal_runs[seed][metric] for metric in ("fidelity", "accuracy")}
            for seed in args.seeds
        })
    return results


def plot(curves: dict[str, dict[str, Any]], uq: dict[str, dict[str, Any]], path: Path) -> None:
    """Per dataset: combined vs member fidelity (means over seeds, ±1 std bars) and the members'
    variance over training (mean over seeds, ±1 std band); legends outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    datasets = list(curves)
    figure, axes = plt.subplots(len(datasets), 2, figsize=(13, 4.4 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        bars, lines = axes[row]
        labels = list(uq[dataset])
        positions = range(len(labels))
        for offset, (key, name) in enumerate((("combined_fidelity", "combined"),
                                              ("member_fidelity_best", "best member"),
                                              ("member_fidelity_mean", "mean member"))):
            means = [uq[dataset][k]["mean"].get(key, 0.0) for k in labels]
            errors = [uq[dataset][k]["std"].get(key) or 0.0 for k in labels]
            bars.bar([p + (offset - 1) * 0.27 for p in positions], means, yerr=errors, capsize=2,
                     width=0.27, label=name)
        low = min(uq[dataset][k]["mean"].get("member_fidelity_mean", 0.0) for k in labels)
        bars.set_ylim(max(0.0, low - 0.1), 1.0)
        bars.set_xticks(list(positions), labels, rotation=20, fontsize=8)
        bars.set_ylabel("fidelity (test set): mean over seeds, bar ±1 std")
        bars.set_title(f"{dataset}: combined vs single-member fidelity", pad=24)
        bars.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
        for index, (label, histories) in enumerate(curves[dataset].items()):
            curve = mean_curve(list(histories.values()), "member_variance")
            if curve is None:
                continue
            colour = f"C{index % 10}"
            lines.plot(curve.queries, curve.mean, "-o", ms=3, color=colour,
                       label=f"{label} ({curve.runs} seed{'s' if curve.runs > 1 else ''}"
                             f"{', interpolated' if curve.interpolated else ''})")
            if curve.runs > 1:
                lines.fill_between(curve.queries, [m - s for m, s in zip(curve.mean, curve.std, strict=True)],
                                   [m + s for m, s in zip(curve.mean, curve.std, strict=True)],
                                   color=colour, alpha=0.2, linewidth=0)
        lines.set_yscale("symlog", linthresh=1e-5)
        lines.set_xlabel("attack queries")
        lines.set_ylabel("members' prediction variance")
        lines.set_title(f"{dataset}: variance over training (mean over seeds, band ±1 std)", pad=24)
        lines.grid(alpha=0.3)
        lines.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uq-budget", type=int, default=20_000)
    parser.add_argument("--knockoff-budget", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--updates-per-batch", type=int, default=8, help="UQ member updates per answered batch")
    parser.add_argument("--diversity", type=float, default=0.5, help="weight of the diversity run")
    parser.add_argument("--sampling", default="random", choices=["random", "adaptive"])
    parser.add_argument("--uq-source", default="surrogate", choices=["surrogate", "generator"],
                        help="the UQ runs' queries: surrogate data (the other built-in) or the generator")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"], choices=["digits", "mnist5k"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["uq", "knockoff"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=seeds_of, default=[0, 1, 2],
                        help="attack seeds, comma-separated: every configuration runs once per seed")
    parser.add_argument("--clone-arch", default=None, help="members' and clone's architecture (default: by input)")
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations per run")
    parser.add_argument("--transfer-samples", type=int, default=200)
    parser.add_argument("--reference-epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ens"))
    parser.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.uq_budget, args.knockoff_budget, args.members = 3_000, 2_000, 3
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "threads": args.threads, "torch": torch.__version__, "seeds": args.seeds,
        "budgets": {"uq": args.uq_budget, "knockoff": args.knockoff_budget}, "members": args.members,
        "surrogate": "the other built-in dataset's train split", "sampling": args.sampling,
        "uq_source": args.uq_source, "updates_per_batch": args.updates_per_batch,
    }
    uq: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for dataset in args.datasets:
        normal = train(dataset, args.out, nasty=False)
        if "uq" not in args.skip:
            uq[dataset], curves[dataset] = uq_study(dataset, normal, args)
        if "knockoff" not in args.skip:
            nasty = train(dataset, args.out, nasty=True)
            result.setdefault("knockoff", {})[dataset] = knockoff_study(dataset, normal, nasty, args)
    if uq:
        result["uq"] = uq
        result["variance_curves"] = curves
        plot(curves, uq, args.out / "ensemble.png")
        result["figure"] = str(args.out / "ensemble.png")
    result["benchmark_seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
