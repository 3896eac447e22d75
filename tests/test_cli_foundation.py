"""The train / distill / nasty-study commands, run as a user runs them (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stealsim.checkpoint import load_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stealsim", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "victim"
    result = run_cli("train", "--dataset", "digits", "--out", str(out), "--epochs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_a_loadable_checkpoint_and_metrics(victim: Path) -> None:
    metrics = json.loads((victim / "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    _, meta = load_checkpoint(victim)
    assert meta.dataset == "digits" and meta.architecture == "small-cnn"


def test_nasty_training_records_its_settings(victim: Path, tmp_path: Path) -> None:
    out = tmp_path / "nasty"
    result = run_cli("train", "--dataset", "digits", "--out", str(out), "--epochs", "1", "--quiet",
                     "--nasty", "--adversary", str(victim), "--omega", "0.05")
    assert result.returncode == 0, result.stderr
    _, meta = load_checkpoint(out)
    assert meta.training["nasty"]["omega"] == 0.05
    assert "adversary_test_accuracy" in meta.metrics


def test_distill_reports_teacher_student_and_baseline(victim: Path, tmp_path: Path) -> None:
    out = tmp_path / "distill"
    result = run_cli("distill", "--teacher", str(victim), "--dataset", "digits", "--out", str(out),
                     "--epochs", "1", "--compare-teacher", str(victim), "--quiet")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy", "baseline_student_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (out / "softmax.png").read_bytes()[:4] == b"\x89PNG"


def test_nasty_study_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = run_cli("nasty-study", "--dataset", "digits", "--out", str(out), "--seeds", "0",
                     "--epochs", "1", "--student-epochs", "2", "--alpha", "0.5", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "results.json").read_text())
    # Teachers train for --epochs, the students (KD and labels-only) for --student-epochs.
    assert summary["training"]["epochs"] == 1
    assert summary["student_training"]["epochs"] == 2
    assert summary["kd"]["alpha"] == 0.5
    assert [row["seed"] for row in summary["seeds"]] == [0]
    assert set(summary["mean"]) == {
        "teacher", "nasty_teacher", "student_from_teacher", "student_from_nasty", "baseline_student"
    }
    assert "| mean |" in (out / "table.md").read_text()
    # Settings are chosen on validation: every network is scored there too.
    assert set(summary["validation_mean"]) == set(summary["mean"])
    assert "Validation split" in (out / "table.md").read_text()
    load_checkpoint(out / "seed0" / "nasty")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["train", "--dataset", "digits", "--arch", "vgg"], "unknown architecture 'vgg'"),
        (["train", "--dataset", "digits", "--nasty", "--adversary", "/nonexistent"], "no checkpoint directory"),
        (["train", "--dataset", "digits", "--nasty"], "--nasty needs --adversary"),
        (["train", "--dataset", "digits", "--device", "tpu"], "unknown device"),
        (["distill", "--teacher", "/nonexistent", "--dataset", "digits"], "no checkpoint directory"),
        (["nasty-study", "--dataset", "digits", "--seeds", "a,b"], "--seeds must be"),
        (["nasty-study", "--dataset", "digits", "--alpha", "1.5"], "KD weight alpha must be in [0, 1]"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    result = run_cli(*args, "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_out_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    result = run_cli("train", "--dataset", "digits", "--out", str(target))
    assert result.returncode == 2 and "not a directory" in result.stderr
    assert target.read_text() == "keep me"


def test_distill_refuses_a_teacher_of_another_shape(victim: Path, tmp_path: Path) -> None:
    result = run_cli("distill", "--teacher", str(victim), "--dataset", "mnist5k", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "takes (1, 8, 8)" in result.stderr
