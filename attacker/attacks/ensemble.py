"""Ensemble stealing with an uncertainty-quantification substitute (Pape et al., 2023; arXiv 2305.05293)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attacker.attacks._common import GeneratorTrainer, frozen
from attacker.loop import Attack, AttackSettings, Evaluates
from attacker.losses import class_balance_loss, victim_targets
from attacker.replay import ReplayMemory
from attacker.surrogate import RandomSampler, SurrogateSplit, load_surrogate
from attacker.uq import (
    UQ_KINDS,
    UQKind,
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
        uq: the UQ model, one of ``deep-ensemble``, ``mc-dropout``, ``snapshot``, ``swag``, ``laplace``.
        members: M, the number of members.
        architectures: members' architectures (cycled over a deep ensemble's members;
            empty: ``student_architecture`` or the default for the input).
        dropout: dropout rate of ``mc-dropout``.
        swag_start: fraction of the budget after which SWAG collects weight moments.
        swag_scale: scale of SWAG's sampled deviation.
        laplace_prior: prior precision of the last-layer Laplace approximation.
        diversity_weight: weight of the diversity term on unqueried images (0: the paper's setting).
        source: ``generator`` (data-free: maximises the members' disagreement) or ``surrogate`` data.
        surrogate: dataset name or image directory (default: the other built-in dataset).
        surrogate_dir: ``--data-dir`` of an on-disk surrogate dataset.
        surrogate_split: ``train``, ``test`` or ``all`` of a surrogate dataset.
        student_steps: member updates (each on a fresh answered batch) per generator update.
        updates_per_batch: (shared with every attack) member updates per answered batch: the first
            on it (plus replay), the others on replayed answers only (1: Dual Student's schedule).
        generator_lr, latent_dim, generator_width, balance_weight, generator_gain: as Dual Student's.
    """

    uq: UQKind = "deep-ensemble"
    members: int = 5
    architectures: tuple[str, ...] = ()
    dropout: float = 0.25
    swag_start: float = 0.5
    swag_scale: float = 0.5
    laplace_prior: float = 1.0
    diversity_weight: float = 0.0
    source: Literal["generator", "surrogate"] = "generator"
    surrogate: str | None = None
    surrogate_dir: str | None = None
    surrogate_split: SurrogateSplit = "train"
    student_steps: int = 5
    generator_lr: float = 1e-3
    latent_dim: int = 64
    generator_width: int = 16
    balance_weight: float = 0.2
    generator_gain: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.uq not in UQ_KINDS:
            raise AttackError(f"unknown --uq {self.uq!r}; choose one of {list(UQ_KINDS)}")
        if self.source not in ("generator", "surrogate"):
            raise AttackError(f"source must be generator or surrogate, got {self.source!r}")
        if self.student_steps < 1 or self.generator_lr <= 0 or self.members < 1:
            raise AttackError(f"invalid ensemble settings: {self}")
        self.uq_settings()  # validates the UQ fields

    def uq_settings(self) -> UQSettings:
        architectures = self.architectures or ((self.student_architecture,) if self.student_architecture else ())
        return UQSettings(
            kind=self.uq, members=self.members, architectures=architectures, width=self.student_width,
            learning_rate=self.student_lr, soft_loss=self.soft_loss, label_smoothing=self.label_smoothing,
            dropout=self.dropout,
            swag_start=self.swag_start, swag_scale=self.swag_scale, laplace_prior=self.laplace_prior,
            diversity_weight=self.diversity_weight, replay=self.replay,
        )


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
        self.uq = build_uq_model(info, settings.uq_settings(), device)
        self.track("uq", self.uq)
        self.recent_queries = ReplayMemory(QUERY_PROBE)
        self.track("recent_queries", self.recent_queries)
        for index, optimizer in enumerate(self.uq.optimizers):
            self.track(f"optimizer_{index}", optimizer)
        self.gen: GeneratorTrainer | None = None
        self.pool: Tensor | None = None
        self.sampler: RandomSampler | None = None
        if settings.source == "generator":
            self.gen = GeneratorTrainer(info, settings.latent_dim, settings.generator_width,
                                        settings.generator_lr, device, settings.generator_gain,
                                        memory_format=settings.memory_format)
            self.track("generator", self.gen.generator)
            self.track("generator_optimizer", self.gen.optimizer)
        else:
            surrogate = load_surrogate(settings.surrogate, info.input_shape, settings.surrogate_dir,
                                       settings.surrogate_split)
            self.pool = surrogate.images
            self.sampler = RandomSampler(len(surrogate))
            self.track("sampler", self.sampler)

    def _images(self, count: int) -> Tensor:
        if self.gen is not None:
            return self.gen.sample(count)
        assert self.pool is not None and self.sampler is not None
        return self.pool[self.sampler.draw(count)].to(self.device)

    def _unlabelled(self, count: int) -> Tensor | None:
        if self.s.diversity_weight <= 0:
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
            for _ in range(self.s.updates_per_batch - 1):
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
