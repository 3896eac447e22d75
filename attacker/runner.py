"""One attack run end to end: victim, evaluator, the attack loop, and the run directory.

This is what ``stealsim attack`` and ``benchmarks/attack.py`` call::

    metrics = run_attack(RunSpec(attack="dual-student", out=Path("runs/ds"), budget=100_000,
                                 url="http://127.0.0.1:8000", api_key=KEY, model="victim"))

The victim is the HTTP service (``url``) or, for tests and the HTTP-overhead
baseline, a checkpoint loaded in this process (``victim_checkpoint``).

Evaluation queries (see :mod:`attacker.evaluation`) are counted apart from the
attack budget. Over HTTP they are charged to ``eval_api_key`` when given, else
to the attack's own key, whose budget must then cover both.

Before the first query and before anything is written (the run directory is
not even created), the run is planned: the attack budget left and the
evaluation queries it will spend (:meth:`~attacker.evaluation.Evaluator.plan`,
an upper bound). Against a stealsim server the keys' remaining budgets
(``GET /v1/usage``, free) must cover the plan, or the run is refused with an
:class:`AttackError` naming the numbers and the ways out; against a server that
does not meter keys (no ``stealsim_metering`` extension) the budget is counted
on the client alone, and ``config.json`` and the report say ``client-only``.
The last check queries the evaluation split (which the plan holds anyway), its
first images as a probe (:mod:`attacker.probe`): the answers must pass the
endpoint's checks (:func:`~attacker.endpoint.decode_answer`) and the victim must
be better than chance on them, or the run stops after the probe's images.
Only then is anything written. ``metrics.json`` records ``planned_eval_queries``
next to the actual ``eval_queries``; if the final evaluation still fails (a key
drained by someone else mid-run), the run writes what it has with
``evaluation_error``, and ``stealsim attack`` exits 1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from attacker.accounts import AccountPool, AccountsSpec
from attacker.attacks import attack_class, build_attack, flat_settings, make_settings
from attacker.client import HttpVictim
from attacker.endpoint import EndpointOptions
from attacker.evaluation import EvalConfig, EvalPlan, Evaluator
from attacker.loop import LoopConfig
from attacker.opening import local_pool, open_http_pool
from attacker.probe import checked_victim_labels
from attacker.report import queries_to_reach, write_run_report
from attacker.rundir import Ledger, RunDirectory
from attacker.students import build_student
from attacker.victims import BudgetedVictim, InProcessVictim, Metering, OutputKind, Victim
from stealsim.errors import AttackError, StealsimError
from stealsim.service_client import IssuedKey, ServiceClient
from stealsim.training import seed_everything

__all__ = ["RunSpec", "RunStoppedError", "infer_eval_dataset", "run_attack", "transfer_evaluations"]

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
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    """What the endpoint's metadata does not say (HTTP only; see :mod:`attacker.endpoint`)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers (a gateway's auth); only their names are written."""
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
    accounts: AccountsSpec = field(default_factory=AccountsSpec)
    """The accounts the budget is spread over, their prices and the clock (:mod:`attacker.accounts`)."""


def infer_eval_dataset(input_shape: tuple[int, int, int]) -> str:
    """The built-in dataset whose images have the victim's shape."""
    if input_shape == (1, 8, 8):
        return "digits"
    if input_shape == (1, 28, 28):
        return "mnist5k"
    raise AttackError(
        f"no built-in test set has images of shape {input_shape}: --eval-dataset takes the built-ins digits "
        "(1, 8, 8) and mnist5k (1, 28, 28), and attack reads no dataset from disk"
    )


EVALUATION_KEY_BUDGET = 10**9
"""Images of the evaluation key a run that opens its accounts opens beside them (never all spent)."""


def _evaluation_key(spec: RunSpec) -> IssuedKey:
    """Open the evaluation key of a run that opens its accounts: no output policy, no price, no limits to speak of."""
    with ServiceClient(str(spec.url), spec.accounts.admin_key, headers=spec.headers) as admin:
        return admin.create_key(EVALUATION_KEY_BUDGET, name=f"{spec.out.name} evaluation", policy=[],
                                rate="100000/second", image_rate="1000000000/minute")


