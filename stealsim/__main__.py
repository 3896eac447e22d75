"""``python -m stealsim`` runs the CLI (tests use this form).

The one import of the ground package that points upward: the entry point hands over
to :mod:`cli.main`, the command line above every role; no other module of
``stealsim`` imports a role or the CLI.
"""

from cli.main import main

main()
