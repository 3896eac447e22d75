"""The random-noise baseline: students trained on the victim's answers to uniform noise."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from attacker.loop import Attack, AttackSettings
from attacker.losses import victim_targets
from attacker.students import Students, StudentSettings
from attacker.victims import BudgetedVictim, VictimInfo
from stealsim.errors import AttackError

__all__ = ["RandomNoise", "RandomNoiseSettings"]


@dataclass(frozen=True)
class RandomNoiseSettings(AttackSettings):
    """Random noise's settings.

    Attributes:
        students: the student (:class:`~attacker.students.StudentSettings`), trained as well
            as its answers allow, with two defaults of its own:

            - ``updates_per_batch`` 4, chosen on the digits validation split at 150,000
              queries (fidelity 0.706 / 0.828 / 0.867 / 0.861 at 1 / 2 / 4 / 8 updates, seed 0,
              width 16): as many student updates per answered batch as Dual Student's two
              students take;
            - ``width`` 32 (16 for every other attack), a stronger baseline: on the digits
              validation split at 150,000 queries with 4 updates, fidelity 0.867 / 0.789
              (seeds 0 / 1) at width 16, 0.950 / 0.883 / 0.889 (seeds 0 / 1 / 2) at width 32.
              Dual Student's lead over it is measured against a clone of twice its width.
        steps_per_call: answered batches per loop step (amortises the loop's bookkeeping).
    """

    students: StudentSettings = field(default_factory=lambda: StudentSettings(width=32, updates_per_batch=4))
    steps_per_call: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps_per_call < 1:
            raise AttackError(f"invalid random-noise settings: {self}")

    def student_settings(self) -> StudentSettings:
        return self.students


class RandomNoise(Attack):
    """Random-noise stealing: query uniform pixels, distil the answers.

    The baseline every report shows next to a data-free attack (on easy inputs
    such as 8x8 digits it is strong). Each query image has i.i.d. pixels
    ``x ~ U[0, 1]``; the student is trained exactly as the Dual Student's
    students (same loss, optimiser, cosine schedule and moving average)::

        L_S = L1(S(x), log V(x) - mean_k log V(x))     (soft labels)
        L_S = CE(S(x), argmax V(x))                    (hard labels)

    Reference: the "random inputs" baseline of Tramèr et al., "Stealing Machine
    Learning Models via Prediction APIs" (USENIX Security 2016), and of the DFME
    and Dual Student papers.
    """

    name = "random"
    settings_type = RandomNoiseSettings

    def __init__(self, settings: AttackSettings, info: VictimInfo, device: torch.device) -> None:
        super().__init__(settings, info, device)
        assert isinstance(settings, RandomNoiseSettings)
        self.s: RandomNoiseSettings = settings
        self.students = Students(info, 1, settings.students, device, settings.memory_format)
        self.track_students(self.students)

    def step(self, victim: BudgetedVictim) -> dict[str, float]:
        self.students.schedule(self.progress)
        total, steps = 0.0, 0
        for _ in range(self.s.steps_per_call):
            count = victim.affordable(self.s.batch_size)
            if count == 0:
                break
            images = torch.rand(count, *self.info.input_shape)
            targets = victim_targets(victim.query(images), self.hard_label).to(self.device)
            total += self.students.train_step(images.to(self.device), targets)
            steps += 1
        return {"student": total / max(1, steps)}

    def clone(self) -> nn.Module:
        return self.students.clone(0).eval()
