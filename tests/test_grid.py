"""``stealsim grid``: a tiny grid in this process (with resume), and the same grid as rq jobs on a
real Redis consumed by two ``stealsim grid-worker`` processes, which must produce the same cells."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from redis_support import delete_matching, grid_workers, redis_url  # noqa: F401 - fixture

from experiments.grid import RESULT_COLUMNS, cells_of, load_spec, run_grid
from experiments.grid_report import pareto_front, write_grid_report

SPEC = {
    "dataset": "digits",
    "victim_epochs": 2,
    "nasty_epochs": 1,
    "victims": ["normal"],
    "attacks": ["random"],
    "defenses": {"none": [], "top1": [{"name": "top_k", "k": 1}]},
    "budgets": [300, 600],
    "seeds": [0],
    "attack_settings": {"student_width": 8, "batch_size": 100, "replay": 600},
    "transfer_samples": 10,
    "reference_epochs": 1,
    "eval_every": 300,
    "threads": 1,
}


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def grid_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The spec file and a victim cache shared by the tests of this module."""
    base = tmp_path_factory.mktemp("grid")
    spec = base / "grid.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return spec, base / "cache"


@pytest.fixture(scope="module")
def in_process_grid(grid_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec, cache = grid_files
    out = tmp_path_factory.mktemp("grid-local") / "out"
    run_grid(load_spec(spec), out, cache_dir=cache, show_progress=False)
    return out


def test_grid_in_process_writes_cells_costs_and_report(in_process_grid: Path, grid_files: tuple[Path, Path]) -> None:
    rows = rows_of(in_process_grid / "results.csv")
    expected = {cell.id for cell in cells_of(load_spec(grid_files[0]))}
    assert {row["cell"] for row in rows} == expected and len(rows) == 4
    for row in rows:
        assert row["status"] == "done", row
        assert int(row["queries"]) == int(row["budget"])
        assert 0.0 <= float(row["fidelity"]) <= 1.0
    costs = {row["defense"]: row for row in rows_of(in_process_grid / "defenses.csv")}
    assert set(costs) == {"none", "top1"}
    # top-1 keeps every arg-max (honest accuracy unchanged) but answers with confidence 1,
    # so its calibration error is exactly the error rate.
    assert float(costs["top1"]["accuracy"]) == pytest.approx(float(costs["none"]["accuracy"]))
    assert float(costs["top1"]["ece"]) == pytest.approx(1.0 - float(costs["top1"]["accuracy"]), abs=1e-6)
    report = (in_process_grid / "report.md").read_text()
    assert "| normal | top1 |" in report
    assert "| random | normal | none | 300 | 1 seed | 0 |" in report  # one seed per cell in this grid
    assert (in_process_grid / "fidelity_vs_budget.png").stat().st_size > 1000
    assert (in_process_grid / "tradeoff.png").stat().st_size > 1000
    assert "## Pareto-optimal defenses" in report and "- random / normal: " in report


def test_pareto_front_keeps_the_points_nothing_beats_on_both() -> None:
    # (honest cost, attacker's fidelity): (0.0, 0.9) is cheapest, (0.1, 0.5) stops best,
    # (0.05, 0.7) sits between; (0.1, 0.8) and (0.2, 0.5) are dominated; a duplicate stays.
    points = [(0.0, 0.9), (0.1, 0.8), (0.05, 0.7), (0.1, 0.5), (0.2, 0.5), (0.05, 0.7)]
    assert pareto_front(points) == [0, 2, 3, 5]
    assert pareto_front([]) == []


def write_results(out: Path, rows: list[dict[str, object]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            cell = f"{row['attack']}__normal__none__b{row['budget']}__s{row['seed']}"
            writer.writerow({"cell": cell, "victim": "normal", "defense": "none", "status": "done",
                             "queries": row["budget"], "accuracy": 0.5, "transfer_success_rate": 0.1,
                             "victim_accuracy": 0.9, "wall_seconds": 1.0, **row})


def test_grid_report_aggregates_the_seeds_of_each_cell(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"attack": "dual-student", "budget": 300, "seed": seed, "fidelity": fidelity}
        for seed, fidelity in ((0, 0.8), (1, 0.9), (2, 1.0))
    ] + [
        {"attack": "random", "budget": 300, "seed": seed, "fidelity": fidelity}
        for seed, fidelity in ((0, 0.6), (1, 0.7))
    ] + [{"attack": "dual-student", "budget": 600, "seed": 0, "fidelity": 0.95}]
    # a failed attempt does not count; a cell written twice counts once (its last line)
    rows.insert(0, {"attack": "random", "budget": 300, "seed": 0, "fidelity": "", "status": "failed"})
    rows.insert(0, {"attack": "dual-student", "budget": 300, "seed": 0, "fidelity": 0.1})
    write_results(tmp_path, rows)
    report = write_grid_report(tmp_path).read_text()
    assert ("| dual-student | normal | none | 300 | 3 | 0, 1, 2 | 0.9000 ± 0.1000 (0.8000) "
            "| 0.5000 ± 0 (0.5000) | 0.1000 ± 0 (0.1000) | +0.250 |") in report
    assert "| random | normal | none | 300 | 2 | 0, 1 | 0.6500 ± 0.0707 (0.6000) |" in report
    assert "| baseline |" in report
    assert "| dual-student | normal | none | 600 | 1 seed | 0 | 0.9500 |" in report
    assert "no baseline |" in report  # no random cell at budget 600
    assert "in 3 groups of seeds" in report and "(1 with a single seed)" in report
    assert (tmp_path / "fidelity_vs_budget.png").stat().st_size > 1000


def test_grid_report_without_finished_cells_writes_no_plot(tmp_path: Path) -> None:
    write_results(tmp_path, [{"attack": "random", "budget": 300, "seed": 0, "status": "failed", "fidelity": ""}])
    report = write_grid_report(tmp_path).read_text()
    assert "No plots: no finished cell has a fidelity yet." in report
    assert not (tmp_path / "fidelity_vs_budget.png").exists() and not (tmp_path / "tradeoff.png").exists()


def test_grid_resume_skips_finished_cells(in_process_grid: Path, grid_files: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    spec, cache = grid_files
    out = tmp_path / "resumed"
    out.mkdir()
    rows = rows_of(in_process_grid / "results.csv")
    kept, dropped = rows[:3], rows[3]
    # A grid stopped after three cells: their rows are in the CSV, the fourth is not.
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    (out / "defenses.csv").write_bytes((in_process_grid / "defenses.csv").read_bytes())
    messages: list[str] = []
    run_grid(load_spec(spec), out, cache_dir=cache, show_progress=False, announce=messages.append)
    assert messages[0].startswith("grid: 4 cells, 3 already finished, 1 to run")
    assert sorted(path.name for path in (out / "runs").iterdir()) == [dropped["cell"]]  # only that one ran
    after = rows_of(out / "results.csv")
    assert [row["cell"] for row in after] == [row["cell"] for row in kept] + [dropped["cell"]]
    assert after[:3] == kept
    assert after[3]["status"] == "done"
    assert {k: v for k, v in after[3].items() if k != "wall_seconds"} == {
        k: v for k, v in dropped.items() if k != "wall_seconds"}
    # Everything finished: a third run runs nothing.
    messages.clear()
    run_grid(load_spec(spec), out, cache_dir=cache, show_progress=False, announce=messages.append)
    assert messages[0].startswith("grid: 4 cells, 4 already finished, 0 to run")
    assert len(rows_of(out / "results.csv")) == 4


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:  # noqa: F811 - the fixture above
    name = "stealsim-test-grid-" + uuid.uuid4().hex[:10]
    yield name
    delete_matching(redis_url, f"*{name}*")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grid_on_redis_with_two_workers_matches_in_process(
    in_process_grid: Path, grid_files: tuple[Path, Path], redis_url: str, queue: str, tmp_path: Path,  # noqa: F811
) -> None:
    spec, cache = grid_files
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    with grid_workers(redis_url, queue, tmp_path, cache, count=2):
        result = subprocess.run(
            [sys.executable, "-m", "stealsim", "grid", str(spec), "--out", str(out), "--redis-url", redis_url,
             "--queue", queue, "--quiet"],
            capture_output=True, text=True, timeout=500, env=environment,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    local = {row["cell"]: row for row in rows_of(in_process_grid / "results.csv")}
    remote = {row["cell"]: row for row in rows_of(out / "results.csv")}
    assert set(remote) == set(local)
    for cell, row in remote.items():
        assert row["status"] == "done", row
        # Same seed, same victims, same code: the very same numbers, wherever the cell ran.
        for column in ("attack", "victim", "defense", "budget", "seed", "queries", "accuracy", "fidelity",
                       "transfer_success_rate", "victim_accuracy"):
            assert row[column] == local[cell][column], (cell, column)
    local_costs = {row["cell"]: row for row in rows_of(in_process_grid / "defenses.csv")}
    remote_costs = {row["cell"]: row for row in rows_of(out / "defenses.csv")}
    assert set(remote_costs) == set(local_costs)
    for cell, row in remote_costs.items():
        assert float(row["accuracy"]) == pytest.approx(float(local_costs[cell]["accuracy"]))
    # Both workers ran cells, each against its own service, now stopped.
    ran = [sorted(p.name for p in (tmp_path / f"worker{i}" / "runs").glob("*")) if (tmp_path / f"worker{i}" / "runs").is_dir() else []
           for i in range(2)]
    assert sorted(ran[0] + ran[1]) == sorted(local)
    for index in range(2):
        assert "victim service stopped" in (tmp_path / f"worker{index}.log").read_text() or not ran[index]


def test_a_results_file_of_older_columns_gains_the_new_ones_and_keeps_its_lines(tmp_path: Path) -> None:
    """A grid resumed by a newer stealsim appends rows with more columns: the file is rewritten under
    the new header first, so no line lands under the wrong column."""
    from experiments.store import ResultsStore

    path = tmp_path / "results.csv"
    ResultsStore(path, ("cell", "status", "fidelity")).append({"cell": "a", "status": "done", "fidelity": 0.5})
    newer = ResultsStore(path, ("cell", "status", "flags", "fidelity"))
    newer.append({"cell": "b", "status": "done", "flags": "seat", "fidelity": 0.25})
    rows = newer.rows()
    assert [row["cell"] for row in rows] == ["a", "b"]
    assert rows[0]["fidelity"] == "0.5" and rows[0]["flags"] == ""
    assert rows[1]["fidelity"] == "0.25" and rows[1]["flags"] == "seat"
    # An older stealsim's store (fewer columns) appends under the file's full header, not its own.
    ResultsStore(path, ("cell", "status", "fidelity")).append({"cell": "c", "status": "done", "fidelity": 1})
    assert [(row["cell"], row["fidelity"], row["flags"]) for row in ResultsStore(path, ()).rows()][-1] == ("c", "1", "")
