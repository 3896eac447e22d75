"""Calibrate the transfer sweep: the independent reference's PGD success against a victim, per epsilon.

``attacker.evaluation.default_epsilons`` is chosen with this script: the
reference model (the default clone architecture trained ``--reference-epochs``
on the training split, exactly as the evaluator trains it) should sit between
about 20 % and 80 % untargeted success, so that a clone's transfer rate can land
above or below it. Measured on the validation split, never on test::

    python -m stealsim train --dataset digits --out /tmp/ev/victim-digits --quiet
    python benchmarks/transfer_calibration.py --victim /tmp/ev/victim-digits \
        --epsilons 0.05,0.1,0.15,0.2,0.25,0.3

Prints one markdown row per epsilon (untargeted, targeted success of the
reference) and, last, a JSON line with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attacker.attacks import make_settings
from attacker.evaluation import EvalConfig, Evaluator
from attacker.runner import infer_eval_dataset
from attacker.students import build_student
from attacker.victims import BudgetedVictim, InProcessVictim
from stealsim.data import load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, required=True, help="checkpoint directory of the victim")
    parser.add_argument("--dataset", default=None, help="default: the built-in of the victim's input shape")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--epsilons", default="0.05,0.1,0.15,0.2,0.25,0.3")
    parser.add_argument("--transfer-samples", type=int, default=500)
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--reference-epochs", type=int, default=15)
    parser.add_argument("--attack", default="dual-student", help="whose default clone architecture the reference takes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    victim = InProcessVictim.from_checkpoint(args.victim)
    dataset = load_dataset(args.dataset or infer_eval_dataset(victim.info.input_shape))
    epsilons = tuple(float(text) for text in args.epsilons.split(","))
    config = EvalConfig(split=args.split, transfer_epsilons=epsilons, transfer_samples=args.transfer_samples,
                        pgd_steps=args.pgd_steps, reference_epochs=args.reference_epochs, seed=args.seed)
    student = make_settings(args.attack).student_settings()
    evaluator = Evaluator(dataset, BudgetedVictim(victim, None), config,
                          reference_factory=lambda: build_student(victim.info, student))
    rates = evaluator.reference_transfer_rates()
    print(f"# {dataset.name} {args.split}: victim accuracy {evaluator.victim_accuracy():.4f}, "
          f"{rates.samples} images attacked, reference {student.architecture or 'default'} "
          f"{args.reference_epochs} epochs")
    print("| eps | reference untargeted | reference targeted |")
    print("|---|---|---|")
    for eps, untargeted, targeted in zip(rates.epsilons, rates.untargeted, rates.targeted, strict=True):
        print(f"| {eps:g} | {untargeted:.3f} | {targeted:.3f} |")
    print(json.dumps({"dataset": dataset.name, "split": args.split, "samples": rates.samples,
                      "epsilons": rates.epsilons, "untargeted": rates.untargeted, "targeted": rates.targeted}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
