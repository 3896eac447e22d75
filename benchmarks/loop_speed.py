"""Queries per second per core of the attack loop: the loop before and after its speed-ups, side by side.

Builds each attack once per variant against the same in-process victim (one torch
thread): ``before``, the loop without its speed-ups (``memory_format=contiguous``
clones, generator and victim: the explicit slow path, float32), ``channels_last``
(the layout alone, float32: the default), ``bfloat16`` (``channels_last`` with
``precision=bfloat16``: the attacker's forwards under autocast) and, with
``--variants``, ``pool_first`` (``channels_last`` with ``student_pool_first``). The
variants run in interleaved rounds in one process, so that they share the
machine's load; each round times ``--steps`` attack steps (``Attack.take_step``,
as the loop calls it). Prints one JSON document: per attack the median queries/s
over rounds of each, and the median per-round ratio of each to ``before``::

    .venv/bin/python benchmarks/loop_speed.py --victim runs/victim-mnist5k --rounds 5 --steps 4

The fidelity of the faster loop is checked separately (``benchmarks/attack.py``
runs, same seeds, both layouts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from attacker.attacks import build_attack
from attacker.victims import BudgetedVictim, InProcessVictim

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "before": ("contiguous", {}),
    "channels_last": ("channels_last", {}),
    "bfloat16": ("channels_last", {"precision": "bfloat16"}),
    "pool_first": ("channels_last", {"student_pool_first": True}),
}
"""The memory layout of clones, generator and victim, and the clones' settings, per variant.
(Flushing denormal floats to zero was tried too: 0.99x, no gain, dropped; so were
``torch.compile`` of a student update, 0.75x, and Adam's fused kernel, 160 vs 170 ms per update
in one measurement, not adopted.)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victim", type=Path, required=True, help="checkpoint directory (stealsim train)")
    parser.add_argument("--attacks", nargs="+", default=["dual-student", "dfme", "random"])
    parser.add_argument("--hard-label", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="attack steps per round and variant")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "before"],
                        default=["channels_last", "bfloat16"], help="measured beside `before`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an attack setting for every variant (repeatable), e.g. updates_per_batch=2")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in ("before", *args.variants)}
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.overrides)}
    torch.set_num_threads(1)
    result: dict[str, Any] = {"victim": str(args.victim), "hard_label": args.hard_label, "rounds": args.rounds,
                              "steps_per_round": args.steps, "settings": overrides, "torch": torch.__version__}
    for name in args.attacks:
        runs = {}
        for variant, (layout, settings) in variants.items():
            victim = InProcessVictim.from_checkpoint(args.victim, memory_format=layout)
            torch.manual_seed(0)
            attack = build_attack(name, victim.info, torch.device("cpu"), memory_format=layout,
                                  hard_label=args.hard_label, **{**overrides, **settings})
            runs[variant] = (attack, BudgetedVictim(victim, None))
        rates: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for variant, (attack, metered) in runs.items():
                before, started = metered.used, time.perf_counter()
                for _ in range(args.steps):
                    attack.take_step(metered)
                if round_index > 0:
                    rates[variant].append((metered.used - before) / (time.perf_counter() - started))
        result[name] = {
            **{variant: {"queries_per_second_median": statistics.median(values)} for variant, values in rates.items()},
            **{f"{variant}_over_before": statistics.median(a / b for a, b in zip(values, rates["before"], strict=True))
               for variant, values in rates.items() if variant != "before"},
        }
        print(f"# {name}: " + json.dumps(result[name]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
