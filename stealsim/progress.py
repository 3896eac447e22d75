"""A small progress-bar helper over rich, shared by training and attacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(
    description: str, total: float, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(status="", steps=1)`` that moves a rich bar (a no-op when disabled)."""
    if not enabled:
        yield lambda status="", steps=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(status: str = "", steps: float = 1) -> None:
            progress.update(task, advance=steps, status=status)

        yield advance
