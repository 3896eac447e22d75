"""The ``stealsim`` typer app: its commands, error handling and logging, and :func:`main`.

Every command is registered here, in the order ``stealsim --help`` lists them, and
wrapped by :func:`reports_errors`: a :class:`~stealsim.errors.StealsimError` becomes
``error: ...`` on stderr and exit status 2, with nothing half-written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer

import cli.attack
import cli.defenses
import cli.experiments
import cli.victim
from stealsim.errors import StealsimError

__all__ = ["app", "main", "reports_errors"]

app = typer.Typer(
    name="stealsim",
    help="Black-box model stealing simulator: victim service, defenses and attacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: it wraps long option names and descriptions at the terminal's
    # width instead of cutting them with an ellipsis at 80 columns, as rich's tables do.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn the project's errors into a one-line message and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StealsimError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc

    return wrapper  # type: ignore[return-value]


@app.callback()
def _configure(
    log_level: Annotated[str, typer.Option(help="Logging level (DEBUG, INFO, WARNING).")] = "INFO",
) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=log_level.upper(),
        format="%(name)s: %(message)s",
        # stderr: stdout holds only a command's result (tables, --json objects).
        handlers=[RichHandler(show_path=False, console=Console(stderr=True))],
    )


COMMANDS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("train", cli.victim.train),
    ("distill", cli.defenses.distill),
    ("nasty-study", cli.defenses.nasty_study),
    ("serve", cli.victim.serve),
    ("worker", cli.victim.worker),
    ("attack", cli.attack.attack),
    ("verify-watermark", cli.defenses.verify_watermark),
    ("ood-fit", cli.defenses.ood_fit),
    ("honest", cli.experiments.honest),
    ("report", cli.experiments.report),
    ("demo", cli.experiments.demo),
    ("grid", cli.experiments.grid),
    ("grid-worker", cli.experiments.grid_worker),
    ("uq-study", cli.experiments.uq_study),
    ("audit", cli.experiments.audit),
)
"""Every command by name, in the order of ``stealsim --help``."""

for _name, _command in COMMANDS:
    app.command(_name)(reports_errors(_command))


def main() -> None:
    """Entry point of the ``stealsim`` console script.

    Before any command: Ctrl-C raises KeyboardInterrupt whatever the launcher left
    (SIGINT ignored under ``nohup`` or ``&``), and a child of another stealsim
    process ends when that parent does (see :mod:`stealsim.processes`).
    """
    from stealsim.processes import die_with_parent, restore_interrupts

    restore_interrupts()
    die_with_parent()
    app(prog_name="stealsim")
