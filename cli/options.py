"""Options and flag parsers that several commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stealsim.errors import ConfigError

__all__ = [
    "DataDirOption",
    "DatasetOption",
    "DeviceOption",
    "announce",
    "check_out_dir",
    "parse_seeds",
]

DatasetOption = Annotated[
    str, typer.Option("--dataset", help="digits, mnist5k, or an on-disk dataset (see --data-dir).")
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Directory (or .npz file) of an on-disk dataset.")
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that exists as a file, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of integers."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from exc
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    return seeds


def announce(text: str) -> None:
    """A long command's stage heading, in bold on stderr (stdout holds only its result)."""
    typer.secho(text, bold=True, err=True)
