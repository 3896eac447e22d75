"""The results store of a grid or study: one CSV line per finished cell, appended as cells finish.

A store is what makes a grid resumable: a cell already in it with status
``done`` is not run again (a failed one is)::

    results = ResultsStore(out / "results.csv", RESULT_COLUMNS)
    todo = [cell for cell in cells if cell.id not in results.finished()]
    results.append(row)          # a dict; missing columns are written empty
    rows = results.rows()        # every line so far, as strings
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResultsStore", "read_csv"]


def read_csv(path: Path) -> list[dict[str, str]]:
    """Every line of a CSV file with a header, as strings; none when the file does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True)
class ResultsStore:
    """A CSV file of result rows with fixed ``columns``; each row names its cell in ``cell``."""

    path: Path
    columns: Sequence[str]

    def rows(self) -> list[dict[str, str]]:
        return read_csv(self.path)

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line (the header first in a new file); None and missing columns empty."""
        new = not self.path.is_file()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.columns), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in self.columns})
            handle.flush()

    def cells(self) -> set[str]:
        """Every cell with a line, whatever its status."""
        return {row["cell"] for row in self.rows()}

    def finished(self) -> set[str]:
        """Cells with status done (failed cells are run again; a line without status counts as done)."""
        return {row["cell"] for row in self.rows() if row.get("status", "done") == "done"}
