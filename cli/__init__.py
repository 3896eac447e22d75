"""The ``stealsim`` command line, above every role.

:mod:`cli.main` holds the typer app, the error handling and :func:`cli.main.main`
(the console script); one thin module per role holds its commands:
:mod:`cli.victim` (train, serve, worker), :mod:`cli.attack` (attack),
:mod:`cli.defenses` (distill, nasty-study, verify-watermark, ood-fit) and
:mod:`cli.experiments` (demo, grid, grid-worker, uq-study, honest, report);
:mod:`cli.options` holds the options several commands share and
:mod:`cli.set_aliases` the attack flags that are shorthands of ``--set``.
Each command parses its flags, imports its role lazily (``stealsim --help``
stays fast), calls one library function and prints its result. Nothing in the
project imports this package except ``stealsim/__main__.py``.
"""
