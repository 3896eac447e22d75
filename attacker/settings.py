"""Nested settings under flat keys: ``--set student_width=32`` sets ``settings.students.width``.

An attack's settings are a frozen dataclass that nests the settings of what it
owns (its students, its generator, its UQ model's members, its surrogate data),
each default written once, on the nested type or on the attack's field. Users,
run specs and ``config.json`` speak flat keys (``student_width``, ``replay``,
``generator_lr``, ``uq``); this module maps one to the other, in one place:

- an attack settings type's own plain fields are keys under their own names;
- a nested settings type declares the keys it answers to in ``KEYS`` (flat key to
  field name), and a field holding one contributes those keys with the field's
  path in front (``student_width`` to ``students.width``, or to
  ``uq.students.width`` one level deeper);
- a settings type may add keys of its own in ``KEYS`` (Dual Student's
  ``student_optimizer`` to ``students.optimizer``).

A nested field's default (its ``default`` or ``default_factory``) is what the
flat keys given replace, so an attack's own defaults for its students (random
noise's width 32) hold unless a key says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from stealsim.errors import AttackError

__all__ = ["flat_keys", "flat_settings", "settings_from_flat"]

SettingsT = TypeVar("SettingsT")


class _Branch(dict[str, Any]):
    """Values given for the fields of one nested settings object (a path segment, not a value)."""


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _nested_type(field: dataclasses.Field[Any]) -> type[Any] | None:
    """The settings type of a nested field (read from its default), or ``None`` for a plain field."""
    default = _default(field)
    return type(default) if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def flat_keys(settings_type: type[Any], *, own_fields: bool = True) -> dict[str, str]:
    """Every flat key ``settings_type`` takes, with the dotted path of the field it sets.

    ``own_fields``: plain fields are keys under their own names (an attack's settings);
    ``False`` for a nested type, whose keys are only those it declares in ``KEYS``.
    """
    keys: dict[str, str] = {}

    def add(key: str, path: str) -> None:
        if keys.get(key, path) != path:
            raise AttackError(f"{settings_type.__name__}: key {key!r} names both {keys[key]} and {path}")
        keys[key] = path

    for field in dataclasses.fields(settings_type):
        nested = _nested_type(field)
        if nested is not None:
            for key, path in flat_keys(nested, own_fields=False).items():
                add(key, f"{field.name}.{path}")
        elif own_fields:
            add(field.name, field.name)
    for key, path in getattr(settings_type, "KEYS", {}).items():
        add(key, path)
    return keys


def _replaced(settings: Any, values: _Branch) -> Any:
    """``settings`` with the fields in ``values`` replaced (nested branches recursively)."""
    changes = {name: _replaced(getattr(settings, name), value) if isinstance(value, _Branch) else value
               for name, value in values.items()}
    return dataclasses.replace(settings, **changes)


def settings_from_flat(settings_type: type[SettingsT], values: Mapping[str, Any]) -> SettingsT:
    """``settings_type`` built from flat keys (see the module docstring); an unknown key raises."""
    keys = flat_keys(settings_type)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise AttackError(f"{settings_type.__name__} has no setting(s) {unknown}; it accepts {sorted(keys)}")
    tree = _Branch()
    for key, value in values.items():
        *parents, leaf = keys[key].split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, _Branch())
        node[leaf] = value
    fields = {field.name: field for field in dataclasses.fields(settings_type)}  # type: ignore[arg-type]
    arguments = {name: _replaced(_default(fields[name]), value) if isinstance(value, _Branch) else value
                 for name, value in tree.items()}
    return settings_type(**arguments)


def flat_settings(settings: Any) -> dict[str, Any]:
    """Every flat key of ``settings`` with its value (what ``config.json`` records)."""
    values: dict[str, Any] = {}
    for key, path in flat_keys(type(settings)).items():
        value = settings
        for name in path.split("."):
            value = getattr(value, name)
        values[key] = value
    return values
