"""``python -m stealsim`` runs the CLI (tests use this form)."""

from stealsim.cli import main

main()
