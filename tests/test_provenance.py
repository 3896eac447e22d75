"""Resolution and provenance of a run: Wilson intervals beside each proportion, the origin in config.json."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch

from attacker.evaluation import INTERVAL_METRICS, proportion_interval
from attacker.provenance import PROVENANCE_FIELDS, command_line
from attacker.rundir import RunDirectory
from experiments.report import aggregate_runs

REPO = Path(__file__).resolve().parent.parent


def wilson_by_hand(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927)'s score interval written out, to check the library's."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1() -> None:
    for successes, trials in ((342, 360), (358, 360), (1, 360), (50, 100), (7, 9)):
        assert proportion_interval(successes, trials) == pytest.approx(wilson_by_hand(successes, trials), abs=1e-9)
    low, high = proportion_interval(360, 360)  # a perfect score still has a lower bound below 1
    assert high == 1.0 and low == pytest.approx(0.98944, abs=1e-5)
    assert proportion_interval(0, 360)[0] == 0.0
    with pytest.raises(ValueError, match="successes <= trials"):
        proportion_interval(5, 4)


def test_the_command_line_keeps_no_secret() -> None:
    line = command_line(["/venv/bin/stealsim", "attack", "random", "--api-key", "k-123", "--eval-api-key=k-456",
                         "--header", "Authorization=Bearer t-789", "--out", "runs/a b"])
    assert line == ("stealsim attack random --api-key REDACTED --eval-api-key=REDACTED --header REDACTED "
                    "--out 'runs/a b'")
    assert command_line(["/repo/stealsim/__main__.py", "report", "x"]) == "python -m stealsim report x"


def test_a_run_records_its_provenance_and_the_resolution_of_its_numbers(
    digits_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    before = datetime.now(UTC).replace(microsecond=0)
    command = [sys.executable, "-m", "stealsim", "--log-level", "WARNING", "attack", "random",
               "--victim-checkpoint", str(digits_checkpoint), "--budget", "300", "--eval-every", "150",
               "--out", str(out), "--transfer-samples", "5", "--reference-epochs", "1", "--quiet",
               "--threads", "1", "--set", "batch_size=100", "--set", "steps_per_call=1",
               "--set", "student_width=8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr
    after = datetime.now(UTC)

    config = json.loads((out / "config.json").read_text())
    origin = config["provenance"]
    assert set(PROVENANCE_FIELDS) <= set(origin)
    assert origin["version"] == metadata.version("stealsim")
    assert origin["python"] == platform.python_version() and origin["torch"] == torch.__version__
    assert origin["device"] == "cpu" and origin["gpu"] is None and origin["cpu"]
    assert origin["command"].startswith("python -m stealsim --log-level WARNING attack random --victim-checkpoint")
    assert before <= datetime.fromisoformat(origin["started_at"]) <= after
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # run from a checkout: its commit, and whether tracked files differ from it
        assert origin["git"]["commit"] == head.stdout.strip() and isinstance(origin["git"]["dirty"], bool)

    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in history if "fidelity" in line]
    assert len(evaluated) >= 2  # an intermediate evaluation and the final one
    for record in (metrics, *evaluated):
        assert record["eval_images"] == 360  # the digits test split
        for name in INTERVAL_METRICS:
            value, low, high = record[name], record[f"{name}_ci95_low"], record[f"{name}_ci95_high"]
            assert 0 <= low <= value <= high <= 1 and high > low
            assert (low, high) == pytest.approx(proportion_interval(round(value * 360), 360))

    # config.json stays readable by every reader: the run record, the multi-run report, the run's report
    record = RunDirectory(out).read_record()
    assert record.config["provenance"] == origin and record.metrics["fidelity"] == metrics["fidelity"]
    assert "| random |" in aggregate_runs([out])
    report = (out / "report.md").read_text()
    assert "| fidelity | " in report and "95 % interval" in report and "360 evaluation images" in report
