"""Where a run's numbers come from: code version, software, hardware, command line and start time.

The runner records :func:`provenance` under ``provenance`` in ``config.json``::

    {"package": "stealsim", "version": "0.1.0",
     "git": {"commit": "a760e6e...", "dirty": false},      # only when run from a git checkout
     "python": "3.11.9", "torch": "2.5.1+cpu", "device": "cpu",
     "cpu": "AMD EPYC 7B13", "gpu": null,                   # the GPU's name when the device is cuda
     "command": "stealsim attack dual-student --url ... --api-key REDACTED ...",
     "started_at": "2026-12-06T16:27:37+00:00"}

The command line never carries a secret: the values of the flags that take keys
or headers (:data:`SECRET_FLAGS`) are written as ``REDACTED``.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROVENANCE_FIELDS", "SECRET_FLAGS", "command_line", "cpu_model", "git_state", "provenance"]

PACKAGE = "stealsim"
PROVENANCE_FIELDS = ("package", "version", "git", "python", "torch", "device", "cpu", "gpu", "command",
                     "started_at")
"""The keys of :func:`provenance`'s record, always all present (``None`` where unknown)."""
SECRET_FLAGS = ("--api-key", "--eval-api-key", "--admin-key", "--header")
"""Flags whose value is a secret (or may be: a gateway's auth header)."""
_CHECKOUT = Path(__file__).resolve().parent.parent
"""The directory above the package: a git checkout when run from one (an editable install)."""


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``sys.argv``, shell-quoted), the values of :data:`SECRET_FLAGS` replaced
    by ``REDACTED``."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    program = Path(args[0])  # the console script's name, not its venv path; `python -m PACKAGE` as typed
    head = f"python -m {program.parent.name}" if program.name == "__main__.py" else shlex.quote(program.name)
    shown: list[str] = []
    hide_next = False
    for arg in args[1:]:
        if hide_next:
            shown.append("REDACTED")
            hide_next = False
            continue
        flag, equals, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if equals:
                shown.append(f"{flag}=REDACTED")
            else:
                shown.append(arg)
                hide_next = True
            continue
        shown.append(arg)
    return " ".join([head, *map(shlex.quote, shown)])


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any] | None:
    """``{"commit": SHA, "dirty": bool}`` of the checkout the code runs from; None outside one.

    ``dirty``: tracked files differ from the commit (untracked files are not counted).
    """
    if not (_CHECKOUT / ".git").exists():
        return None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def provenance(device: torch.device | str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The record of :data:`PROVENANCE_FIELDS` for a run on ``device`` (the resolved one: ``cpu``, ``cuda:0``)."""
    resolved = torch.device(device)
    gpu = torch.cuda.get_device_name(resolved) if resolved.type == "cuda" and torch.cuda.is_available() else None
    return {
        "package": PACKAGE,
        "version": _version(),
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(resolved),
        "cpu": cpu_model(),
        "gpu": gpu,
        "command": command_line(argv),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
