"""The defender's table of issue #38 (benchmarks/adaptive_defenses.py) read from result files:
which run stands for which cell, what a blocking detector leaves, and the verdict."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("adaptive_defenses", ROOT / "benchmarks" / "adaptive_defenses.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({key for row in rows for key in row})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cells(variant: str, attack: str, defense: str, fidelities: list[float], **extra: object) -> list[dict[str, object]]:
    return [{"cell": f"{attack}__normal__{defense}__b50000__s{seed}", "attack": attack, "defense": defense,
             "seed": seed, "status": "done", "fidelity": value, "transfer_success_rate": 0.5,
             "first_flags": extra.get("first_flags", ""), "fidelity_at_flags": extra.get("fidelity_at_flags", ""),
             "watermark_p_value": ""} for seed, value in enumerate(fidelities)]


def _costs(defenses: dict[str, tuple[float, str]]) -> list[dict[str, object]]:
    return [{"cell": f"normal__{name}", "defense": name, "accuracy": accuracy, "ece": 0.02, "flags": flags}
            for name, (accuracy, flags) in defenses.items()]


def test_the_table_maps_arg_max_runs_blocks_at_flags_and_judges_the_best_thief(bench: ModuleType,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "adaptive"
    _write(out / "plain" / "results.csv",
           _cells("plain", "dual-student", "none", [0.90, 0.92, 0.94])
           + _cells("plain", "dual-student", "reverse-sigmoid", [0.60, 0.62, 0.64])
           + _cells("plain", "dual-student", "adaptive-misinfo", [0.50, 0.52, 0.54])
           + _cells("plain", "dual-student", "detectors", [0.90, 0.92, 0.94], first_flags="ood_rate:128",
                    fidelity_at_flags="ood_rate:0.3000"))
    _write(out / "plain" / "defenses.csv", _costs({"none": (0.99, ""), "reverse-sigmoid": (0.99, ""),
                                                   "adaptive-misinfo": (0.985, ""), "detectors": (0.99, "")}))
    _write(out / "arg-max" / "results.csv",
           _cells("arg-max", "dual-student", "none", [0.88, 0.90, 0.92])
           + _cells("arg-max", "dual-student", "adaptive-misinfo", [0.70, 0.72, 0.74]))
    _write(out / "arg-max" / "defenses.csv", _costs({"none": (0.99, "")}))
    summary = bench.summarize(out, ["dual-student"])
    table = summary["defenses"]
    # Reverse sigmoid keeps the arg-max: the arg-max thief's run under none stands for it.
    reverse = table["reverse-sigmoid"]["attacks"]["dual-student"]
    assert reverse["best_variant"] == "arg-max" and reverse["best"][0] == pytest.approx(0.90)
    misinformation = table["adaptive-misinfo"]["attacks"]["dual-student"]
    assert misinformation["best_variant"] == "arg-max" and misinformation["best"][0] == pytest.approx(0.72)
    # Blocking at ood_rate's first flag leaves the fidelity at the flag; PRADA never flagged: all of it.
    assert table["ood_rate (blocking)"]["attacks"]["dual-student"]["best"][0] == pytest.approx(0.30)
    assert table["prada (blocking)"]["attacks"]["dual-student"]["best"][0] == pytest.approx(0.92)
    verdict = bench.verdict
    assert verdict(table["reverse-sigmoid"], table["none"], ["dual-student"], 1.0, 10.0).startswith("no: ")
    assert verdict(table["adaptive-misinfo"], table["none"], ["dual-student"], 1.0, 10.0).startswith("yes: ")
    assert verdict(table["ood_rate (blocking)"], table["none"], ["dual-student"], 1.0, 10.0).startswith("yes: ")
    # An honest user blocked by the detector costs all its accuracy: no, whatever the thief keeps.
    _write(out / "plain" / "defenses.csv", _costs({"none": (0.99, ""), "reverse-sigmoid": (0.99, ""),
                                                   "adaptive-misinfo": (0.985, ""),
                                                   "detectors": (0.99, "ood_rate")}))
    table = bench.summarize(out, ["dual-student"])["defenses"]
    assert verdict(table["ood_rate (blocking)"], table["none"], ["dual-student"], 1.0, 10.0) == \
        "no: costs honest users 99.0 points"
    assert "| adaptive-misinfo | 0.5 |" in bench.verdict_table({"defenses": table}, ["dual-student"], 1.0, 10.0)
