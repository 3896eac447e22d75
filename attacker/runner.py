"""One attack run end to end: victim, evaluator, the attack loop, and the run directory.

This is what ``stealsim attack`` and ``benchmarks/attack.py`` call::

    metrics = run_attack(RunSpec(attack="dual-student", out=Path("runs/ds"), budget=100_000,
                                 url="http://127.0.0.1:8000", api_key=KEY, model="victim"))

The victim is the HTTP service (``url``) or, for tests and the HTTP-overhead
baseline, a checkpoint loaded in this process (``victim_checkpoint``).

Evaluation queries (see :mod:`attacker.evaluation`) are counted apart from the
attack budget. Over HTTP they are charged to ``eval_api_key`` when given, else
to the attack's own key, whose budget must then cover both (the run logs the
evaluation cost at its start and reports it in ``eval_queries``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attacker.attacks import attack_class, build_attack, make_settings
from attacker.client import HttpVictim
from attacker.evaluation import EvalConfig, Evaluator
from attacker.loop import LoopConfig
from attacker.report import queries_to_reach, write_run_report
from attacker.rundir import Ledger, RunDirectory
from attacker.students import build_student
from attacker.victims import BudgetedVictim, InProcessVictim, OutputKind, Victim
from stealsim.errors import AttackError
from stealsim.training import seed_everything

__all__ = ["RunSpec", "infer_eval_dataset", "run_attack"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs. Secrets (API keys) are never written to the run directory."""

    attack: str
    out: Path
    budget: int
    url: str | None = None
    api_key: str | None = None
    model: str = "victim"
    victim_checkpoint: Path | None = None
    victim_output: OutputKind = "probabilities"
    eval_dataset: str | None = None
    eval_api_key: str | None = None
    eval_every: int = 0
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    show_progress: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    evaluation: EvalConfig = field(default_factory=EvalConfig)


def infer_eval_dataset(input_shape: tuple[int, int, int]) -> str:
    """The built-in dataset whose images have the victim's shape."""
    if input_shape == (1, 8, 8):
        return "digits"
    if input_shape == (1, 28, 28):
        return "mnist5k"
    raise AttackError(
        f"no built-in test set has images of shape {input_shape}; pass --eval-dataset (and --data-dir)"
    )


def _open_victims(spec: RunSpec) -> tuple[Victim, Victim, bool]:
    """``(attack victim, evaluation victim, evaluation charged to the attack key?)``."""
    if spec.url is not None:
        if spec.victim_checkpoint is not None:
            raise AttackError("give either --url (HTTP victim) or --victim-checkpoint, not both")
        if not spec.api_key:
            raise AttackError("--url needs --api-key")
        victim = HttpVictim(spec.url, spec.api_key, spec.model)
        if spec.eval_api_key and spec.eval_api_key != spec.api_key:
            return victim, HttpVictim(spec.url, spec.eval_api_key, spec.model), False
        return victim, victim, True
    if spec.victim_checkpoint is None:
        raise AttackError("give --url URL (and --api-key) or --victim-checkpoint DIR")
    local = InProcessVictim.from_checkpoint(spec.victim_checkpoint, spec.victim_output)
    return local, local, False


def _server_used(victim: Victim) -> int | None:
    if isinstance(victim, HttpVictim):
        return int(victim.usage()["used"])
    return None


def _reconcile(victim: Victim, ledger: Ledger, resume: bool) -> None:
    """Align the local count with ``GET /v1/usage`` (HTTP only).

    A run killed between the server charging a request and the ledger recording
    it has spent queries it never saw; on resume they are added to the count
    (``lost_queries``), so the budget is never exceeded.
    """
    used = _server_used(victim)
    if used is None:
        return
    if not resume or ledger.server_used_at_start is None:
        ledger.server_used_at_start = used
        return
    expected = (
        ledger.server_used_at_start
        + ledger.attack_queries
        + (ledger.eval_queries if ledger.eval_on_attack_key else 0)
    )
    if used > expected:
        missing = used - expected
        logger.warning("the server counts %d queries this run did not record; charging them", missing)
        ledger.attack_queries += missing
        ledger.lost_queries += missing
    elif used < expected:
        logger.warning("the server counts %d fewer queries than this run (refunds?)", expected - used)


def _stored_config(spec: RunSpec, victim: Victim, eval_dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "attack": spec.attack,
        "budget": spec.budget,
        "victim": (spec.url and f"{spec.url} model {spec.model}") or str(spec.victim_checkpoint),
        "victim_kind": "http" if spec.url else "in-process",
        "victim_info": asdict(victim.info),
        "eval_dataset": eval_dataset,
        "eval_every": spec.eval_every,
        "separate_evaluation_key": bool(spec.eval_api_key),
        "seed": spec.seed,
        "device": spec.device,
        "settings": settings,
        "evaluation": asdict(spec.evaluation),
    }


