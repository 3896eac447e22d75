"""The answer-side adaptive attacker (issue #38): D-DAE's restoration and the watermark filter.

On fixed tensors: the restoration inverts a known perturbation of a fixed linear model's
softmax outputs and its detector tells perturbed from clean answers; the filter drops exactly
a planted wrong label. Then one short in-process run per setting records its counters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attacker.adaptive import AdaptiveSettings, AnswerAdapter, contradicted
from attacker.attacks import build_attack, flat_settings, make_settings
from attacker.loop import LoopConfig
from attacker.restoration import Restorer, perturb, reverse_sigmoid
from attacker.rundir import RunDirectory
from attacker.runner import RunSpec, run_attack
from attacker.victims import FunctionVictim, InProcessVictim, LocalVictim, VictimInfo
from stealsim.errors import AttackError

CLASSES = 10


def _l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum(dim=1).mean())


@pytest.fixture(scope="module")
def toy() -> tuple[Restorer, torch.Tensor]:
    """A restorer fit on 2,000 softmax outputs of a fixed linear model; 1,000 other outputs held out."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weights = 1.5 * torch.randn(16, CLASSES, generator=generator)
    clean = torch.softmax(torch.randn(3000, 16, generator=generator) @ weights, dim=1)
    restorer = Restorer(CLASSES)
    report = restorer.fit(clean[:2000], steps=300, seed=0)
    assert report["l1_after"] < report["l1_before"]
    return restorer, clean[2000:]


def test_restoration_inverts_a_known_reverse_sigmoid(toy: tuple[Restorer, torch.Tensor]) -> None:
    restorer, clean = toy
    perturbed = reverse_sigmoid(clean, beta=1.0, gamma=0.1)  # the server's defaults
    restored = restorer.restore(perturbed)
    before, after = _l1(perturbed, clean), _l1(restored, clean)
    assert before > 0.5  # the perturbation is large: a real test of the restoration
    assert after <= 0.5 * before, f"mean L1 to the clean vectors {before:.3f} -> {after:.3f}"
    assert torch.allclose(restored.sum(dim=1), torch.ones(len(restored)), atol=1e-4)
    agree = float((restored.argmax(dim=1) == clean.argmax(dim=1)).float().mean())
    assert agree >= 0.98


def test_restoration_reduces_gaussian_noise(toy: tuple[Restorer, torch.Tensor]) -> None:
    restorer, clean = toy
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp_min(0)
    noisy = noisy / noisy.sum(dim=1, keepdim=True)
    before, after = _l1(noisy, clean), _l1(restorer.restore(noisy), clean)
    assert after <= 0.75 * before, f"mean L1 to the clean vectors {before:.3f} -> {after:.3f}"


def test_the_detector_tells_perturbed_from_clean_answers(toy: tuple[Restorer, torch.Tensor]) -> None:
    restorer, clean = toy
    generator = torch.Generator().manual_seed(2)
    flagged_clean = float(restorer.detect(clean).mean())
    for family in ("reverse_sigmoid", "gaussian_noise"):
        flagged = float(restorer.detect(perturb(clean, family, generator)).mean())
        balanced_accuracy = 0.5 * (flagged + 1.0 - flagged_clean)
        assert balanced_accuracy >= 0.9, f"{family}: {flagged:.3f} perturbed and {flagged_clean:.3f} clean flagged"


def test_the_restorer_refuses_an_unknown_family() -> None:
    with pytest.raises(AttackError, match="restore_families"):
        Restorer(CLASSES, ("round",))
    with pytest.raises(AttackError, match="restore_families"):
        make_settings("random", restore_families=["top_k"])


# -- drop_contradicted --------------------------------------------------------------------------


def _confident_clone(labels: torch.Tensor, top: float) -> torch.Tensor:
    rest = (1.0 - top) / (CLASSES - 1)
    probabilities = torch.full((len(labels), CLASSES), rest)
    probabilities[torch.arange(len(labels)), labels] = top
    return probabilities


