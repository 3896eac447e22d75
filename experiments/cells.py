"""The one runner of experiment cells: an attack run in a fresh directory, turned into a result row.

A cell of the grid (:mod:`experiments.grid`) or of the uq-study
(:mod:`experiments.uq_study`) is one attack run; both run it here::

    row = run_cell({"cell": cell.id, **asdict(cell)}, work_dir / "runs" / cell.id,
                   attack=lambda run_dir: RunSpec(attack="random", out=run_dir, ...),
                   results=lambda metrics, run_dir: {"fidelity": metrics["fidelity"]})

A failed cell is a row too (status ``failed`` and the error): a grid goes on
past it, and runs it again when resumed.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attacker.runner import RunSpec

__all__ = ["run_cell"]

logger = logging.getLogger(__name__)

Measure = Callable[[dict[str, Any], Path], Mapping[str, Any]]
"""``(the run's metrics, its directory) -> columns of the row``."""


def run_cell(
    row: Mapping[str, Any],
    run_dir: Path,
    attack: Callable[[Path], RunSpec],
    results: Measure,
    extras: Measure | None = None,
) -> dict[str, Any]:
    """Run one cell's attack in ``run_dir`` and return its row: ``row`` (the cell's axes, ``cell`` its id) and
    ``status``, the results, ``error`` and ``wall_seconds``.

    ``run_dir`` is emptied first (an unfinished earlier attempt starts again);
    ``attack(run_dir)`` is the run (it may ask the victim service for keys);
    ``results(metrics, run_dir)`` are the columns that make the row ``done``;
    ``extras(metrics, run_dir)`` are measured after: if they fail, the row stays
    done with the error. Any failure is logged and its text goes to ``error``.
    """
    from attacker.runner import run_attack

    cell = dict(row)
    cell["status"] = "failed"
    started = time.perf_counter()
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        metrics = run_attack(attack(run_dir))
        cell.update(results(metrics, run_dir))
        cell["status"] = "done"
        if extras is not None:
            cell.update(extras(metrics, run_dir))
    except Exception as exc:
        logger.exception("cell %s failed", cell["cell"])
        cell["error"] = f"{type(exc).__name__}: {exc}"
    cell["wall_seconds"] = time.perf_counter() - started
    return cell
