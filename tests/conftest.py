"""Shared pytest fixtures."""

# Victim-server fixtures (a tiny digits checkpoint, a real `stealsim serve` process).
from server_support import client, digits_checkpoint, victim_server  # noqa: F401
