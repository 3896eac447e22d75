"""What the command line tells a user: every attack in `attack --help`, hints that name only flags `attack` has."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from attacker.attacks import ATTACKS
from attacker.runner import infer_eval_dataset
from cli.main import app
from stealsim.errors import AttackError


def attack_help_lines() -> list[str]:
    done = CliRunner().invoke(app, ["attack", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert done.exit_code == 0, done.output
    return [re.sub(r"[│╭╮╰╯─]", " ", line) for line in done.output.splitlines()]


def attack_help() -> str:
    return " ".join(" ".join(attack_help_lines()).split())


def attack_options() -> set[str]:
    """The options `attack` has (the first word of an option's help line)."""
    return {match.group(1) for line in attack_help_lines() if (match := re.match(r"\s+(--[a-z][a-z-]+)", line))}


def test_attack_help_names_every_registered_attack() -> None:
    text = attack_help()
    missing = [name for name in ATTACKS if name not in text]
    assert not missing and "art-knockoff" in text and "art-copycat" in text


def test_the_evaluation_set_hint_names_only_flags_attack_has() -> None:
    with pytest.raises(AttackError) as refused:
        infer_eval_dataset((3, 32, 32))
    message = str(refused.value)
    flags = set(re.findall(r"--[a-z][a-z-]+", message))
    assert flags == {"--eval-dataset"}
    options = attack_options()
    assert "--eval-api-key" in options and "--data-dir" not in options
    assert flags <= options
    assert "digits" in message and "mnist5k" in message
