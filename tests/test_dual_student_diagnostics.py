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


def one_class(images: Tensor) -> Tensor:
    """A victim that answers class 3 to every image: the dead start ``generator_restart`` detects."""
    return torch.nn.functional.one_hot(torch.full((len(images),), 3), 10).float()


def restarting_attack(window: int) -> DualStudent:
    torch.manual_seed(0)
    attack = build_attack("dual-student", DIGITS, torch.device("cpu"), hard_label=True, generator_restart=window, **SMALL)
    assert isinstance(attack, DualStudent)
    return attack


def test_a_dead_start_draws_a_fresh_generator_once_per_window() -> None:
    attack = restarting_attack(window=64)  # one step answers 3 batches of 32: 96 queries, past the window
    victim = BudgetedVictim(FunctionVictim(one_class, DIGITS), budget=10_000)
    before = [p.detach().clone() for p in attack.gen.generator.parameters()]
    attack.step(victim)
    assert attack.generator_restarts == 1
    assert int(attack.window_counts.sum()) == 0
    assert not attack.gen.optimizer.state  # Adam's moments start afresh with the generator
    # Not the generator that one Adam step would have made: drawn anew (its weights moved by more than a step).
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(before, attack.gen.generator.parameters(), strict=True))
    assert moved > 10 * attack.s.generator.learning_rate
    attack.step(victim)
    assert attack.generator_restarts == 2
    assert attack.diagnostics(evaluator=None)["generator_restarts"] == 2.0  # type: ignore[arg-type]
    assert victim.used == 6 * 32  # restarting spends no query


def test_varied_answers_or_the_default_never_restart() -> None:
    varied = restarting_attack(window=64)
    victim = BudgetedVictim(FunctionVictim(answers, DIGITS), budget=10_000)
    shares = []
    for _ in range(3):
        varied.step(victim)
        shares.append(float(varied.answer_counts.max()) / float(varied.answer_counts.sum()))
    assert max(shares) < 0.99 and varied.generator_restarts == 0
    def nearly_one_class(images: Tensor) -> Tensor:  # all but one image of each batch: 31/32 < 99.9 %
        labels = torch.full((len(images),), 3)
        labels[0] = 5
        return torch.nn.functional.one_hot(labels, 10).float()

    nearly = restarting_attack(window=64)
    nearly.step(BudgetedVictim(FunctionVictim(nearly_one_class, DIGITS), budget=10_000))
    assert nearly.generator_restarts == 0 and int(nearly.window_counts.sum()) == 0  # checked, not dead
    default = fresh_attack()
    assert default.s.generator_restart == 0
    default.step(BudgetedVictim(FunctionVictim(one_class, DIGITS), budget=10_000))
    assert default.generator_restarts == 0 and "generator_restarts" not in default.diagnostics(evaluator=None)  # type: ignore[arg-type]


def test_a_negative_restart_window_is_refused() -> None:
    from attacker.attacks import make_settings
    from stealsim.errors import AttackError

    with pytest.raises(AttackError, match=r"generator_restart must be 0 \(never\) or a number of queries per check, got -1"):
        make_settings("dual-student", generator_restart=-1)
