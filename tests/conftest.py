"""Shared pytest fixtures."""

# Victim-server fixtures (a tiny digits checkpoint, a real `stealsim serve` process).
# A real Seldon MLServer (a third-party OIP v2 server) serving scikit-learn digits models.
from mlserver_support import mlserver  # noqa: F401
from server_support import client, digits_checkpoint, victim_server  # noqa: F401
