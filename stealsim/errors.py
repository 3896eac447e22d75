"""The project's one exception tree.

Every error a user can cause derives from :class:`StealsimError`, so the CLI and
the HTTP app each translate it in one place. Foreign errors (torch, safetensors,
Redis, HTTP) are wrapped at the boundary where they occur (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "StealsimError",
    "ConfigError",
    "DatasetError",
    "CheckpointError",
    "ArchitectureError",
]


class StealsimError(Exception):
    """Root of every error stealsim raises on purpose."""


class ConfigError(StealsimError):
    """A setting, flag or argument has a value that is not accepted."""


class DatasetError(StealsimError):
    """A dataset name is unknown, or its files are missing or malformed."""


class ArchitectureError(StealsimError):
    """An architecture name is unknown or its arguments do not fit it."""


class CheckpointError(StealsimError):
    """A checkpoint is missing, corrupt, or does not match its sidecar."""
