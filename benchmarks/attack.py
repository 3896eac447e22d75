"""Attack-efficiency benchmark: prints one JSON document of what it measured.

1. ``digits`` (victim from ``stealsim train --dataset digits``): Dual Student and
   the random-noise baseline at ``--digits-budget`` queries; fidelity, accuracy,
   queries to 90% / 95% fidelity, attack-loop queries/s.
2. ``mnist5k``: Dual Student, DFME and random noise at ``--mnist-budget``, soft
   and hard labels.
3. HTTP overhead: Dual Student on ``digits`` at ``--http-budget`` against a real
   ``stealsim serve`` and against the same checkpoint in process (same seed);
   the ratio of the attack loops' wall times.

Every figure comes from a run made here; budgets are flags so a quick run is
possible (``--quick``)::

    .venv/bin/python benchmarks/attack.py --threads 2 --out runs/bench
    .venv/bin/python benchmarks/attack.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attacker.evaluation import EvalConfig
from attacker.runner import RunSpec, run_attack
from experiments.service import ServiceProcess, create_key, new_admin_key

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
                        "--out", str(directory), "--quiet"], check=True)
    return directory


def attack(name: str, out: Path, budget: int, args: argparse.Namespace, **spec: Any) -> dict[str, Any]:
    settings = dict(spec.pop("settings", {}))
    if args.clone_arch:
        settings["student_architecture"] = args.clone_arch
    metrics = run_attack(RunSpec(
        attack=name, out=out, budget=budget, seed=args.seed, show_progress=False,
        eval_every=max(1, budget // args.evaluations), settings=settings,
        evaluation=EvalConfig(transfer_samples=args.transfer_samples, reference_epochs=args.reference_epochs),
        **spec,
    ))
    kept = {k: metrics.get(k) for k in KEPT}
    print(f"# {out.name}: " + json.dumps(kept), file=sys.stderr, flush=True)
    return kept


def fresh(path: Path) -> Path:
    if path.exists():
        import shutil

        shutil.rmtree(path)
    return path


def http_overhead(victim: Path, budget: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The same attack over HTTP and in process; the HTTP run's loop time over the local one's."""
    admin = new_admin_key()
    with ServiceProcess({"victim": victim}, admin_key=admin, log_path=root / "http-service.log") as service:
        extra = 360 + 2 * args.transfer_samples + 1000
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-budget", type=int, default=1_000_000)
    parser.add_argument("--mnist-budget", type=int, default=300_000)
    parser.add_argument("--http-budget", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the benchmark's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clone-arch", default=None, help="clone architecture (default: by input shape)")
    parser.add_argument("--evaluations", type=int, default=20, help="evaluations per run")
    parser.add_argument("--transfer-samples", type=int, default=500)
    parser.add_argument("--reference-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["digits", "mnist", "mnist-hard", "http"])
    parser.add_argument("--attacks", nargs="+", default=["dual-student", "dfme", "random"],
                        choices=["dual-student", "dfme", "random"], help="attacks to run (digits has no DFME)")
    parser.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.digits_budget, args.mnist_budget, args.http_budget = 20_000, 10_000, 10_000
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "budgets": {"digits": args.digits_budget, "mnist5k": args.mnist_budget, "http": args.http_budget},
    }
    if "digits" not in args.skip or "http" not in args.skip:
        digits = ensure_victim("digits", args.out)
    if "digits" not in args.skip:
        result["digits"] = {
            name: attack(name, fresh(args.out / f"digits-{name}"), args.digits_budget, args,
                         victim_checkpoint=digits)
            for name in ("dual-student", "random") if name in args.attacks
        }
    if "mnist" not in args.skip or "mnist-hard" not in args.skip:
        mnist = ensure_victim("mnist5k", args.out)
    for mode, hard in (("mnist", False), ("mnist-hard", True)):
        if mode in args.skip:
            continue
        label = "mnist5k_hard_label" if hard else "mnist5k_soft_label"
        result[label] = {
            name: attack(name, fresh(args.out / f"{mode}-{name}"), args.mnist_budget, args,
                         victim_checkpoint=mnist, settings={"hard_label": hard})
            for name in ("dual-student", "dfme", "random") if name in args.attacks
        }
    if "http" not in args.skip:
        result["http_overhead"] = http_overhead(digits, args.http_budget, args, args.out)
    result["benchmark_seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
