"""The defender's table: what each API defense costs honest users against what it leaves thieves.

Run (digits; about 30 minutes on 2 cores with two grid workers)::

    python benchmarks/defenses.py --out runs/bench-defenses                 # in this process
    python benchmarks/defenses.py --out runs/bench-defenses --redis-url redis://127.0.0.1:6379/0
                                                                             # on `stealsim grid-worker`s

Steps, all printed:

1. Train (or reuse) the victim and the defender's models (misinformation model, MAD proxy).
2. Choose the defenses' thresholds on the validation split (never the test split):
   adaptive misinformation's ``tau`` = the ``--honest-share`` quantile of the victim's
   maximum softmax probability on validation images (so about that share of honest
   answers turn to misinformation); SEAT's ``threshold`` = the smallest RMS pixel
   distance between two validation images (honest traffic like it makes no similar pair);
   the Mahalanobis OOD statistics (``stealsim ood-fit``'s fit: the victim's penultimate
   features on the training split, ``tau`` at the ``1 - --honest-share`` quantile of the
   validation split's distances).
3. Run the grid (attacks x defenses x seeds at one budget, over HTTP against a real
   ``stealsim serve``): fidelity, transfer, detector flags and the queries they needed,
   the watermark test of every clone; the honest user's accuracy, ECE, flags and latency.
4. Train ``--independent`` models on the victim's training data without any answer of the
   API (different seeds and widths) and test each against every watermark record: the
   false-accusation check.
5. A longer honest stream through each detector (SEAT on pixels and on features, the OOD
   rate by MSP and by Mahalanobis distance): ``--honest-passes`` shuffled passes over the test split; are honest users flagged?
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.grid import GridSpec, load_spec, run_grid
from experiments.store import read_csv
from experiments.victims import VictimSettings, prepare_defender_models, prepare_victims


def fit_mahalanobis(victim_dir: Path, dataset: str, honest_share: float, out: Path) -> float:
    """Write the victim's Mahalanobis OOD statistics to ``out`` (as ``stealsim ood-fit``); their tau."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "stealsim", "ood-fit", "--checkpoint", str(victim_dir),
                           "--dataset", dataset, "--honest-rate", str(honest_share), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)["tau"])


def calibrate(victim_dir: Path, dataset: str, honest_share: float) -> dict[str, float]:
    from stealsim.checkpoint import load_checkpoint
    from stealsim.data import load_dataset

    data = load_dataset(dataset)
    model, _ = load_checkpoint(victim_dir, "cpu")
    with torch.no_grad():
        msp = torch.softmax(model(data.x_val), dim=1).max(dim=1).values.numpy()
    flat = data.x_val.reshape(len(data.x_val), -1).double()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    distances.fill_diagonal_(float("inf"))
    from victim_server.defender_models import DefenderModels

    features = torch.from_numpy(DefenderModels().features(victim_dir, data.x_val.numpy())).double()
    feature_distances = torch.cdist(features, features)
    feature_distances.fill_diagonal_(float("inf"))
    return {"tau": float(np.quantile(msp, honest_share)), "seat_threshold": float(distances.min()),
            "seat_feature_threshold": float(feature_distances.min()), "validation_images": len(data.x_val)}


def spec_for(args: argparse.Namespace, tau: float, seat_threshold: float, feature_threshold: float,
             statistics: Path) -> dict[str, object]:
    spec = _all_defenses(args, tau, seat_threshold, feature_threshold, statistics)
    defenses = spec["defenses"]
    assert isinstance(defenses, dict)
    unknown = set(args.defenses or ()) - set(defenses)
    if unknown:
        raise SystemExit(f"--defenses: unknown {sorted(unknown)}; choose from {sorted(defenses)}")
    if args.defenses:
        spec["defenses"] = {name: steps for name, steps in defenses.items() if name in args.defenses or name == "none"}
    return spec


