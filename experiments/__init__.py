"""Experiments that drive every role end to end: the one-command demo and experiment grids.

This package sits above the roles (it may import ``stealsim``, ``defense``,
``victim_server`` and ``attacker``); nothing below it imports it. The CLI's
``demo``, ``grid`` and ``grid-worker`` commands are thin wrappers over
:mod:`experiments.demo`, :mod:`experiments.grid` and :mod:`experiments.grid_worker`.
"""
