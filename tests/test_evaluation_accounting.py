"""The evaluation's PGD (untargeted and targeted) on a linear model whose answers are known,
its transfer rates and query plan on a tiny dataset, and the plan of whole in-process runs
against what they actually spent (the HTTP refusals are in test_attack_http.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from attacker.evaluation import EvalConfig, Evaluator, pgd_linf
from attacker.loop import LoopConfig
from attacker.runner import RunSpec, run_attack, transfer_evaluations
from attacker.victims import BudgetedVictim, InProcessVictim, VictimInfo
from stealsim.data import Dataset, load_dataset
from stealsim.errors import AttackError

# logits = W x + b on two pixels: class 1 grows with pixel 0, class 2 with pixel 1.
WEIGHT = [[0.0, 0.0], [4.0, 0.0], [0.0, 2.0]]
BIAS = [3.0, 0.0, 0.0]


def linear_model() -> nn.Module:
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(WEIGHT))
        linear.bias.copy_(torch.tensor(BIAS))
    return nn.Sequential(nn.Flatten(), linear).eval()


def pixels(*points: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(points).reshape(len(points), 1, 1, 2)


def test_pgd_on_a_linear_model_moves_where_the_gradient_sign_says() -> None:
    # From y = 0 the untargeted gradient of CE is sum_k p_k w_k - w_0 = (4 p1, 2 p2): sign (+, +).
    # Towards target 1 the descent direction is -(sum_k p_k w_k - w_1) = (4 (1 - p1), -2 p2): (+, -).
    # 20 steps of 2.5 eps / 20 cross the whole ball, so PGD ends on its corner whatever the start.
    model = linear_model()
    images, labels = pixels((0.5, 0.5), (0.95, 0.02)), torch.tensor([0, 0])
    generator = torch.Generator().manual_seed(0)
    untargeted = pgd_linf(model, images, labels, 0.1, steps=20, generator=generator)
    targeted = pgd_linf(model, images, labels, 0.1, steps=20, generator=generator, targets=torch.tensor([1, 1]))
    torch.testing.assert_close(untargeted, pixels((0.6, 0.6), (1.0, 0.12)))
    torch.testing.assert_close(targeted, pixels((0.6, 0.4), (1.0, 0.0)))  # kept within [0, 1]


def tiny_dataset() -> Dataset:
    # A: label 0, answered 0 (logits 3, 2, 1); B: label 1, answered 1 (3, 3.6, 1);
    # C: label 2 but answered 0: not in the transfer set.
    x = pixels((0.5, 0.5), (0.9, 0.5), (0.5, 0.5))
    y = torch.tensor([0, 1, 2])
    return Dataset("tiny", x, y, x[:2], y[:2], x, y, ("a", "b", "c"))


def test_transfer_rates_count_untargeted_and_targeted_success_per_epsilon() -> None:
    model = linear_model()
    info = VictimInfo(input_shape=(1, 1, 2), num_classes=3)
    metered = BudgetedVictim(InProcessVictim(model, info), None)
    evaluator = Evaluator(tiny_dataset(), metered, EvalConfig(transfer_epsilons=(0.3, 0.2)))
    plan = evaluator.plan(1)
    assert not plan.exact and plan.split_images == 3
    assert plan.transfer_per_evaluation == 3 * 2 * 2  # bounded by the split before its labels are known
    rates = evaluator.transfer_rates(model)
    assert metered.used == 3 + 2 * 2 * 2  # the split once, 2 correct images x 2 epsilons x 2 modes
    assert rates.epsilons == (0.2, 0.3) and rates.samples == 2
    # eps 0.2: A -> (0.7, 0.7) answers 0 (fails); B -> (0.7, 0.7) answers 0 (untargeted success,
    # target 2 missed). eps 0.3: A -> (0.8, 0.8) answers 1; targeted A -> (0.8, 0.2) answers 1 = its
    # target; B -> (0.6, 0.8) answers 0, not its target 2.
    assert rates.untargeted == (0.5, 1.0)
    assert rates.targeted == (0.0, 0.5)
    assert rates.metrics("transfer") == {
        "transfer_untargeted@0.2": 0.5, "transfer_targeted@0.2": 0.0,
        "transfer_untargeted@0.3": 1.0, "transfer_targeted@0.3": 0.5,
    }
    exact = evaluator.plan(2)
    assert exact.exact and exact.split_images == 0 and exact.transfer_per_evaluation == 8
    assert exact.total == 2 * 8 + 8  # two transfer evaluations and the reference's once


def test_eval_config_refuses_bad_values() -> None:
    with pytest.raises(AttackError, match="split"):
        EvalConfig(split="train")  # type: ignore[arg-type]
    with pytest.raises(AttackError, match="not both"):
        EvalConfig(transfer_epsilon=0.1, transfer_epsilons=(0.1,))
    with pytest.raises(AttackError, match=r"\(0, 1\]"):
        EvalConfig(transfer_epsilons=(0.1, 0.0))
    assert EvalConfig(transfer_epsilon=0.3).epsilons((1, 8, 8)) == (0.3,)  # the older single-value form
    assert EvalConfig(transfer_epsilons=(0.2, 0.1, 0.2)).epsilons((1, 8, 8)) == (0.1, 0.2)


def test_transfer_evaluations_ahead_of_a_run() -> None:
    config = LoopConfig(budget=600, eval_every=200)
    assert transfer_evaluations(config, 0, every_eval=False) == 1  # the final one only
    assert transfer_evaluations(config, 0, every_eval=True) == 3  # at 200, 400, and the final one
    assert transfer_evaluations(config, 450, every_eval=True) == 1  # resumed past the last multiple
    assert transfer_evaluations(LoopConfig(budget=601, eval_every=200), 199, every_eval=True) == 4


@pytest.mark.parametrize(("split", "every_eval"), [("test", True), ("validation", False)])
def test_planned_evaluation_queries_equal_those_spent(
    split: str, every_eval: bool, digits_checkpoint: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    samples = 10
    out = tmp_path / "run"
    metrics = run_attack(RunSpec(
        attack="random", out=out, budget=600, victim_checkpoint=digits_checkpoint, eval_every=200,
        show_progress=False, settings={"batch_size": 100, "steps_per_call": 1, "student_width": 8},
        evaluation=EvalConfig(split=split, transfer_samples=samples, reference_epochs=1,  # type: ignore[arg-type]
                              transfer_every_eval=every_eval),
    ))
    data = load_dataset("digits")
    images = len(data.split(split)[1])
    per_transfer = samples * 3 * 2
    # one batch of 100 per step: evaluations at 200 and 400 exactly, then the final one (a step
    # spanning several multiples of eval_every evaluates once: the plan is an upper bound)
    evaluations = 3 if every_eval else 1
    assert metrics["eval_queries"] == images + evaluations * per_transfer + per_transfer
    assert metrics["planned_eval_queries"] == metrics["eval_queries"]
    assert metrics["eval_split"] == split and metrics["transfer_epsilons"] == [0.125, 0.175, 0.225]
    config = json.loads((out / "config.json").read_text())
    assert config["eval_split"] == split and config["evaluation"]["split"] == split
    assert (out / f"victim_{split}_labels.pt").is_file()
    assert sorted(path.name for path in out.glob("victim_*_labels.pt")) == [f"victim_{split}_labels.pt"]
    assert metrics["transfer_success_rate"] == metrics["transfer_untargeted@0.175"]
    assert "reference_transfer_targeted@0.225" in metrics


def test_cli_refuses_bad_evaluation_flags(digits_checkpoint: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    base = ["attack", "random", "--victim-checkpoint", str(digits_checkpoint), "--budget", "10"]
    runner = CliRunner()
    for flags, message in (
        (["--transfer-epsilons", "0.1,big"], "--transfer-epsilons"),
        (["--transfer-epsilons", "0.1", "--transfer-epsilon", "0.2"], "not both"),
        (["--eval-split", "train"], "--eval-split"),
    ):
        out = tmp_path / "x"
        result = runner.invoke(app, [*base, "--out", str(out), *flags])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not out.exists()
