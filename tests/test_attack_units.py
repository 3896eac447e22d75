"""Attacker units: losses and the zeroth-order estimator on fixed tensors, the metered
victim, the shared loop (budget, resume) over every registered attack, evaluation, reports."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from attacker.attacks import ATTACKS, build_attack, flat_settings, make_settings, setting_keys
from attacker.evaluation import EvalConfig, Evaluator, default_epsilon, default_epsilons, pgd_linf
from attacker.loop import LoopConfig
from attacker.losses import (
    class_balance_loss,
    disagreement_loss,
    forward_difference_gradient,
    per_sample_student_loss,
    student_loss,
    unit_directions,
    victim_targets,
)
from attacker.replay import ReplayMemory
from attacker.report import queries_to_reach
from attacker.rundir import Ledger, RunDirectory
from attacker.runner import RunSpec, run_attack
from attacker.students import build_student, cosine_factor, default_clone_architecture
from attacker.victims import BudgetedVictim, FunctionVictim, InProcessVictim, VictimInfo
from experiments.report import compare_runs
from stealsim.data import load_dataset
from stealsim.errors import AttackError, BudgetExhaustedError

DIGITS = VictimInfo(input_shape=(1, 8, 8), num_classes=10, max_images_per_request=100)
TINY = {"student_width": 8, "generator_width": 8, "batch_size": 64, "latent_dim": 16}


def tiny_settings(name: str, **extra: object) -> dict[str, object]:
    settings = dict(TINY)
    if name in ("random", "knockoff", "art-knockoff", "art-copycat"):
        settings = {k: v for k, v in settings.items() if k not in ("generator_width", "latent_dim")}
    if name.startswith("art-"):
        settings["nb_epochs"] = 1
    return {**settings, **extra}


# -- losses on fixed tensors ----------------------------------------------------------------


def test_victim_targets_are_mean_centred_log_probabilities() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    targets = victim_targets(p, hard_label=False)
    logp = torch.log(p + 1e-8)
    torch.testing.assert_close(targets, logp - logp.mean(dim=1, keepdim=True))
    torch.testing.assert_close(targets.sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    assert victim_targets(p, hard_label=True).tolist() == [0, 2]
    assert victim_targets(torch.tensor([3, 1]), hard_label=False).tolist() == [3, 1]


def test_student_losses_match_their_formulas() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    soft = torch.tensor([[0.5, -1.0, 0.5], [1.0, 1.0, -2.0]])
    expected_l1 = (0.5 + 1.0 + 0.0 + 1.0 + 2.0 + 1.0) / 6
    assert student_loss(logits, soft).item() == pytest.approx(expected_l1)
    assert per_sample_student_loss(logits, soft).tolist() == pytest.approx([0.5, 4.0 / 3])
    labels = torch.tensor([0, 1])
    manual_ce = -(F.log_softmax(logits, dim=1)[torch.arange(2), labels]).mean()
    assert student_loss(logits, labels).item() == pytest.approx(manual_ce.item())
    kl = (F.softmax(soft, 1) * (F.log_softmax(soft, 1) - F.log_softmax(logits, 1))).sum(1).mean()
    assert student_loss(logits, soft, "kl").item() == pytest.approx(kl.item(), rel=1e-5)


def test_label_smoothing_spreads_eps_over_the_classes_of_label_targets_only() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    labels = torch.tensor([0, 1])
    eps, classes = 0.3, 3
    target = F.one_hot(labels, classes).float() * (1 - eps) + eps / classes
    manual = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert student_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(manual.item())
    assert student_loss(logits, labels, label_smoothing=eps).item() > student_loss(logits, labels).item()
    soft = torch.tensor([[0.5, -1.0, 0.5], [1.0, 1.0, -2.0]])
    assert student_loss(logits, soft, label_smoothing=eps).item() == student_loss(logits, soft).item()


def test_disagreement_and_class_balance() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert disagreement_loss(a, b).item() == pytest.approx(-(1 + 0 + 1 + 1) / 4)
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    assert disagreement_loss(a, b, probabilities=True).item() == pytest.approx(-(pa - pb).abs().mean().item())
    balanced = torch.eye(4) * 50  # each class predicted once, confidently
    collapsed = torch.zeros(4, 4)
    collapsed[:, 2] = 50
    assert class_balance_loss(balanced).item() == pytest.approx(0.0, abs=1e-5)
    assert class_balance_loss(collapsed).item() == pytest.approx(math.log(4), abs=1e-4)


def test_cosine_schedule_endpoints() -> None:
    assert cosine_factor(0.0, 0.1) == pytest.approx(1.0)
    assert cosine_factor(1.0, 0.1) == pytest.approx(0.1)
    assert cosine_factor(0.5, 0.0) == pytest.approx(0.5)


def test_default_clones_are_small_cnns_for_grayscale_and_resnets_for_colour() -> None:
    assert default_clone_architecture(1, 8) == "small-cnn"
    assert default_clone_architecture(1, 28) == "small-cnn"
    assert default_clone_architecture(3, 32) == "resnet18"
    student = build_student(VictimInfo((1, 28, 28), 10), make_settings("random").student_settings())
    assert student(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in student.parameters()) < 100_000  # small and fast on a CPU


def test_replay_memory_keeps_the_latest_answers_and_joins_replayed_ones() -> None:
    memory = ReplayMemory(4)
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    joined, targets = memory.add_and_join(images[:3], torch.arange(3))
    assert torch.equal(targets, torch.arange(3))  # nothing to replay yet
    memory.add(images[3:], torch.arange(3, 6))  # wraps: the oldest two are overwritten
    assert memory.filled == 4 and sorted(memory.state_dict()["targets"].tolist()) == [2, 3, 4, 5]
    joined, targets = memory.add_and_join(images[:2], torch.tensor([0, 1]))
    assert joined.shape[0] == 4 and set(targets[2:].tolist()) <= {2, 3, 4, 5}
    # A batch larger than the memory keeps its last entries; new target shapes start afresh.
    memory.add(torch.zeros(10, 1, 1, 1), torch.arange(10))
    assert sorted(memory.state_dict()["targets"].tolist()) == [6, 7, 8, 9]
    memory.add(torch.zeros(2, 1, 1, 1), torch.rand(2, 10))
    assert memory.filled == 2 and memory.sample(5)[1].shape == (2, 10)
    restored = ReplayMemory(4)
    restored.load_state_dict(memory.state_dict())
    assert restored.filled == 2 and torch.equal(restored.state_dict()["targets"], memory.state_dict()["targets"])



def test_reservoir_replay_keeps_a_uniform_sample_of_everything_added() -> None:
    torch.manual_seed(0)
    capacity, batches, batch = 100, 50, 40  # 2,000 items through a memory of 100
    counts = torch.zeros(batches)
    for _ in range(40):  # repeat: which batch each kept item came from
        memory = ReplayMemory(capacity, policy="reservoir")
        for b in range(batches):
            memory.add(torch.zeros(batch, 1, 1, 1), torch.full((batch,), b))
        assert memory.filled == capacity and memory.seen == batches * batch
        counts += torch.bincount(memory.stored()[1], minlength=batches).float()
    # Uniform: every batch keeps about capacity / batches = 2 items per memory, the first as
    # the last (a ring would keep only the last 2.5 batches).
    first_half, second_half = counts[: batches // 2].sum(), counts[batches // 2:].sum()
    assert abs(float(first_half - second_half)) / float(counts.sum()) < 0.1
    assert float(counts[:5].sum()) > 0.5 * 40 * capacity * 5 / batches
    restored = ReplayMemory(capacity, policy="reservoir")
    restored.load_state_dict(memory.state_dict())
    assert restored.seen == memory.seen and torch.equal(restored.stored()[1], memory.stored()[1])
    with pytest.raises(ValueError, match="replay policy"):
        ReplayMemory(4, policy="fifo")  # type: ignore[arg-type]


def test_ring_replay_forgets_what_a_reservoir_keeps() -> None:
    torch.manual_seed(0)
    ring, reservoir = ReplayMemory(10, "ring"), ReplayMemory(10, "reservoir")
    for b in range(20):
        for memory in (ring, reservoir):
            memory.add(torch.zeros(5, 1, 1, 1), torch.full((5,), b))
    assert set(ring.stored()[1].tolist()) == {18, 19}
    assert min(reservoir.stored()[1].tolist()) < 18

# -- the zeroth-order estimator ----------------------------------------------------------------


def smooth(points: Tensor) -> Tensor:
    """A smooth per-sample function of [B, 1, 2, 2] points."""
    flat = points.flatten(1)
    weights = torch.arange(1, flat.shape[1] + 1, dtype=flat.dtype)
    return (torch.sin(flat) * weights).sum(1) + 0.5 * (flat**2).sum(1)


def test_forward_difference_with_basis_directions_is_the_finite_difference_gradient() -> None:
    x = torch.tensor([[[[0.1, -0.4], [0.7, 0.2]]], [[[1.0, 0.0], [-0.3, 0.5]]]], dtype=torch.float64)
    d = 4
    basis = torch.eye(d, dtype=torch.float64).view(1, d, 1, 2, 2).expand(2, d, 1, 2, 2)
    calls: list[int] = []

    def counted(points: Tensor) -> Tensor:
        calls.append(points.shape[0])
        return smooth(points)

    gradient, values = forward_difference_gradient(counted, x, basis, epsilon=1e-6)
    exact = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(smooth(exact).sum(), exact)
    # (d / m) * sum_j slope_j e_j with m = d: exactly the forward-difference gradient.
    torch.testing.assert_close(gradient, autograd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, smooth(x))
    assert calls == [2 * (d + 1)], "one call on all N * (m + 1) points"


def test_forward_difference_with_random_directions_estimates_the_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    m = 20000
    directions = unit_directions(3 * m, (1, 2, 2)).double().view(3, m, 1, 2, 2)
    assert directions.flatten(2).norm(dim=2).sub(1).abs().max() < 1e-6
    gradient, _ = forward_difference_gradient(smooth, x, directions, epsilon=1e-5)
    exact = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(smooth(exact).sum(), exact)
    cosine = F.cosine_similarity(gradient.flatten(1), autograd.flatten(1), dim=1)
    relative = (gradient - autograd).flatten(1).norm(dim=1) / autograd.flatten(1).norm(dim=1)
    assert cosine.min() > 0.98
    assert relative.max() < 0.1


# -- the metered victim ------------------------------------------------------------------------


def uniform_victim(info: VictimInfo = DIGITS) -> FunctionVictim:
    return FunctionVictim(lambda x: torch.full((x.shape[0], info.num_classes), 1.0 / info.num_classes), info)


def test_budgeted_victim_counts_images_and_refuses_whole_requests() -> None:
    charges: list[int] = []
    victim = BudgetedVictim(uniform_victim(), budget=250, on_charge=charges.append)
    assert victim.query(torch.rand(230, 1, 8, 8)).shape == (230, 10)
    assert victim.used == 230 and victim.requests == 3  # split at max_images_per_request=100
    assert charges == [100, 200, 230]
    with pytest.raises(BudgetExhaustedError) as refused:
        victim.query(torch.rand(21, 1, 8, 8))
    assert refused.value.remaining == 20 and victim.used == 230
    assert victim.affordable(64) == 20
    with pytest.raises(AttackError):
        victim.query(torch.rand(2, 1, 28, 28))


def test_in_process_victim_answers_probabilities_or_labels(digits_checkpoint: Path) -> None:
    soft = InProcessVictim.from_checkpoint(digits_checkpoint)
    hard = InProcessVictim.from_checkpoint(digits_checkpoint, output_kind="label")
    images = load_dataset("digits").x_test[:50]
    probabilities = soft.query(images)
    assert probabilities.shape == (50, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(50))
    assert hard.query(images).tolist() == probabilities.argmax(1).tolist()
    with pytest.raises(AttackError, match="within"):
        soft.query(images + 2)


# -- every registered attack on the shared loop ----------------------------------------------


@pytest.fixture(scope="module")
def local_victim(digits_checkpoint: Path) -> InProcessVictim:
    return InProcessVictim.from_checkpoint(digits_checkpoint)


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("hard_label", [False, True])
def test_every_attack_spends_exactly_its_budget(
    name: str, hard_label: bool, local_victim: InProcessVictim, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    budget = 1000  # not a multiple of the batch: the last requests shrink to fit
    metered_calls: list[int] = []

    class Spy:
        info = local_victim.info

        def query(self, images: Tensor) -> Tensor:
            metered_calls.append(int(images.shape[0]))
            return local_victim.query(images)

    attack = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name, hard_label=hard_label))
    outcome = attack.run(Spy(), LoopConfig(budget=budget, eval_every=400, show_progress=False), RunDirectory(tmp_path))
    assert sum(metered_calls) == budget == outcome.metrics["queries_used"]
    assert outcome.stop_reason == "budget_spent"
    assert [line["queries"] for line in outcome.history][-1] == budget
    assert RunDirectory(tmp_path).read_ledger().attack_queries == budget
    assert attack.clone()(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_dfme_charges_every_perturbation(local_victim: InProcessVictim, tmp_path: Path) -> None:
    attack = build_attack("dfme", local_victim.info, torch.device("cpu"), **tiny_settings("dfme", directions=3, student_steps=1))
    metered = BudgetedVictim(local_victim, budget=10_000)
    attack.step(metered)
    # generator step: 64 images x (1 + 3 directions); one student step: 64.
    assert metered.used == 64 * 4 + 64


@pytest.mark.parametrize("remember", [False, True])
def test_dfme_remember_generator_queries_keeps_every_paid_answer(
    local_victim: InProcessVictim, remember: bool
) -> None:
    """With ``remember_generator_queries`` the generator step's 64 x (1 + 2) answers join the
    replay memory beside the two student batches; without it only the student batches do."""
    settings = tiny_settings("dfme", directions=2, student_steps=2, replay=1_000,
                             remember_generator_queries=remember)
    attack = build_attack("dfme", local_victim.info, torch.device("cpu"), **settings)
    metered = BudgetedVictim(local_victim, budget=10_000)
    attack.step(metered)
    assert metered.used == 64 * 3 + 2 * 64
    memory = attack.students.memory  # type: ignore[attr-defined]
    assert memory.seen == (metered.used if remember else 2 * 64)
    images, targets = memory.stored()
    assert images.min() >= 0 and images.max() <= 1 and targets.shape[1] == 10


def test_settings_are_checked() -> None:
    with pytest.raises(AttackError, match="no setting"):
        make_settings("dual-student", directions=3)
    with pytest.raises(AttackError, match="unknown attack"):
        make_settings("knockoff-typo")
    with pytest.raises(AttackError):
        make_settings("dfme", epsilon=0.0)
    with pytest.raises(AttackError, match="remember_generator_queries needs a replay memory"):
        make_settings("dfme", remember_generator_queries=True, replay=0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_flat_keys_set_the_nested_settings_and_round_trip(name: str) -> None:
    settings = make_settings(name)
    assert make_settings(name, **flat_settings(settings)) == settings  # config.json's settings rebuild the run's
    changed = make_settings(name, student_width=24, replay=123, replay_policy="ring", batch_size=32)
    assert changed.student_settings() == replace(settings.student_settings(), width=24, replay=123, replay_policy="ring")
    assert (flat_settings(changed)["student_width"], changed.batch_size) == (24, 32)
    assert set(setting_keys(name)) == set(flat_settings(settings))


def test_a_victim_in_this_process_says_nothing_meters_it_and_the_meter_delegates() -> None:
    closed: list[bool] = []

    class Closing(FunctionVictim):
        def close(self) -> None:
            closed.append(True)

    local = Closing(lambda images: torch.zeros(len(images), 10), DIGITS)
    metered = BudgetedVictim(local, 100)
    for victim in (local, metered):
        assert (victim.metering, victim.key_usage(), victim.endpoint_record(), victim.request_metrics()) == (
            "none", None, None, {})
    metered.close()
    assert closed == [True]


def test_the_loop_learns_something(local_victim: InProcessVictim, tmp_path: Path) -> None:
    """Random-noise stealing of 8x8 digits beats chance clearly within 20k queries."""
    torch.set_num_threads(1)
    data = load_dataset("digits")
    metered = BudgetedVictim(local_victim, None)
    attack = build_attack("random", local_victim.info, torch.device("cpu"), batch_size=256, student_width=16, replay=5000)
    evaluator = Evaluator(data, metered, EvalConfig(transfer_samples=50, reference_epochs=1),
                          reference_factory=lambda: build_student(local_victim.info, attack.settings.student_settings()))
    outcome = attack.run(local_victim, LoopConfig(budget=20_000, show_progress=False), RunDirectory(tmp_path), evaluator)
    assert outcome.metrics["fidelity"] > 0.3  # chance is ~0.1
    # test set once, then clone and reference PGD: 50 images x 3 epsilons x (untargeted, targeted)
    assert metered.used == len(data.y_test) + 2 * 50 * 3 * 2


# -- resume ---------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_resume_continues_with_the_same_query_count(
    name: str, local_victim: InProcessVictim, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    config = LoopConfig(budget=1500, eval_every=300, seed=3, show_progress=False)

    class Dies:
        """Answers until ``limit`` images, then raises (a crash in the middle of a step)."""

        info = local_victim.info

        def __init__(self, limit: int) -> None:
            self.limit, self.seen = limit, 0

        def query(self, images: Tensor) -> Tensor:
            if self.seen + images.shape[0] > self.limit:
                raise Interrupt
            self.seen += images.shape[0]
            return local_victim.query(images)

    run_dir = RunDirectory(tmp_path)
    first = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name))
    with pytest.raises(Interrupt):
        first.run(Dies(1000), config, run_dir)
    spent = run_dir.read_ledger().attack_queries
    assert 600 <= spent <= 1000
    checkpoint = run_dir.load_checkpoint()
    if ATTACKS[name].one_shot:  # ART's attacks: one step, no checkpoint inside it; the count survives
        assert checkpoint is None
    else:
        assert checkpoint is not None and checkpoint["queries"] <= spent  # work after it is lost, queries are not

    second = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name))
    remaining = Dies(10_000)
    outcome = second.run(remaining, config, run_dir, resume=True)
    assert remaining.seen == 1500 - spent
    assert outcome.metrics["queries_used"] == 1500
    history = run_dir.read_history()
    assert [line["queries"] for line in history] == sorted(line["queries"] for line in history)


def test_resume_refuses_a_missing_or_foreign_run(local_victim: InProcessVictim, tmp_path: Path, digits_checkpoint: Path) -> None:
    spec = RunSpec(attack="random", out=tmp_path / "run", budget=256, victim_checkpoint=digits_checkpoint,
                   resume=True, show_progress=False)
    with pytest.raises(AttackError, match="cannot resume"):
        run_attack(spec)
    fresh = RunSpec(attack="random", out=tmp_path / "run", budget=256, victim_checkpoint=digits_checkpoint,
                    show_progress=False, settings={"batch_size": 128, "student_width": 8},
                    evaluation=EvalConfig(transfer_samples=20, reference_epochs=1))
    run_attack(fresh)
    with pytest.raises(AttackError, match="already holds a run"):
        run_attack(fresh)
    with pytest.raises(AttackError, match="holds a random run"):
        run_attack(RunSpec(**{**fresh.__dict__, "attack": "dfme", "resume": True}))


# -- evaluation and reports ----------------------------------------------------------------------


def test_pgd_stays_in_the_ball_and_fools_its_own_model(local_victim: InProcessVictim) -> None:
    data = load_dataset("digits")
    model = local_victim.model
    images, labels = data.x_test[:100], data.y_test[:100]
    adversarial = pgd_linf(model, images, labels, epsilon=0.2, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adversarial - images).abs().max() <= 0.2 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean()
        attacked = (model(adversarial).argmax(1) == labels).float().mean()
    assert attacked < clean - 0.3
    assert default_epsilons((1, 28, 28)) == (0.125, 0.15, 0.175)
    assert default_epsilons((1, 8, 8)) == (0.125, 0.175, 0.225)
    assert default_epsilon((1, 28, 28)) == 0.15  # the middle one: transfer_success_rate's
    assert default_epsilon((3, 32, 32)) == pytest.approx(8 / 255)
    assert default_epsilon((1, 8, 8)) == 0.175


def test_evaluator_metrics_and_costs(local_victim: InProcessVictim, tmp_path: Path) -> None:
    data = load_dataset("digits")
    metered = BudgetedVictim(local_victim, None)
    evaluator = Evaluator(
        data, metered, EvalConfig(transfer_samples=40, reference_epochs=1),
        reference_factory=lambda: build_student(local_victim.info, make_settings("random").student_settings()),
        cache_dir=tmp_path,
    )
    victim_model = local_victim.model
    metrics = evaluator.evaluate(victim_model, final=False)
    assert metrics["fidelity"] == 1.0  # the victim agrees with itself
    assert metrics["accuracy"] == pytest.approx(metrics["victim_accuracy"])
    assert metrics["normalised_accuracy"] == pytest.approx(1.0)
    assert metered.used == len(data.y_test)
    final = evaluator.evaluate(victim_model, final=True)
    per_transfer = 40 * 3 * 2  # 40 images x 3 epsilons x (untargeted, targeted)
    assert metered.used == len(data.y_test) + 2 * per_transfer
    for eps in (0.125, 0.175, 0.225):
        for kind in ("transfer_untargeted", "transfer_targeted", "reference_transfer_untargeted",
                     "reference_transfer_targeted"):
            assert 0 <= final[f"{kind}@{eps}"] <= 1
        # white-box PGD on the victim itself; targeted is the harder goal
        assert final[f"transfer_untargeted@{eps}"] >= final[f"transfer_targeted@{eps}"]
    assert final["transfer_untargeted@0.225"] > 0.5
    assert final["transfer_success_rate"] == final["transfer_untargeted@0.175"]
    assert final["reference_transfer_success_rate"] == final["reference_transfer_untargeted@0.175"]
    assert final["transfer_epsilon"] == 0.175
    evaluator.evaluate(victim_model, final=True)  # reference cached: only the clone's examples again
    assert metered.used == len(data.y_test) + 3 * per_transfer
    again = Evaluator(data, BudgetedVictim(local_victim, None), EvalConfig(transfer_samples=40, reference_epochs=1),
                      cache_dir=tmp_path)
    again.victim_labels()
    assert again.victim.used == 0  # cached in the run directory, per split
    assert again.planned_queries(1) == per_transfer  # split and reference cached: the clone's examples only
    validation = Evaluator(data, BudgetedVictim(local_victim, None), EvalConfig(split="validation"), cache_dir=tmp_path)
    validation.victim_labels()
    assert validation.victim.used == len(data.y_val)  # another split: never the test split's answers
    assert (tmp_path / "victim_validation_labels.pt").is_file() and (tmp_path / "victim_test_labels.pt").is_file()


def test_run_directory_report_and_comparison(digits_checkpoint: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("random", "dual-student"):
        out = tmp_path / name
        metrics = run_attack(RunSpec(
            attack=name, out=out, budget=768, victim_checkpoint=digits_checkpoint, eval_every=256,
            show_progress=False, settings=tiny_settings(name),
            evaluation=EvalConfig(transfer_samples=20, reference_epochs=1),
        ))
        runs.append(out)
        for required in ("queries_used", "fidelity", "accuracy", "victim_accuracy",
                         "transfer_success_rate", "wall_seconds"):
            assert required in metrics
        assert metrics["queries_used"] == 768
        assert json.loads((out / "metrics.json").read_text())["queries_used"] == 768
        lines = (out / "metrics.jsonl").read_text().splitlines()
        queries = [json.loads(line)["queries"] for line in lines]
        # an evaluation once a step crosses each multiple of eval_every, and a final one
        assert len(queries) == 3 and queries[0] >= 256 and queries[1] >= 512 and queries[-1] == 768
        config = json.loads((out / "config.json").read_text())
        assert config["attack"] == name and "api_key" not in json.dumps(config)
        assert (out / "progress.png").stat().st_size > 1000
        assert "Final metrics" in (out / "report.md").read_text()
    table = compare_runs(runs, tmp_path / "all.png")
    assert table.count("\n") == 4 and "dual-student" in table and "random" in table
    assert (tmp_path / "all.png").stat().st_size > 1000
    assert queries_to_reach([{"queries": 5, "fidelity": 0.5}, {"queries": 9, "fidelity": 0.95}], 0.9) == 9
    assert queries_to_reach([{"queries": 5, "fidelity": 0.5}], 0.9) is None


def test_ledger_round_trip(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    run_dir.write_ledger(Ledger(attack_queries=5, eval_queries=7, server_used_at_start=3))
    assert run_dir.read_ledger() == Ledger(attack_queries=5, eval_queries=7, server_used_at_start=3)


def test_report_command_compares_runs(digits_checkpoint: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, [
        "attack", "random", "--victim-checkpoint", str(digits_checkpoint), "--budget", "300",
        "--out", str(out), "--batch-size", "100", "--set", "student_width=8", "--transfer-samples", "10",
        "--reference-epochs", "1", "--quiet", "--threads", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "queries_used=300" in result.output
    result = runner.invoke(app, ["report", str(out), "--plot", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0, result.output
    assert "| group | attack | n |" in result.output and "| random | random | 1 seed | 0 |" in result.output
    assert (tmp_path / "cmp.png").is_file()
    result = runner.invoke(app, ["report", str(out), "--per-run"])
    assert result.exit_code == 0, result.output
    assert "| run | attack |" in result.output and "| run | random | 0 |" in result.output
    bad = runner.invoke(app, ["attack", "nope", "--victim-checkpoint", str(digits_checkpoint),
                              "--budget", "10", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown attack" in bad.output
