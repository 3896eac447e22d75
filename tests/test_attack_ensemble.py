"""The ensemble attack: the five UQ models, their diagnostics, and every kind end to end
against a real ``stealsim serve`` within budget (server-side usage = the attacker's count)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import torch
from server_support import ServerProcess, new_key
from test_attack_http import EVAL_COST, TINY_FLAGS, run_cli, usage

from attacker.attacks import build_attack
from attacker.evaluation import EvalConfig
from attacker.runner import RunSpec, run_attack
from attacker.students import StudentSettings
from attacker.uq import (
    UQ_KINDS,
    UQSettings,
    build_uq_model,
    member_diagnostics,
    pairwise_disagreement,
)
from attacker.victims import VictimInfo
from stealsim.data import load_dataset
from stealsim.errors import AttackError

DIGITS = VictimInfo(input_shape=(1, 8, 8), num_classes=10, max_images_per_request=512)
TRANSFER = 20
TINY = {"student_width": 8, "generator_width": 8, "latent_dim": 16, "batch_size": 64, "members": 3,
        "student_steps": 2}


def tiny_spec(kind: str, out: Path, budget: int, victim_checkpoint: Path | None = None, url: str | None = None,
              api_key: str | None = None, **fields: object) -> RunSpec:
    return RunSpec(
        attack="ensemble", out=out, budget=budget, eval_every=budget // 2, show_progress=False,
        settings={**TINY, "uq": kind, **fields}, victim_checkpoint=victim_checkpoint, url=url, api_key=api_key,
        evaluation=EvalConfig(transfer_samples=TRANSFER, reference_epochs=1))


# -- units ------------------------------------------------------------------------------------


def test_pairwise_disagreement_is_the_mean_l1_over_pairs() -> None:
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[10.0, -10.0]])
    pa, pb = torch.softmax(a, 1), torch.softmax(b, 1)
    two = (pa - pb).abs().mean()
    assert pairwise_disagreement([a, b]).item() == pytest.approx(two.item())
    # Three members, two identical: pairs (a,a)=0, (a,b), (a,b) -> 2/3 of the pair distance.
    assert pairwise_disagreement([a, a, b]).item() == pytest.approx(2 * two.item() / 3)
    assert pairwise_disagreement([a]).item() == 0.0


def _identical_deep_ensemble() -> torch.nn.Module:
    model = build_uq_model(DIGITS, UQSettings(kind="deep-ensemble", members=4, students=StudentSettings(width=8)), torch.device("cpu"))
    state = model.networks[0].state_dict()
    for net in model.networks[1:]:
        net.load_state_dict(state)
    return model


@pytest.mark.parametrize("identical", ["deep-ensemble", "mc-dropout"])
def test_identical_members_report_zero_variance(identical: str) -> None:
    data = load_dataset("digits")
    if identical == "deep-ensemble":
        model = _identical_deep_ensemble()
    else:  # MC dropout without dropout: every mask is the same network
        model = build_uq_model(DIGITS, UQSettings(kind="mc-dropout", members=4, students=StudentSettings(width=8), dropout=0.0),
                               torch.device("cpu"))
    victim_labels = data.y_test.roll(1)
    metrics = member_diagnostics(model.members(), data.x_test, data.y_test, victim_labels)
    assert metrics["members"] == 4
    assert metrics["member_variance"] == 0.0 and metrics["member_disagreement"] == 0.0
    assert metrics["combined_fidelity"] == metrics["member_fidelity_best"] == metrics["member_fidelity_mean"]
    assert metrics["fidelity_gain"] == 0.0


@pytest.mark.parametrize("kind", ["deep-ensemble", "mc-dropout", "laplace"])
def test_distinct_members_report_positive_variance(kind: str) -> None:
    data = load_dataset("digits")
    model = build_uq_model(DIGITS, UQSettings(kind=kind, members=4, students=StudentSettings(width=8), dropout=0.5), torch.device("cpu"))
    metrics = member_diagnostics(model.members(), data.x_test[:100], data.y_test[:100], data.y_test[:100])
    assert metrics["member_variance"] > 0 and metrics["member_disagreement"] > 0
    assert metrics["member_fidelity_best"] >= metrics["member_fidelity_mean"]


def test_combined_prediction_is_the_mean_of_member_probabilities() -> None:
    model = build_uq_model(DIGITS, UQSettings(kind="deep-ensemble", members=3, students=StudentSettings(width=8)), torch.device("cpu"))
    x = torch.rand(5, 1, 8, 8)
    expected = torch.stack([torch.softmax(m.eval()(x), 1) for m in model.members()]).mean(0)
    torch.testing.assert_close(torch.exp(model.combined()(x)), expected)


def test_members_differ_in_architecture() -> None:
    model = build_uq_model(DIGITS, UQSettings(kind="deep-ensemble", members=3, architectures=("small-cnn", "lenet5")),
                           torch.device("cpu"))
    kinds = [type(net.net).__name__ for net in model.networks]
    assert kinds == ["SmallCNN", "LeNet5", "SmallCNN"]


def test_snapshot_swag_and_laplace_build_their_members() -> None:
    device = torch.device("cpu")
    x, targets = torch.rand(32, 1, 8, 8), torch.randn(32, 10)
    snapshot = build_uq_model(DIGITS, UQSettings(kind="snapshot", members=3, students=StudentSettings(width=8)), device)
    assert len(snapshot.members()) == 1
    snapshot.schedule(0.7)  # two of three cycles over: two snapshots taken
    assert len(snapshot.members()) == 3
    swag = build_uq_model(DIGITS, UQSettings(kind="swag", members=3, students=StudentSettings(width=8), swag_start=0.5), device)
    swag.schedule(0.2)
    swag.train_step(x, targets)
    assert len(swag.members()) == 1  # before swag_start: no moments
    swag.schedule(0.6)
    for _ in range(3):
        swag.train_step(x, targets)
    assert len(swag.members()) == 3
    laplace = build_uq_model(DIGITS, UQSettings(kind="laplace", members=3, students=StudentSettings(width=8)), device)
    before = laplace.precision_weight.clone()
    laplace.train_step(x, targets)
    assert bool((laplace.precision_weight > before).any())
    # Fixed seeds: a member is the same network at every evaluation.
    first = [m(x) for m in laplace.members()]
    again = [m(x) for m in laplace.members()]
    for one, two in zip(first, again, strict=True):
        torch.testing.assert_close(one, two)


def test_ensemble_settings_are_checked() -> None:
    with pytest.raises(AttackError, match="unknown --uq"):
        build_attack("ensemble", DIGITS, torch.device("cpu"), uq="dropconnect")
    with pytest.raises(AttackError):
        build_attack("ensemble", DIGITS, torch.device("cpu"), source="imagenet")


@pytest.mark.parametrize("source", ["generator", "surrogate"])
def test_diversity_term_runs_and_keeps_the_budget(source: str, digits_checkpoint: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec("deep-ensemble", tmp_path / "run", 400, victim_checkpoint=digits_checkpoint,
                     diversity_weight=0.5, source=source, updates_per_batch=2)
    metrics = run_attack(spec)
    assert metrics["queries_used"] == 400
    assert metrics["member_variance"] >= 0.0 and "combined_fidelity" in metrics


# -- every UQ kind end to end over HTTP -------------------------------------------------------------


@pytest.mark.parametrize("kind", UQ_KINDS)
def test_every_uq_kind_over_http_within_budget(
    kind: str, victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    budget = 400
    key = new_key(client, budget=budget + EVAL_COST)
    out = tmp_path / kind
    metrics = run_attack(tiny_spec(kind, out, budget, url=victim_server.url, api_key=key, swag_start=0.3))
    assert metrics["queries_used"] == budget
    assert usage(victim_server, key)["used"] == budget + metrics["eval_queries"]
    assert metrics["server_count_matches"] is True
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) >= 2
    for line in lines:
        for name in ("member_variance", "member_disagreement", "combined_fidelity", "member_fidelity_best",
                     "member_fidelity_mean", "member_accuracy_best", "combined_accuracy"):
            assert name in line, (name, line)
        # The clone evaluated is the combined prediction.
        assert line["combined_fidelity"] == pytest.approx(line["fidelity"])
    assert lines[-1]["members"] == 3  # snapshot: two cycles' snapshots + the current network
    assert (out / "report.md").is_file()


def test_ensemble_cli_flags(victim_server: ServerProcess, client: httpx.Client, tmp_path: Path) -> None:
    budget = 300
    key = new_key(client, budget=budget + EVAL_COST)
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "stealsim", "attack", "ensemble", "--url", victim_server.url,
               "--api-key", key, "--budget", str(budget), "--out", str(out), *TINY_FLAGS,
               "--uq", "mc-dropout", "--members", "2", "--member-arch", "lenet5", "--source", "surrogate",
               "--surrogate", "mnist5k", "--diversity", "0.1", "--set", "student_steps=1"]
    result = run_cli(command)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["settings"]
    assert (config["uq"], config["members"], config["architectures"], config["source"]) == (
        "mc-dropout", 2, ["lenet5"], "surrogate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["members"] == 2 and metrics["queries_used"] == budget
    assert usage(victim_server, key)["used"] == budget + metrics["eval_queries"]


def test_diversity_term_pushes_members_apart_on_unqueried_images() -> None:
    x, targets, unlabelled = torch.rand(64, 1, 8, 8), torch.randn(64, 10), torch.rand(64, 1, 8, 8)
    spreads = []
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = build_uq_model(DIGITS, UQSettings(kind="deep-ensemble", members=3, students=StudentSettings(width=8, replay=0),
                                                  diversity_weight=weight), torch.device("cpu"))
        for _ in range(5):
            model.train_step(x, targets, unlabelled)
        with torch.no_grad():
            spreads.append(float(pairwise_disagreement([m.eval()(unlabelled) for m in model.members()])))
    assert spreads[1] > spreads[0]


@pytest.mark.parametrize("policy", ["reservoir", "ring"])
def test_the_members_replay_memory_follows_replay_policy(policy: str) -> None:
    """``replay_policy`` reaches the members' replay memory (the ensemble once recorded it and kept a ring)."""
    attack = build_attack("ensemble", DIGITS, torch.device("cpu"), replay_policy=policy, replay=64, **TINY)
    memory = attack.uq.memory  # type: ignore[attr-defined]
    assert memory.policy == policy
    torch.manual_seed(0)
    first = torch.rand(64, 1, 8, 8)
    attack.uq.train_step(first, torch.randn(64, 10))  # type: ignore[attr-defined]
    for _ in range(3):
        attack.uq.train_step(torch.rand(64, 1, 8, 8), torch.randn(64, 10))  # type: ignore[attr-defined]
    images, _ = memory.stored()
    kept = sum(bool((images == one).all(dim=(1, 2, 3)).any()) for one in first)
    # A reservoir keeps a uniform sample of all 256 answers (about a quarter of the first batch),
    # a ring only the last 64.
    assert (kept > 0) is (policy == "reservoir")
