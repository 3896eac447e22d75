"""Attack benchmark over seeds: prints one JSON document of what it measured.

For each dataset (``digits``, ``mnist5k``; victims from ``stealsim train``),
label mode (soft, hard) and attack (Dual Student, DFME, random noise, Knockoff),
one run per seed at the dataset's budget, in process; per row the mean ± std
and min over the seeds of fidelity, accuracy, transfer and queries/s, and Dual
Student's lead over each other attack (mean ± std of the per-seed differences).
Every baseline runs at its own defaults (random noise and Knockoff trained as
well as their answers allow: ``updates_per_batch``). Settings are chosen with
``--split validation``; reported numbers use the test split (the default).
Transfer success per attack at each epsilon of the evaluator's sweep, untargeted
and targeted, beside the independently trained reference. Then the HTTP
overhead: Dual Student on ``digits`` at ``--http-budget`` against a real
``stealsim serve`` and against the same checkpoint in process (same
seed); the ratio of the attack loops' wall times.

Every figure comes from a run made here; budgets are flags so a quick run is
possible (``--quick``). The run directories stay under ``--out``;
``stealsim report OUT/digits-soft-*`` draws their curves as mean with a band::

    .venv/bin/python benchmarks/attack.py --threads 1 --seeds 0,1,2 --out runs/bench
    .venv/bin/python benchmarks/attack.py --quick
    .venv/bin/python benchmarks/attack.py --render saved.json   # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attacker.evaluation import EvalConfig
from attacker.runner import RunSpec, run_attack
from experiments.service import ServiceProcess, create_key, new_admin_key

ATTACKS_RUN = ("dual-student", "dfme", "random", "knockoff")
ART_ATTACKS = ("art-knockoff", "art-copycat")
"""IBM ART's extraction attacks (the ``stealsim[art]`` extra), on request: ``--attacks knockoff art-knockoff``."""

KEPT = (
    "queries_used", "fidelity", "accuracy", "victim_accuracy", "normalised_accuracy",
    "transfer_success_rate", "reference_transfer_success_rate", "queries_to_90_fidelity",
    "queries_to_95_fidelity", "queries_per_second", "attack_seconds", "wall_seconds",
    "eval_queries", "stop_reason",
)


def ensure_victim(dataset: str, root: Path) -> Path:
    directory = root / f"victim-{dataset}"
    if not (directory / "model.json").is_file():
        subprocess.run([sys.executable, "-m", "stealsim", "train", "--dataset", dataset,
                        "--out", str(directory), "--quiet"], check=True, stdout=sys.stderr)  # stdout: the JSON
    return directory


