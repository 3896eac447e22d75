"""Dual Student (Beetham, Kardan, Mian and Shah, ICLR 2023; arXiv 2309.10058)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from attacker.attacks._common import GeneratorSettings, GeneratorTrainer, frozen, make_generator
from attacker.loop import Attack, AttackSettings, Evaluates
from attacker.losses import (
    class_balance_loss,
    confidence_shortfall,
    disagreement_loss,
    victim_targets,
)
from attacker.replay import ReplayMemory
from attacker.students import SCHEDULE_KEYS, Students, StudentSettings
from attacker.victims import BudgetedVictim, VictimInfo
from stealsim.errors import AttackError

__all__ = ["DualStudent", "DualStudentSettings"]

PROBE = 2048
"""Answered queries kept for the diagnostics: the run's first ``PROBE``, its last ``PROBE``, and
``PROBE`` drawn uniformly from all of them."""

DEAD_START_SHARE = 0.999
"""``generator_restart``: the victim's top class's share of a window's answers that counts as a dead start.
On mnist5k with hard labels the runs that found other classes on their own within 40,000 queries had
0.895-0.998 of their first 20,000 answers in one class; the ones that stayed had 1.000 (docs/results/dual-student-hard-labels.md)."""


@dataclass(frozen=True)
class DualStudentSettings(AttackSettings):
    """Dual Student's settings (defaults tuned for 8x8 / 28x28 grayscale on a CPU).

    Attributes:
        students: the two students (:class:`~attacker.students.StudentSettings`), with
            ``updates_per_batch`` 4: chosen on the mnist5k validation split at 200,000 queries
            (seeds 0 / 1), fidelity 0.910 / 0.946 with 2 and **0.940 / 0.962 with 4** (about 2x
            the compute); 1 is the paper's (one student step per generated batch). Besides the
            keys every attack takes, ``student_optimizer``, ``student_weight_decay`` and
            ``lr_schedule`` set their optimiser and schedule.
        generator: the generator (:class:`~attacker.attacks._common.GeneratorSettings`; keys
            ``generator_lr``, ``latent_dim``, ``generator_width``, ``generator_gain`` and
            ``generator_betas``).
        student_steps: student updates (each on a fresh victim-answered batch) per generator update.
        balance_weight: weight ``lambda`` of the class-balance term (0, the default: the paper's
            loss alone; 0.2 helped on 8x8 digits with 5 student steps, hurt on mnist5k).
        disagreement: compare the students' ``logits`` (the paper) or softmax ``probabilities`` (as given,
            with soft and hard labels alike).
        generator_schedule: the generator's learning-rate schedule: ``students`` (the
            default and the authors': the same ``lr_schedule`` as the students) or
            ``constant`` (the generator keeps its learning rate to the end of the budget).
        generator_restart: queries per check for a dead start (0, the default: never, as the
            paper). When the victim gave one class to at least 99.9 % of the last
            ``generator_restart`` answers, the generator and its optimiser state are drawn
            afresh. With hard labels a generator whose images all get one answer is a near
            fixed point: the students learn that constant class with a saturated softmax, their
            disagreement and its gradient vanish (generator losses of order 1e-6), and nothing
            moves the generator off the images (a width-32 mnist5k run sat at fidelity 0.099
            for 260,000 queries; docs/results/dual-student-hard-labels.md). Not in the paper or the authors' code.
        shape_confidence: weight of the query-shaping term
            :func:`~attacker.losses.confidence_shortfall` in the generator's loss (0, the
            default: the paper's loss): the generator also seeks images the first student is sure
            of, which keeps a maximum-softmax OOD detector's statistic down (issue #38).
        preset: ``tuned`` (these defaults) or ``reference`` (:data:`REFERENCE`, the authors'
            code); settings given beside a preset override it.

    Departures from the authors' code (github.com/James-Beetham/dual_students), each a
    setting whose ``reference`` value is theirs:

    - ``student_optimizer`` ``adam`` (theirs ``sgd``, momentum 0.9) with
      ``student_weight_decay`` 0 (theirs 5e-4) and ``student_lr`` 2e-3 (theirs 0.1);
    - ``lr_schedule`` ``cosine`` (theirs ``multistep``: x0.3 at 10/30/50 % of the budget,
      students and generator alike);
    - ``generator_lr`` 1e-3 (theirs 1e-4) and ``generator_betas`` (0.5, 0.999) (theirs
      Adam's default (0.9, 0.999));
    - ``student_steps`` 3 (theirs 5), ``updates_per_batch`` 4 and ``replay`` 20,000 with
      ``replay_policy`` ``reservoir`` (theirs 1 and none), ``latent_dim`` 64 (theirs 256);
    - ``disagreement`` on ``probabilities`` (theirs ``logits``, the paper's eq. 2);
    - ``students_in_generator_step`` ``train`` (theirs ``eval``: batch norms on running
      statistics), ``generator_when_sampling`` ``train`` (theirs ``eval``);
    - ``generator_step_input`` ``images`` (theirs ``preactivation``: the students see the
      generator's output before its squashing non-linearity during the generator step,
      mapped here through the same affine map as images, ``0.5 + 0.5 * BN(a)``);
    - ``hard_target`` ``class`` (cross-entropy to the arg-max; theirs ``one_hot``: the
      student loss on the one-hot vector);
    - ``generator_gain`` 3 (theirs: ``tanh(BN(a))``, which is ``sigmoid(2 BN(a))`` in [0, 1]
      pixels, so 2 in ``reference``);
    - ``ema_decay`` 0.995 per update (theirs: a 0.9 moving average stepped every 10
      iterations of 5 student updates, about 0.998 per update, the ``reference`` value).
    """

    KEYS: ClassVar[dict[str, str]] = {
        **{key: f"students.{field}" for key, field in SCHEDULE_KEYS.items()},
        "generator_betas": "generator.betas",
    }

    students: StudentSettings = field(default_factory=lambda: StudentSettings(updates_per_batch=4))
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    student_steps: int = 3
    balance_weight: float = 0.0
    disagreement: Literal["logits", "probabilities"] = "probabilities"
    students_in_generator_step: Literal["train", "eval"] = "train"
    generator_when_sampling: Literal["train", "eval"] = "train"
    generator_step_input: Literal["images", "preactivation"] = "images"
    hard_target: Literal["class", "one_hot"] = "class"
    generator_schedule: Literal["students", "constant"] = "students"
    generator_restart: int = 0
    shape_confidence: float = 0.0
    preset: Literal["tuned", "reference"] = "tuned"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named sets of settings (``reference``), filled in below the class."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape_confidence < 0:
            raise AttackError(f"shape_confidence must be >= 0, got {self.shape_confidence}")
        if self.generator_restart < 0:
            raise AttackError(f"generator_restart must be 0 (never) or a number of queries per check, got {self.generator_restart}")
        if self.student_steps < 1:
            raise AttackError(f"invalid Dual Student settings: {self}")
        choices = {"students_in_generator_step": ("train", "eval"), "generator_when_sampling": ("train", "eval"),
                   "generator_step_input": ("images", "preactivation"), "hard_target": ("class", "one_hot"),
                   "disagreement": ("logits", "probabilities"), "preset": ("tuned", "reference"),
                   "generator_schedule": ("students", "constant")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise AttackError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def student_settings(self) -> StudentSettings:
        return self.students


REFERENCE: dict[str, Any] = {
    "student_lr": 0.1, "student_optimizer": "sgd", "student_weight_decay": 5e-4, "lr_schedule": "multistep",
    "generator_lr": 1e-4, "generator_betas": (0.9, 0.999), "student_steps": 5, "updates_per_batch": 1,
    "replay": 0, "latent_dim": 256, "disagreement": "logits", "students_in_generator_step": "eval",
    "generator_when_sampling": "eval", "generator_step_input": "preactivation", "hard_target": "one_hot",
    "generator_gain": 2.0, "ema_decay": 0.998, "balance_weight": 0.0, "generator_schedule": "students",
}
"""The Dual Student authors' settings (github.com/James-Beetham/dual_students, ``train.py``
defaults and ``run_cifar_ds.sh``), in this project's terms: ``--preset reference``."""
DualStudentSettings.PRESETS["reference"] = REFERENCE
DualStudentSettings.PRESETS["tuned"] = {}


class DualStudent(Attack):
    """Dual Student: two students and a generator that seeks their disagreement.

    Paper: J. Beetham, N. Kardan, A. Mian, M. Shah, "Dual Student Networks for
    Data-Free Model Stealing", ICLR 2023 (arXiv 2309.10058).

    Two students ``S1``, ``S2`` are trained alike on the victim's answers. The
    generator ``G`` is trained to maximise their disagreement (paper eq. 2)::

        L_G = -L1(S1(G(z)), S2(G(z)))

    which needs **no** victim query and no zeroth-order gradient: where the
    students disagree, at least one is wrong about the victim, so those images
    are informative. Each student minimises (eq. 1, soft labels, with the
    logits recovered from probabilities as in DFME)::

        L_S = L1(S_i(x), log V(x) - mean_k log V(x))

    or, with hard labels, ``CE(S_i(x), argmax V(x))``. One step is one generator
    update followed by ``student_steps`` student updates, each on a fresh batch
    ``x = G(z)`` answered by the victim (``batch_size`` queries each). Students
    and generator use cosine learning-rate schedules over the budget; the clone
    is the moving average of ``S1``.

    Example::

        attack = DualStudent(DualStudentSettings(batch_size=256), victim.info, torch.device("cpu"))
        attack.run(victim, LoopConfig(budget=100_000), RunDirectory(Path("runs/ds")))
    """

    name = "dual-student"
    settings_type = DualStudentSettings

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        super().__init__(settings, info, device)
        assert isinstance(settings, DualStudentSettings)
        self.s: DualStudentSettings = settings
        self.students = Students(info, 2, settings.students, device, settings.memory_format)
        self.gen = GeneratorTrainer(
            info, settings.generator, device,
            settings.students.schedule if settings.generator_schedule == "students" else "constant",
            memory_format=settings.memory_format,
        )
        self.track_students(self.students)
        self.track("generator", self.gen.generator)
        self.track("generator_optimizer", self.gen.optimizer)
        # Diagnostics only (not checkpointed: after a resume they start afresh).
        self.first_answers = ReplayMemory(PROBE)
        self.last_answers = ReplayMemory(PROBE)
        # Its own random numbers: measuring must not move the run's.
        self.all_answers = ReplayMemory(PROBE, "reservoir", torch.Generator().manual_seed(0))
        self.answer_counts = torch.zeros(info.num_classes, dtype=torch.long)
        # The victim's answers since the last dead-start check (``generator_restart``).
        self.window_counts = torch.zeros(info.num_classes, dtype=torch.long)
        self.generator_restarts = 0

    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        self.students.schedule(self.progress)
        self.gen.schedule(self.progress)
        first, second = self.students.members
        eval_students = self.s.students_in_generator_step == "eval"
        first.train(not eval_students)
        second.train(not eval_students)
        self.gen.generator.train()
        # Generator: maximise the students' disagreement (no victim query).
        with frozen(first, second):
            if self.s.generator_step_input == "preactivation":  # the authors' code
                points = self.gen.points(self.s.batch_size)
                images = 0.5 + 0.5 * points / max(self.s.generator.gain, 1e-12)
            else:
                images = self.gen.images(self.s.batch_size)
            logits = first(images)
            generator_loss = disagreement_loss(logits, second(images), self.s.disagreement == "probabilities")
            if self.s.balance_weight > 0:
                generator_loss = generator_loss + self.s.balance_weight * class_balance_loss(logits)
            if self.s.shape_confidence > 0:  # query shaping against the MSP detectors (issue #38)
                generator_loss = generator_loss + self.s.shape_confidence * confidence_shortfall(logits)
            self.gen.update(generator_loss)
        first.train()
        second.train()
        # Students: match the victim on fresh generated images.
        student_loss = 0.0
        steps = 0
        for _ in range(self.s.student_steps):
            count = victim.affordable(self.s.batch_size)
            if count == 0:
                break
            images = self.gen.sample(count, eval_mode=self.s.generator_when_sampling == "eval")
            answers = victim.query(images.cpu())
            self._remember(images, answers)
            targets = self._targets(answers).to(self.device)
            student_loss += self.students.train_step(images, targets)
            steps += 1
        self._restart_if_dead()
        return {"generator": float(generator_loss.detach()), "student": student_loss / max(1, steps)}

    def _restart_if_dead(self) -> None:
        """Draw the generator afresh when one class took >= 99.9 % of the last ``generator_restart`` answers."""
        if self.s.generator_restart == 0 or int(self.window_counts.sum()) < self.s.generator_restart:
            return
        if int(self.window_counts.max()) >= DEAD_START_SHARE * int(self.window_counts.sum()):
            fresh = make_generator(self.info, self.s.generator, self.device)
            self.gen.generator.load_state_dict(fresh.state_dict())
            self.gen.optimizer.state.clear()
            self.generator_restarts += 1
        self.window_counts.zero_()

    def _targets(self, answers: torch.Tensor) -> torch.Tensor:
        """Training targets; ``hard_target="one_hot"`` turns labels into one-hot vectors (the authors')."""
        targets = victim_targets(answers, self.hard_label)
        if self.hard_label and self.s.hard_target == "one_hot":
            return F.one_hot(targets, self.info.num_classes).float()
        return targets

    def clone(self) -> nn.Module:
        return self.students.clone(0).eval()

    def _remember(self, images: torch.Tensor, answers: torch.Tensor) -> None:
        labels = answers if answers.dim() == 1 else answers.argmax(dim=1)
        labels = labels.long().cpu()
        counts = torch.bincount(labels, minlength=self.info.num_classes)
        self.answer_counts += counts
        self.window_counts += counts
        room = PROBE - self.first_answers.filled
        if room > 0:
            self.first_answers.add(images[:room].cpu(), labels[:room])
        self.last_answers.add(images.cpu(), labels)
        self.all_answers.add(images.cpu(), labels)

    def diagnostics(self, evaluator: Evaluates) -> dict[str, float]:
        """What tells a late decline's cause apart, at each evaluation (no victim queries).

        - ``student_disagreement``: the two averaged students' arg-max disagree, on the
          evaluation split; ``second_fidelity``: the second student's fidelity there.
        - ``first_agreement`` / ``last_agreement`` / ``all_agreement``: the clone's agreement
          with the victim's labels on the run's first / last 2,048 answered queries and on
          2,048 drawn uniformly from all of them (forgetting shows as the first and the
          uniform sample falling while the last holds).
        - ``answer_entropy`` (``log K`` = 1) and ``answer_top_share``: the class histogram of
          the victim's answers since the previous evaluation (``answer_share_<k>`` per class).
        - ``generator_restarts`` (with ``generator_restart``): generators drawn afresh so far
          (counted from the start of this process: a resumed run counts again from 0).
        - ``generator_spread``: RMS pixel distance between pairs of 256 generated images;
          ``generator_class_entropy``: the clone's class histogram on them (1 = uniform).
        """
        from attacker.evaluation import Evaluator, predict_labels

        result: dict[str, float] = {}
        clone, second = self.students.clone(0), self.students.clone(1)
        if isinstance(evaluator, Evaluator):
            first_labels = predict_labels(clone, evaluator.images)
            second_labels = predict_labels(second, evaluator.images)
            result["student_disagreement"] = float((first_labels != second_labels).float().mean())
            result["second_fidelity"] = float((second_labels == evaluator.victim_labels()).float().mean())
        for name, memory in (("first", self.first_answers), ("last", self.last_answers), ("all", self.all_answers)):
            if memory.filled > 0:
                images, labels = memory.stored()
                result[f"{name}_agreement"] = float((predict_labels(clone, images) == labels).float().mean())
        total = int(self.answer_counts.sum())
        if total > 0:
            shares = self.answer_counts.double() / total
            result["answer_entropy"] = normalised_entropy(shares)
            result["answer_top_share"] = float(shares.max())
            result.update({f"answer_share_{k}": float(share) for k, share in enumerate(shares)})
            self.answer_counts.zero_()
        result.update(self._generator_diagnostics(clone))
        if self.s.generator_restart > 0:
            result["generator_restarts"] = float(self.generator_restarts)
        return result

    @torch.no_grad()
    def _generator_diagnostics(self, clone: nn.Module, count: int = 256) -> dict[str, float]:
        """Generator spread and class entropy, leaving the RNG and the batch-norm statistics as they were."""
        from attacker.evaluation import predict_labels

        buffers = [b.clone() for b in self.gen.generator.buffers()]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            images = self.gen.sample(count, eval_mode=self.s.generator_when_sampling == "eval")
        for saved, buffer in zip(buffers, self.gen.generator.buffers(), strict=True):
            buffer.copy_(saved)
        flat = images.flatten(1).float().cpu()
        pairs = torch.cdist(flat, flat).pow(2) / flat.shape[1]
        spread = float(pairs.sum() / (count * (count - 1))) ** 0.5
        classes = torch.bincount(predict_labels(clone, images), minlength=self.info.num_classes).double()
        return {"generator_spread": spread, "generator_class_entropy": normalised_entropy(classes / count)}


def normalised_entropy(shares: torch.Tensor) -> float:
    """Entropy of a class histogram (shares summing to 1) over ``log K``: 1 when uniform, 0 on one class."""
    nonzero = shares[shares > 0]
    return float(-(nonzero * nonzero.log()).sum() / torch.log(torch.tensor(float(len(shares)))))
