"""The attack loop, shared by every attack: budget, accounting, evaluation, checkpoints, progress.

An attack subclasses :class:`Attack` and supplies its hooks:

- ``__init__``: build its students / clones, generator, optimisers, and
  :meth:`Attack.track` every stateful object (they are checkpointed);
- :meth:`Attack.step`: spend some queries through the metered victim it is
  given (ask ``victim.affordable(n)`` before querying) and train;
- :meth:`Attack.clone`: the model evaluated as the stolen copy;
- :meth:`Attack.diagnostics` (optional): extra metrics at each evaluation.

:meth:`Attack.run` owns everything else: it meters the victim with a
:class:`~attacker.victims.BudgetedVictim` (one image = one query, every
zeroth-order perturbation included), persists the count after every answered
request, evaluates every ``eval_every`` queries, checkpoints at each
evaluation, resumes from the last checkpoint, and shows a progress bar.

A new attack is one new file in ``attacker/attacks/`` plus its registry entry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from attacker.accounts import AccountPool
from attacker.adaptive import AdaptiveSettings, AdaptiveVictim, AnswerAdapter, clone_probabilities
from attacker.replay import ReplayMemory
from attacker.rundir import Ledger, RunDirectory
from attacker.students import MEMORY_FORMATS, MemoryFormat, Students, StudentSettings
from attacker.victims import BudgetedVictim, Victim, VictimInfo
from stealsim.errors import AttackError, BudgetExhaustedError, RunLimitReachedError, VictimAPIError
from stealsim.progress import progress_bar
from stealsim.training import seed_everything

__all__ = ["PRECISIONS", "Attack", "AttackSettings", "Evaluates", "LoopConfig", "RunOutcome"]

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")
"""What :attr:`AttackSettings.precision` accepts."""


@dataclass(frozen=True)
class AttackSettings:
    """Settings every attack has; each attack extends this with its own (frozen) fields.

    An attack nests the settings of what it owns (its students as
    :class:`~attacker.students.StudentSettings`, a generator, a UQ model); users set
    every knob by a flat key (``--set student_width=32``), mapped onto the nested
    fields by :mod:`attacker.settings`.

    Attributes:
        batch_size: images per victim request (large batches: few round-trips).
        hard_label: train on the victim's arg-max only (forced for a label-only victim).
        memory_format: tensor layout of the clones and generators: ``channels_last`` (about
            2x faster on a CPU, the same function up to float rounding) or ``contiguous``
            (``benchmarks/loop_speed.py`` measures both).
        precision: the attacker's own forward passes (clones, generators) in each step:
            ``float32``, or ``bfloat16`` under ``torch.autocast`` (mixed precision: weights,
            optimiser state, losses and the images sent to the victim stay float32; only the
            convolutions and linear layers compute in bfloat16). On this project's AMX CPU
            a step was 1.6x (Dual Student) and 1.8x (DFME) cheaper than in float32
            (docs/results/loop-speed.md); a CPU without bfloat16 units is slower, and GPUs
            were not measured. Evaluation always runs in float32, and the victim never sees
            autocast (:meth:`Attack.take_step`).
        adaptive: the adaptive attacker (:mod:`attacker.adaptive`; keys ``restore``,
            ``restore_warmup``, ``restore_families``, ``restore_steps``, ``drop_contradicted``,
            ``drop_threshold``, ``drop_warmup``, ``shape_min_distance``, ``shape_history``,
            ``shape_cover``, ``shape_cover_source``), off by default.
    """

    KEYS: ClassVar[dict[str, str]] = {}
    """Flat keys of this type's own beyond its plain fields and its nested settings' (see :mod:`attacker.settings`)."""

    batch_size: int = 256
    hard_label: bool = False
    memory_format: MemoryFormat = "channels_last"
    precision: Literal["float32", "bfloat16"] = "float32"
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)

    def __post_init__(self) -> None:
        if self.memory_format not in MEMORY_FORMATS:
            raise AttackError(f"memory_format must be channels_last or contiguous, got {self.memory_format!r}")
        if self.precision not in PRECISIONS:
            raise AttackError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise AttackError(f"invalid attack settings: {self}")

    def student_settings(self) -> StudentSettings:
        """The settings of the clone the attack trains (the evaluation builds its transfer reference alike)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its clone is built")


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs: the budget and how often to evaluate.

    Attributes:
        budget: attack queries (images) the run may spend.
        eval_every: queries between evaluations (0: a twentieth of the budget).
        seed: seeds Python, NumPy and torch at the start of a new run.
        show_progress: draw a progress bar.
    """

    budget: int
    eval_every: int = 0
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1 or self.eval_every < 0:
            raise AttackError(f"budget must be >= 1 and eval_every >= 0, got {self}")

    @property
    def evaluation_interval(self) -> int:
        return self.eval_every or max(1, self.budget // 20)


class Evaluates(Protocol):
    """What the loop asks of an evaluator (see :class:`attacker.evaluation.Evaluator`)."""

    def evaluate(self, clone: nn.Module, final: bool) -> dict[str, float]: ...


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    stop_reason: str


class Attack(ABC):
    """Base class of every attack: owns the loop; subclasses supply :meth:`step` and :meth:`clone`.

    Args:
        settings: the attack's settings (a subclass of :class:`AttackSettings`).
        info: the victim's public metadata.
        device: where students and generators train.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[AttackSettings]] = AttackSettings
    one_shot: ClassVar[bool] = False
    """True for an attack that spends its budget in one step (ART's): no checkpoint inside it."""
    extra: ClassVar[str | None] = None
    """The optional install extra the attack needs (``art``), or ``None``."""

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        if not isinstance(settings, self.settings_type):
            raise AttackError(f"{self.name} needs {self.settings_type.__name__}, got {type(settings).__name__}")
        self.settings = settings
        self.info = info
        self.device = device
        self.hard_label = settings.hard_label or info.output_kind == "label"
        self._tracked: dict[str, Any] = {}
        self.progress = 0.0
        """Fraction of the budget spent before the current step (drives schedules)."""
        self.finished = False
        """Set by a one-shot attack (ART's) once it has spent what it will: the loop stops."""
        self.adapter: AnswerAdapter | None = None
        """The adaptive attacker (query shaping, ``restore``, ``drop_contradicted``), when any is on."""
        if settings.adaptive.enabled:
            self.adapter = AnswerAdapter(settings.adaptive, info, device)
            self.track("adaptive", self.adapter)

    # -- hooks --------------------------------------------------------------------------

    @abstractmethod
    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        """Spend some queries (at most ``victim.remaining``) and train; return loss statistics."""

    @abstractmethod
    def clone(self) -> nn.Module:
        """The stolen model, in eval mode, taking pixels in [0, 1]."""

    def take_step(self, victim: BudgetedVictim) -> dict[str, float]:
        """:meth:`step` at the settings' ``precision`` (what the loop and the speed benchmark call).

        With ``bfloat16`` the step runs under ``torch.autocast`` on the attack's device;
        :class:`~attacker.victims.BudgetedVictim` switches autocast off around the victim,
        so only the attacker's own models compute in bfloat16.
        """
        enabled = self.settings.precision == "bfloat16"
        # No weight cache: autocast keeps each weight's bfloat16 copy until the region ends, and
        # this region holds several optimiser steps; cached copies would be stale after the first.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False):
            return self.step(victim)

    def diagnostics(self, evaluator: Evaluates) -> dict[str, float]:
        """Metrics of the attack's own, added to each evaluation's line (default: none)."""
        return {}

    def track(self, name: str, thing: Any) -> None:
        """Checkpoint ``thing`` (a module, an optimiser, or anything with ``state_dict``)."""
        self._tracked[name] = thing

    def track_students(self, students: Students) -> None:
        """Checkpoint ``students`` and each of their optimisers (``student_optimizer_<i>``)."""
        self.track("students", students)
        for index, optimizer in enumerate(students.optimizers):
            self.track(f"student_optimizer_{index}", optimizer)

    def _clone_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The clone's softmax on ``images`` (``drop_contradicted``), every tracked module's mode kept."""
        modules = [thing for thing in self._tracked.values() if isinstance(thing, nn.Module)]
        return clone_probabilities(self.clone, modules, images, self.device)

    def _memories(self) -> dict[str, ReplayMemory]:
        """The replay memories of tracked objects (students' and UQ models' ``memory``), checkpointed with them."""
        found: dict[str, ReplayMemory] = {}
        for name, thing in self._tracked.items():
            memory = getattr(thing, "memory", None)
            if isinstance(memory, ReplayMemory):
                found[f"{name}.memory"] = memory
        return found

    def state_dict(self) -> dict[str, Any]:
        state = {name: thing.state_dict() for name, thing in self._tracked.items()}
        state.update({name: memory.state_dict() for name, memory in self._memories().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._tracked) - set(state)
        if missing:
            raise AttackError(f"the checkpoint lacks {sorted(missing)}; was it written by another attack?")
        for name, thing in self._tracked.items():
            thing.load_state_dict(_on_device(state[name], self.device) if isinstance(thing, ReplayMemory)
                                  else state[name])
        for name, memory in self._memories().items():
            if name in state:
                memory.load_state_dict(_on_device(state[name], self.device))
            else:
                logger.warning("the checkpoint holds no %s (an older checkpoint): it starts empty", name)

    # -- the loop -------------------------------------------------------------------------

    def run(
        self,
        victim: Victim,
        config: LoopConfig,
        run_dir: RunDirectory,
        evaluator: Evaluates | None = None,
        resume: bool = False,
        ledger: Ledger | None = None,
    ) -> RunOutcome:
        """Steal from ``victim`` until the budget is spent; write metrics and checkpoints.

        ``ledger`` is the run's query ledger (shared with the evaluator, which
        adds evaluation queries); a resumed run reads it from ``run_dir``.
        Every answered request goes to the run's answers journal before it is
        counted; a resumed run restarts from its checkpoint and replays the
        journal (:class:`~attacker.victims.BudgetedVictim`), so its training is
        the uninterrupted run's and no answer is bought twice.
        """
        ledger = ledger if ledger is not None else (run_dir.read_ledger() if resume else Ledger())
        # A run's accounts, prices and clock (attacker.accounts): recorded at every evaluation.
        pool = victim if isinstance(victim, AccountPool) else None
        history: list[dict[str, Any]] = []
        attack_seconds = 0.0
        interval = config.evaluation_interval
        next_eval = interval
        journal = run_dir.journal()
        state = run_dir.load_checkpoint() if resume else None
        used_at_checkpoint = spent_at_checkpoint = 0
        finished: dict[str, Any] | None = None
        if state is not None:
            self.load_state_dict(state["attack"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            history = [dict(line) for line in state["history"]]
            attack_seconds = float(state["attack_seconds"])
            next_eval = int(state["next_eval"])
            spent_at_checkpoint = int(state["queries"])
            used_at_checkpoint = int(state.get("used", spent_at_checkpoint))
            finished = state.get("finished")
            if pool is not None and state.get("economy") is not None:
                pool.load_state_dict(state["economy"])
            run_dir.rewrite_history(history)
        else:
            seed_everything(config.seed)
        replay = [record for record in journal.read(repair=True) if record.start >= spent_at_checkpoint] \
            if resume else []
        if not resume:
            journal.clear()
        # Paid for, never to be answered to the attack: a request charged at a kill but never
        # journaled (the ledger has it from the server's count), or an older run's lost answers.
        forfeited = max(0, ledger.attack_queries - used_at_checkpoint - sum(record.count for record in replay))
        if resume:
            logger.info("resuming at %d queries: %s, %d answers replayed from the journal%s",
                        ledger.attack_queries,
                        f"training from the checkpoint at {spent_at_checkpoint}" if state is not None
                        else "no checkpoint yet, training from the start",
                        sum(record.count for record in replay),
                        f", {forfeited} paid for but never received" if forfeited else "")
        while next_eval <= used_at_checkpoint:
            next_eval += interval

        if self.adapter is not None:  # the victim's answers go through the adaptive attacker first
            self.adapter.seed = config.seed
            self.adapter.bind(self._clone_probabilities)
            budgeted: BudgetedVictim = AdaptiveVictim(victim, config.budget, used=used_at_checkpoint, journal=journal,
                                                      replay=replay, forfeited=forfeited, adapter=self.adapter)
        else:
            budgeted = BudgetedVictim(victim, config.budget, used=used_at_checkpoint, journal=journal,
                                      replay=replay, forfeited=forfeited)

        def charged(spent: int) -> None:
            ledger.attack_queries = max(ledger.attack_queries, spent)
            run_dir.write_ledger(ledger)

        budgeted.on_charge = charged
        ledger.attack_queries = max(ledger.attack_queries, budgeted.spent)
        run_dir.write_ledger(ledger)

        stop_reason = "budget_spent"
        last: dict[str, float] = {}
        fidelity = history[-1].get("fidelity", float("nan")) if history else float("nan")
        final: dict[str, Any] | None = None
        if finished is not None:  # the run had ended: its final evaluation is done, or failed (done again)
            stop_reason = str(finished["stop_reason"])
            if "evaluation_error" in history[-1]:
                history.pop()
                run_dir.rewrite_history(history)
            else:
                final = history[-1]
        stopped_on_overdraft = False
        try:
            with progress_bar(self.name, total=config.budget, enabled=config.show_progress) as advance:
                advance("", steps=budgeted.spent)
                while finished is None and (budgeted.remaining or 0) > 0:
                    before = budgeted.used
                    self.progress = before / config.budget
                    started = time.perf_counter()
                    if pool is not None:
                        pool.sync(budgeted.spent)  # answers replayed from the journal are paid for too
                    try:
                        with pool.clock.running() if pool is not None else contextlib.nullcontext():
                            last = self.take_step(budgeted)
                    except BudgetExhaustedError as exc:
                        attack_seconds += time.perf_counter() - started
                        if isinstance(exc, RunLimitReachedError):  # no account left, time or money up
                            stop_reason = exc.stop_reason
                            logger.warning("the run stops: %s", exc)
                            break
                        if exc.status == 0 and budgeted.diverged and not stopped_on_overdraft:
                            # The replay stopped mid-step and left less budget than the step had sized
                            # its request for: the next step asks for what remains.
                            stopped_on_overdraft = True
                            continue
                        if exc.status == 0:  # our own meter: the step asked for too much
                            raise AttackError(f"{self.name} asked for more than its budget: {exc}") from exc
                        stop_reason = "server_budget_exhausted"
                        logger.warning("the server refused further queries: %s", exc)
                        break
                    attack_seconds += time.perf_counter() - started
                    spent = budgeted.used - before
                    if self.finished:  # a one-shot attack: done, with or without budget left
                        stop_reason = "budget_spent" if not budgeted.remaining else "attack_finished"
                        advance("", steps=spent)
                        break
                    if spent == 0:
                        stop_reason = "budget_too_small_for_a_step"
                        break
                    rate = budgeted.used / max(attack_seconds, 1e-9)
                    advance(f"{rate:,.0f} q/s  fidelity {fidelity:.3f}", steps=spent)
                    if budgeted.used >= next_eval and (budgeted.remaining or 0) > 0:
                        line = self._evaluate(evaluator, budgeted.spent, attack_seconds, ledger, last, False, pool)
                        history.append(line)
                        run_dir.append_metrics(line)
                        fidelity = line.get("fidelity", float("nan"))
                        while next_eval <= budgeted.used:
                            next_eval += interval
                        self._checkpoint(run_dir, budgeted, history, attack_seconds, next_eval, pool=pool)

                # A step that ended the run early (a one-shot attack) leaves journal records unasked for.
                budgeted.stop_replay("the run ended")
                if final is None:
                    # Inside the bar, so that its last line shows the final evaluation's fidelity.
                    final = self._evaluate(evaluator, budgeted.spent, attack_seconds, ledger, last, True, pool)
                    history.append(final)
                    run_dir.append_metrics(final)
                    self._checkpoint(run_dir, budgeted, history, attack_seconds, next_eval,
                                     finished={"stop_reason": stop_reason}, pool=pool)
                rate = budgeted.used / max(attack_seconds, 1e-9)
                advance(f"{rate:,.0f} q/s  fidelity {final.get('fidelity', float('nan')):.3f} (final)", steps=0)
        finally:
            journal.close()
        run_dir.save_clone(self.clone(), self.info.input_shape)
        metrics = dict(final)
        metrics.update(
            queries_used=budgeted.spent,
            budget=config.budget,
            attack_seconds=attack_seconds,
            queries_per_second=budgeted.spent / max(attack_seconds, 1e-9),
            victim_requests=budgeted.requests,
            replayed_queries=budgeted.replayed,
            unreplayed_queries=budgeted.forfeited,
            stop_reason=stop_reason,
        )
        return RunOutcome(metrics=metrics, history=history, stop_reason=stop_reason)

    def _evaluate(
        self,
        evaluator: Evaluates | None,
        queries: int,
        attack_seconds: float,
        ledger: Ledger,
        losses: dict[str, float],
        final: bool,
        pool: AccountPool | None = None,
    ) -> dict[str, Any]:
        line: dict[str, Any] = {"queries": queries, "attack_seconds": round(attack_seconds, 3)}
        if pool is not None:
            pool.sync(queries)
            line.update(pool.economy())
        line.update({f"loss_{k}": v for k, v in losses.items()})
        if self.adapter is not None:
            line.update(self.adapter.metrics())
        if evaluator is not None:
            try:
                line.update(evaluator.evaluate(self.clone(), final))
                line.update(self.diagnostics(evaluator))
            except VictimAPIError as exc:
                # The evaluation key ran dry or the victim failed: keep the run (and its checkpoint),
                # report why (a final evaluation that failed makes the run exit non-zero).
                logger.warning("evaluation skipped: %s", exc)
                line["evaluation_error"] = str(exc)
        line["eval_queries"] = ledger.eval_queries
        return line

    def _checkpoint(
        self,
        run_dir: RunDirectory,
        budgeted: BudgetedVictim,
        history: list[dict[str, Any]],
        attack_seconds: float,
        next_eval: int,
        finished: dict[str, Any] | None = None,
        pool: AccountPool | None = None,
    ) -> None:
        """Save the attack's state; the journals, which it now covers, start empty.

        ``queries``: images paid for; ``used``: images answered to the attack (they differ
        by answers paid for but never received); ``finished``: set once the run has ended
        (its stop reason), so that a resumed run does not evaluate again.
        """
        run_dir.save_checkpoint(
            {
                "attack": self.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "history": history,
                "attack_seconds": attack_seconds,
                "next_eval": next_eval,
                "queries": budgeted.spent,
                "used": budgeted.used,
                "finished": finished,
                "economy": None if pool is None else pool.state_dict(),
            }
        )
        if budgeted.journal is not None:
            budgeted.journal.clear()
        if not history or "evaluation_error" not in history[-1]:
            # The history in the checkpoint holds what the evaluation's answers were for; after a
            # failed evaluation they stay, for the final evaluation a resumed run does again.
            run_dir.journal("evaluation").clear()


def _on_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A replay memory's state with its tensors on ``device`` (checkpoints load on the CPU)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in state.items()}
