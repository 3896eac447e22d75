"""What the answers journal costs a run, and what a checkpoint after every request would cost instead.

Runs one attack against an in-process victim (the fastest victim there is, so the
journal's share is the largest it can be) with the journal off, written and flushed, and
written and ``fsync``'d before each request is counted (as a run does), interleaved,
``--rounds`` times each; then times one journal record and one checkpoint of the
attack's state (the alternative the journal replaces: a checkpoint per request).
Prints one JSON object::

    .venv/bin/python benchmarks/answers_journal.py --victim runs/victim-digits --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attacker.attacks import build_attack
from attacker.journal import AnswerJournal
from attacker.loop import LoopConfig
from attacker.rundir import RunDirectory
from attacker.victims import InProcessVictim
from stealsim.training import seed_everything


class _Silent(AnswerJournal):
    def append(self, start: int, images: torch.Tensor, answers: torch.Tensor) -> None:
        pass


class _Variant(RunDirectory):
    """A run directory whose journals write nothing (``none``), or flush without ``fsync`` (``flush``)."""

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__(path)
        self.mode = mode

    def journal(self, queries: str = "attack") -> AnswerJournal:
        if self.mode == "none":
            return _Silent(self.path / "unused.journal")
        name = "answers.journal" if queries == "attack" else "eval-answers.journal"
        return AnswerJournal(self.path / name, fsync=self.mode == "fsync")


MODES = ("none", "flush", "fsync")
"""No journal; written and flushed to the operating system (survives a killed process); and ``fsync``'d
(survives a crashed machine: what a run does)."""


def _rate(victim: InProcessVictim, attack_name: str, budget: int, mode: str, root: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=root))
    seed_everything(0)
    attack = build_attack(attack_name, victim.info, torch.device("cpu"), batch_size=256)
    run_dir = _Variant(out, mode)
    started = time.perf_counter()
    attack.run(victim, LoopConfig(budget=budget, eval_every=budget // 3, show_progress=False), run_dir)
    return budget / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, required=True, help="checkpoint directory (stealsim train)")
    parser.add_argument("--attack", default="dual-student")
    parser.add_argument("--budget", type=int, default=15_360)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs"), help="where the runs are written (the disk measured)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    victim = InProcessVictim.from_checkpoint(args.victim)
    args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="journal-bench-", dir=args.work))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES[round_ % 3:] + MODES[:round_ % 3]:  # each mode first in turn
            rates[mode].append(_rate(victim, args.attack, args.budget, mode, root))

    record_ms: dict[str, float] = {}
    for size in (8, 28):
        journal = AnswerJournal(root / f"records-{size}.journal")
        images, answers = torch.rand(256, 1, size, size), torch.softmax(torch.rand(256, 10), dim=1)
        started = time.perf_counter()
        for index in range(100):
            journal.append(index * 256, images, answers)
        record_ms[f"{size}x{size}"] = (time.perf_counter() - started) / 100 * 1e3
        journal.close()

    seed_everything(0)
    attack = build_attack(args.attack, victim.info, torch.device("cpu"), batch_size=256)
    attack.run(victim, LoopConfig(budget=args.budget, show_progress=False), RunDirectory(root))  # fills its memories
    state = {"attack": attack.state_dict(), "rng": torch.get_rng_state()}
    started = time.perf_counter()
    for _ in range(10):
        RunDirectory(root).save_checkpoint(state)
    checkpoint_ms = (time.perf_counter() - started) / 10 * 1e3
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({
        "attack": args.attack, "victim": str(args.victim), "budget": args.budget, "batch_size": 256,
        "queries_per_second": {name: [round(v) for v in values] for name, values in rates.items()},
        "median_ratio_to_none": {mode: round(median[mode] / median["none"], 3) for mode in MODES},
        "journal_record_ms_256_images": {k: round(v, 2) for k, v in record_ms.items()},
        "checkpoint_ms": round(checkpoint_ms, 1),
        "checkpoint_bytes": (root / "checkpoint.pt").stat().st_size,
        "request_ms_at_median_rate": round(256 / median["fsync"] * 1e3, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