def _revoke_evaluation_key(spec: RunSpec, key_id: str) -> None:
    """Revoke the evaluation key the run opened (after the run, or when it fails)."""
    try:
        with ServiceClient(str(spec.url), spec.accounts.admin_key, headers=spec.headers) as admin:
            admin.revoke(key_id)
    except StealsimError as exc:
        logger.error("could not revoke the run's evaluation key %s: %s", key_id, exc)


def _open_victims(spec: RunSpec) -> tuple[AccountPool, Victim, bool, str | None]:
    """``(attack victim, evaluation victim, evaluation charged to the attack key?, evaluation key the run
    opened)``; the run revokes that key, and the pool the accounts it opened, when it ends."""
    if spec.url is not None:
        if spec.victim_checkpoint is not None:
            raise AttackError("give either --url (HTTP victim) or --victim-checkpoint, not both")
        pool = open_http_pool(spec.url, spec.api_key, spec.model, spec.accounts, spec.budget, spec.out.name,
                              spec.endpoint, spec.headers)
        opened: IssuedKey | None = None
        try:
            eval_key = spec.eval_api_key
            if not eval_key and spec.accounts.opens_accounts:
                opened = _evaluation_key(spec)
                eval_key = opened.api_key
            if eval_key and eval_key != spec.api_key and eval_key not in spec.accounts.keys:
                evaluation = HttpVictim(spec.url, eval_key, spec.model, options=spec.endpoint, headers=spec.headers)
                return pool, evaluation, False, None if opened is None else opened.key_id
        except BaseException:
            pool.close()
            if opened is not None:
                _revoke_evaluation_key(spec, opened.key_id)
            raise
        return pool, pool.accounts[0].victim, True, None
    if spec.victim_checkpoint is None:
        raise AttackError("give --url URL (and --api-key) or --victim-checkpoint DIR")
    local = InProcessVictim.from_checkpoint(spec.victim_checkpoint, spec.victim_output)
    return local_pool(local, spec.accounts), local, False, None


_METERING_RECORDS: dict[Metering, str] = {"server": "server-reconciled", "client": "client-only", "none": "in-process"}


def metering_of(victim: Victim) -> str:
    """``server-reconciled`` (a stealsim server counts the key), ``client-only`` or ``in-process``."""
    return _METERING_RECORDS[victim.metering]


def _server_used(victim: Victim) -> int | None:
    usage = victim.key_usage()
    return None if usage is None else usage.used


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