def run_attack(spec: RunSpec) -> dict[str, Any]:
    """Run (or resume) one attack; write the run directory; return the final metrics."""
    from stealsim.data import load_dataset
    from stealsim.training import resolve_device

    attack_class(spec.attack)  # fail on a bad name before any side effect
    run_dir = RunDirectory(spec.out)
    run_dir.prepare(spec.resume)
    started = time.perf_counter()
    settings_overrides = dict(spec.settings)
    if spec.resume:
        stored = run_dir.read_json("config.json")
        if stored.get("attack") != spec.attack:
            raise AttackError(f"{spec.out} holds a {stored.get('attack')} run, not {spec.attack}")
        settings_overrides = dict(stored.get("settings", {}))
        spec = RunSpec(**{**spec.__dict__, "budget": int(stored["budget"]), "seed": int(stored["seed"]),
                          "eval_every": int(stored.get("eval_every", 0))})
    victim, eval_victim, eval_on_attack_key = _open_victims(spec)
    try:
        eval_name = spec.eval_dataset or infer_eval_dataset(victim.info.input_shape)
        dataset = load_dataset(eval_name)
        device = resolve_device(spec.device)
        settings = make_settings(spec.attack, **settings_overrides)
        settings_dict = {k: v for k, v in asdict(settings).items()}
        if not spec.resume:
            run_dir.write_json("config.json", _stored_config(spec, victim, eval_name, settings_dict))
        ledger = run_dir.read_ledger() if spec.resume else Ledger(eval_on_attack_key=eval_on_attack_key)
        ledger.eval_on_attack_key = eval_on_attack_key
        _reconcile(victim, ledger, spec.resume)
        run_dir.write_ledger(ledger)

        def eval_charged(used: int) -> None:
            ledger.eval_queries = used
            run_dir.write_ledger(ledger)

        metered_eval = BudgetedVictim(eval_victim, None, used=ledger.eval_queries, on_charge=eval_charged)
        evaluator = Evaluator(
            dataset,
            metered_eval,
            spec.evaluation,
            reference_factory=lambda: build_student(victim.info, settings.student_settings()),
            cache_dir=spec.out,
            device=device,
        )
        transfer = min(spec.evaluation.transfer_samples, len(dataset.y_test))
        logger.info(
            "evaluation costs %d queries for the test set (once) + %d per transfer evaluation "
            "+ %d once for the reference model, charged to %s",
            len(dataset.y_test), transfer, transfer,
            "the attack key" if eval_on_attack_key else ("the evaluation key" if spec.url else "nobody (in-process)"),
        )
        # Seed before the clones and generators are built, so that a run's result does
        # not depend on what ran earlier in this process.
        seed_everything(spec.seed)
        attack = build_attack(spec.attack, victim.info, device, **settings_dict)
        outcome = attack.run(
            victim,
            LoopConfig(budget=spec.budget, eval_every=spec.eval_every, seed=spec.seed,
                       show_progress=spec.show_progress),
            run_dir,
            evaluator,
            resume=spec.resume,
            ledger=ledger,
        )
        metrics = dict(outcome.metrics)
        previous = run_dir.read_json("metrics.json").get("wall_seconds", 0.0) if (
            spec.resume and (spec.out / "metrics.json").is_file()) else 0.0
        metrics.update(
            eval_queries=ledger.eval_queries,
            lost_queries=ledger.lost_queries,
            queries_to_90_fidelity=queries_to_reach(outcome.history, 0.90),
            queries_to_95_fidelity=queries_to_reach(outcome.history, 0.95),
            wall_seconds=float(previous) + time.perf_counter() - started,
            victim_kind="http" if spec.url else "in-process",
        )
        if isinstance(victim, HttpVictim):
            used = _server_used(victim)
            assert used is not None and ledger.server_used_at_start is not None
            counted = ledger.attack_queries + (ledger.eval_queries if eval_on_attack_key else 0)
            metrics.update(
                server_queries=used - ledger.server_used_at_start,
                server_count_matches=used - ledger.server_used_at_start == counted,
                http_retries=victim.retries,
            )
        run_dir.write_json("metrics.json", metrics)
        write_run_report(spec.out, run_dir.read_json("config.json"), metrics, outcome.history)
        return metrics
    finally:
        for one in {id(victim): victim, id(eval_victim): eval_victim}.values():
            if isinstance(one, HttpVictim):
                one.close()
