"""Dual Student's ``reference`` preset (the authors' code's settings) and the settings it
switches, each checked on what it does to one real step: optimiser, schedule, batch-norm
modes, what the students see in the generator step, hard-label targets."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attacker.attacks import build_attack, flat_settings, make_settings
from attacker.attacks.dual_student import REFERENCE, DualStudent, DualStudentSettings
from attacker.students import multistep_factor
from attacker.victims import BudgetedVictim, FunctionVictim, VictimInfo
from stealsim.errors import AttackError

DIGITS = VictimInfo(input_shape=(1, 8, 8), num_classes=10, max_images_per_request=512)
SMALL = {"batch_size": 32, "student_width": 8, "generator_width": 8}


def answers(images: Tensor) -> Tensor:
    """A fixed function of the images, as probabilities."""
    return torch.softmax(images.flatten(1)[:, :10] * 5, dim=1)


def test_the_preset_holds_the_authors_settings_and_overrides_win() -> None:
    reference = make_settings("dual-student", preset="reference")
    assert isinstance(reference, DualStudentSettings)
    for name, value in REFERENCE.items():
        assert flat_settings(reference)[name] == value, name
    assert reference.preset == "reference"
    assert make_settings("dual-student", preset="reference", student_lr=0.3).student_settings().learning_rate == 0.3
    tuned = make_settings("dual-student")
    assert isinstance(tuned, DualStudentSettings)
    assert (tuned.preset, tuned.students.optimizer, tuned.students.schedule) == ("tuned", "adam", "cosine")
    with pytest.raises(AttackError, match="no preset 'paper'"):
        make_settings("dual-student", preset="paper")
    with pytest.raises(AttackError, match="has no setting"):
        make_settings("knockoff", preset="reference")
    with pytest.raises(AttackError, match="lr_schedule must be one of"):
        make_settings("dual-student", lr_schedule="linear")


def test_multistep_schedule_on_fixed_fractions() -> None:
    steps = (0.1, 0.3, 0.5)
    assert [multistep_factor(p, steps, 0.3) for p in (0.0, 0.099, 0.1, 0.35, 0.9)] == pytest.approx(
        [1.0, 1.0, 0.3, 0.09, 0.027])


def test_reference_students_train_with_sgd_on_steps() -> None:
    attack = build_attack("dual-student", DIGITS, torch.device("cpu"), preset="reference", **SMALL)
    assert isinstance(attack, DualStudent)
    optimizer = attack.students.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 5e-4
    attack.students.schedule(0.35)
    attack.gen.schedule(0.35)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.09)
    assert attack.gen.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.09)
    assert attack.gen.optimizer.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("lr_schedule", ["cosine", "multistep"])
def test_a_constant_generator_schedule_leaves_the_students_decaying(lr_schedule: str) -> None:
    follows = build_attack("dual-student", DIGITS, torch.device("cpu"), lr_schedule=lr_schedule, **SMALL)
    constant = build_attack("dual-student", DIGITS, torch.device("cpu"), lr_schedule=lr_schedule,
                            generator_schedule="constant", **SMALL)
    assert isinstance(follows, DualStudent) and isinstance(constant, DualStudent)
    for attack in (follows, constant):
        attack.students.schedule(0.8)
        attack.gen.schedule(0.8)
    student_lr = follows.students.optimizers[0].param_groups[0]["lr"]
    assert student_lr < 0.5 * 2e-3
    assert constant.students.optimizers[0].param_groups[0]["lr"] == pytest.approx(student_lr)
    assert follows.gen.optimizer.param_groups[0]["lr"] < 0.5 * 1e-3
    assert constant.gen.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(AttackError, match="generator_schedule must be one of"):
        make_settings("dual-student", generator_schedule="cosine")


@pytest.mark.parametrize("preset", ["tuned", "reference"])
def test_modes_and_inputs_of_one_step(preset: str) -> None:
    torch.manual_seed(0)
    attack = build_attack("dual-student", DIGITS, torch.device("cpu"), preset=preset, **SMALL)
    assert isinstance(attack, DualStudent)
    seen: list[tuple[bool, bool, float, float]] = []  # (training, grad enabled, min, max) per student forward
    generator_modes: list[tuple[bool, bool]] = []  # (training, grad enabled) per generator forward
    attack.students.members[0].register_forward_pre_hook(
        lambda module, inputs: seen.append((module.training, torch.is_grad_enabled(),
                                            float(inputs[0].detach().min()), float(inputs[0].detach().max()))))
    attack.gen.generator.body.register_forward_pre_hook(
        lambda module, inputs: generator_modes.append((module.training, torch.is_grad_enabled())))
    attack.step(BudgetedVictim(FunctionVictim(answers, DIGITS), budget=10_000))
    generator_step, student_steps = seen[0], seen[1:]
    reference = preset == "reference"
    assert generator_step[0] is (not reference)  # eval-mode students in the authors' generator step
    inside = generator_step[2] >= 0.0 and generator_step[3] <= 1.0
    assert inside is (not reference)  # the pre-activation is not squashed into [0, 1]
    assert all(training for training, *_ in student_steps)
    assert len(student_steps) == (5 if reference else 3 * 4)  # student steps x updates per batch
    sampling = [training for training, grad in generator_modes if not grad]
    assert sampling and all(training is (not reference) for training in sampling)


def test_one_hot_hard_targets() -> None:
    attack = build_attack("dual-student", DIGITS, torch.device("cpu"), preset="reference", hard_label=True, **SMALL)
    assert isinstance(attack, DualStudent)
    targets = attack._targets(torch.tensor([[0.1, 0.9] + [0.0] * 8, [0.7, 0.3] + [0.0] * 8]))
    assert targets.tolist() == [[0.0, 1.0] + [0.0] * 8, [1.0, 0.0] + [0.0] * 8]
    tuned = build_attack("dual-student", DIGITS, torch.device("cpu"), hard_label=True, **SMALL)
    assert isinstance(tuned, DualStudent)
    assert tuned._targets(torch.tensor([[0.1, 0.9] + [0.0] * 8])).tolist() == [1]
