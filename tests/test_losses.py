"""Nasty Teacher and KD losses on fixed tensors: values and gradient directions."""

from __future__ import annotations

import math

import torch

from defense.nasty_teacher import nasty_teacher_loss, settings_for
from stealsim.losses import kd_loss

TEACHER = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
ADVERSARY = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.0, 2.0]])
LABELS = torch.tensor([0, 2])


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum(dim=1).mean())


def test_nasty_loss_matches_the_formula() -> None:
    tau, omega = 4.0, 0.04
    p_teacher = torch.softmax(TEACHER / tau, dim=1)
    p_adversary = torch.softmax(ADVERSARY / tau, dim=1)
    cross_entropy = -float(torch.log_softmax(TEACHER, dim=1)[[0, 1], LABELS].mean())
    expected = cross_entropy - omega * tau**2 * _kl(p_teacher, p_adversary)
    actual = float(nasty_teacher_loss(TEACHER, ADVERSARY, LABELS, tau, omega))
    assert math.isclose(actual, expected, rel_tol=1e-5)


def test_nasty_loss_equals_cross_entropy_when_teacher_agrees_with_adversary() -> None:
    loss = nasty_teacher_loss(TEACHER, TEACHER.clone(), LABELS, tau=4.0, omega=1.0)
    assert math.isclose(float(loss), float(torch.nn.functional.cross_entropy(TEACHER, LABELS)), rel_tol=1e-6)


def test_a_gradient_step_on_the_nasty_term_moves_away_from_the_adversary() -> None:
    # With the CE term switched off (labels give zero weight via omega dominance), descending the
    # loss must increase KL(teacher || adversary): the sign that makes the teacher nasty.
    logits = TEACHER.clone().requires_grad_(True)
    loss = nasty_teacher_loss(logits, ADVERSARY, LABELS, tau=4.0, omega=10.0)
    loss.backward()
    assert logits.grad is not None
    stepped = (logits - 0.1 * logits.grad).detach()
    before = _kl(torch.softmax(TEACHER / 4, dim=1), torch.softmax(ADVERSARY / 4, dim=1))
    after = _kl(torch.softmax(stepped / 4, dim=1), torch.softmax(ADVERSARY / 4, dim=1))
    assert after > before


def test_with_omega_zero_the_gradient_is_the_cross_entropy_gradient() -> None:
    logits = TEACHER.clone().requires_grad_(True)
    nasty_teacher_loss(logits, ADVERSARY, LABELS, tau=4.0, omega=0.0).backward()
    expected = (torch.softmax(TEACHER, dim=1) - torch.eye(3)[LABELS]) / 2
    assert logits.grad is not None and torch.allclose(logits.grad, expected, atol=1e-6)


def test_kd_loss_matches_hinton_formula() -> None:
    alpha, temperature = 0.9, 4.0
    p_teacher = torch.softmax(ADVERSARY / temperature, dim=1)
    p_student = torch.softmax(TEACHER / temperature, dim=1)
    cross_entropy = float(torch.nn.functional.cross_entropy(TEACHER, LABELS))
    expected = alpha * temperature**2 * _kl(p_teacher, p_student) + (1 - alpha) * cross_entropy
    assert math.isclose(float(kd_loss(TEACHER, ADVERSARY, LABELS, alpha, temperature)), expected, rel_tol=1e-5)
    soft_only = temperature**2 * _kl(p_teacher, p_student)
    assert math.isclose(float(kd_loss(TEACHER, ADVERSARY, None, alpha, temperature)), soft_only, rel_tol=1e-5)


def test_nasty_settings_have_dataset_defaults_and_overrides() -> None:
    assert settings_for("cifar10").tau == 4.0 and settings_for("cifar10").omega == 0.04
    assert settings_for("digits", omega=0.5).omega == 0.5
    # Students distil at tau unless the dataset's protocol says otherwise; a new tau drops it.
    assert settings_for("cifar10").student_temperature == settings_for("cifar10").tau
    assert settings_for("digits", tau=6.0).student_temperature == 6.0
    mnist = settings_for("mnist5k")
    assert mnist.student_temperature == 2.0 and mnist.student_alpha == 0.5
    assert settings_for("mnist5k", tau=8.0).student_temperature == 8.0
    assert settings_for("mnist5k", omega=0.5).student_temperature == mnist.student_temperature
