"""Process hygiene shared by every command that starts (or is) a child process.

Two promises, under any launcher (a terminal, ``nohup``, a script's background job):

* **Ctrl-C works.** A process started with SIGINT ignored (``cmd &`` in a
  non-interactive shell, ``nohup``) inherits the ignore, and Python then installs
  no KeyboardInterrupt handler. :func:`restore_interrupts` puts Python's own
  handler back at start, explicitly.
* **Children die with their parent, SIGKILL included.** A parent that starts
  ``python -m stealsim ...`` passes :func:`child_environment`; the child's CLI
  calls :func:`die_with_parent` first thing, which asks Linux for a parent-death
  signal (``prctl(PR_SET_PDEATHSIG)``): when the parent exits for any reason, the
  child gets SIGTERM and shuts down as it would on a plain ``kill``. A parent
  killed before the child got that far is caught by comparing ``getppid()``.

The death signal belongs to the *thread* that started the child, so parents
start children from their main thread (or a thread that lives as long as them).
On systems without ``prctl`` the children are still stopped by the parent's
normal exit paths, only not after a SIGKILL of the parent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping

__all__ = ["PARENT_PID_ENV", "child_environment", "die_with_parent", "restore_interrupts"]

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "STEALSIM_PARENT_PID"
"""Set in a child's environment to the parent's pid: the child dies with that parent."""

_PR_SET_PDEATHSIG = 1


def restore_interrupts() -> None:
    """Give SIGINT (Ctrl-C) Python's KeyboardInterrupt handler, even if it was inherited ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def child_environment(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environment`` (default: this process's) plus the marker that ties a child to us."""
    base = dict(os.environ if environment is None else environment)
    base[PARENT_PID_ENV] = str(os.getpid())
    return base


def die_with_parent(death_signal: int = signal.SIGTERM) -> bool:
    """When started by :func:`child_environment`, end with the parent; True if armed.

    The marker is removed from the environment, so that our own children are tied
    to us (through their own :func:`child_environment`), not to our parent.
    """
    value = os.environ.pop(PARENT_PID_ENV, None)
    if not value:
        return False
    try:
        parent = int(value)
    except ValueError:
        logger.warning("ignoring %s=%r (not a pid)", PARENT_PID_ENV, value)
        return False
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), death_signal)
    return armed
