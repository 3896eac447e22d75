"""The attack loop's ``precision`` setting: bfloat16 autocast for the attacker's own forwards,
float32 for the victim, the losses, the weights and DFME's finite differences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from attacker.attacks import build_attack, make_settings
from attacker.loop import LoopConfig
from attacker.rundir import RunDirectory
from attacker.victims import BudgetedVictim, InProcessVictim
from stealsim.errors import AttackError

TINY = {"student_width": 8, "generator_width": 8, "batch_size": 64, "latent_dim": 16}


@pytest.fixture(scope="module")
def local_victim(digits_checkpoint: Path) -> InProcessVictim:
    return InProcessVictim.from_checkpoint(digits_checkpoint)


class RecordingVictim:
    """The in-process victim, recording the dtype of what it receives and whether autocast was on."""

    def __init__(self, victim: InProcessVictim) -> None:
        self.victim = victim
        self.info = victim.info
        self.seen: list[tuple[torch.dtype, bool]] = []

    def query(self, images: Tensor) -> Tensor:
        self.seen.append((images.dtype, torch.is_autocast_enabled("cpu")))
        return self.victim.query(images)


def record_conv_outputs(model: nn.Module, into: list[tuple[torch.dtype, bool]]) -> None:
    """Record (output dtype, grad enabled) of every forward of ``model``'s first convolution."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda _m, _i, output: into.append((output.dtype, torch.is_grad_enabled())))


def test_precision_is_checked() -> None:
    with pytest.raises(AttackError, match="precision must be one of float32, bfloat16, got 'float16'"):
        make_settings("dual-student", precision="float16")


@pytest.mark.parametrize("name", ["dual-student", "dfme", "random"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_students_compute_at_the_precision_and_the_victim_in_float32(
    name: str, precision: str, local_victim: InProcessVictim
) -> None:
    torch.manual_seed(0)
    extra = {} if name == "random" else {"generator_width": 8, "latent_dim": 16}
    settings = {k: v for k, v in TINY.items() if k in ("student_width", "batch_size")}
    attack = build_attack(name, local_victim.info, torch.device("cpu"), **settings, **extra, precision=precision)
    student = attack.students.members[0]  # type: ignore[attr-defined]
    forwards: list[tuple[torch.dtype, bool]] = []
    record_conv_outputs(student, forwards)
    victim = RecordingVictim(local_victim)
    metered = BudgetedVictim(victim, budget=10_000)
    attack.take_step(metered)

    # The victim gets float32 images with autocast off, however the attacker trains.
    assert victim.seen and all(seen == (torch.float32, False) for seen in victim.seen)
    training = {dtype for dtype, grad in forwards if grad}
    assert training == {torch.bfloat16 if precision == "bfloat16" else torch.float32}
    if name == "dfme":
        # The finite-difference forwards (no grad) stay float32 under bfloat16 autocast.
        assert {dtype for dtype, grad in forwards if not grad} == {torch.float32}
    # Master weights and what the replay memory keeps stay float32.
    assert all(p.dtype == torch.float32 for p in student.parameters())
    images, _ = attack.students.memory.stored()  # type: ignore[attr-defined]
    assert images.dtype == torch.float32


def test_a_bfloat16_run_spends_its_budget_with_finite_losses(local_victim: InProcessVictim, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    attack = build_attack("dual-student", local_victim.info, torch.device("cpu"), **TINY, precision="bfloat16")
    outcome = attack.run(local_victim, LoopConfig(budget=6_000, eval_every=3_000, show_progress=False),
                         RunDirectory(tmp_path))
    assert outcome.metrics["queries_used"] == 6_000
    losses = [line["loss_student"] for line in outcome.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    # The clone evaluates in float32 and answers finite logits.
    logits = attack.clone()(torch.rand(4, 1, 8, 8))
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


def test_bfloat16_training_follows_float32(local_victim: InProcessVictim) -> None:
    """The same seed trains to about the same student loss at either precision.

    Guards against stale weights: autocast caches each weight's bfloat16 copy for the
    whole autocast region, and one step holds several optimiser updates; with that cache
    every forward after the first update used the weights as they were before it (the
    student loss stayed about 1.5x that of float32 on mnist5k).
    """
    torch.set_num_threads(1)
    losses = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        attack = build_attack("dual-student", local_victim.info, torch.device("cpu"), **TINY,
                              updates_per_batch=4, precision=precision)
        metered = BudgetedVictim(local_victim, budget=None)
        losses[precision] = [attack.take_step(metered)["student"] for _ in range(6)]
    for float32, bfloat16 in zip(losses["float32"][1:], losses["bfloat16"][1:], strict=True):
        assert bfloat16 == pytest.approx(float32, rel=0.1), losses
