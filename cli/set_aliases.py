"""Flags of ``stealsim attack`` that are shorthands of ``--set KEY=VALUE``: defined once, here.

Attack settings reach the attack through ``--set`` (any setting of any attack).
A few have a flag of their own, kept for the commands and docs that use them;
:data:`SET_ALIASES` lists each flag with the setting it sets, and
:func:`with_set_aliases` adds them to the command, so ``stealsim attack --help``
lists them beside ``--set``. A ``--set`` of the same key wins over its flag.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import typer

__all__ = ["SET_ALIASES", "SetAlias", "alias_settings", "with_set_aliases"]

AliasKind = Literal["text", "integer", "number", "switch", "repeated"]


@dataclass(frozen=True)
class SetAlias:
    """``--flag VALUE`` sets the attack setting ``key`` (absent: the attack's default)."""

    flag: str
    """The flag without its dashes, e.g. ``member-arch`` for ``--member-arch``."""
    key: str
    """The attack setting, as ``--set KEY=VALUE`` names it."""
    kind: AliasKind
    """text, integer, number, switch (a flag alone sets true) or repeated (a list of texts)."""
    help: str
    minimum: float | None = None
    metavar: str | None = None

    @property
    def parameter(self) -> str:
        return self.flag.replace("-", "_")

    def annotation(self) -> Any:
        help_text = f"{self.help} (--set {self.key})"
        if self.kind == "switch":
            return Annotated[bool, typer.Option(help=help_text)]
        option = typer.Option(f"--{self.flag}", help=help_text, min=self.minimum, metavar=self.metavar)
        value_type = {"text": str, "integer": int, "number": float, "repeated": list[str]}[self.kind]
        return Annotated[value_type | None, option]

    def default(self) -> Any:
        return False if self.kind == "switch" else None


SET_ALIASES: tuple[SetAlias, ...] = (
    SetAlias("hard-label", "hard_label", "switch", "Train on the victim's arg-max only."),
    SetAlias("batch-size", "batch_size", "integer", "Images per victim request.", minimum=1),
    SetAlias("uq", "uq", "text", "ensemble: deep-ensemble, mc-dropout, snapshot, swag or laplace."),
    SetAlias("members", "members", "integer", "ensemble: number of members.", minimum=1),
    SetAlias("member-arch", "architectures", "repeated",
             "ensemble: members' architectures (repeatable, cycled).", metavar="ARCH"),
    SetAlias("diversity", "diversity_weight", "number", "ensemble: weight of the diversity term.", minimum=0.0),
    SetAlias("source", "source", "text", "ensemble: queries from the generator or surrogate data."),
    SetAlias("surrogate", "surrogate", "text",
             "ensemble/knockoff: dataset name or image directory (default: the other built-in)."),
    SetAlias("surrogate-dir", "surrogate_dir", "text", "--data-dir of an on-disk surrogate dataset."),
    SetAlias("surrogate-split", "surrogate_split", "text", "train, test or all of the surrogate dataset."),
    SetAlias("sampling", "sampling", "text", "knockoff: random or adaptive (bandit over classes)."),
    SetAlias("preset", "preset", "text",
             "dual-student: tuned (our defaults) or reference (the authors' code's settings)."),
)
"""Every flag of ``stealsim attack`` that stands for a ``--set`` key, in the order of its help."""

F = TypeVar("F", bound=Callable[..., Any])


def with_set_aliases(command: F, after: str = "setting") -> F:
    """Give ``command`` (which takes ``**aliases``) one option per :data:`SET_ALIASES` entry,
    listed after its parameter ``after``; typer reads the options from the signature."""
    parameters = [parameter for parameter in inspect.signature(command, eval_str=True).parameters.values()
                  if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    names = [parameter.name for parameter in parameters]
    position = names.index(after) + 1
    added = [inspect.Parameter(alias.parameter, inspect.Parameter.KEYWORD_ONLY, default=alias.default(),
                               annotation=alias.annotation()) for alias in SET_ALIASES]
    keyword = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters[position:]]
    command.__signature__ = inspect.Signature([*parameters[:position], *added, *keyword])  # type: ignore[attr-defined]
    return command


def alias_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The ``--set`` keys of the alias flags, by parameter name in ``values``; ``None`` where a
    flag was not given (a switch only sets true; a repeated flag given no times is absent)."""
    settings: dict[str, Any] = {}
    for alias in SET_ALIASES:
        value = values.get(alias.parameter)
        settings[alias.key] = (value or None) if alias.kind in ("switch", "repeated") else value
    return settings
