"""Students (the clones being trained) with their optimisers, moving averages and schedule.

Every attack trains one or more students on the victim's answers the same way,
so it lives here once: Adam (or SGD) on :func:`~attacker.losses.student_loss`,
a cosine learning-rate schedule over the *query budget* (the learning rate is a
function of the fraction of the budget spent, so a resumed run picks up the
same schedule), and an exponential moving average of each student's weights and
buffers (the averaged student is the one evaluated).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from attacker.losses import SoftLoss, student_loss
from attacker.replay import REPLAY_POLICIES, ReplayMemory
from attacker.victims import VictimInfo
from stealsim.architectures import PixelClassifier, build_classifier
from stealsim.errors import AttackError

ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = ["MEMORY_FORMATS", "SCHEDULE_KEYS", "STUDENT_KEYS", "MemoryFormat", "StudentSettings", "Students",
           "build_student", "cosine_factor", "multistep_factor", "schedule_factor", "set_learning_rate",
           "with_memory_format"]

MemoryFormat = Literal["channels_last", "contiguous"]
MEMORY_FORMATS = ("channels_last", "contiguous")


STUDENT_KEYS: dict[str, str] = {
    "student_architecture": "architecture",
    "student_width": "width",
    "student_pool_first": "pool_first",
    "student_lr": "learning_rate",
    "ema_decay": "ema_decay",
    "soft_loss": "soft_loss",
    "label_smoothing": "label_smoothing",
    "replay": "replay",
    "replay_policy": "replay_policy",
    "updates_per_batch": "updates_per_batch",
}
"""The flat keys (``--set KEY=VALUE``) of the students' settings every attack takes, and their fields."""

SCHEDULE_KEYS: dict[str, str] = {
    "student_optimizer": "optimizer",
    "student_weight_decay": "weight_decay",
    "lr_schedule": "schedule",
}
"""Flat keys of the students' optimiser and schedule, which only Dual Student takes (its ``reference`` preset)."""

_KEY_OF = {field: key for key, field in (STUDENT_KEYS | SCHEDULE_KEYS).items()}


