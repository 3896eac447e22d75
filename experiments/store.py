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
        """Write ``row`` as one line (the header first in a new file); None and missing columns empty.

        A file written with other columns (a grid resumed by a newer stealsim) is rewritten first
        under ``columns`` plus its own columns that ``columns`` lacks, its lines kept."""
        new = not self.path.is_file()
        columns = list(self.columns) if new else self._upgrade_header()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
            handle.flush()

    def _upgrade_header(self) -> list[str]:
        """The file's columns, first rewritten to hold every one of :attr:`columns` if they did not."""
        with self.path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if all(column in header for column in self.columns):
            return header
        kept = self.rows()
        columns = [*self.columns, *(column for column in header if column not in self.columns)]
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        temporary.replace(self.path)
        return columns

    def cells(self) -> set[str]:
        """Every cell with a line, whatever its status."""
        return {row["cell"] for row in self.rows()}

    def finished(self) -> set[str]:
        """Cells with status done (failed cells are run again; a line without status counts as done)."""
        return {row["cell"] for row in self.rows() if row.get("status", "done") == "done"}