def _all_defenses(args: argparse.Namespace, tau: float, seat_threshold: float,
                  feature_threshold: float, statistics: Path) -> dict[str, object]:
    return {
        "dataset": args.dataset, "victim_epochs": args.epochs, "victims": ["normal"],
        "attacks": args.attacks, "budgets": [args.budget], "seeds": list(range(args.seeds)),
        "defenses": {
            "none": [],
            "mad": [{"name": "prediction_poisoning", "epsilon": args.mad_epsilon, "objective": "angular",
                     "oracle": "argmax", "proxy": "@proxy"}],
            "adaptive-misinfo": [{"name": "adaptive_misinformation", "model": "@misinformation",
                                  "tau": round(tau, 6), "nu": 10000.0}],
            "watermark": [{"name": "watermark", "fraction": args.watermark_fraction, "mode": args.watermark_mode}],
            "seat": [{"name": "seat", "threshold": round(seat_threshold, 6), "max_pairs": args.seat_pairs}],
            "seat-features": [{"name": "seat", "threshold": round(feature_threshold, 6),
                               "max_pairs": args.seat_pairs, "encoder": "@victim"}],
            # tau at the honest share's quantile; the test allows honest users twice that share (slack
            # for a test split whose hard images are a little more common than validation's).
            "ood-rate": [{"name": "ood_rate", "tau": round(tau, 6), "honest_rate": 2 * args.honest_share,
                          "alpha": args.ood_alpha, "min_queries": 64}],
            "ood-mahalanobis": [{"name": "ood_rate", "score": "mahalanobis", "encoder": "@victim",
                                 "statistics": str(statistics.resolve()), "honest_rate": 2 * args.honest_share,
                                 "alpha": args.ood_alpha, "min_queries": 64}],
        },
        "attack_settings": {"batch_size": 128},
        "transfer_samples": 100, "reference_epochs": 3, "threads": 1,
    }


def independent_models(dataset: str, count: int, epochs: int, cache: Path) -> list[Path]:
    """Models trained on the victim's training data (not on any answer): innocent suspects."""
    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import TrainConfig, augmentation_shift, train_classifier

    data = load_dataset(dataset)
    paths = []
    for index in range(count):
        path = cache / f"independent-{dataset}-{epochs}-{index}"
        if not (path / "model.json").is_file():
            size = data.input_shape[1]
            model, meta = train_classifier(
                data, "small-cnn", TrainConfig(epochs=epochs, seed=100 + index, max_shift=augmentation_shift(size)),
                "cpu", architecture_kwargs={"width": (16, 32, 48)[index % 3]}, show_progress=False)
            save_checkpoint(path, model, meta)
        paths.append(path)
    return paths


DETECTORS = ("seat", "seat-features", "ood-rate", "ood-mahalanobis")


