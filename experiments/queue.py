"""Experiment cells as jobs on a Redis queue (rq): enqueue and collect, and the worker loop.

A driver (the grid, the uq-study) hands :func:`collect_jobs` its jobs, each a
function that rq calls by import path in a worker with the job's arguments, and
gets ``(job id, result)`` back as jobs finish::

    jobs = [Job(f"{queue}-cell-{cell.id}", run_cell_job, (spec_data, asdict(cell)), on_failure)]
    for job_id, row in collect_jobs(jobs, "redis://queue-host:6379", queue): ...

Workers (:func:`run_worker`, behind ``stealsim grid-worker``) are rq
``SimpleWorker``s: jobs run in the worker process itself (no fork per job), so
what a job starts survives until the worker stops: :func:`worker_resource`
keeps it (a victim service, say) and stops it with the worker; a job finds the
worker's directories with :func:`worker_options`. Any number of workers on any
number of hosts consume a queue; each trains or reuses the victims in its own
cache and starts its own victim service, so a host needs only the code and the
Redis URL::

    stealsim grid-worker --redis-url redis://queue-host:6379 --queue grid   # on each host
    stealsim grid examples/grid.yaml --redis-url redis://queue-host:6379 --queue grid

This module knows no grid and no study: their job functions live beside their
drivers (:func:`experiments.grid.run_cell_job`, :func:`experiments.grid.run_defense_job`,
:func:`experiments.uq_study.run_uq_job`; rq imports them by name).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from stealsim.errors import ConfigError, StealsimError

__all__ = [
    "Job",
    "WorkerOptions",
    "collect_jobs",
    "connect",
    "run_worker",
    "worker_options",
    "worker_resource",
]

logger = logging.getLogger(__name__)

JOB_TIMEOUT = 6 * 3600
"""Seconds one job may run before rq stops it (a cell at a large budget on CPU takes hours)."""
RESULT_TTL = 7 * 24 * 3600
"""Seconds Redis keeps a finished or failed job's result (long enough to collect a stopped driver's grid)."""


@dataclass(frozen=True)
class WorkerOptions:
    """Where a worker keeps its runs and its victim cache."""

    work_dir: Path
    cache_dir: Path
    show_progress: bool = False


class Stoppable(Protocol):
    def stop(self) -> object: ...


Resource = TypeVar("Resource", bound=Stoppable)


class _WorkerState:
    """The worker process's options and what its jobs started (stopped when the worker stops).

    Set by :func:`run_worker` for the life of the worker; jobs find it here
    because rq calls job functions by import path, with the job's arguments only.
    """

    options: WorkerOptions | None = None
    resources: dict[str, Stoppable] = {}  # noqa: RUF012 - process-wide on purpose, see above


def worker_options() -> WorkerOptions:
    """The options of the worker this job runs in (any job function may ask)."""
    if _WorkerState.options is None:
        raise ConfigError("grid jobs run inside `stealsim grid-worker` (no worker options set)")
    return _WorkerState.options


def worker_resource(key: str, start: Callable[[], Resource]) -> Resource:
    """The worker's resource under ``key``: started by ``start()`` for the first job that asks,
    the same object for every later job, stopped when the worker stops."""
    worker_options()
    resource = _WorkerState.resources.get(key)
    if resource is None:
        resource = _WorkerState.resources[key] = start()
    return cast(Resource, resource)  # a key names one kind of resource


@dataclass(frozen=True)
class Job:
    """One queued job: rq calls ``function(*arguments)`` in a worker."""

    id: str
    function: Callable[..., Any]
    arguments: tuple[Any, ...]
    on_failure: Callable[[str], Any] | None = None
    """Builds the result of a failed job from its error (``None``: a failed job yields nothing)."""


def connect(redis_url: str) -> Any:
    """A Redis client that has answered a ping (ConfigError naming the URL when it does not)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(f"Redis at {redis_url} does not answer: {exc}") from exc
    return client


def collect_jobs(jobs: Sequence[Job], redis_url: str, queue: str,
                 poll_seconds: float = 0.5) -> Iterator[tuple[str, Any]]:
    """Enqueue ``jobs`` on ``queue``; yield ``(job id, result)`` as they finish (a failed job: its failure row)."""
    from rq import Queue
    from rq.job import Job as RqJob
    from rq.job import JobStatus

    connection = connect(redis_url)
    jobs_queue = Queue(queue, connection=connection)
    pending: dict[str, Callable[[str], Any] | None] = {}
    for job in jobs:
        queued = jobs_queue.enqueue(job.function, *job.arguments, job_id=job.id, job_timeout=JOB_TIMEOUT,
                                    result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL)
        pending[queued.id] = job.on_failure
    logger.info("enqueued %d jobs on %r; waiting for `stealsim grid-worker --queue %s`", len(pending), queue, queue)
    try:
        while pending:
            for identifier, on_failure in list(pending.items()):
                fetched = RqJob.fetch(identifier, connection=connection)
                status = fetched.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    del pending[identifier]
                    yield identifier, fetched.return_value()
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                    del pending[identifier]
                    result = fetched.latest_result()
                    error = " ".join((result.exc_string or "").strip().splitlines()[-1:]) if result else ""
                    logger.error("job %s %s: %s", identifier, status, error)
                    if on_failure is not None:
                        yield identifier, on_failure(f"job {status}: {error}")
            if pending:
                time.sleep(poll_seconds)
    finally:
        connection.close()


def run_worker(
    redis_url: str,
    queues: Sequence[str],
    options: WorkerOptions,
    *,
    burst: bool = False,
    name: str | None = None,
) -> None:
    """``stealsim grid-worker``: consume jobs until stopped (SIGINT/SIGTERM: finish the current
    job) or, with ``burst``, until the queues are empty; then stop what the jobs started."""
    from rq import SimpleWorker

    if _WorkerState.options is not None:
        raise StealsimError("a grid worker already runs in this process")
    connection = connect(redis_url)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    _WorkerState.options = options
    try:
        worker = SimpleWorker(list(queues), connection=connection, name=name)
        logger.info("grid worker %s on %s, queues %s, runs in %s", worker.name, redis_url, list(queues),
                    options.work_dir)
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        for resource in _WorkerState.resources.values():
            resource.stop()
        _WorkerState.resources = {}
        _WorkerState.options = None
        connection.close()
