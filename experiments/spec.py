"""Experiment specs: a YAML file validated by a pydantic model, errors naming the file and the field.

The grid (:class:`experiments.grid.GridSpec`) and the uq-study
(:class:`experiments.uq_study.UQStudySpec`) read their YAML files here::

    spec = read_spec(Path("examples/grid.yaml"), GridSpec, "grid")
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from stealsim.errors import ConfigError

__all__ = ["read_spec"]

SpecModel = TypeVar("SpecModel", bound=BaseModel)


def read_spec(path: Path, model: type[SpecModel], what: str) -> SpecModel:
    """A YAML file validated as ``model``; errors name the file and the bad field (``what``: "grid")."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} spec {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} settings, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
