"""``stealsim grid-worker``: a worker that runs the cells of grids and uq-studies queued on Redis.

The grid command enqueues one job per cell and collects the rows as jobs
finish; any number of workers on any number of hosts consume the queue. Each
worker trains or reuses the victims in its own cache (keyed by the spec's
victim settings), starts its own victim service with the first grid job, and
stops it when the worker stops, so a host needs nothing but the code and the
Redis URL::

    stealsim grid-worker --redis-url redis://queue-host:6379 --queue grid   # on each host
    stealsim grid examples/grid.yaml --redis-url redis://queue-host:6379 --queue grid

The jobs are :func:`experiments.grid.run_cell_job`, :func:`experiments.grid.run_defense_job`
and :func:`experiments.uq_study.run_uq_job` (rq imports them by name); the
queue's plumbing is :mod:`experiments.queue`.
"""

from __future__ import annotations

from collections.abc import Sequence

from experiments.queue import WorkerOptions, run_worker

__all__ = ["WorkerOptions", "run_grid_worker"]


def run_grid_worker(
    redis_url: str,
    queues: Sequence[str],
    options: WorkerOptions,
    *,
    burst: bool = False,
    name: str | None = None,
) -> None:
    """Consume grid and study jobs until stopped (SIGINT/SIGTERM: finish the current job) or, with ``burst``,
    until the queues are empty; then stop every victim service the jobs started."""
    run_worker(redis_url, queues, options, burst=burst, name=name)
