"""Reports over seeds: aggregation on fixed numbers, grouping by seed, mean curves, no empty plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from attacker.report import write_run_report
from experiments.report import (
    aggregate_runs,
    compare_runs,
    group_runs,
    plot_groups,
    read_runs,
    seed_table,
)
from experiments.stats import format_spread, mean_curve, spread
from stealsim.errors import AttackError


def fake_run(root: Path, name: str, *, attack: str = "dual-student", seed: int = 0, budget: int = 1000,
             fidelity: float = 0.5, settings: dict[str, Any] | None = None, port: int = 8000,
             history: list[dict[str, Any]] | None = None, **metrics: Any) -> Path:
    """A run directory as attacker/runner.py writes it (HTTP victim, model ``normal``)."""
    path = root / name
    path.mkdir(parents=True)
    config = {
        "attack": attack, "budget": budget, "seed": seed, "victim": f"http://127.0.0.1:{port} model normal",
        "victim_kind": "http", "eval_dataset": "digits", "eval_every": 500, "device": "cpu",
        "separate_evaluation_key": True,
        "victim_info": {"input_shape": [1, 8, 8], "num_classes": 10, "output_kind": "probabilities",
                        "max_images_per_request": 1024, "name": "normal"},
        "settings": {"batch_size": 100, "student_lr": 0.002, **(settings or {})},
        "evaluation": {"transfer_samples": 20},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.json").write_text(json.dumps({"fidelity": fidelity, "accuracy": fidelity - 0.1,
                                                    "queries_used": budget, "eval_queries": 360, **metrics}))
    if history is None:
        history = [{"queries": 500, "fidelity": fidelity / 2, "accuracy": 0.2},
                   {"queries": budget, "fidelity": fidelity, "accuracy": fidelity - 0.1}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))
    return path


def test_spread_on_fixed_numbers() -> None:
    value = spread([0.8, 0.9, 1.0])
    assert value is not None
    assert value.mean == pytest.approx(0.9) and value.std == pytest.approx(0.1) and value.min == 0.8
    assert (value.n, value.of) == (3, 3)
    assert format_spread(value) == "0.9000 ± 0.1000 (0.8000)"
    two = spread([2.0, 4.0, None])  # sample std (n - 1): sqrt(2); None skipped but counted
    assert two is not None and two.std == pytest.approx(math.sqrt(2)) and (two.n, two.of) == (2, 3)
    assert format_spread(two).endswith("[2/3]")
    one = spread([0.5])
    assert one is not None and math.isnan(one.std) and format_spread(one) == "0.5000"
    assert spread([None, float("nan")]) is None and format_spread(None) == "—"


def test_runs_that_differ_only_by_seed_are_one_group(tmp_path: Path) -> None:
    paths = [
        # the service's port changes between runs: still the same victim
        fake_run(tmp_path, "ds-s0", seed=0, fidelity=0.8, port=8001),
        fake_run(tmp_path, "ds-s1", seed=1, fidelity=0.9, port=8002),
        fake_run(tmp_path, "ds-s2", seed=2, fidelity=1.0),
        fake_run(tmp_path, "ds-lr-s0", seed=0, fidelity=0.7, settings={"student_lr": 0.001}),
        fake_run(tmp_path, "random-s0", attack="random", seed=0, fidelity=0.6, settings={"steps_per_call": 5}),
        fake_run(tmp_path, "random-s1", attack="random", seed=1, fidelity=0.7, settings={"steps_per_call": 5}),
        fake_run(tmp_path, "ds-big", seed=0, budget=2000, fidelity=0.95),
    ]
    groups = group_runs(read_runs(paths))
    assert [[run.path.name for run in group.runs] for group in groups] == [
        ["ds-s0", "ds-s1", "ds-s2"], ["ds-lr-s0"], ["random-s0", "random-s1"], ["ds-big"]]
    assert [group.label for group in groups] == [
        "dual-student (budget=1000, student_lr=0.002)", "dual-student (budget=1000, student_lr=0.001)",
        "random (budget=1000)", "dual-student (budget=2000, student_lr=0.002)"]
    table = seed_table(groups, ("fidelity",))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    first = rows["dual-student (budget=1000, student_lr=0.002)"]
    assert "| 3 | 0, 1, 2 | 0.9000 ± 0.1000 (0.8000) | +0.2500 |" in first  # random's mean is 0.65
    assert "| 1 seed | 0 | 0.7000 | +0.0500 |" in rows["dual-student (budget=1000, student_lr=0.001)"]
    assert "0.6500 ± 0.0707 (0.6000) | baseline |" in rows["random (budget=1000)"]
    assert "no baseline" in rows["dual-student (budget=2000, student_lr=0.002)"]  # no random at 2000
    assert "1 seed (no spread)" in table and "No baseline" in table


def test_labels_override_the_grouping(tmp_path: Path) -> None:
    paths = [fake_run(tmp_path, "a", fidelity=0.2), fake_run(tmp_path, "b", fidelity=0.4, budget=5),
             fake_run(tmp_path, "c", fidelity=0.9)]
    groups = group_runs(read_runs(paths), labels=["x", "x", "y"])
    assert [(group.label, len(group.runs)) for group in groups] == [("x", 2), ("y", 1)]
    with pytest.raises(Exception, match="one label per run"):
        group_runs(read_runs(paths), labels=["x"])
    assert "Seeds repeat within: x" in seed_table(groups)  # both "x" runs have seed 0


def test_mean_curve_same_queries_and_interpolated() -> None:
    same = mean_curve([[{"queries": 10, "fidelity": 0.2}, {"queries": 20, "fidelity": 0.4}],
                       [{"queries": 10, "fidelity": 0.4}, {"queries": 20, "fidelity": 0.8}]])
    assert same is not None and not same.interpolated and same.runs == 2
    assert same.queries == [10, 20] and same.mean == pytest.approx([0.3, 0.6])
    assert same.std == pytest.approx([math.sqrt(0.02), math.sqrt(0.08)])
    shifted = mean_curve([[{"queries": 0, "fidelity": 0.0}, {"queries": 100, "fidelity": 1.0}],
                          [{"queries": 50, "fidelity": 0.5}, {"queries": 150, "fidelity": 0.5}]])
    assert shifted is not None and shifted.interpolated
    assert shifted.queries == [50, 100]  # only where both runs have a value, no extrapolation
    assert shifted.mean == pytest.approx([0.5, 0.75])
    assert mean_curve([[{"queries": 10, "accuracy": 0.3}]], "fidelity") is None


def test_no_empty_plot_is_ever_written(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "never-evaluated", history=[], planned_eval_queries=2000,
                   evaluation_error="HTTP 429 on the evaluation key")
    (run / "progress.png").write_bytes(b"stale")
    config, metrics = (json.loads((run / name).read_text()) for name in ("config.json", "metrics.json"))
    write_run_report(run, config, metrics, [])
    assert not (run / "progress.png").exists()
    report = (run / "report.md").read_text()
    assert "No plot: the run has no evaluated point" in report
    assert "360 spent of 2,000 planned, charged to the evaluation key" in report
    assert "HTTP 429 on the evaluation key" in report
    assert plot_groups([("nothing", [[{"queries": 5}]])], tmp_path / "empty.png", "t") == []
    assert not (tmp_path / "empty.png").exists()
    assert "No plot written" in aggregate_runs([run], tmp_path / "agg.png")
    assert not (tmp_path / "agg.png").exists()
    assert "evaluation error: HTTP 429" in aggregate_runs([run])


def test_reports_with_points_write_plots(tmp_path: Path) -> None:
    paths = [fake_run(tmp_path, f"s{seed}", seed=seed, fidelity=0.5 + seed / 10) for seed in range(3)]
    config, metrics = (json.loads((paths[0] / name).read_text()) for name in ("config.json", "metrics.json"))
    history = [json.loads(line) for line in (paths[0] / "metrics.jsonl").read_text().splitlines()]
    write_run_report(paths[0], config, metrics, history)
    assert (paths[0] / "progress.png").stat().st_size > 1000
    assert "![fidelity and accuracy" in (paths[0] / "report.md").read_text()
    text = aggregate_runs(paths, tmp_path / "mean.png")
    assert "band ±1 std over seeds" in text and (tmp_path / "mean.png").stat().st_size > 1000
    per_run = compare_runs(paths, tmp_path / "each.png")
    assert per_run.count("\n") == 5 and (tmp_path / "each.png").stat().st_size > 1000


def test_cli_report_aggregates_by_default(tmp_path: Path) -> None:
    paths = [str(fake_run(tmp_path, f"s{seed}", seed=seed, fidelity=0.8 + seed / 10)) for seed in range(2)]
    command = [sys.executable, "-m", "stealsim", "report", *paths]
    aggregated = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert aggregated.returncode == 0, aggregated.stderr
    assert "| dual-student | dual-student | 2 | 0, 1 | 0.8500 ± 0.0707 (0.8000) |" in aggregated.stdout
    header, _, row, *_ = aggregated.stdout.splitlines()
    assert header.endswith("| fidelity − random | victim | dataset |")
    assert row.endswith("| no baseline | normal (HTTP) | digits test |")
    each = subprocess.run([*command, "--per-run"], capture_output=True, text=True, timeout=120)
    assert each.returncode == 0 and "| s1 | dual-student | 1 |" in each.stdout
    header, _, row, *_ = each.stdout.splitlines()
    assert header.endswith("| wall_seconds | victim | dataset |") and row.endswith("| normal (HTTP) | digits test |")


def test_published_reference_points_are_read_and_drawn(tmp_path: Path) -> None:
    from experiments.report import ReferencePoint, read_reference_points

    csv_path = tmp_path / "published.csv"
    csv_path.write_text("# Source: a paper, table 2\nmethod,queries,accuracy_percent\nDFME,1000,10.3\nDFME,50000,83.4\n")
    points = read_reference_points(csv_path)
    assert [(p.method, p.queries, p.metric, p.source) for p in points] == [
        ("DFME", 1000.0, "accuracy", "published.csv"), ("DFME", 50000.0, "accuracy", "published.csv")]
    assert [p.value for p in points] == pytest.approx([0.103, 0.834])
    assert isinstance(points[0], ReferencePoint)
    paths = [str(fake_run(tmp_path, f"s{seed}", seed=seed, fidelity=0.8)) for seed in range(2)]
    plot = tmp_path / "with-references.png"
    done = subprocess.run([sys.executable, "-m", "stealsim", "report", *paths, "--plot", str(plot),
                           "--reference", str(csv_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert plot.stat().st_size > 1000
    (tmp_path / "bad.csv").write_text("method,queries,loss\nDFME,10,1.0\n")
    with pytest.raises(AttackError, match="is not one of fidelity, accuracy"):
        read_reference_points(tmp_path / "bad.csv")
    refused = subprocess.run([sys.executable, "-m", "stealsim", "report", *paths, "--reference", str(csv_path)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "give --plot too" in refused.stderr
    # --curve picks the panels: a metric no run recorded draws nothing, and says so.
    absent = subprocess.run([sys.executable, "-m", "stealsim", "report", *paths, "--plot", str(tmp_path / "x.png"),
                             "--curve", "answer_top_share"], capture_output=True, text=True, timeout=120)
    assert absent.returncode == 0 and "No plot written" in absent.stdout and not (tmp_path / "x.png").exists()


def test_stopped_runs_are_reported_from_their_last_evaluation_and_named(tmp_path: Path) -> None:
    finished = fake_run(tmp_path, "done", seed=0, fidelity=0.9)
    stopped = fake_run(tmp_path, "stopped", seed=1, history=[
        {"queries": 500, "fidelity": 0.3, "accuracy": 0.2}, {"queries": 700, "loss": 1.0},
        {"queries": 800, "fidelity": 0.5, "accuracy": 0.4}, {"queries": 900, "loss": 0.9}])
    (stopped / "metrics.json").unlink()
    runs = read_runs([finished, stopped])
    assert runs[1].metrics["fidelity"] == 0.5 and runs[1].metrics["stopped_at"] == 800
    assert "stopped_at" not in runs[0].metrics
    table = seed_table(group_runs(runs), ("fidelity",))
    assert "0.7000 ± 0.2828 (0.5000)" in table
    assert "Not finished" in table and "stopped at 800 queries" in table
    assert "stopped at 800 queries" in compare_runs([finished, stopped])
    assert "Not finished" not in compare_runs([finished])
    empty = fake_run(tmp_path, "empty", history=[{"queries": 100, "loss": 2.0}])
    (empty / "metrics.json").unlink()
    with pytest.raises(AttackError, match=r"no metrics\.json and no evaluation"):
        read_runs([empty])


def test_report_plot_into_a_missing_folder_is_one_error_line(tmp_path: Path) -> None:
    run = str(fake_run(tmp_path, "s0"))
    for plot in (tmp_path / "missing" / "runs.png", tmp_path):  # a missing folder; a folder instead of a file
        done = subprocess.run([sys.executable, "-m", "stealsim", "report", run, "--plot", str(plot)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: --plot ") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "missing").exists()


def with_intervals(fidelity: float, accuracy: float, victim_accuracy: float, n: int = 360) -> dict[str, Any]:
    """One evaluation's proportions with their Wilson intervals, as attacker/evaluation.py writes them."""
    from attacker.evaluation import proportion_interval

    line: dict[str, Any] = {"eval_images": n}
    for name, value in (("fidelity", fidelity), ("accuracy", accuracy), ("victim_accuracy", victim_accuracy)):
        line[name] = value
        line[f"{name}_ci95_low"], line[f"{name}_ci95_high"] = proportion_interval(round(value * n), n)
    return line