def transfer_evaluations(config: LoopConfig, spent: int, every_eval: bool) -> int:
    """Evaluations with transfer still ahead of a run that has spent ``spent`` attack queries.

    The final one; with ``transfer_every_eval`` also every intermediate one: the
    loop evaluates when a step reaches a multiple of the interval while budget
    remains, so at most one per multiple in ``(spent, budget)`` (fewer when a step
    spans several multiples).
    """
    if not every_eval:
        return 1
    interval = config.evaluation_interval
    return 1 + max(0, (config.budget - 1) // interval - spent // interval)


def _largest_fitting_budget(available: int, spent: int, cost: Callable[[int], int]) -> int:
    """A budget ``b > spent`` as large as possible with ``(b - spent) + cost(b) <= available``; 0 if none.

    ``cost`` (the evaluation plan) is constant in ``b`` unless transfer runs at every
    evaluation, when it grows by steps; each try lowers ``b`` by what it overshot.
    """
    budget = spent + available
    while budget > spent:
        excess = (budget - spent) + cost(budget) - available
        if excess <= 0:
            return budget
        budget -= excess
    return 0


def _remaining(victim: Victim) -> int | None:
    """The key's remaining images (``None``: unlimited, or no server counts them)."""
    usage = victim.key_usage()
    return None if usage is None else usage.remaining


def _check_keys(
    spec: RunSpec,
    victim: Victim,
    eval_victim: Victim,
    eval_on_attack_key: bool,
    spent: int,
    plan_for: Callable[[int], EvalPlan],
) -> None:
    """Refuse a run its keys cannot pay for: before any query, nothing charged, nothing written."""
    if victim.metering != "server":
        return  # client-only metering or in process: the run's own count is the budget (nothing to ask)
    plan = plan_for(spec.budget)
    attack_left = spec.budget - spent
    # Flags are written as they are typed (no thousands separators), so they can be pasted.
    what = f"--budget {spec.budget}" if not spec.resume else f"the {attack_left:,} attack queries this run has left"
    remaining = _remaining(victim)
    if eval_on_attack_key:
        needed = attack_left + plan.total
        if remaining is not None and remaining < needed:
            fit = _largest_fitting_budget(remaining, spent, lambda budget: plan_for(budget).total)
            if spec.resume:
                way = "top the key up, or resume with --eval-api-key KEY (a separate key for evaluation)"
            elif fit >= 1:
                way = (f"pass --eval-api-key KEY (a separate key for evaluation), or a smaller budget: "
                       f"--budget {fit} is the largest that fits")
            else:
                way = "pass --eval-api-key KEY (a separate key for evaluation): the evaluation alone does not fit"
            raise AttackError(
                f"the attack key has {remaining:,} images left, but this run needs {needed:,}: {what} "
                f"plus {plan.describe()}, charged to the same key; {way}"
            )
        return
    if remaining is not None and remaining < attack_left:
        way = ("top the key up" if spec.resume or remaining < 1
               else f"pass --budget {remaining} (what the key has left) or top the key up")
        raise AttackError(f"the attack key has {remaining:,} images left, fewer than {what}; {way}")
    eval_remaining = _remaining(eval_victim)
    if eval_remaining is not None and eval_remaining < plan.total:
        raise AttackError(
            f"the evaluation key has {eval_remaining:,} images left, but this run needs {plan.describe()}; "
            "top the evaluation key up or use another, or evaluate less (--transfer-samples, --transfer-epsilons)"
        )


def _stored_config(spec: RunSpec, victim: Victim, eval_dataset: str, settings: dict[str, Any],
                   evaluator: Evaluator) -> dict[str, Any]:
    from attacker.provenance import provenance

    return {
        "attack": spec.attack,
        "budget": spec.budget,
        "victim": (spec.url and f"{spec.url} model {spec.model}") or str(spec.victim_checkpoint),
        "victim_kind": "http" if spec.url else "in-process",
        "victim_model": spec.model if spec.url else Path(str(spec.victim_checkpoint)).name,
        "victim_info": asdict(victim.info),
        "metering": metering_of(victim),
        **({"endpoint": endpoint} if (endpoint := victim.endpoint_record()) is not None else {}),
        "eval_dataset": eval_dataset,
        "eval_split": evaluator.split,
        "eval_every": spec.eval_every,
        "separate_evaluation_key": bool(spec.eval_api_key),
        "seed": spec.seed,
        "device": spec.device,
        "settings": settings,
        "evaluation": asdict(spec.evaluation),
        **({"accounts": victim.accounts_record()} if isinstance(victim, AccountPool) else {}),
        "transfer_epsilons": list(evaluator.epsilons),
        "provenance": provenance(evaluator.device),
    }


def _stored_evaluation(stored: dict[str, Any], given: EvalConfig) -> EvalConfig:
    """A resumed run keeps the evaluation settings it started with (split, epsilons, samples, ...)."""
    fields = stored.get("evaluation")
    if not isinstance(fields, dict):
        return given
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    values = {key: value for key, value in fields.items() if key in known}
    if values.get("transfer_epsilons") is not None:
        values["transfer_epsilons"] = tuple(float(eps) for eps in values["transfer_epsilons"])
    return EvalConfig(**values)


class RunStoppedError(AttackError):
    """A run that had started (its directory written) stopped on an error: ``--resume`` continues it.

    Everything paid for is in ``out`` (ledger, checkpoint, answers journal); the CLI
    prints where the run stopped and the command that resumes it.
    """

    def __init__(self, message: str, out: Path) -> None:
        super().__init__(message)
        self.out = out


def _already_finished(run_dir: RunDirectory, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run resumed: nothing to do and nothing charged (no victim is even opened).

    Its ``report.md`` is written again when it is missing (a kill just before it).
    """
    if not (run_dir.path / "report.md").is_file():
        write_run_report(run_dir.path, config, metrics, run_dir.read_history())
    logger.warning("%s holds a finished run (%s of %s queries, stop reason %s): nothing to resume, nothing charged",
                   run_dir.path, f"{metrics.get('queries_used', 0):,}", f"{config.get('budget', 0):,}",
                   metrics.get("stop_reason"))
    return {**metrics, "already_finished": True}


def run_attack(spec: RunSpec) -> dict[str, Any]:
    """Run (or resume) one attack; write the run directory; return the final metrics.

    Raises :class:`AttackError` before any query and any write when the keys
    cannot cover the plan (see the module docstring), and :class:`RunStoppedError`
    when the victim fails for good after the run has started (the directory keeps
    everything paid for; ``--resume`` continues). A failed final evaluation does
    not raise: the metrics carry ``evaluation_error``. A finished run resumed
    returns its metrics with ``already_finished`` and charges nothing.
    """
    from stealsim.data import load_dataset
    from stealsim.training import resolve_device

    attack_class(spec.attack)  # fail on a bad name before any side effect
    run_dir = RunDirectory(spec.out)
    if spec.resume or spec.out.exists():
        run_dir.prepare(spec.resume)  # checks only: on an existing path it creates nothing
    started = time.perf_counter()
    settings_overrides = dict(spec.settings)
    ledger = Ledger()
    if spec.resume and spec.accounts.opens_accounts:
        raise AttackError("a run that opens its accounts (--admin-key) cannot be resumed: their keys are never "
                          "written to the run directory; start it again in a new directory")
    if spec.resume:
        stored = run_dir.read_json("config.json")
        if stored.get("attack") != spec.attack:
            raise AttackError(f"{spec.out} holds a {stored.get('attack')} run, not {spec.attack}")
        finished = run_dir.finished_metrics()
        if finished is not None:
            return _already_finished(run_dir, stored, finished)
        settings_overrides = dict(stored.get("settings", {}))
        spec = replace(spec, budget=int(stored["budget"]), seed=int(stored["seed"]),
                       eval_every=int(stored.get("eval_every", 0)),
                       evaluation=_stored_evaluation(stored, spec.evaluation))
        ledger = run_dir.read_ledger()
    victim, eval_victim, eval_on_attack_key, opened_eval_key = _open_victims(spec)
    metered_eval: BudgetedVictim | None = None
    try:
        eval_name = spec.eval_dataset or infer_eval_dataset(victim.info.input_shape)
        dataset = load_dataset(eval_name)
        device = resolve_device(spec.device)
        settings = make_settings(spec.attack, **settings_overrides)
        settings_dict = flat_settings(settings)
        loop_config = LoopConfig(budget=spec.budget, eval_every=spec.eval_every, seed=spec.seed,
                                 show_progress=spec.show_progress)
        ledger.eval_on_attack_key = eval_on_attack_key
        _reconcile(victim, ledger, spec.resume)  # in memory only, until the checks pass

        writing = False  # no file until every check has passed

        def eval_charged(spent: int) -> None:
            ledger.eval_queries = max(ledger.eval_queries, spent)
            if writing:
                run_dir.write_ledger(ledger)

        metered_eval = BudgetedVictim(eval_victim, None, used=ledger.eval_queries, on_charge=eval_charged)
        evaluator = Evaluator(
            dataset,
            metered_eval,
            spec.evaluation,
            reference_factory=lambda: build_student(victim.info, settings.student_settings(), settings.memory_format),
            cache_dir=spec.out if spec.out.is_dir() else None,
            device=device,
        )
        spent = ledger.attack_queries

        def plan_for(budget: int) -> EvalPlan:
            config = replace(loop_config, budget=budget)
            return evaluator.plan(transfer_evaluations(config, spent, spec.evaluation.transfer_every_eval))

        plan = plan_for(spec.budget)
        _check_keys(spec, victim, eval_victim, eval_on_attack_key, spent, plan_for)
        planned_eval_queries = ledger.eval_queries + plan.total
        # Seed before the clones and generators are built, so that a run's result does
        # not depend on what ran earlier in this process.
        seed_everything(spec.seed)
        attack = build_attack(spec.attack, victim.info, device, **settings_dict)

        # The last check: the victim's answers to the evaluation split (queries the plan
        # holds anyway), its first images sent as a probe: answers in the form the metadata
        # and flags say, a victim better than chance, or a refusal naming the images sent,
        # before the rest of the split and before anything is written (attacker.probe).
        checked_victim_labels(evaluator)
        # Every check passed: from here on the run writes.
        run_dir.prepare(spec.resume)
        writing = True
        evaluator.attach(spec.out)
        if not spec.resume:
            run_dir.write_json("config.json", _stored_config(spec, victim, eval_name, settings_dict, evaluator))
        run_dir.write_ledger(ledger)
        logger.info(
            "evaluation on the %s split of %s (epsilons %s) plans %s, charged to %s",
            evaluator.split, eval_name, ", ".join(f"{eps:g}" for eps in evaluator.epsilons), plan.describe(),
            ("nobody: the server does not meter keys (client-only metering)"
             if metering_of(victim) == "client-only" else
             "the attack key" if eval_on_attack_key else ("the evaluation key" if spec.url else "nobody (in-process)")),
        )
        # The evaluation's answers are journaled as the attack's are, and a resumed run's
        # evaluations are answered from the journal first (no evaluation query bought twice).
        if spec.resume:
            metered_eval.replay_counted(run_dir.journal("evaluation").read(repair=True))
        metered_eval.journal = run_dir.journal("evaluation")
        try:
            outcome = attack.run(
                victim,
                loop_config,
                run_dir,
                evaluator,
                resume=spec.resume,
                ledger=ledger,
            )
        except StealsimError as exc:  # the victim failed for good, after the retries: resumable
            raise RunStoppedError(str(exc), spec.out) from exc
        metrics = dict(outcome.metrics)
        previous = run_dir.read_json("metrics.json").get("wall_seconds", 0.0) if (
            spec.resume and (spec.out / "metrics.json").is_file()) else 0.0
        metrics.update(
            eval_queries=ledger.eval_queries,
            planned_eval_queries=planned_eval_queries,
            eval_split=evaluator.split,
            transfer_epsilons=list(evaluator.epsilons),
            lost_queries=ledger.lost_queries,
            queries_to_90_fidelity=queries_to_reach(outcome.history, 0.90),
            queries_to_95_fidelity=queries_to_reach(outcome.history, 0.95),
            wall_seconds=float(previous) + time.perf_counter() - started,
            victim_kind="http" if spec.url else "in-process",
            metering=metering_of(victim),
        )
        metrics.update(victim.request_metrics())
        used = _server_used(victim)
        if used is not None:
            assert ledger.server_used_at_start is not None
            counted = ledger.attack_queries + (ledger.eval_queries if eval_on_attack_key else 0)
            metrics.update(
                server_queries=used - ledger.server_used_at_start,
                server_count_matches=used - ledger.server_used_at_start == counted,
            )
        run_dir.write_json("metrics.json", metrics)
        write_run_report(spec.out, run_dir.read_json("config.json"), metrics, outcome.history)
        if metrics.get("evaluation_error"):
            logger.error("the final evaluation failed (metrics.json has what the run measured): %s",
                         metrics["evaluation_error"])
        return metrics
    finally:
        if metered_eval is not None and metered_eval.journal is not None:
            metered_eval.journal.close()
        victim.close()  # every account's client; the accounts the run opened are revoked
        if all(eval_victim is not account.victim for account in victim.accounts):
            eval_victim.close()
        if opened_eval_key is not None:
            _revoke_evaluation_key(spec, opened_eval_key)
