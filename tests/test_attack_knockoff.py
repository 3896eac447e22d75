"""Knockoff Nets: surrogate data (datasets, image directories), random and adaptive sampling,
and the attack end to end against a real ``stealsim serve`` (probabilities and label-only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from server_support import ServerProcess, new_key
from test_attack_http import DIGITS_TEST, EVAL_COST, TINY_FLAGS, run_cli, usage

from attacker.attacks import build_attack
from attacker.evaluation import EvalConfig
from attacker.runner import RunSpec, run_attack
from attacker.surrogate import BanditSampler, RandomSampler, fit_images, load_surrogate
from attacker.victims import BudgetedVictim, InProcessVictim
from stealsim.errors import AttackError

TRANSFER = 20
TINY = {"student_width": 8, "batch_size": 64, "updates_per_batch": 2}


# -- surrogate data ---------------------------------------------------------------------------------


def test_surrogate_datasets_fit_the_victim_shape() -> None:
    small = load_surrogate("mnist5k", (1, 8, 8))
    assert small.images.shape[1:] == (1, 8, 8) and small.name == "mnist5k:train"
    assert float(small.images.min()) >= 0 and float(small.images.max()) <= 1
    large = load_surrogate(None, (1, 28, 28))  # default: the other built-in, digits
    assert large.name.startswith("digits") and large.images.shape[1:] == (1, 28, 28)
    assert len(load_surrogate("digits", (1, 8, 8), split="test")) == DIGITS_TEST
    colour = fit_images(torch.rand(2, 1, 8, 8), (3, 16, 16))
    assert colour.shape == (2, 3, 16, 16) and torch.equal(colour[:, 0], colour[:, 1])
    with pytest.raises(AttackError, match="neither a dataset"):
        load_surrogate("/no/such/place", (1, 8, 8))


def test_surrogate_image_directory_with_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for name, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    pool = load_surrogate(str(tmp_path), (1, 8, 8))
    assert pool.images.shape == (6, 1, 8, 8) and pool.class_names == ("cats", "dogs")
    assert pool.classes.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(pool.images[:3].max()) == 0.0 and float(pool.images[3:].min()) == 1.0


def test_random_sampler_draws_without_replacement() -> None:
    sampler = RandomSampler(10)
    first = sampler.draw(7)
    second = sampler.draw(3)
    assert sorted(torch.cat([first, second]).tolist()) == list(range(10))
    assert len(sampler.draw(15)) == 15  # reshuffles when spent


def test_bandit_update_is_the_gradient_bandit_rule() -> None:
    bandit = BanditSampler(torch.tensor([0, 1, 2, 3]), num_outputs=4, learning_rate=0.1)
    bandit.update(torch.tensor([2]), torch.tensor([1.0]))
    # pi uniform (1/4), baseline 0: H(2) += 0.1 * 1 * (1 - 1/4); others -= 0.1 * 1 * 1/4.
    assert bandit.preferences.tolist() == pytest.approx([-0.025, -0.025, 0.075, -0.025])
    assert bandit.baseline == pytest.approx(1.0)


def test_bandit_learns_the_rewarding_class() -> None:
    torch.manual_seed(0)
    classes = torch.arange(40) % 4
    bandit = BanditSampler(classes, num_outputs=4, learning_rate=0.2)
    for _ in range(50):
        picks, arms = bandit.draw(8)
        assert torch.equal(classes[picks], arms)  # each image comes from its arm's class
        bandit.update(arms, (arms == 3).float())
    assert int(bandit.policy().argmax()) == 3 and float(bandit.policy()[3]) > 0.5


def test_bandit_rewards_are_rescaled() -> None:
    bandit = BanditSampler(torch.arange(4), num_outputs=3)
    answers = torch.tensor([[1.0, 0.0, 0.0], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0]])
    rewards = bandit.rewards(answers, torch.tensor([0.0, 1.0, 2.0]))
    assert rewards.shape == (3,) and float(rewards.min()) >= 0 and float(rewards.max()) <= 3


# -- the attack ---------------------------------------------------------------------------------


def test_knockoff_learns_from_surrogate_digits(digits_checkpoint: Path, tmp_path: Path) -> None:
    """KD on mnist5k images shrunk to 8x8 steals the digits victim far above chance."""
    torch.set_num_threads(1)
    metrics = run_attack(RunSpec(
        attack="knockoff", out=tmp_path / "run", budget=1500, victim_checkpoint=digits_checkpoint,
        show_progress=False, settings={"batch_size": 100, "updates_per_batch": 8},
        evaluation=EvalConfig(transfer_samples=TRANSFER, reference_epochs=1),
    ))
    assert metrics["queries_used"] == 1500
    assert metrics["fidelity"] > 0.3  # chance is ~0.1


def test_adaptive_step_spends_one_batch_and_trains(digits_checkpoint: Path) -> None:
    victim = InProcessVictim.from_checkpoint(digits_checkpoint)
    attack = build_attack("knockoff", victim.info, torch.device("cpu"), sampling="adaptive", **TINY)
    metered = BudgetedVictim(victim, budget=1000)
    stats = attack.step(metered)
    assert metered.used == 64 and "reward" in stats and "student" in stats
    assert attack.transfer.filled == 64


@pytest.mark.parametrize(("sampling", "label_only"), [("random", False), ("adaptive", False), ("adaptive", True)])
def test_knockoff_over_http_within_budget(
    sampling: str, label_only: bool, victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 400
    policy = [{"name": "label_only"}] if label_only else None
    key = new_key(client, budget=budget + EVAL_COST, **({"policy": policy} if policy else {}))
    out = tmp_path / "run"
    if label_only:  # through the command line (its flags), the others in this process
        command = [sys.executable, "-m", "stealsim", "attack", "knockoff", "--url", victim_server.url,
                   "--api-key", key, "--budget", str(budget), "--out", str(out), "--eval-every", "200", *TINY_FLAGS,
                   "--sampling", sampling, "--surrogate", "mnist5k", "--set", "updates_per_batch=2"]
        result = run_cli(command)
        assert result.returncode == 0, result.stderr
    else:
        torch.set_num_threads(1)
        run_attack(RunSpec(
            attack="knockoff", out=out, budget=budget, url=victim_server.url, api_key=key, eval_every=200,
            show_progress=False, settings={**TINY, "sampling": sampling, "surrogate": "mnist5k"},
            evaluation=EvalConfig(transfer_samples=TRANSFER, reference_epochs=1),
        ))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == budget
    assert usage(victim_server, key)["used"] == budget + metrics["eval_queries"]
    assert metrics["server_count_matches"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["sampling"] == sampling
    assert config["victim_info"]["output_kind"] == ("label" if label_only else "probabilities")
    assert "fidelity" in metrics and "transfer_success_rate" in metrics