def attack(name: str, out: Path, budget: int, args: argparse.Namespace, seed: int | None = None,
           **spec: Any) -> dict[str, Any]:
    settings = dict(spec.pop("settings", {}))
    if args.clone_arch:
        settings["student_architecture"] = args.clone_arch
    settings.update(args.overrides.get(name, {}))
    metrics = run_attack(RunSpec(
        attack=name, out=out, budget=budget, seed=args.seeds[0] if seed is None else seed,
        show_progress=False, eval_every=max(1, budget // args.evaluations), settings=settings,
        evaluation=EvalConfig(split=args.split, transfer_samples=args.transfer_samples,
                              reference_epochs=args.reference_epochs),
        **spec,
    ))
    kept = {k: metrics.get(k) for k in KEPT}
    kept |= {k: v for k, v in metrics.items() if k.startswith(("transfer_", "reference_transfer_"))}
    print(f"# {out.name}: " + json.dumps(kept), file=sys.stderr, flush=True)
    return kept


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std and min of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "n": len(values)}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows and mean / std / min of every numeric metric they share."""
    summary: dict[str, Any] = {"per_seed": per_seed}
    for key in per_seed[0]:
        values = [row.get(key) for row in per_seed]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            summary[key] = spread([float(v) for v in values])  # type: ignore[arg-type]
    return summary


def leads(rows: dict[str, list[dict[str, Any]]], leader: str = "dual-student") -> dict[str, dict[str, float]]:
    """The leader's fidelity minus each other attack's, seed by seed: mean ± std."""
    if leader not in rows:
        return {}
    return {
        other: spread([a["fidelity"] - b["fidelity"] for a, b in zip(rows[leader], rows[other], strict=True)])
        for other in rows if other != leader
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| dataset | labels | attack | seeds | fidelity mean ± std (min) | Dual Student's lead |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for _block, content in result.items():
        if not isinstance(content, dict) or "attacks" not in content:
            continue
        for name, row in content["attacks"].items():
            f = row["fidelity"]
            lead = content["leads"].get(name)
            lead_text = f"{lead['mean']:+.3f} ± {lead['std']:.3f}" if lead else ""
            lines.append(f"| {content['dataset']} | {content['labels']} | {name} | {f['n']} | "
                         f"{f['mean']:.3f} ± {f['std']:.3f} ({f['min']:.3f}) | {lead_text} |")
    return "\n".join(lines)


def transfer_markdown(result: dict[str, Any]) -> str:
    """Transfer success per attack at each epsilon of the sweep: clone mean ± std, untargeted and
    targeted, beside the independently trained reference (the same for every attack of a block)."""
    lines: list[str] = []
    for content in result.values():
        if not isinstance(content, dict) or "attacks" not in content:
            continue
        first = next(iter(content["attacks"].values()))
        epsilons = sorted({key.split("@", 1)[1] for key in first if key.startswith("transfer_untargeted@")},
                          key=float)
        if not epsilons:
            continue
        header = " | ".join(f"untargeted @{e} | targeted @{e}" for e in epsilons)
        lines += ["", f"Transfer, {content['dataset']}, {content['labels']} labels (mean ± std over seeds):", "",
                  f"| model | {header} |", "| --- |" + " ---: |" * (2 * len(epsilons))]

        def cells(row: dict[str, Any], prefix: str, epsilons: list[str] = epsilons) -> str:
            out = []
            for e in epsilons:
                for kind in ("untargeted", "targeted"):
                    value = row.get(f"{prefix}transfer_{kind}@{e}")
                    out.append(f"{value['mean']:.3f} ± {value['std']:.3f}" if isinstance(value, dict) else "")
            return " | ".join(out)

        for name, row in content["attacks"].items():
            lines.append(f"| {name} clone | {cells(row, '')} |")
        lines.append(f"| reference (no queries) | {cells(first, 'reference_')} |")
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    """The fidelity table, then the transfer tables."""
    return markdown(result) + "\n" + transfer_markdown(result)


def fresh(path: Path) -> Path:
    if path.exists():
        import shutil

        shutil.rmtree(path)
    return path


def http_overhead(victim: Path, budget: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The same attack over HTTP and in process; the HTTP run's loop time over the local one's."""
    admin = new_admin_key()
    with ServiceProcess({"victim": victim}, admin_key=admin, log_path=root / "http-service.log") as service:
        extra = 50_000  # evaluation queries charged to the same key (the test set, transfer at 3 eps x 2)
        key = create_key(service.url, admin, budget + extra, name="http-overhead")
        over_http = attack("dual-student", fresh(root / "http-dual-student"), budget, args,
                           url=service.url, api_key=key, model="victim")
    local = attack("dual-student", fresh(root / "local-dual-student"), budget, args, victim_checkpoint=victim)
    return {
        "budget": budget,
        "http_attack_seconds": over_http["attack_seconds"],
        "in_process_attack_seconds": local["attack_seconds"],
        "ratio": over_http["attack_seconds"] / local["attack_seconds"],
        "http_queries_per_second": over_http["queries_per_second"],
        "in_process_queries_per_second": local["queries_per_second"],
        "http_fidelity": over_http["fidelity"],
        "in_process_fidelity": local["fidelity"],
    }


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``ATTACK.KEY=JSON`` items (``random.updates_per_batch=8``) as ``{attack: {key: value}}``."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, _, value = item.partition("=")
        name, _, key = target.partition(".")
        if not key or not value:
            raise SystemExit(f"--set takes ATTACK.KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        overrides.setdefault(name, {})[key] = parsed
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-budget", type=int, default=150_000)
    parser.add_argument("--mnist-budget", type=int, default=50_000)
    parser.add_argument("--http-budget", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark's cores)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (one run per seed)")
    parser.add_argument("--split", default="test", choices=["test", "validation"],
                        help="evaluation split: validation to choose settings, test to report")
    parser.add_argument("--clone-arch", default=None, help="clone architecture (default: by input shape)")
    parser.add_argument("--evaluations", type=int, default=10, help="evaluations per run")
    parser.add_argument("--transfer-samples", type=int, default=300)
    parser.add_argument("--reference-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"], choices=["digits", "mnist5k"])
    parser.add_argument("--labels", nargs="+", default=["soft", "hard"], choices=["soft", "hard"])
    parser.add_argument("--skip-http", action="store_true", help="no HTTP-overhead measurement")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS_RUN), choices=[*ATTACKS_RUN, *ART_ATTACKS])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="ATTACK.KEY=JSON setting override, e.g. random.updates_per_batch=8 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small budgets, one seed (a smoke run)")
    parser.add_argument("--render", type=Path, default=None,
                        help="print the tables of a JSON document this benchmark wrote, run nothing")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(tables(saved))
        return
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.overrides = parse_overrides(args.overrides)
    if args.quick:
        args.digits_budget, args.mnist_budget, args.http_budget = 10_000, 5_000, 10_000
        args.seeds = args.seeds[:1]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    budgets = {"digits": args.digits_budget, "mnist5k": args.mnist_budget}
    result: dict[str, Any] = {
        "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "seeds": args.seeds, "split": args.split, "budgets": budgets | {"http": args.http_budget},
        "overrides": args.overrides,
    }
    for dataset in args.datasets:
        victim = ensure_victim(dataset, args.out)
        for labels in args.labels:
            rows: dict[str, list[dict[str, Any]]] = {}
            for name in args.attacks:
                rows[name] = [
                    attack(name, fresh(args.out / f"{dataset}-{labels}-{name}-seed{seed}"), budgets[dataset],
                           args, seed=seed, victim_checkpoint=victim,
                           settings={"hard_label": labels == "hard"})
                    for seed in args.seeds
                ]
            result[f"{dataset}_{labels}"] = {
                "dataset": dataset, "labels": labels, "budget": budgets[dataset],
                "attacks": {name: summarise(per_seed) for name, per_seed in rows.items()},
                "leads": leads(rows),
            }
    if not args.skip_http:
        result["http_overhead"] = http_overhead(ensure_victim("digits", args.out), args.http_budget, args, args.out)
    result["benchmark_seconds"] = time.perf_counter() - started
    print(tables(result), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
