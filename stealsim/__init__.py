"""stealsim: a client-server simulator of black-box model stealing.

The shared core every role uses: architectures, datasets, the checkpoint
format, the training loop and the CLI. The victim service lives in
``victim_server``, defenses in ``defense``, the attacker in ``attacker``.
"""

from stealsim.errors import StealsimError

__all__ = ["StealsimError", "__version__"]

__version__ = "0.1.0"
