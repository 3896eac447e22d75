"""Benchmark of issue #6: UQ ensembles and Knockoff against normal vs Nasty Teacher victims.

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

Every figure comes from a run made here; budgets are flags::

    .venv/bin/python benchmarks/ensemble.py --out runs/bench-ens
    .venv/bin/python benchmarks/ensemble.py --quick --datasets digits
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

UQ_KEPT = (
    "queries_used", "fidelity", "accuracy", "victim_accuracy", "combined_fidelity", "member_fidelity_best",
    "member_fidelity_mean", "member_accuracy_best", "member_accuracy_mean", "fidelity_gain",
    "member_variance", "member_disagreement", "members", "transfer_success_rate", "attack_seconds",
)
KNOCKOFF_KEPT = (
    "queries_used", "fidelity", "accuracy", "victim_accuracy", "normalised_accuracy", "transfer_success_rate",
    "server_count_matches", "attack_seconds",
)
KD_TEMPERATURE = {"digits": 4.0, "mnist5k": 20.0}  # the Nasty Teachers' tau (defense/nasty_teacher.py)


def train(dataset: str, root: Path, nasty: bool) -> Path:
    normal = root / f"victim-{dataset}"
    directory = root / (f"nasty-{dataset}" if nasty else f"victim-{dataset}")
    if not (directory / "model.json").is_file():
        extra = ["--nasty", "--adversary", str(normal)] if nasty else []
        subprocess.run([sys.executable, "-m", "stealsim", "train", "--dataset", dataset, "--out", str(directory),
                        "--quiet", *extra], check=True)
    return directory


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def run(attack: str, out: Path, budget: int, args: argparse.Namespace, kept: tuple[str, ...],
        **spec: Any) -> dict[str, Any]:
    if args.clone_arch:
        spec["settings"] = spec.get("settings", {}) | {"student_architecture": args.clone_arch}
    metrics = run_attack(RunSpec(
        attack=attack, out=fresh(out), budget=budget, seed=args.seed, show_progress=False,
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
    results, curves = {}, {}
    variants: list[tuple[str, dict[str, Any]]] = [(kind, {"uq": kind}) for kind in UQ_KINDS]
    variants.append((f"deep-ensemble+diversity{args.diversity:g}", {"uq": "deep-ensemble",
                                                                     "diversity_weight": args.diversity}))
    for label, settings in variants:
        out = args.out / f"uq-{dataset}-{label}"
        results[label] = run("ensemble", out, args.uq_budget, args, UQ_KEPT, victim_checkpoint=victim,
                             settings={"members": args.members, "source": args.uq_source, "student_steps": 1,
                                       "updates_per_batch": args.updates_per_batch, **settings})
        curves[label] = [(line["queries"], line.get("member_variance"), line.get("combined_fidelity"),
                          line.get("member_fidelity_best")) for line in history(out)]
    return results, curves


def knockoff_study(dataset: str, normal: Path, nasty: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Knockoff over HTTP against ``victim`` and ``nasty`` served side by side."""
    admin = new_admin_key()
    results: dict[str, Any] = {}
    models = {"victim": normal, "nasty": nasty}
    with ServiceProcess(models, admin_key=admin, log_path=args.out / f"knockoff-{dataset}-service.log") as service:
        for output in ("probabilities", "label"):
            for model in models:
                label = f"{model}-{output}"
                policy = [{"name": "label_only"}] if output == "label" else None
                key = create_key(service.url, admin, args.knockoff_budget + 10_000, name=label, policy=policy)
                results[label] = run(
                    "knockoff", args.out / f"knockoff-{dataset}-{label}", args.knockoff_budget, args,
                    KNOCKOFF_KEPT, url=service.url, api_key=key, model=model,
                    settings={"temperature": KD_TEMPERATURE[dataset], "sampling": args.sampling},
                )
    for output in ("probabilities", "label"):
        normal_run, nasty_run = results[f"victim-{output}"], results[f"nasty-{output}"]
        results[f"nasty_minus_normal_{output}"] = {
            "fidelity": nasty_run["fidelity"] - normal_run["fidelity"],
            "accuracy": nasty_run["accuracy"] - normal_run["accuracy"],
        }
    return results


def plot(curves: dict[str, dict[str, Any]], uq: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    datasets = list(curves)
    figure, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        bars, lines = axes[row]
        labels = list(uq[dataset])
        positions = range(len(labels))
        for offset, (key, name) in enumerate((("combined_fidelity", "combined"),
                                              ("member_fidelity_best", "best member"),
                                              ("member_fidelity_mean", "mean member"))):
            bars.bar([p + (offset - 1) * 0.27 for p in positions], [uq[dataset][k][key] for k in labels],
                     width=0.27, label=name)
        low = min(uq[dataset][k]["member_fidelity_mean"] for k in labels)
        bars.set_ylim(max(0.0, low - 0.1), 1.0)
        bars.set_xticks(list(positions), labels, rotation=20, fontsize=8)
        bars.set_ylabel("fidelity (test set)")
        bars.set_title(f"{dataset}: combined vs single-member fidelity")
        bars.legend(fontsize=8)
        for index, (label, points) in enumerate(curves[dataset].items()):
            shown = [(q, v) for q, v, _, _ in points if v is not None]
            lines.plot([q for q, _ in shown], [v for _, v in shown], "-o", ms=3, color=f"C{index}", label=label)
        lines.set_yscale("symlog", linthresh=1e-5)
        lines.set_xlabel("attack queries")
        lines.set_ylabel("members' prediction variance")
        lines.set_title(f"{dataset}: variance over training")
        lines.grid(alpha=0.3)
        lines.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
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
    parser.add_argument("--seed", type=int, default=0)
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
        "threads": args.threads, "torch": torch.__version__, "seed": args.seed,
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
