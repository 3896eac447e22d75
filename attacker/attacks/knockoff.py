"""Knockoff Nets: stealing with surrogate images (Orekondy, Schiele, Fritz, CVPR 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attacker.loop import Attack, AttackSettings
from attacker.losses import LOG_EPSILON
from attacker.replay import ReplayMemory
from attacker.students import StudentSettings, build_student, cosine_factor, set_learning_rate
from attacker.surrogate import BanditSampler, RandomSampler, Reward, SurrogateSettings
from attacker.victims import BudgetedVictim, VictimInfo
from stealsim.errors import AttackError
from stealsim.losses import kd_loss

__all__ = ["Knockoff", "KnockoffSettings"]


@dataclass(frozen=True)
class KnockoffSettings(AttackSettings):
    """Knockoff's settings.

    Attributes:
        students: the clone (:class:`~attacker.students.StudentSettings`: architecture, width,
            learning rate, label smoothing). Its ``replay`` memory is the transfer set, which
            every update draws ``train_batch`` images from, ``updates_per_batch`` times after
            each answered batch (16 by default), and its ``replay_policy`` is ``ring``: the
            transfer set keeps the last ``replay`` answers, as in every Knockoff run measured.
            The clone has no moving average and its loss is KD (``ema_decay`` and
            ``soft_loss`` do not apply).
        surrogate: the images queried (:class:`~attacker.surrogate.SurrogateSettings`).
        sampling: ``random`` or ``adaptive`` (the bandit over the surrogate's classes).
        reward: the adaptive sampler's reward: ``certainty``, ``diversity``, ``loss`` or ``all``.
        bandit_lr: the bandit's step ``alpha``.
        temperature: KD temperature ``T`` on soft answers.
        train_batch: images per clone update, drawn from the transfer set.
    """

    students: StudentSettings = field(
        default_factory=lambda: StudentSettings(updates_per_batch=16, replay_policy="ring"))
    surrogate: SurrogateSettings = field(default_factory=SurrogateSettings)
    sampling: Literal["random", "adaptive"] = "random"
    reward: Reward = "all"
    bandit_lr: float = 0.1
    temperature: float = 4.0
    train_batch: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling not in ("random", "adaptive"):
            raise AttackError(f"sampling must be random or adaptive, got {self.sampling!r}")
        if self.reward not in ("certainty", "diversity", "loss", "all"):
            raise AttackError(f"reward must be certainty, diversity, loss or all, got {self.reward!r}")
        if self.temperature <= 0 or self.train_batch < 1 or self.students.replay < 1:
            raise AttackError(f"invalid Knockoff settings: {self}")

    def student_settings(self) -> StudentSettings:
        return self.students


class Knockoff(Attack):
    """Knockoff Nets: query with the attacker's own images, train the clone on the answers by KD.

    Paper: T. Orekondy, B. Schiele, M. Fritz, "Knockoff Nets: Stealing
    Functionality of Black-Box Models", CVPR 2019. Images come from a surrogate
    pool (:mod:`attacker.surrogate`: a dataset or a directory of images),
    drawn at random or by the paper's adaptive strategy (a gradient bandit over
    the pool's classes, Sec. 4.1.2, rewards certainty / diversity / loss). Every
    answered image joins the transfer set; after each answered batch the clone
    takes ``updates_per_batch`` Adam steps on batches from it, with

        L = T^2 KL(softmax(log V(x) / T) || softmax(S(x) / T))

    on probabilities (Hinton et al. 2015, the KD of the Nasty Teacher paper,
    Ma et al. ICLR 2021, with the victim's logits recovered as ``log V(x)``), or
    ``CE(S(x), y)`` on labels (a label-only API, or ``hard_label``). Against a
    normal and a Nasty Teacher served side by side this is the Nasty Teacher
    experiment through a real API. The clone's learning rate decays on a cosine
    over the budget.

    Example::

        attack = Knockoff(KnockoffSettings(sampling="adaptive"), victim.info, torch.device("cpu"))
        attack.run(victim, LoopConfig(budget=5_000), RunDirectory(Path("runs/knockoff")), evaluator)
    """

    name = "knockoff"
    settings_type = KnockoffSettings

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        super().__init__(settings, info, device)
        assert isinstance(settings, KnockoffSettings)
        self.s: KnockoffSettings = settings
        surrogate = settings.surrogate.load(info.input_shape)
        self.pool = surrogate.images
        self.network = build_student(info, settings.students, settings.memory_format).to(device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=settings.students.learning_rate)
        self.transfer = ReplayMemory(settings.students.replay, settings.students.replay_policy)
        self.sampler: RandomSampler | BanditSampler
        if settings.sampling == "adaptive":
            self.sampler = BanditSampler(surrogate.classes, info.num_classes, settings.bandit_lr, settings.reward)
        else:
            self.sampler = RandomSampler(len(surrogate))
        self.track("network", self.network)
        self.track("optimizer", self.optimizer)
        self.track("transfer_set", self.transfer)
        self.track("sampler", self.sampler)

    def _loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        logits = logits.float()  # bfloat16 under autocast: the loss in float32
        if targets.dim() == 1:
            return F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=self.s.students.label_smoothing)
        teacher = torch.log(targets + LOG_EPSILON)
        if reduction == "none":
            t = self.s.temperature
            return (F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                             reduction="none", log_target=True).sum(dim=1) * t * t)
        return kd_loss(logits, teacher, None, temperature=self.s.temperature)

    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        students = self.s.students
        set_learning_rate(self.optimizer, students.learning_rate, cosine_factor(self.progress, students.min_lr_fraction))
        count = victim.affordable(self.s.batch_size)
        if count == 0:
            return {}
        arms = None
        if isinstance(self.sampler, BanditSampler):
            picks, arms = self.sampler.draw(count)
        else:
            picks = self.sampler.draw(count)
        images = self.pool[picks]
        answers = victim.query(images)
        targets = answers.long() if answers.dim() == 1 else answers.float()
        if self.hard_label and targets.dim() == 2:
            targets = targets.argmax(dim=1)
        stats: dict[str, float] = {}
        if isinstance(self.sampler, BanditSampler) and arms is not None:
            with torch.no_grad():
                self.network.eval()
                losses = self._loss(self.network(images.to(self.device)), targets.to(self.device), "none").cpu()
            probabilities = (F.one_hot(targets, self.info.num_classes).float() if targets.dim() == 1
                             else targets)
            rewards = self.sampler.rewards(probabilities, losses)
            self.sampler.update(arms, rewards)
            stats["reward"] = float(rewards.mean())
        self.transfer.add(images.to(self.device), targets.to(self.device))
        self.network.train()
        total = 0.0
        for _ in range(self.s.students.updates_per_batch):
            batch, batch_targets = self.transfer.sample(self.s.train_batch)
            loss = self._loss(self.network(batch), batch_targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        stats["student"] = total / self.s.students.updates_per_batch
        return stats

    def clone(self) -> nn.Module:
        return self.network.eval()