@dataclass(frozen=True)
class StudentSettings:
    """How students (the clones an attack trains) are built and trained.

    Attributes:
        architecture: classifier from the registry (default: the one
            :func:`default_clone_architecture` picks for the input).
        width: ``width`` argument of ``small-cnn`` (ignored by other architectures): 16 for
            every attack's clone but random noise's (32, :class:`~attacker.attacks.RandomNoiseSettings`).
            With hard labels, a Dual Student clone of width 32 with ``pool_first`` (about 0.8x
            the queries/s) was ahead on the mnist5k validation split: 0.764 / 0.926 against
            0.464 / 0.710 at 160k queries (seeds 3 / 4;
            docs/results/dual-student-hard-labels.md). Like ``replay``, set it with the label
            mode: it does not follow it.
        pool_first: ``pool_first`` argument of ``small-cnn``
            (:class:`stealsim.architectures.SmallCNN`: the same kind of function, a cheaper
            training step).
        learning_rate: initial learning rate.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        weight_decay: L2 penalty.
        ema_decay: decay of the moving average of the weights, which is the model evaluated
            (0 disables it).
        min_lr_fraction: the cosine schedule ends at this fraction of the initial rate.
        soft_loss: ``l1`` on recovered logits (the papers') or ``kl``, for soft targets.
        label_smoothing: with label targets, the cross-entropy puts ``eps / K`` on every class
            other than the victim's label (0: plain one-hot cross-entropy, as the papers).
            Soft targets ignore it.
        replay: answered images kept in a replay memory; each update also trains on as many
            of them (drawn at random) as it has fresh ones (0: no replay). Replay reuses
            answers already paid for: it costs compute, not queries. With hard labels, Dual
            Student on the mnist5k validation split needed 250,000 (0.912 at 1M queries; with
            20,000 the clone stayed near 0.80, with 100,000 it slid from 0.93 to 0.844; one
            seed each, docs/results/dual-student-hard-labels.md): set it with the label mode,
            it does not follow it.
        replay_policy: what a full replay memory keeps: ``reservoir``, a uniform sample of
            every answer so far, or ``ring``, the last ``replay`` answers
            (:class:`attacker.replay.ReplayMemory`). Reservoir was chosen on the mnist5k
            validation split at 200,000 queries (docs/results/dual-student-settings.md): the
            same fidelity where the generator stays diverse, and no decline where it collapses onto one class of
            answers and a ring forgets the others.
        updates_per_batch: training effort: updates per :meth:`Students.train_step`. The
            first trains on the fresh batch joined with as many replayed answers, the others
            on ``2 * batch`` replayed answers alone (the fresh batch again when ``replay`` is
            0). Replayed answers are paid for already: more updates cost compute, not queries.
        schedule: ``cosine`` (ours) or ``multistep``: the rate times ``step_scale`` at each
            fraction of the budget in ``milestones`` (the Dual Student authors' code).
    """

    KEYS: ClassVar[dict[str, str]] = STUDENT_KEYS

    architecture: str | None = None
    width: int = 16
    pool_first: bool = False
    learning_rate: float = 2e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    min_lr_fraction: float = 0.02
    soft_loss: SoftLoss = "l1"
    label_smoothing: float = 0.0
    replay: int = 20_000
    replay_policy: Literal["ring", "reservoir"] = "reservoir"
    updates_per_batch: int = 1
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: tuple[float, ...] = (0.1, 0.3, 0.5)
    step_scale: float = 0.3

    def __post_init__(self) -> None:
        choices = (("replay_policy", REPLAY_POLICIES), ("optimizer", ("adam", "sgd")),
                   ("schedule", ("cosine", "multistep")), ("soft_loss", ("l1", "kl")))
        for name, allowed in choices:  # errors name the flat key a user sets
            if getattr(self, name) not in allowed:
                raise AttackError(f"{_KEY_OF[name]} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.label_smoothing < 1:
            raise AttackError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if (self.learning_rate <= 0 or not 0 <= self.ema_decay < 1 or self.updates_per_batch < 1
                or self.replay < 0 or self.weight_decay < 0 or self.width < 1):
            raise AttackError(f"invalid attack settings: {self}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))


def cosine_factor(progress: float, floor: float) -> float:
    """``floor + (1 - floor) * (1 + cos(pi * progress)) / 2`` for progress in [0, 1]."""
    progress = min(1.0, max(0.0, progress))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def multistep_factor(progress: float, milestones: tuple[float, ...], scale: float) -> float:
    """``scale ** m`` with ``m`` the milestones (fractions of the budget) already passed.

    PyTorch's ``MultiStepLR`` over the query budget, as the Dual Student authors'
    code schedules students and generator (milestones 10/30/50 %, scale 0.3).
    """
    return float(scale ** sum(1 for milestone in milestones if progress >= milestone))


def schedule_factor(progress: float, schedule: str, floor: float, milestones: tuple[float, ...] = (0.1, 0.3, 0.5),
                    scale: float = 0.3) -> float:
    """The learning-rate factor at ``progress`` under ``schedule`` (``cosine``, ``multistep`` or
    ``constant``: 1 throughout)."""
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return multistep_factor(progress, milestones, scale)
    return cosine_factor(progress, floor)


def set_learning_rate(optimizer: torch.optim.Optimizer, base: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * factor


def default_clone_architecture(channels: int, size: int) -> str:
    """The clones' architecture unless told otherwise: small and fast on a CPU.

    ``small-cnn`` for grayscale (8x8 and 28x28), ``resnet18`` for colour. The
    attacker does not know the victim's architecture. On mnist5k, Dual Student
    clones built as ``lenet5`` stayed near chance at 150,000 queries while
    ``small-cnn`` clones learned (docs/results/clone-and-generator.md).
    """
    del size  # the same choice at every resolution, for now
    return "small-cnn" if channels == 1 else "resnet18"


def build_student(info: VictimInfo, settings: StudentSettings,
                  memory_format: MemoryFormat = "channels_last") -> PixelClassifier:
    """A fresh student for the victim's input shape and class count, in ``memory_format``."""
    channels, size, _ = info.input_shape
    name = settings.architecture or default_clone_architecture(channels, size)
    kwargs: dict[str, Any] = {"width": settings.width, "pool_first": settings.pool_first} if name == "small-cnn" else {}
    net = build_classifier(
        name, in_channels=channels, image_size=size, num_classes=info.num_classes, **kwargs
    )
    # The attacker does not know the victim's normalisation; centre [0, 1] pixels.
    return with_memory_format(PixelClassifier(net, [0.5] * channels, [0.5] * channels), memory_format)


def with_memory_format(module: ModuleT, memory_format: str) -> ModuleT:
    """``module`` with its 4-D weights in ``channels_last`` layout (or left ``contiguous``).

    ``channels_last`` runs convolutions and pooling about 2x faster on a CPU (oneDNN),
    the same function up to float rounding (``benchmarks/loop_speed.py`` measures both).
    """
    if memory_format == "channels_last":
        return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if memory_format != "contiguous":
        raise ValueError(f"memory_format must be channels_last or contiguous, got {memory_format!r}")
    return module


class Students(nn.Module):
    """``count`` students trained alike, each with a moving-average copy.

    ``members[i]`` are trained; ``averages[i]`` follow them and are evaluated.
    """

    def __init__(
        self, info: VictimInfo, count: int, settings: StudentSettings, device: torch.device,
        memory_format: MemoryFormat = "channels_last",
    ) -> None:
        super().__init__()
        self.settings = settings
        self.members = nn.ModuleList([build_student(info, settings, memory_format) for _ in range(count)]).to(device)
        self.averages = nn.ModuleList([copy.deepcopy(m) for m in self.members]).eval()
        for average in self.averages:
            average.requires_grad_(False)
        self.optimizers = [self._optimizer(member) for member in self.members]
        self.updates = 0
        self.memory = ReplayMemory(settings.replay, settings.replay_policy)

    def _optimizer(self, member: nn.Module) -> torch.optim.Optimizer:
        s = self.settings
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                member.parameters(), lr=s.learning_rate, momentum=0.9, weight_decay=s.weight_decay
            )
        return torch.optim.Adam(member.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)

    def schedule(self, progress: float) -> None:
        """Set every student's learning rate for ``progress`` (fraction of the budget spent)."""
        s = self.settings
        factor = schedule_factor(progress, s.schedule, s.min_lr_fraction, s.milestones, s.step_scale)
        for optimizer in self.optimizers:
            set_learning_rate(optimizer, self.settings.learning_rate, factor)

    def train_step(self, images: Tensor, targets: Tensor) -> float:
        """``updates_per_batch`` optimiser steps of every student on a fresh answered batch.

        The first step trains on ``(images, targets)`` joined with as many replayed
        answers, the others on ``2 * len(images)`` replayed answers. Returns the
        first step's mean loss (the one on the fresh batch).
        """
        fresh = len(images)
        if self.settings.replay > 0:
            images, targets = self.memory.add_and_join(images, targets)
        first = self._update(images, targets)
        for _ in range(self.settings.updates_per_batch - 1):
            if self.settings.replay > 0:
                images, targets = self.memory.sample(2 * fresh)
            self._update(images, targets)
        return first

    def _update(self, images: Tensor, targets: Tensor) -> float:
        """One optimiser step of every student on ``(images, targets)``; the mean loss."""
        total = 0.0
        for member, optimizer in zip(self.members, self.optimizers, strict=True):
            member.train()
            loss = student_loss(member(images), targets, self.settings.soft_loss, self.settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        self.updates += 1
        self._update_averages()
        return total / len(self.members)

    @torch.no_grad()
    def _update_averages(self) -> None:
        decay = self.settings.ema_decay
        # Warm-up: early on the average follows the students closely.
        decay = min(decay, (1.0 + self.updates) / (10.0 + self.updates))
        for member, average in zip(self.members, self.averages, strict=True):
            params: list[Tensor] = list(average.parameters())
            torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, [p.detach() for p in member.parameters()], alpha=1 - decay)
            for mine, theirs in zip(average.buffers(), member.buffers(), strict=True):
                if mine.dtype.is_floating_point:
                    mine.mul_(decay).add_(theirs, alpha=1 - decay)
                else:
                    mine.copy_(theirs)

    def clone(self, index: int = 0) -> nn.Module:
        """The model evaluated as the clone: the moving average of student ``index``."""
        if self.settings.ema_decay <= 0:
            return self.members[index]
        return self.averages[index]

    def get_extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])

    def optimizer_states(self) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_optimizer_states(self, states: list[dict[str, Any]]) -> None:
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
