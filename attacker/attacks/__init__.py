"""The attack registry: one file per attack, one entry each.

::

    attack = build_attack("dual-student", victim.info, torch.device("cpu"), batch_size=512, student_width=32)

Settings are given by flat keys (``student_width``, ``replay_policy``, ``uq``), the
keys of ``--set KEY=VALUE``, run specs and ``config.json``; :mod:`attacker.settings`
maps them onto each attack's nested settings.
"""

from __future__ import annotations

from typing import Any

import torch

from attacker.attacks.art_copycat import ArtCopycat
from attacker.attacks.art_knockoff import ArtKnockoff, ArtKnockoffSettings
from attacker.attacks.dfme import DFME, DFMESettings
from attacker.attacks.dual_student import DualStudent, DualStudentSettings
from attacker.attacks.ensemble import Ensemble, EnsembleSettings
from attacker.attacks.knockoff import Knockoff, KnockoffSettings
from attacker.attacks.random_noise import RandomNoise, RandomNoiseSettings
from attacker.loop import Attack, AttackSettings
from attacker.settings import flat_keys, flat_settings, settings_from_flat
from attacker.victims import VictimInfo
from stealsim.errors import AttackError

__all__ = [
    "ATTACKS",
    "DFME",
    "ArtCopycat",
    "ArtKnockoff",
    "ArtKnockoffSettings",
    "DFMESettings",
    "DualStudent",
    "DualStudentSettings",
    "Ensemble",
    "EnsembleSettings",
    "Knockoff",
    "KnockoffSettings",
    "RandomNoise",
    "RandomNoiseSettings",
    "attack_class",
    "build_attack",
    "flat_settings",
    "make_settings",
    "setting_keys",
]

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (DualStudent, DFME, RandomNoise, Ensemble, Knockoff, ArtKnockoff, ArtCopycat)
}
"""Every attack by name; ``art-*`` need the optional ``stealsim[art]`` extra (checked when built)."""


def attack_class(name: str) -> type[Attack]:
    try:
        return ATTACKS[name]
    except KeyError:
        raise AttackError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}") from None


def setting_keys(name: str) -> tuple[str, ...]:
    """The flat keys attack ``name`` takes, sorted."""
    return tuple(sorted(flat_keys(attack_class(name).settings_type)))


def make_settings(name: str, **overrides: Any) -> AttackSettings:
    """The settings of attack ``name`` with ``overrides``, by flat key (``None`` values are ignored).

    ``preset=NAME`` (where the attack has presets, e.g. Dual Student's ``reference``)
    starts from that named set; the other overrides win over it. An unknown key raises
    :class:`AttackError` naming the keys the attack takes.
    """
    settings_type = attack_class(name).settings_type
    given = {k: v for k, v in overrides.items() if v is not None}
    presets: dict[str, dict[str, Any]] = getattr(settings_type, "PRESETS", {})
    if "preset" in given and presets:  # a named set of settings; the settings given beside it win
        if given["preset"] not in presets:
            raise AttackError(f"{name} has no preset {given['preset']!r}; choose one of {sorted(presets)}")
        given = {**presets[given["preset"]], **given}
    unknown = sorted(set(given) - set(setting_keys(name)))
    if unknown:
        raise AttackError(f"{name} has no setting(s) {unknown}; it accepts {list(setting_keys(name))}")
    return settings_from_flat(settings_type, given)


def build_attack(name: str, info: VictimInfo, device: torch.device, **overrides: Any) -> Attack:
    """Build attack ``name`` against a victim described by ``info``."""
    return attack_class(name)(make_settings(name, **overrides), info, device)
