"""The UQ study's diagnostics on fixed tensors, and ``stealsim uq-study`` end to end: in this
process (with resume) and as rq jobs on a real Redis consumed by a real ``stealsim grid-worker``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from redis_support import delete_matching, grid_workers, redis_url  # noqa: F401 - fixture

from attacker.replay import ReplayMemory
from attacker.uq import member_spread, spread_diagnostics
from experiments.uq_study import UQ_COLUMNS, cells_of, load_uq_spec, peak_of, run_uq_study
from stealsim.errors import AttackError, ConfigError

SPEC = {
    "dataset": "digits",
    "victim_epochs": 2,
    "budget": 600,
    "kinds": ["deep-ensemble", "mc-dropout"],
    "sources": ["surrogate"],
    "diversity": [0.0],
    "seeds": [0],
    "members": 3,
    "split": "validation",
    "evaluations": 2,
    "attack_settings": {"student_width": 8, "batch_size": 100, "replay": 600, "updates_per_batch": 2},
    "source_settings": {"surrogate": {"student_steps": 1}},
    "transfer_samples": 10,
    "reference_epochs": 1,
}


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# -- diagnostics on fixed tensors --------------------------------------------------------------


def test_spread_of_two_members_that_split_on_one_image() -> None:
    # Image 0: the members are one-hot on different classes; image 1: both are uniform.
    probabilities = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                                  [[0.0, 1.0], [0.5, 0.5]]])
    spread = member_spread(probabilities)
    # Var over members of (1, 0) is 0.25 for both classes of image 0, 0 on image 1: mean 0.125.
    assert spread["member_variance"] == pytest.approx(0.125)
    assert spread["member_disagreement"] == pytest.approx(0.5)  # labels (0, 0) vs (1, 0)
    assert spread["member_pairwise_disagreement"] == pytest.approx(0.5)


def test_pairwise_disagreement_counts_pairs_not_images() -> None:
    one_hot = torch.eye(3)
    # One image; members predict classes 0, 0 and 1: every image is split, 2 of 3 pairs differ.
    probabilities = torch.stack([one_hot[0], one_hot[0], one_hot[1]])[:, None, :]
    spread = member_spread(probabilities)
    assert spread["member_disagreement"] == pytest.approx(1.0)
    assert spread["member_pairwise_disagreement"] == pytest.approx(2 / 3)
    # Population variance over members: class 0 (1, 1, 0) -> 2/9, class 1 (0, 0, 1) -> 2/9, class 2 -> 0.
    assert spread["member_variance"] == pytest.approx((2 / 9 + 2 / 9 + 0) / 3)


def test_identical_members_have_no_spread() -> None:
    probabilities = torch.softmax(torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(0)), dim=2)
    spread = member_spread(probabilities.expand(4, 7, 4))
    assert spread == {"member_variance": 0.0, "member_disagreement": 0.0, "member_pairwise_disagreement": 0.0}


def test_member_spread_rejects_a_wrong_shape() -> None:
    with pytest.raises(AttackError, match=r"\[members, images, classes\]"):
        member_spread(torch.zeros(3, 4))


def test_spread_diagnostics_combined_beats_each_member() -> None:
    # Three images, victim says class 0 for all. Each member is wrong (0.7 on class 1) on one
    # image and right (0.9 on class 0) on the other two: the average is right everywhere.
    right, wrong = torch.tensor([0.9, 0.1]), torch.tensor([0.3, 0.7])
    probabilities = torch.stack([
        torch.stack([wrong, right, right]),
        torch.stack([right, wrong, right]),
        torch.stack([right, right, wrong]),
    ])
    victim = torch.zeros(3, dtype=torch.long)
    result = spread_diagnostics(probabilities, victim, victim)
    assert result["combined_fidelity"] == pytest.approx(1.0)  # class 0: (0.3 + 0.9 + 0.9) / 3 = 0.7
    assert result["member_fidelity_best"] == pytest.approx(2 / 3)
    assert result["member_fidelity_mean"] == pytest.approx(2 / 3)
    assert result["fidelity_gain"] == pytest.approx(1 / 3)
    assert result["combined_accuracy"] == pytest.approx(1.0)
    # No true labels (the attacker's own queries): no accuracy keys.
    assert "combined_accuracy" not in spread_diagnostics(probabilities, None, victim)


def test_peak_of_a_rising_then_falling_variance() -> None:
    history = [{"queries": 100, "member_variance": 0.01}, {"queries": 200, "member_variance": 0.04},
               {"queries": 300}, {"queries": 400, "member_variance": 0.02}]
    assert peak_of(history, "member_variance") == {"peak": 0.04, "peak_queries": 200, "final_over_peak": 0.5}
    assert peak_of(history[:1], "absent") == {"peak": None, "peak_queries": None, "final_over_peak": None}


def test_replay_memory_keeps_the_last_entries() -> None:
    memory = ReplayMemory(4)
    memory.add(torch.arange(3.0)[:, None], torch.arange(3))
    memory.add(torch.arange(3.0, 6.0)[:, None], torch.arange(3, 6))
    images, targets = memory.stored()
    assert sorted(targets.tolist()) == [2, 3, 4, 5]
    assert sorted(images.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]


# -- the study ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("uq-study")
    spec = base / "study.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return spec, base / "cache"


@pytest.fixture(scope="module")
def local_study(study_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec, cache = study_files
    out = tmp_path_factory.mktemp("uq-local") / "out"
    run_uq_study(load_uq_spec(spec), out, cache_dir=cache)
    return out


def test_study_in_process_writes_rows_curves_and_report(local_study: Path) -> None:
    rows = rows_of(local_study / "results.csv")
    assert [row["cell"] for row in rows] == ["deep-ensemble__surrogate__div0__s0", "mc-dropout__surrogate__div0__s0"]
    assert list(rows[0]) == list(UQ_COLUMNS)
    for row in rows:
        assert row["status"] == "done", row
        assert int(row["queries"]) == 600
        assert row["split"] == "validation"
        for column in ("combined_fidelity", "member_fidelity_best", "query_combined_fidelity"):
            assert 0.0 <= float(row[column]) <= 1.0
        # Members from their own initialisations (or dropout masks) differ, on the test split and the queries.
        assert float(row["member_variance"]) > 0 and float(row["query_member_variance"]) > 0
        assert float(row["variance_peak"]) >= float(row["member_variance"])
        assert int(float(row["variance_peak_queries"])) in (300, 600)
    curves = [json.loads(line) for line in (local_study / "curves.jsonl").read_text().splitlines()]
    assert [len(entry["history"]) for entry in curves] == [2, 2]
    assert all("query_member_disagreement" in line for entry in curves for line in entry["history"])
    report = (local_study / "report.md").read_text()
    assert "| deep-ensemble | surrogate | 0.0 | 1 |" in report
    assert (local_study / "uq-fidelity.png").stat().st_size > 0 and (local_study / "uq-spread.png").stat().st_size > 0


def test_study_resumes_and_refuses_changed_settings(local_study: Path, study_files: tuple[Path, Path]) -> None:
    spec, cache = study_files
    messages: list[str] = []
    rows = run_uq_study(load_uq_spec(spec), local_study, cache_dir=cache, announce=messages.append)
    assert messages[0].startswith("uq-study: 2 cells, 2 already finished, 0 to run")
    assert len(rows) == 2
    changed = spec.parent / "changed.yaml"
    changed.write_text(yaml.safe_dump({**SPEC, "budget": 900}))
    with pytest.raises(ConfigError, match=r"other settings .*budget"):
        run_uq_study(load_uq_spec(changed), local_study, cache_dir=cache)


def test_study_spec_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "kinds": ["bayes-by-backprop"]}))
    with pytest.raises(ConfigError, match="unknown UQ kinds"):
        load_uq_spec(bad)
    bad.write_text(yaml.safe_dump({**SPEC, "attack_settings": {"generator_lr": -1.0}}))
    with pytest.raises(ConfigError, match="ensemble settings"):
        load_uq_spec(bad)
    bad.write_text(yaml.safe_dump({**SPEC, "diversity": [-1.0]}))
    with pytest.raises(ConfigError, match="diversity"):
        load_uq_spec(bad)


def test_cells_put_seeds_outermost() -> None:
    from experiments.uq_study import UQStudySpec

    cells = cells_of(UQStudySpec.model_validate({**SPEC, "seeds": [0, 1]}))
    assert [cell.seed for cell in cells] == [0, 0, 1, 1]


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:  # noqa: F811 - the fixture above
    name = "stealsim-test-uq-" + uuid.uuid4().hex[:10]
    yield name
    delete_matching(redis_url, f"*{name}*")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_study_on_redis_matches_in_process(
    local_study: Path, study_files: tuple[Path, Path], redis_url: str, queue: str, tmp_path: Path,  # noqa: F811
) -> None:
    spec, cache = study_files
    out = tmp_path / "out"
    with grid_workers(redis_url, queue, tmp_path, cache, count=1):
        result = subprocess.run(
            [sys.executable, "-m", "stealsim", "uq-study", str(spec), "--out", str(out), "--redis-url",
             redis_url, "--queue", queue],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
    local = {row["cell"]: row for row in rows_of(local_study / "results.csv")}
    remote = {row["cell"]: row for row in rows_of(out / "results.csv")}
    assert set(remote) == set(local)
    for cell, row in remote.items():
        # Same seed, same victim, same code: the same numbers wherever the cell ran.
        for column in ("status", "queries", "combined_fidelity", "member_fidelity_best", "member_variance",
                       "query_member_variance", "variance_peak_queries"):
            assert row[column] == local[cell][column], (cell, column)
    assert sorted(p.name for p in (tmp_path / "worker0" / "runs").iterdir()) == sorted(local)
