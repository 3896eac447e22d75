"""The API defenses of issue #14 on fixed tensors: MAD, adaptive misinformation, DAWN, SEAT."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from defense.misinformation import misinform, misinformation_loss, misinformation_weight
from defense.poisoning import mad_objective, mad_perturb
from defense.policies import PolicyContext, parse_policy
from defense.seat import SeatDetector, SeatVerdict, similar_pairs
from defense.watermark import WatermarkRecord, mark, select, verify
from stealsim.errors import ConfigError

Y = np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])


# -- MAD (Orekondy et al., 2020) --------------------------------------------------------------------


def _last_layer_gradient(target: np.ndarray, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """G^T target for a linear layer, by autograd: the gradient of sum_k target_k log p_k w.r.t. W."""
    weight = torch.zeros((len(logits), len(features)), dtype=torch.float64, requires_grad=True)
    z = torch.as_tensor(logits) + weight @ torch.as_tensor(features)
    (torch.as_tensor(target) * torch.log_softmax(z, dim=0)).sum().backward()
    assert weight.grad is not None
    return weight.grad.numpy().ravel()


def test_closed_form_angular_objective_matches_the_last_layer_jacobian() -> None:
    rng = np.random.default_rng(0)
    logits, features = rng.normal(size=3), rng.normal(size=5)
    proxy = np.exp(logits) / np.exp(logits).sum()
    y, candidate = Y[0], np.array([0.1, 0.1, 0.8])
    u = _last_layer_gradient(candidate, logits, features)
    v = _last_layer_gradient(y, logits, features)
    expected = np.sum((u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** 2)
    ours = mad_objective(candidate[None, None], y[None], proxy[None], "angular")[0, 0]
    assert ours == pytest.approx(expected, rel=1e-9)


def test_mad_extreme_moves_epsilon_toward_the_best_vertex() -> None:
    # gradient_distance picks the vertex farthest from y: the least likely class.
    answer = mad_perturb(Y, None, epsilon=0.4, norm="l1", objective="gradient_distance", oracle="extreme")
    assert np.allclose(np.abs(answer - Y).sum(axis=1), 0.4)
    assert np.allclose(answer.sum(axis=1), 1.0)
    assert answer[0].argmin() != 2 and answer[0, 2] == pytest.approx(0.1 + 0.2)  # mass moved to class 2
    # A large epsilon reaches the vertex itself (alpha clipped at 1).
    far = mad_perturb(Y, None, epsilon=2.0, norm="l1", objective="gradient_distance", oracle="extreme")
    assert np.allclose(far[0], [0, 0, 1]) and far[1].argmax() in (0, 2)


def test_mad_argmax_keeps_every_top_label_and_beats_a_brute_force_over_vertices() -> None:
    rng = np.random.default_rng(1)
    y = rng.dirichlet(np.ones(4) * 0.5, size=20)
    proxy = rng.dirichlet(np.ones(4), size=20)
    answer = mad_perturb(y, proxy, epsilon=0.5, norm="l2", objective="angular", oracle="argmax")
    assert np.array_equal(answer.argmax(axis=1), y.argmax(axis=1))
    assert np.all(np.linalg.norm(answer - y, axis=1) <= 0.5 + 1e-9)
    # The chosen vertex is the best argmax-preserving vertex (all subsets holding the top class).
    row = 0
    top = int(y[row].argmax())
    best = -1.0
    for subset in itertools.product((0, 1), repeat=4):
        if subset[top]:
            vertex = np.array(subset, float)
            vertex[top] += 1e-5
            vertex /= vertex.sum()
            best = max(best, float(mad_objective(vertex[None, None], y[row : row + 1], proxy[row : row + 1],
                                                 "angular")[0, 0]))
    full = mad_perturb(y[row : row + 1], proxy[row : row + 1], 10.0, "l2", "angular", "argmax")
    assert mad_objective(full[None].astype(float), y[row : row + 1], proxy[row : row + 1], "angular")[0, 0] \
        == pytest.approx(best, rel=1e-6)


def test_mad_policy_needs_a_proxy_for_the_angular_objective() -> None:
    with pytest.raises(ConfigError, match="needs a proxy"):
        parse_policy([{"name": "prediction_poisoning"}])
    assert parse_policy([{"name": "prediction_poisoning", "objective": "gradient_distance"}]).needs_context


# -- adaptive misinformation (Kariyappa and Qureshi, 2020) -----------------------------------------


def test_misinformation_blend_follows_eq_4_and_5() -> None:
    wrong = np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    alpha = misinformation_weight(Y.max(axis=1), tau=0.8, nu=10.0)
    assert alpha == pytest.approx(1 / (1 + np.exp(10.0 * (Y.max(axis=1) - 0.8))))
    served = misinform(Y, wrong, tau=0.8, nu=10.0)
    assert np.allclose(served, (1 - alpha[:, None]) * Y + alpha[:, None] * wrong)
    # A near-step at nu = 10000: confident (in-distribution) rows are untouched, unsure ones replaced.
    hard = misinform(Y, wrong, tau=0.8, nu=10000.0)
    assert np.allclose(hard[0], wrong[0]) and np.allclose(hard[1], Y[1])


def test_misinformation_loss_is_eq_3() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits, dim=1)
    expected = -(torch.log(1 - p[0, 0]) + torch.log(1 - p[1, 2])) / 2
    assert float(misinformation_loss(logits, logits, labels)) == pytest.approx(float(expected), rel=1e-6)


# -- DAWN watermark (Szyller et al., 2021) -----------------------------------------------------------


def test_watermark_selection_is_keyed_deterministic_and_never_the_top_label() -> None:
    images = np.random.default_rng(2).random((4000, 1, 8, 8), dtype=np.float32)
    top = np.arange(4000) % 10
    marked, labels = select(b"secret", "key_a", images, top, 0.05, 10)
    again, labels_again = select(b"secret", "key_a", images, top, 0.05, 10)
    assert np.array_equal(marked, again) and np.array_equal(labels, labels_again)
    assert 0.04 < marked.mean() < 0.06 and not np.any(labels == top)
    other, _ = select(b"secret", "key_b", images, top, 0.05, 10)
    assert np.mean(marked & other) < 0.01  # another key marks other inputs
    wrong_labels = (labels - top) % 10
    assert set(wrong_labels.tolist()) == set(range(1, 10))  # every other label occurs


def test_watermark_swap_and_one_hot_answers() -> None:
    marked, labels = np.array([True, False]), np.array([2, 0])
    swapped = mark(Y, marked, labels, "swap")
    assert np.allclose(swapped[0], [0.1, 0.2, 0.7]) and np.allclose(swapped[1], Y[1])
    assert np.allclose(mark(Y, marked, labels, "one_hot")[0], [0, 0, 1])


def test_watermark_verification_p_value() -> None:
    record = WatermarkRecord(np.zeros((30, 1, 2, 2), np.float32), np.full(30, 3), np.zeros(30, np.int64), 10)
    copy = verify(record, np.array([3] * 12 + [0] * 18))
    assert copy.matches == 12 and copy.p_value == pytest.approx(stats.binom.sf(11, 30, 1 / 9))
    assert copy.stolen and copy.victim_agreement == pytest.approx(18 / 30)
    innocent = verify(record, np.zeros(30, np.int64))
    assert innocent.matches == 0 and innocent.p_value == 1.0 and not innocent.stolen
    restored = WatermarkRecord.from_bytes(record.to_bytes())
    assert np.array_equal(restored.labels, record.labels) and restored.classes == 10
    assert len(restored.distinct()) == 1  # thirty copies of one input are one piece of evidence


def test_watermark_policy_records_the_marked_rows() -> None:
    policy = parse_policy([{"name": "watermark", "fraction": 0.5}, {"name": "label_only"}])
    images = np.random.default_rng(3).random((64, 1, 2, 2), dtype=np.float32)
    p = np.random.default_rng(4).dirichlet(np.ones(10), size=64).astype(np.float32)
    context = PolicyContext(images, "key_a", b"s", lambda path, x: np.empty(0))
    answer = policy.apply(p, np.random.default_rng(0), context)
    assert answer.kind == "label" and answer.marks is not None and 16 < len(answer.marks.rows) < 48
    assert np.array_equal(answer.values[answer.marks.rows], answer.marks.labels)
    unmarked = np.setdiff1d(np.arange(64), answer.marks.rows)
    assert np.array_equal(answer.values[unmarked], p[unmarked].argmax(axis=1))
    with pytest.raises(ConfigError, match="context"):
        policy.apply(p, np.random.default_rng(0))


# -- SEAT (Zhang et al., 2021) ------------------------------------------------------------------------


def test_seat_counts_similar_pairs_across_and_within_batches() -> None:
    old = np.array([[0.0, 0.0], [1.0, 0.0]])
    new = np.array([[0.0, 0.05], [0.0, 0.08], [5.0, 5.0]])
    # new[0]-old[0] (0.05), new[1]-old[0] (0.08), new[0]-new[1] (0.03): 3 pairs under 0.1.
    assert similar_pairs(new, old, 0.1) == 3
    detector = SeatDetector(threshold=0.1, max_pairs=3, history=4)
    assert detector.observe(old).pairs == 0
    verdict = detector.observe(new)
    assert verdict.pairs == 3 and verdict.flagged and verdict.queries == 5
    restored = SeatDetector.from_bytes(detector.to_bytes(), 0.1, 3, 4)
    assert restored.flagged and restored.observe(np.array([[9.0, 9.0]])) == SeatVerdict(True, 3, 6)



# -- ood_rate ------------------------------------------------------------------------------------


def test_ood_p_value_is_the_binomial_tail() -> None:
    from defense.ood_rate import ood_p_value

    # P(Binomial(10, 0.1) >= 3) = 1 - sum_{k<3} C(10, k) 0.1^k 0.9^(10-k)
    below = sum(math.comb(10, k) * 0.1**k * 0.9 ** (10 - k) for k in range(3))
    assert ood_p_value(3, 10, 0.1) == pytest.approx(1.0 - below)
    assert ood_p_value(0, 10, 0.1) == 1.0
    assert ood_p_value(10, 10, 0.1) == pytest.approx(0.1**10)


def test_ood_rate_detector_counts_queries_under_tau_and_flags_after_min_queries() -> None:
    from defense.ood_rate import OodRateDetector

    confident = np.tile(np.array([[0.9, 0.05, 0.05]], np.float32), (30, 1))
    unsure = np.tile(np.array([[0.4, 0.35, 0.25]], np.float32), (30, 1))
    detector = OodRateDetector(tau=0.5, honest_rate=0.01, alpha=1e-6, min_queries=64)
    verdict = detector.observe(confident)
    assert (verdict.ood, verdict.queries, verdict.p_value, verdict.flagged) == (0, 30, 1.0, False)
    verdict = detector.observe(unsure)  # 30 of 60 under tau: p tiny, but fewer than min_queries
    assert verdict.ood == 30 and verdict.p_value < 1e-30 and not verdict.flagged
    restored = OodRateDetector.from_bytes(detector.to_bytes(), 0.5, 0.01, 1e-6, 64)
    verdict = restored.observe(confident[:4])  # 64 queries: tested now
    assert verdict.flagged and (verdict.ood, verdict.queries) == (30, 64)
    assert restored.observe(confident).flagged  # stays flagged
    # One honest-looking miss in 64 is what the honest rate predicts: no flag.
    honest = OodRateDetector(tau=0.5, honest_rate=0.01, alpha=1e-6, min_queries=64)
    assert not honest.observe(np.concatenate([confident, confident, unsure[:1], confident[:3]])).flagged


def test_ood_rate_policy_step_is_a_detector_and_checked() -> None:
    policy = parse_policy([{"name": "label_only"}, {"name": "ood_rate", "tau": 0.6, "block": True}])
    assert [step.name for step in policy.detectors] == ["ood_rate"]
    assert policy.output_kind == "label"
    with pytest.raises(ConfigError, match="ood_rate"):
        parse_policy([{"name": "ood_rate", "tau": 1.5}])
    with pytest.raises(ConfigError, match="at most one"):
        parse_policy([{"name": "ood_rate", "tau": 0.5}, {"name": "ood_rate", "tau": 0.6}])


# -- ood_rate with the Mahalanobis score --------------------------------------------------------


def gaussian_clusters(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes in 3 dimensions: unit-variance clusters around (0, 0, 0) and (6, 0, 0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    return rng.normal(size=(count, 3)) + np.outer(labels, [6.0, 0.0, 0.0]), labels


def test_mahalanobis_statistics_on_known_clusters(tmp_path: Path) -> None:
    from defense.mahalanobis import FeatureGaussian, fit_feature_gaussian

    features, labels = gaussian_clusters(4000, seed=0)
    validation, _ = gaussian_clusters(2000, seed=1)
    gaussian = fit_feature_gaussian(features, labels, validation, honest_rate=0.05)
    assert gaussian.means[:, 0] == pytest.approx([0.0, 6.0], abs=0.1)
    assert gaussian.precision == pytest.approx(np.eye(3), abs=0.1)
    # Squared distances of in-distribution points are chi-square with 3 degrees of freedom:
    # the 95 % quantile is 7.81.
    assert gaussian.tau == pytest.approx(7.81, rel=0.1)
    assert gaussian.distances(np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [3.0, 4.0, 0.0]])) == pytest.approx(
        [0.0, 0.0, 25.0], abs=1.5)
    path = tmp_path / "ood.safetensors"
    gaussian.save(path, encoder="somewhere")
    loaded = FeatureGaussian.load(path)
    assert loaded.tau == gaussian.tau and np.array_equal(loaded.precision, gaussian.precision)
    with pytest.raises(ConfigError, match="do not fit statistics of dimension 3"):
        loaded.distances(np.zeros((2, 4)))
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="stealsim ood-fit"):
        FeatureGaussian.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="no training images"):
        fit_feature_gaussian(features, np.where(labels == 1, 2, 0), validation)


def test_ood_rate_counts_distances_over_tau_with_the_mahalanobis_score() -> None:
    from defense.ood_rate import OodRateDetector

    detector = OodRateDetector(tau=10.0, honest_rate=0.01, alpha=1e-6, min_queries=64, score="mahalanobis")
    verdict = detector.observe(np.full(64, 3.0))
    assert (verdict.ood, verdict.flagged) == (0, False)
    verdict = detector.observe(np.full(40, 50.0))
    assert verdict.ood == 40 and verdict.flagged
    restored = OodRateDetector.from_bytes(detector.to_bytes(), 10.0, 0.01, 1e-6, 64, "mahalanobis")
    assert restored.flagged and restored.observe(np.full(1, 50.0)).ood == 41
    with pytest.raises(ValueError, match="bad OOD-rate settings"):
        OodRateDetector(tau=2.0, honest_rate=0.01, alpha=1e-6, min_queries=64)  # an MSP over 1


def test_ood_rate_policy_checks_the_settings_of_each_score(tmp_path: Path) -> None:
    step = parse_policy([{"name": "ood_rate", "score": "mahalanobis", "encoder": str(tmp_path),
                          "statistics": str(tmp_path / "ood.safetensors"), "tau": 40.0}]).detectors[0]
    assert step.checkpoints() == [tmp_path] and step.new_detector().tau == 40.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="score mahalanobis needs encoder"):
        parse_policy([{"name": "ood_rate", "score": "mahalanobis", "tau": 40.0}])
    with pytest.raises(ConfigError, match="score msp needs tau"):
        parse_policy([{"name": "ood_rate"}])
    with pytest.raises(ConfigError, match="belong to score mahalanobis"):
        parse_policy([{"name": "ood_rate", "tau": 0.5, "encoder": str(tmp_path)}])
