"""Ensemble stealing with an uncertainty-quantification substitute (Pape et al., 2023; arXiv 2305.05293)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from attacker.attacks._common import GeneratorSettings, GeneratorTrainer, frozen
from attacker.loop import Attack, AttackSettings, Evaluates
from attacker.losses import class_balance_loss, victim_targets
from attacker.replay import ReplayMemory
from attacker.students import StudentSettings
from attacker.surrogate import RandomSampler, SurrogateSettings
from attacker.uq import (
    UQSettings,
    build_uq_model,
    member_diagnostics,
    member_probabilities,
    pairwise_disagreement,
    spread_diagnostics,
)
from attacker.victims import BudgetedVictim, VictimInfo
from stealsim.errors import AttackError

__all__ = ["QUERY_PROBE", "Ensemble", "EnsembleSettings"]

QUERY_PROBE = 1024
"""The last answered queries on which each evaluation also measures the members' spread."""


@dataclass(frozen=True)
class EnsembleSettings(AttackSettings):
    """The ensemble attack's settings (UQ model, query source, generator).

    Attributes:
        uq: the UQ model (:class:`~attacker.uq.UQSettings`): its kind (key ``uq``: one of
            ``deep-ensemble``, ``mc-dropout``, ``snapshot``, ``swag``, ``laplace``), its
            ``members``, ``architectures``, ``dropout``, ``swag_start``, ``swag_scale``,
            ``laplace_prior``, ``diversity_weight`` (0: the paper's setting), and its
            ``students``, the members' training (the keys every attack takes). The students'
            ``updates_per_batch`` is member updates per answered batch: the first on it (plus
            replay), the others on replayed answers only (1: Dual Student's schedule).
        generator: the generator (:class:`~attacker.attacks._common.GeneratorSettings`).
        source: ``generator`` (data-free: maximises the members' disagreement) or ``surrogate`` data.
        surrogate: the surrogate images (:class:`~attacker.surrogate.SurrogateSettings`).
        student_steps: member updates (each on a fresh answered batch) per generator update.
        balance_weight: weight of the class-balance term of the generator's loss (as Dual
            Student's).
    """

    uq: UQSettings = field(default_factory=UQSettings)
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    source: Literal["generator", "surrogate"] = "generator"
    surrogate: SurrogateSettings = field(default_factory=SurrogateSettings)
    student_steps: int = 5
    balance_weight: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in ("generator", "surrogate"):
            raise AttackError(f"source must be generator or surrogate, got {self.source!r}")
        if self.student_steps < 1:
            raise AttackError(f"invalid ensemble settings: {self}")

    def student_settings(self) -> StudentSettings:
        return self.uq.students


