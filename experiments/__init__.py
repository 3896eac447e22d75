"""Experiments that drive every role end to end: the demo, grids, the uq-study, reports over runs.

This package sits above the roles (it may import ``stealsim``, ``defense``,
``victim_server`` and ``attacker``); nothing below it imports it. One home per idea:

- :mod:`experiments.spec`: a YAML spec validated by pydantic (grid, uq-study)
- :mod:`experiments.store`: the results CSV of a grid or study (resume by finished cells)
- :mod:`experiments.queue`: rq jobs, their collection, and the worker loop (``grid-worker``)
- :mod:`experiments.cells`: the one cell runner (an attack run as a result row)
- :mod:`experiments.stats`: mean ± sample std (min), seed groups, mean curves with a band
- :mod:`experiments.report`: the multi-run report (``stealsim report``)
- :mod:`experiments.grid`, :mod:`experiments.grid_report`: grids of attacks x victims x
  defenses x budgets x seeds, and their report
- :mod:`experiments.uq_study`: the UQ stealing study
- :mod:`experiments.audit`, :mod:`experiments.audit_report`: ``stealsim audit``, attackers
  through many accounts against a defended service, and its verdict
- :mod:`experiments.demo`: the one-command demo
- :mod:`experiments.victims`, :mod:`experiments.service`, :mod:`experiments.honest`:
  cached victims, the victim service as a child process, an honest user's traffic

The CLI's ``demo``, ``grid``, ``grid-worker``, ``uq-study``, ``audit`` and ``report`` commands are
thin wrappers over these modules.
"""
