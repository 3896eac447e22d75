"""Training effort, a setting of the shared loop: ``updates_per_batch`` clone updates per answered batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from attacker.attacks import build_attack, make_settings
from attacker.loop import LoopConfig
from attacker.rundir import RunDirectory
from attacker.students import Students, StudentSettings
from attacker.victims import InProcessVictim, VictimInfo
from stealsim.errors import AttackError

DIGITS = VictimInfo(input_shape=(1, 8, 8), num_classes=10, max_images_per_request=512)


class CountingVictim:
    """The in-process victim, counting requests."""

    def __init__(self, victim: InProcessVictim) -> None:
        self.inner = victim
        self.info = victim.info
        self.requests = 0

    def query(self, images: Tensor) -> Tensor:
        self.requests += 1
        return self.inner.query(images)


@pytest.mark.parametrize("updates", [1, 3])
@pytest.mark.parametrize("replay", [0, 500])
def test_students_take_the_set_number_of_updates_per_batch(updates: int, replay: int) -> None:
    torch.manual_seed(0)
    settings = StudentSettings(width=8, replay=replay, updates_per_batch=updates)
    students = Students(DIGITS, 2, settings, torch.device("cpu"))
    before = [p.detach().clone() for p in students.members[0].parameters()]
    for _ in range(4):
        students.train_step(torch.rand(32, 1, 8, 8), torch.randn(32, 10))
    assert students.updates == 4 * updates
    assert any(not torch.equal(a, b) for a, b in zip(before, students.members[0].parameters(), strict=True))
    # The replay memory holds each fresh batch once, however many updates replay it.
    assert students.memory.filled == (min(replay, 4 * 32) if replay else 0)


@pytest.mark.parametrize("name", ["random", "dual-student", "dfme"])
def test_the_loop_follows_updates_per_batch(name: str, digits_checkpoint: Path, tmp_path: Path) -> None:
    """Every answered batch gets exactly ``updates_per_batch`` student updates, whatever the attack."""
    torch.set_num_threads(1)
    counts = {}
    for updates in (1, 4):
        victim = CountingVictim(InProcessVictim.from_checkpoint(digits_checkpoint))
        extra = {} if name == "random" else {"generator_width": 8, "latent_dim": 16}
        attack = build_attack(name, victim.info, torch.device("cpu"), student_width=8, batch_size=64,
                              updates_per_batch=updates, **extra)
        out = tmp_path / f"{name}{updates}"
        out.mkdir()
        attack.run(victim, LoopConfig(budget=640, show_progress=False), RunDirectory(out))
        counts[updates] = attack.students.updates  # type: ignore[attr-defined]
        if name != "dfme":  # every request is a student batch (DFME's generator steps query too)
            assert counts[updates] == updates * victim.requests
    assert counts[4] == 4 * counts[1] > 0


def test_knockoff_reads_the_shared_setting() -> None:
    assert make_settings("knockoff").student_settings().updates_per_batch == 16
    assert make_settings("knockoff", updates_per_batch=3).student_settings().updates_per_batch == 3
    assert make_settings("dfme").student_settings().updates_per_batch == 4  # chosen on mnist5k validation (docs/results/updates-per-batch.md)
    assert make_settings("dual-student").student_settings().updates_per_batch == 4


def test_updates_per_batch_must_be_positive() -> None:
    with pytest.raises(AttackError, match="invalid attack settings"):
        make_settings("random", updates_per_batch=0)


@pytest.mark.parametrize("name", ["dual-student", "dfme", "random", "ensemble"])
def test_label_smoothing_reaches_the_clones_loss(name: str) -> None:
    attack = build_attack(name, DIGITS, torch.device("cpu"), hard_label=True, label_smoothing=0.1)
    trained = attack.uq.settings.students if name == "ensemble" else attack.students.settings  # type: ignore[attr-defined]
    assert trained.label_smoothing == 0.1
    assert make_settings(name).student_settings().label_smoothing == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_outside_zero_one_is_refused_by_name(value: float) -> None:
    with pytest.raises(AttackError, match="label_smoothing must be in"):
        make_settings("dual-student", label_smoothing=value)


def test_knockoff_smooths_its_label_cross_entropy() -> None:
    attack = build_attack("knockoff", DIGITS, torch.device("cpu"), hard_label=True, label_smoothing=0.2)
    logits = torch.tensor([[1.0, -2.0, 0.5] + [0.0] * 7])
    labels = torch.tensor([2])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    assert attack._loss(logits, labels).item() == pytest.approx(expected.item())  # type: ignore[attr-defined]
    assert attack._loss(logits, labels).item() != pytest.approx(  # type: ignore[attr-defined]
        torch.nn.functional.cross_entropy(logits, labels).item())