class Ensemble(Attack):
    """Model stealing with an uncertainty-quantification substitute of M members.

    Paper: D. Pape, S. Däubener, T. Eisenhofer, A. E. Cinà, L. Schönherr, "On the
    Limitations of Model Stealing with Uncertainty Quantification Models",
    ESANN 2023 (arXiv 2305.05293). The attacker's uncertainty about the
    victim's architecture, weights and data is held by a UQ model
    (:mod:`attacker.uq`: deep ensemble, MC dropout, snapshot ensemble, SWAG,
    last-layer Laplace); its combined prediction ``mean_m softmax(f_m(x))`` is
    the clone. The paper finds only marginal fidelity gains over one member and
    explains them by the members' low prediction variance; every evaluation
    here reports both (:func:`attacker.uq.member_diagnostics`) on the evaluation
    split, and the members' spread and fit on the last :data:`QUERY_PROBE`
    answered queries as ``query_*`` (``query_combined_fidelity`` there is the
    agreement with the victim's answers to the attacker's own queries).

    Queries come from a generator trained, as Dual Student's (Beetham et al.
    2023, eq. 2) generalised from two students to M members, to maximise the
    members' mean pairwise disagreement::

        L_G = -(2 / (M (M - 1))) sum_{i<j} L1(softmax f_i(G(z)), softmax f_j(G(z)))
              + lambda * (log K - H(mean_n p(G(z_n))))

    or from surrogate data (``source="surrogate"``, random draws). Each member
    minimises the student loss on the victim's answers (L1 on recovered logits,
    or CE on labels); with ``diversity_weight`` ``w > 0`` (beyond the paper) the
    members' total loss subtracts ``w * D`` with ``D`` the same pairwise
    disagreement on images *not* sent to the victim (a fresh generated or
    surrogate batch): the members agree where the victim answered and stay apart
    elsewhere. The members use no moving average (``ema_decay`` is unused).

    Example::

        attack = Ensemble(EnsembleSettings(uq="mc-dropout", members=5), victim.info, torch.device("cpu"))
        attack.run(victim, LoopConfig(budget=20_000), RunDirectory(Path("runs/mc")), evaluator)
    """

    name = "ensemble"
    settings_type = EnsembleSettings

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        super().__init__(settings, info, device)
        assert isinstance(settings, EnsembleSettings)
        self.s: EnsembleSettings = settings
        self.uq = build_uq_model(info, settings.uq, device)
        self.track("uq", self.uq)
        self.recent_queries = ReplayMemory(QUERY_PROBE)
        self.track("recent_queries", self.recent_queries)
        for index, optimizer in enumerate(self.uq.optimizers):
            self.track(f"optimizer_{index}", optimizer)
        self.gen: GeneratorTrainer | None = None
        self.pool: Tensor | None = None
        self.sampler: RandomSampler | None = None
        if settings.source == "generator":
            self.gen = GeneratorTrainer(info, settings.generator, device, memory_format=settings.memory_format)
            self.track("generator", self.gen.generator)
            self.track("generator_optimizer", self.gen.optimizer)
        else:
            surrogate = settings.surrogate.load(info.input_shape)
            self.pool = surrogate.images
            self.sampler = RandomSampler(len(surrogate))
            self.track("sampler", self.sampler)

    def _images(self, count: int) -> Tensor:
        if self.gen is not None:
            return self.gen.sample(count)
        assert self.pool is not None and self.sampler is not None
        return self.pool[self.sampler.draw(count)].to(self.device)

    def _unlabelled(self, count: int) -> Tensor | None:
        if self.s.uq.diversity_weight <= 0:
            return None
        if self.gen is not None:
            return self.gen.sample(count)
        assert self.pool is not None
        return self.pool[torch.randint(len(self.pool), (count,))].to(self.device)

    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        self.uq.schedule(self.progress)
        losses: dict[str, float] = {}
        if self.gen is not None:
            self.gen.schedule(self.progress)
            self.uq.networks.train()
            with frozen(self.uq):
                images = self.gen.images(self.s.batch_size)
                logits = self.uq.training_members(images)
                loss = -pairwise_disagreement(logits)
                if self.s.balance_weight > 0:
                    mean = torch.stack([torch.softmax(one.float(), dim=1) for one in logits]).mean(dim=0)
                    loss = loss + self.s.balance_weight * class_balance_loss(torch.log(mean + 1e-12))
                self.gen.update(loss)
            losses["generator"] = float(loss.detach())
        total, steps = 0.0, 0
        for _ in range(self.s.student_steps):
            count = victim.affordable(self.s.batch_size)
            if count == 0:
                break
            images = self._images(count)
            targets = victim_targets(victim.query(images.cpu()), self.hard_label).to(self.device)
            self.recent_queries.add(images.detach(), targets)
            total += self.uq.train_step(images, targets, self._unlabelled(count))
            for _ in range(self.s.uq.students.updates_per_batch - 1):
                self.uq.train_replayed(self.s.batch_size, self._unlabelled(count))
            steps += 1
        losses["student"] = total / max(1, steps)
        return losses

    def clone(self) -> nn.Module:
        return self.uq.combined()

    def diagnostics(self, evaluator: Evaluates) -> dict[str, float]:
        from attacker.evaluation import Evaluator

        if not isinstance(evaluator, Evaluator):
            return {}
        members = self.uq.members()
        result = member_diagnostics(members, evaluator.images, evaluator.labels, evaluator.victim_labels())
        if self.recent_queries.filled > 0:
            # The same spread on the attacker's own last queries, against the victim's answers to them.
            images, targets = self.recent_queries.stored()
            answered = targets if targets.dim() == 1 else targets.argmax(dim=1)
            on_queries = spread_diagnostics(member_probabilities(members, images), None, answered.cpu())
            result.update({f"query_{name}": value for name, value in on_queries.items() if name != "members"})
        return result