def long_honest_stream(spec: GridSpec, args: argparse.Namespace) -> None:
    """Each detector's false positives on a longer honest stream: ``--honest-passes`` shuffled passes
    over the test split, in requests of 32, through a key of its own."""
    from experiments.grid import GridRunner, key_flags
    from experiments.honest import HonestSettings, honest_traffic
    from experiments.service import create_key
    from stealsim.data import load_dataset

    data = load_dataset(args.dataset)
    settings = HonestSettings(batch=32, passes=args.honest_passes, shuffle=True)
    print(f"\nLong honest stream: {args.honest_passes} shuffled passes over the {len(data.y_test)} test images "
          "(repeats included: a user re-sending an image is honest too):")
    runner = GridRunner.for_spec(spec, args.out / "honest-stream", args.cache).start()
    try:
        for detector in (d for d in DETECTORS if d in spec.defenses):
            url = runner.url
            key = create_key(url, runner.admin_key, args.honest_passes * len(data.y_test),
                             name=f"honest-stream/{detector}", models=["normal"], policy=runner.policy(spec, detector))
            result = honest_traffic(url, key, "normal", data, settings)
            flagged = key_flags(url, runner.admin_key, key)
            print(f"  {detector}: {result.images} images, flags: {flagged['flags'] or 'none'}"
                  + (f" at {flagged['flagged_at']} images" if flagged["flagged_at"] else ""), flush=True)
    finally:
        runner.stop()


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-defenses"))
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--attacks", nargs="+", default=["knockoff", "dual-student", "dfme", "random"])
    parser.add_argument("--honest-share", type=float, default=0.01)
    parser.add_argument("--mad-epsilon", type=float, default=1.0)
    parser.add_argument("--watermark-fraction", type=float, default=0.02)
    parser.add_argument("--watermark-mode", choices=["swap", "one_hot"], default="one_hot")
    parser.add_argument("--seat-pairs", type=int, default=50)
    parser.add_argument("--ood-alpha", type=float, default=1e-6, help="ood_rate's binomial level per look")
    parser.add_argument("--honest-passes", type=int, default=20,
                        help="passes over the test split of the long honest stream through each detector")
    parser.add_argument("--independent", type=int, default=5)
    parser.add_argument("--defenses", nargs="+", default=None,
                        help="run only these defenses (and none); default: all")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    settings = VictimSettings(dataset=args.dataset, epochs=args.epochs)
    victims = prepare_victims(settings, args.cache)
    prepare_defender_models(settings, args.cache)
    chosen = calibrate(victims.normal, args.dataset, args.honest_share)
    args.out.mkdir(parents=True, exist_ok=True)
    statistics_path = args.out / "ood-mahalanobis.safetensors"
    chosen["mahalanobis_tau"] = fit_mahalanobis(victims.normal, args.dataset, args.honest_share, statistics_path)
    print(f"validation choices: {json.dumps(chosen)}", flush=True)
    spec_path = args.out / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(args, chosen["tau"], chosen["seat_threshold"],
                                                 chosen["seat_feature_threshold"], statistics_path), sort_keys=False))
    run_grid(load_spec(spec_path), args.out, cache_dir=args.cache, redis_url=args.redis_url)

    rows = [row for row in read_csv(args.out / "results.csv") if row["status"] == "done"]
    costs = {row["defense"]: row for row in read_csv(args.out / "defenses.csv")}
    attacks = args.attacks
    print("\n| defense | honest accuracy | honest ECE | honest flagged | latency ms/request | "
          + " | ".join(f"{a} fidelity" for a in attacks) + " |")
    print("|---|---:|---:|---|---:|" + "---:|" * len(attacks))
    for defense in (d for d in ("none", "mad", "adaptive-misinfo", "watermark", *DETECTORS) if d in costs):
        cost = costs.get(defense, {})
        cells = [mean_std([number(r["fidelity"]) for r in rows if r["defense"] == defense and r["attack"] == a])
                 for a in attacks]
        print(f"| {defense} | {number(cost.get('accuracy')):.3f} | {number(cost.get('ece')):.3f} | "
              f"{cost.get('flags') or 'no'} | {number(cost.get('latency_ms')):.1f} | " + " | ".join(cells) + " |")

    ran = set(load_spec(spec_path).defenses)
    for detector in (d for d in DETECTORS if d in ran):
        print(f"\n{detector} flags (queries sent when flagged):")
        for attack in attacks:
            seat = [r for r in rows if r["defense"] == detector and r["attack"] == attack]
            print(f"  {attack}: {sum(bool(r['flags']) for r in seat)}/{len(seat)} keys flagged, at "
                  f"{[int(number(r['flagged_at'])) if r['flagged_at'] else None for r in seat]}")
    long_honest_stream(load_spec(spec_path), args)

    print(f"\nWatermark (fraction {args.watermark_fraction:.3f}) of each clone, p-value of Binomial(n, 1/(K-1)):")
    from defense.watermark import WatermarkRecord, load_suspect, verify

    innocents = independent_models(args.dataset, args.independent, args.epochs, args.cache)
    innocent_p: list[float] = []
    for row in sorted((r for r in rows if r["defense"] == "watermark"), key=lambda r: r["cell"]):
        record_path = args.out / "runs" / row["cell"] / "watermark.npz"
        print(f"  {row['attack']} seed {row['seed']}: {row['watermark_matches']}/{row['watermark_marked']} "
              f"matches, p = {number(row['watermark_p_value']):.2e}")
        if record_path.is_file():
            record = WatermarkRecord.from_bytes(record_path.read_bytes()).distinct()
            for path in innocents:
                innocent_p.append(verify(record, load_suspect(path)(record.images)).p_value)
    if innocent_p:
        print(f"  independent models x records: {len(innocent_p)} tests, "
              f"{sum(p < 1e-3 for p in innocent_p)} accused at p < 1e-3, smallest p = {min(innocent_p):.2e}")


if __name__ == "__main__":
    main()
