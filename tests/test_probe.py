"""The probe before the evaluation split (attacker/probe.py): what it sends, when it stops a run,
and what its refusals say, on the real digits test split with victims whose answers are known."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from attacker.evaluation import EvalConfig, Evaluator
from attacker.probe import PROBE_IMAGES, accuracy_floor, checked_victim_labels
from attacker.victims import BudgetedVictim, FunctionVictim, VictimInfo
from stealsim.data import load_dataset
from stealsim.errors import AttackError, VictimAPIError

INFO = VictimInfo(input_shape=(1, 8, 8), num_classes=10)
DATA = load_dataset("digits")
IMAGES, LABELS = DATA.split("test")
TRUTH = {image.numpy().tobytes(): int(label) for image, label in zip(IMAGES, LABELS, strict=True)}


def oracle(shift: Callable[[int], int]) -> Callable[[Tensor], Tensor]:
    """A victim that answers ``shift(index in the split)`` classes off the true label (0: right)."""
    order = {image.numpy().tobytes(): index for index, image in enumerate(IMAGES)}

    def answer(images: Tensor) -> Tensor:
        keys = [image.numpy().tobytes() for image in images]
        labels = torch.tensor([(TRUTH[key] + shift(order[key])) % 10 for key in keys])
        return F.one_hot(labels, 10).float()

    return answer


def evaluator_of(function: Callable[[Tensor], Tensor]) -> tuple[Evaluator, BudgetedVictim]:
    metered = BudgetedVictim(FunctionVictim(function, INFO), None)
    return Evaluator(DATA, metered, EvalConfig()), metered


def test_the_floor_lies_between_chance_and_a_perfect_victim() -> None:
    assert accuracy_floor(10) == pytest.approx(0.325)
    assert accuracy_floor(2) == pytest.approx(0.625)
    assert accuracy_floor(100) == pytest.approx(0.01 + 0.99 / 4)


def test_a_good_victim_costs_no_query_beyond_the_split() -> None:
    evaluator, metered = evaluator_of(oracle(lambda index: 0))
    labels = checked_victim_labels(evaluator)
    assert labels.tolist() == LABELS.tolist()
    assert metered.used == len(LABELS) == 360  # the probe's 32 answers are kept, not asked again
    assert metered.requests == 2  # the probe, then the other 328


def test_a_victim_at_chance_stops_after_the_probe() -> None:
    evaluator, metered = evaluator_of(oracle(lambda index: 1))  # every answer one class off
    with pytest.raises(AttackError) as refused:
        checked_victim_labels(evaluator)
    message = str(refused.value)
    assert "answers 0 of the probe's 32 images correctly (accuracy 0.000; chance 0.100" in message
    assert "The check sent 32 images of the test split of digits" in message
    assert "the checkpoint is not trained for this task" in message  # in process: no wire to get wrong
    assert metered.used == PROBE_IMAGES == 32 and metered.requests == 1


def test_a_victim_at_chance_after_the_probe_stops_after_the_split() -> None:
    evaluator, metered = evaluator_of(oracle(lambda index: 0 if index < 40 else 1))
    with pytest.raises(AttackError, match="answers 40 of the 360 images of the test split correctly") as refused:
        checked_victim_labels(evaluator)
    assert "The check sent 360 images" in str(refused.value) and metered.used == 360


def test_an_answer_refused_in_the_probe_says_what_was_sent() -> None:
    def mismatched(images: Tensor) -> Tensor:
        raise VictimAPIError("the answer of model 'm' does not match its metadata: ...", status=200,
                             code="output_mismatch")

    evaluator, metered = evaluator_of(mismatched)
    with pytest.raises(VictimAPIError) as refused:
        checked_victim_labels(evaluator)
    assert refused.value.code == "output_mismatch" and refused.value.status == 200
    assert "(stopped in the probe: 32 images of the test split were sent, as evaluation queries" in str(refused.value)
    assert metered.used == 0  # answered images only: the refused answer is not counted