def test_the_filter_drops_exactly_a_planted_wrong_label() -> None:
    labels = torch.arange(8) % CLASSES
    answers = _confident_clone(labels, 0.9)  # the victim agrees with the clone...
    answers[3] = _confident_clone(torch.tensor([7]), 0.9)[0]  # ...but for one watermark-like wrong label
    confident = _confident_clone(labels, 0.99)
    assert contradicted(answers, confident, 0.95).tolist() == [i == 3 for i in range(8)]
    assert contradicted(answers.argmax(dim=1), confident, 0.95).tolist() == [i == 3 for i in range(8)]
    unsure = _confident_clone(labels, 0.6)
    assert not bool(contradicted(answers, unsure, 0.95).any())

    info = VictimInfo(input_shape=(1, 8, 8), num_classes=CLASSES)
    adapter = AnswerAdapter(AdaptiveSettings(drop_contradicted=True, drop_threshold=0.95, drop_warmup=100),
                            info, torch.device("cpu"))
    adapter.bind(lambda images: confident)
    images = torch.rand(8, 1, 8, 8)
    assert torch.equal(adapter.adapt(images, answers, used_before=50), answers)  # still in the warm-up
    assert adapter.metrics()["dropped_answers"] == 0
    kept = adapter.adapt(images, answers, used_before=100)
    changed = (kept != answers).any(dim=1)
    assert changed.tolist() == [i == 3 for i in range(8)]
    assert torch.equal(kept[3], confident[3])  # the clone's own prediction in the dropped row's place
    assert adapter.metrics() == {"dropped_answers": 1.0, "drop_checked_answers": 8.0}
    adapter.bind(lambda images: unsure)
    assert torch.equal(adapter.adapt(images, answers, used_before=200), answers)
    assert adapter.metrics()["dropped_answers"] == 1.0


# -- settings and whole runs --------------------------------------------------------------------


def test_adaptive_settings_are_flat_keys_and_off_by_default() -> None:
    settings = make_settings("dual-student")
    flat = flat_settings(settings)
    assert (flat["restore"], flat["drop_contradicted"]) == (False, False)
    changed = make_settings("knockoff", restore=True, restore_families=["reverse_sigmoid"], drop_threshold=0.9)
    assert changed.adaptive == AdaptiveSettings(restore=True, restore_families=("reverse_sigmoid",),
                                                drop_threshold=0.9)
    assert make_settings("knockoff", **flat_settings(changed)) == changed
    info = VictimInfo(input_shape=(1, 8, 8), num_classes=CLASSES)
    assert build_attack("random", info, torch.device("cpu")).adapter is None  # nothing changes when off
    with pytest.raises(AttackError, match="drop_threshold"):
        make_settings("random", drop_threshold=0.0)


BASE = {"batch_size": 100, "student_width": 8, "steps_per_call": 1}