def test_tables_show_intervals_victim_dataset_and_whole_group_names(tmp_path: Path) -> None:
    final = with_intervals(342 / 360, 340 / 360, 358 / 360)
    history = [{"queries": 500, **with_intervals(0.5, 0.5, 358 / 360)}, {"queries": 1000, **final}]
    long_arch = ["resnet18", "resnet34", "lenet5", "small-cnn", "resnet18", "resnet34"]
    paths = [
        fake_run(tmp_path, "a", history=history, **final, settings={"architectures": long_arch}),
        fake_run(tmp_path, "b", history=history, **final, settings={"architectures": ["lenet5"]}),
        fake_run(tmp_path, "c", history=history, **final),
    ]
    # another victim (its column tells it apart) and a label-only victim of the same name
    config = json.loads((paths[2] / "config.json").read_text())
    config["victim"] = "http://127.0.0.1:9000 model nasty"
    (paths[2] / "config.json").write_text(json.dumps(config))
    labels = fake_run(tmp_path, "d", history=history, **final)
    config = json.loads((labels / "config.json").read_text())
    config["victim_info"]["output_kind"] = "label"
    (labels / "config.json").write_text(json.dumps(config))
    groups = group_runs(read_runs([*paths, labels]))
    names = [group.label for group in groups]
    assert names[0] == f"dual-student (output_kind=probabilities, architectures={','.join(long_arch)})"
    assert names[1] == "dual-student (output_kind=probabilities, architectures=lenet5)"
    assert names[2] == "dual-student (output_kind=probabilities)"
    assert names[3] == "dual-student (output_kind=label)"
    assert [group.label for group in group_runs(read_runs(paths[1:3]))] == [
        "dual-student (architectures=lenet5)", "dual-student"]  # the victim column alone tells "c" apart
    assert not any("…" in name or "{" in name for name in names)
    table = seed_table(groups, ("fidelity", "accuracy"))
    low, high = final["fidelity_ci95_low"], final["fidelity_ci95_high"]
    assert f"| 1 seed | 0 | 0.9500 ({low:.4f}–{high:.4f}) |" in table and "| nasty (HTTP) | digits test |" in table
    assert 0.92 < low < 0.95 < high < 0.97
    assert "360 evaluation images, so one image moves them by 0.28 points" in table
    assert "accuracy equals fidelity" not in table  # the victim gets 358 of 360
    per_run = compare_runs(paths)
    assert f"| c | dual-student | 0 | 1,000 | 0.9500 ({low:.4f}–{high:.4f}) |" in per_run

    write_run_report(paths[0], json.loads((paths[0] / "config.json").read_text()), final, history)
    report = (paths[0] / "report.md").read_text()
    assert f"| fidelity | 0.9500 | {low:.4f}–{high:.4f} |" in report
    assert f"| 1,000 | 0.9500 ({low:.4f}–{high:.4f}) |" in report and "one image moves them by 0.28" in report


def test_a_perfect_victim_draws_one_panel_and_says_so(tmp_path: Path) -> None:
    history = [{"queries": q, **with_intervals(f, f, 1.0)} for q, f in ((500, 0.5), (1000, 0.9))]
    paths = [fake_run(tmp_path, f"s{seed}", seed=seed, history=history, **history[-1]) for seed in range(2)]
    text = aggregate_runs(paths, tmp_path / "perfect.png")
    assert "so accuracy equals fidelity throughout" in text
    assert "fidelity = accuracy against queries" in text and (tmp_path / "perfect.png").stat().st_size > 1000
    single = aggregate_runs(paths[:1], tmp_path / "one.png")
    assert "band 95 % interval of the evaluation split (Wilson)" in single
    write_run_report(paths[0], json.loads((paths[0] / "config.json").read_text()), history[-1], history)
    assert "so accuracy equals fidelity throughout: the plot draws one panel" in (paths[0] / "report.md").read_text()
    # an imperfect victim keeps its two panels
    history[0]["victim_accuracy"] = 0.99
    imperfect = fake_run(tmp_path, "imperfect", history=history)
    assert "fidelity, accuracy against queries" in aggregate_runs([imperfect], tmp_path / "two.png")
