"""Dual Student's diagnostics (what tells a late decline's cause apart): the class histogram
of the victim's answers, agreement on the first and last answered queries, the generator's
spread, on real steps against a fixed function; and that measuring changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attacker.attacks import build_attack
from attacker.attacks.dual_student import DualStudent, normalised_entropy
from attacker.victims import BudgetedVictim, FunctionVictim, VictimInfo

DIGITS = VictimInfo(input_shape=(1, 8, 8), num_classes=10, max_images_per_request=512)
SMALL = {"batch_size": 32, "student_width": 8, "generator_width": 8}


def answers(images: Tensor) -> Tensor:
    return torch.softmax(images.flatten(1)[:, :10] * 5, dim=1)


def fresh_attack() -> DualStudent:
    torch.manual_seed(0)
    attack = build_attack("dual-student", DIGITS, torch.device("cpu"), **SMALL)
    assert isinstance(attack, DualStudent)
    return attack


def test_normalised_entropy_of_fixed_histograms() -> None:
    assert normalised_entropy(torch.full((10,), 0.1)) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([1.0] + [0.0] * 9)) == pytest.approx(0.0)
    assert normalised_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.5)


def test_diagnostics_measure_the_answers_since_the_last_evaluation() -> None:
    attack = fresh_attack()
    victim = BudgetedVictim(FunctionVictim(answers, DIGITS), budget=10_000)
    seen: list[Tensor] = []
    original = victim.query

    def recording(images: Tensor) -> Tensor:
        out = original(images)
        seen.append(out.argmax(1))
        return out

    victim.query = recording  # type: ignore[method-assign]
    for _ in range(2):
        attack.step(victim)
    result = attack.diagnostics(evaluator=None)  # type: ignore[arg-type]
    labels = torch.cat(seen)
    shares = torch.bincount(labels, minlength=10).double() / len(labels)
    assert [result[f"answer_share_{k}"] for k in range(10)] == pytest.approx(shares.tolist())
    assert result["answer_top_share"] == pytest.approx(float(shares.max()))
    assert result["answer_entropy"] == pytest.approx(normalised_entropy(shares))
    # Fewer answers than the probe: the first and the last answered queries are the same set.
    assert result["first_agreement"] == result["last_agreement"] == result["all_agreement"]
    assert 0.0 <= result["first_agreement"] <= 1.0
    assert 0.0 < result["generator_spread"] < 1.0 and 0.0 <= result["generator_class_entropy"] <= 1.0
    assert "answer_entropy" not in attack.diagnostics(evaluator=None)  # type: ignore[arg-type]  # nothing new


def test_measuring_leaves_the_run_unchanged() -> None:
    def run(measure: bool) -> DualStudent:  # one after the other: the steps share torch's RNG
        attack = fresh_attack()
        victim = BudgetedVictim(FunctionVictim(answers, DIGITS), budget=10_000)
        attack.step(victim)
        if measure:
            buffers = [b.clone() for b in attack.gen.generator.buffers()]
            attack.diagnostics(evaluator=None)  # type: ignore[arg-type]
            assert all(torch.equal(a, b) for a, b in zip(buffers, attack.gen.generator.buffers(), strict=True))
        attack.step(victim)
        return attack

    measured, plain = run(measure=True), run(measure=False)
    for a, b in zip(measured.clone().parameters(), plain.clone().parameters(), strict=True):
        assert torch.equal(a, b)
