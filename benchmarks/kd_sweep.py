"""KD settings of the Nasty Teacher study, chosen on the validation split.

A Nasty Teacher's harm is only meaningful on a distillation that works: the
student distilled from the *normal* teacher must beat the same student trained
on labels alone. For every seed this trains the normal teacher and the
labels-only student once, then one KD student (Hinton et al. 2015, eq. 2 with
the T^2 scaling) per ``(alpha, T, epochs)`` setting, and prints each setting's
validation accuracy (mean ± std over the seeds) and its gain over the
labels-only student. Test accuracy is not computed: settings are chosen here,
numbers are reported by ``stealsim nasty-study``::

    .venv/bin/python benchmarks/kd_sweep.py --dataset digits --alphas 0.5,0.9 --temperatures 2,4,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

from stealsim.architectures import default_architecture, default_student_architecture
from stealsim.data import load_dataset
from stealsim.distill import DistillConfig, distill_student
from stealsim.training import TrainConfig, accuracy, augmentation_shift, train_classifier


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alphas", default="0.5,0.9")
    parser.add_argument("--temperatures", default="2,4,8")
    parser.add_argument("--epochs", default="30", help="student epochs (comma-separated: swept)")
    parser.add_argument("--student", default=None, help="student architecture (default: the study's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    channels, size, _ = data.input_shape
    teacher_arch = default_architecture(channels, size)
    student_arch = args.student or default_student_architecture(channels, size)
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs_grid = [int(e) for e in args.epochs.split(",")]
    settings = list(itertools.product(floats(args.alphas), floats(args.temperatures), epochs_grid))
    validation = (data.x_val, data.y_val)
    scores: dict[str, list[float]] = {"teacher": [], **{f"labels-only e{e}": [] for e in epochs_grid}}
    scores |= {f"kd alpha={a} T={t} e{e}": [] for a, t, e in settings}
    started = time.perf_counter()
    for seed in seeds:
        shift = augmentation_shift(size)
        teacher, _ = train_classifier(data, teacher_arch, TrainConfig(epochs=30, max_shift=shift, seed=seed),
                                      show_progress=False)
        scores["teacher"].append(accuracy(teacher, *validation))
        for epochs in epochs_grid:
            train = TrainConfig(epochs=epochs, max_shift=shift, seed=seed)
            baseline, _ = train_classifier(data, student_arch, train, show_progress=False)
            scores[f"labels-only e{epochs}"].append(accuracy(baseline, *validation))
        for alpha, temperature, epochs in settings:
            train = TrainConfig(epochs=epochs, max_shift=shift, seed=seed)
            student = distill_student(teacher, data, student_arch, DistillConfig(alpha, temperature, train),
                                      show_progress=False)
            scores[f"kd alpha={alpha} T={temperature} e{epochs}"].append(accuracy(student, *validation))
        print(f"# seed {seed} done after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for name, values in scores.items():
        epochs = name.rsplit(" e", 1)[-1] if name != "teacher" else None
        baseline = scores.get(f"labels-only e{epochs}") if epochs else None
        gains = [v - b for v, b in zip(values, baseline, strict=True)] if baseline and name.startswith("kd") else None
        rows.append({
            "setting": name, "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "per_seed": values,
            "gain_over_labels_only": statistics.fmean(gains) if gains else None,
        })
    print(f"| {args.dataset} ({student_arch} student, validation, {len(seeds)} seeds) | accuracy % | gain over labels-only |")
    print("| --- | ---: | ---: |")
    for row in rows:
        gain = "" if row["gain_over_labels_only"] is None else f"{100 * row['gain_over_labels_only']:+.2f}"
        print(f"| {row['setting']} | {100 * row['mean']:.2f} ± {100 * row['std']:.2f} | {gain} |")
    print(json.dumps({"dataset": args.dataset, "student": student_arch, "seeds": seeds, "rows": rows,
                      "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