@pytest.mark.parametrize(("extra", "counters"), [
    ({"restore": True, "restore_warmup": 300, "restore_steps": 60},
     {"restore_detected", "restore_detector_share", "restored_answers", "restore_shadow_l1_before",
      "restore_shadow_l1_after", "restore_shadow_detector_accuracy"}),
    ({"drop_contradicted": True, "drop_warmup": 300, "drop_threshold": 0.5},
     {"dropped_answers", "drop_checked_answers"}),
])
def test_a_short_run_records_the_counters(digits_checkpoint: Path, tmp_path: Path, extra: dict[str, object],
                                          counters: set[str]) -> None:
    out = tmp_path / "run"
    metrics = run_attack(RunSpec(attack="random", out=out, budget=800, victim_checkpoint=digits_checkpoint,
                                 eval_every=400, show_progress=False, settings={**BASE, **extra}))
    stored = json.loads((out / "metrics.json").read_text())
    assert counters <= set(stored) and stored["queries_used"] == 800 == metrics["queries_used"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(counters <= set(line) for line in history[1:])
    if "restore" in extra:
        assert stored["restore_detected"] in (0.0, 1.0)
        # Restored answers are the ones after the verdict, and only if it said "perturbed".
        assert stored["restored_answers"] == (500 if stored["restore_detected"] else 0)
    else:
        assert stored["drop_checked_answers"] == 500  # every answer after the 300 of the warm-up
        assert 0 <= stored["dropped_answers"] <= 500
    assert json.loads((out / "config.json").read_text())["settings"] | extra == \
        json.loads((out / "config.json").read_text())["settings"]


@pytest.mark.parametrize(("perturbed", "verdict"), [(True, 1.0), (False, 0.0)])
def test_the_verdict_against_a_victim_that_perturbs_or_not(digits_checkpoint: Path, tmp_path: Path,
                                                           perturbed: bool, verdict: float) -> None:
    """Random noise against the digits checkpoint, its answers through the server's reverse sigmoid
    (``beta`` 1, ``gamma`` 0.1) or not: the detector's verdict on the 600 warm-up answers."""
    local = InProcessVictim.from_checkpoint(digits_checkpoint)
    victim = FunctionVictim(
        (lambda images: reverse_sigmoid(local.query(images), 1.0, 0.1)) if perturbed else local.query, local.info)
    attack = build_attack("random", local.info, torch.device("cpu"), **BASE, restore=True, restore_warmup=600,
                          restore_steps=150)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.prepare(False)
    metrics = attack.run(victim, LoopConfig(budget=800, show_progress=False), run_dir).metrics
    assert metrics["restore_detected"] == verdict, metrics["restore_detector_share"]
    assert metrics["restored_answers"] == (200 if perturbed else 0)


def test_switching_an_adaptation_on_leaves_the_attacks_random_numbers_alone() -> None:
    """Plain and adaptive runs start from the same clone (a paired comparison): the adapter draws nothing."""
    info = VictimInfo(input_shape=(1, 8, 8), num_classes=CLASSES)
    states = []
    for extra in ({}, {"restore": True, "drop_contradicted": True}):
        torch.manual_seed(0)
        attack = build_attack("random", info, torch.device("cpu"), **extra)
        states.append(attack.clone().state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


class _Interrupt(Exception):
    pass


class _Counting(LocalVictim):
    """The victim through the server's reverse sigmoid, counting what it answers; :class:`_Interrupt` past ``limit``."""

    def __init__(self, victim: InProcessVictim, limit: int | None = None) -> None:
        self.victim, self.info, self.limit, self.seen = victim, victim.info, limit, 0
        self.asked: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and self.seen + images.shape[0] > self.limit:
            raise _Interrupt()
        self.seen += int(images.shape[0])
        self.asked.append(images.clone())
        return reverse_sigmoid(self.victim.query(images), 1.0, 0.1)


@pytest.mark.parametrize("limit", [500, 1100])
def test_an_interrupted_adaptive_run_resumed_is_the_uninterrupted_one(digits_checkpoint: Path, tmp_path: Path,
                                                                       limit: int) -> None:
    """Killed in the restoration's warm-up (500) or after it (1100), resumed: the journal's answers go
    through the checkpointed adapter again, and clone, restorer and counters are the uninterrupted run's."""
    torch.set_num_threads(1)
    local = InProcessVictim.from_checkpoint(digits_checkpoint)
    settings = {**BASE, "restore": True, "restore_warmup": 600, "restore_steps": 60,
                "drop_contradicted": True, "drop_warmup": 300, "drop_threshold": 0.15}
    config = LoopConfig(budget=1500, eval_every=300, seed=3, show_progress=False)
    runs = []
    for name, victims in (("whole", [_Counting(local)]), ("cut", [_Counting(local, limit), _Counting(local)])):
        run_dir = RunDirectory(tmp_path / name)
        run_dir.path.mkdir()
        for index, victim in enumerate(victims):
            torch.manual_seed(config.seed)
            attack = build_attack("random", local.info, torch.device("cpu"), **settings)
            if index == 0 and len(victims) == 2:
                with pytest.raises(_Interrupt):
                    attack.run(victim, config, run_dir)
                continue
            outcome = attack.run(victim, config, run_dir, resume=index == 1)
        runs.append((attack, outcome.metrics, victims))
    (whole, whole_metrics, straight), (second, metrics, (dies, rest)) = runs
    assert rest.seen == 1500 - dies.seen and metrics["replayed_queries"] > 0
    assert torch.equal(torch.cat(rest.asked), torch.cat(straight[0].asked)[dies.seen:])
    assert whole_metrics["restore_detected"] == 1.0 and whole_metrics["dropped_answers"] > 0
    for key in ("restore_detected", "restore_detector_share", "restored_answers", "dropped_answers",
                "drop_checked_answers"):
        assert metrics[key] == whole_metrics[key], key
    expected, got = whole.state_dict(), second.state_dict()
    for module in ("students", "adaptive"):
        for key, value in expected[module].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[module][key]), key
