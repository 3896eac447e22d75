"""Grid cells as jobs on a Redis queue (rq), and the ``stealsim grid-worker`` that runs them.

The grid command enqueues one job per cell (:func:`run_on_queue`) and collects
the rows as jobs finish; any number of workers on any number of hosts consume
the queue (:func:`run_grid_worker`). Each worker trains or reuses the victims
in its own cache (keyed by the spec's victim settings), starts its own victim
service with the first job, and stops it when the worker stops, so a host needs
nothing but the code and the Redis URL::

    stealsim grid-worker --redis-url redis://queue-host:6379 --queue grid   # on each host
    stealsim grid examples/grid.yaml --redis-url redis://queue-host:6379 --queue grid

Workers are rq ``SimpleWorker``s: jobs run in the worker process itself (no
fork per job), so the victim service and the loaded data survive between jobs.
The same workers run ``stealsim uq-study`` cells (:func:`experiments.uq_study.run_uq_job`,
in process, no service): :func:`collect_jobs` is the queue's generic half.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from experiments.grid import Cell, CellRunner, DefenseCell, GridSpec
from stealsim.errors import ConfigError, StealsimError

__all__ = [
    "WorkerOptions",
    "collect_jobs",
    "job_id",
    "run_cell_job",
    "run_defense_job",
    "run_grid_worker",
    "run_on_queue",
    "worker_options",
]

logger = logging.getLogger(__name__)

JOB_TIMEOUT = 6 * 3600
RESULT_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class WorkerOptions:
    """Where a grid worker keeps its runs and its victim cache."""

    work_dir: Path
    cache_dir: Path
    show_progress: bool = False


class _WorkerState:
    """The worker process's options and its started cell runners (one service per victim setting).

    Set by :func:`run_grid_worker` for the life of the worker; jobs find it here
    because rq calls job functions by import path, with the job's arguments only.
    """

    options: WorkerOptions | None = None
    runners: dict[str, CellRunner] = {}  # noqa: RUF012 - process-wide on purpose, see above


def worker_options() -> WorkerOptions:
    """The options of the grid worker this job runs in (any job function may ask)."""
    if _WorkerState.options is None:
        raise ConfigError("grid jobs run inside `stealsim grid-worker` (no worker options set)")
    return _WorkerState.options


def _runner(spec: GridSpec) -> CellRunner:
    options = worker_options()
    key = spec.victim_settings().cache_key()
    runner = _WorkerState.runners.get(key)
    if runner is None:
        runner = CellRunner(spec, options.work_dir, options.cache_dir, options.show_progress).start()
        _WorkerState.runners[key] = runner
    runner.spec = spec  # same victims; this job's defenses and attack settings
    return runner


def run_cell_job(spec_data: dict[str, Any], cell_data: dict[str, Any]) -> dict[str, Any]:
    """An rq job: one grid cell; returns its result row."""
    spec = GridSpec.model_validate(spec_data)
    return _runner(spec).run(Cell(**cell_data))


def run_defense_job(spec_data: dict[str, Any], cell_data: dict[str, Any]) -> dict[str, Any]:
    """An rq job: what one defense costs honest users of one victim."""
    spec = GridSpec.model_validate(spec_data)
    return _runner(spec).defense_cost(DefenseCell(**cell_data))


def job_id(queue: str, kind: str, cell_id: str) -> str:
    return f"{queue}-{kind}-{cell_id}"


def _connect(redis_url: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(f"Redis at {redis_url} does not answer: {exc}") from exc
    return client


Job = tuple[str, Callable[..., Any], tuple[Any, ...], Callable[[str], Any] | None]
"""A queued job: ``(job id, function, arguments, result on failure)``; the last builds the row of a
failed job from its error (``None``: a failed job yields nothing)."""


def collect_jobs(jobs: Sequence[Job], redis_url: str, queue: str,
                 poll_seconds: float = 0.5) -> Iterator[tuple[str, Any]]:
    """Enqueue ``jobs`` on ``queue``; yield ``(job id, result)`` as they finish (a failed job: its failure row)."""
    from rq import Queue
    from rq.job import Job as RqJob
    from rq.job import JobStatus

    connection = _connect(redis_url)
    jobs_queue = Queue(queue, connection=connection)
    pending: dict[str, Callable[[str], Any] | None] = {}
    for identifier, function, arguments, on_failure in jobs:
        job = jobs_queue.enqueue(function, *arguments, job_id=identifier, job_timeout=JOB_TIMEOUT,
                                 result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL)
        pending[job.id] = on_failure
    logger.info("enqueued %d jobs on %r; waiting for `stealsim grid-worker --queue %s`", len(pending), queue, queue)
    try:
        while pending:
            for identifier, on_failure in list(pending.items()):
                job = RqJob.fetch(identifier, connection=connection)
                status = job.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    del pending[identifier]
                    yield identifier, job.return_value()
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                    del pending[identifier]
                    result = job.latest_result()
                    error = " ".join((result.exc_string or "").strip().splitlines()[-1:]) if result else ""
                    logger.error("job %s %s: %s", identifier, status, error)
                    if on_failure is not None:
                        yield identifier, on_failure(f"job {status}: {error}")
            if pending:
                time.sleep(poll_seconds)
    finally:
        connection.close()


def run_on_queue(
    spec: GridSpec,
    cells: Sequence[Cell],
    defense_cells: Sequence[DefenseCell],
    redis_url: str,
    queue: str,
    poll_seconds: float = 0.5,
) -> Iterator[tuple[Literal["cell", "cost"], dict[str, Any]]]:
    """Enqueue the grid's cells and yield ``(kind, row)`` as their jobs finish (a failed job: a failed row)."""
    spec_data = spec.model_dump()

    def failed(cell: Cell) -> Callable[[str], dict[str, Any]]:
        return lambda error: {"cell": cell.id, **asdict(cell), "status": "failed", "error": error}

    jobs: list[Job] = [(job_id(queue, "cost", cell.id), run_defense_job, (spec_data, asdict(cell)), None)
                       for cell in defense_cells]
    jobs += [(job_id(queue, "cell", cell.id), run_cell_job, (spec_data, asdict(cell)), failed(cell))
             for cell in cells]
    kinds: dict[str, Literal["cell", "cost"]] = {identifier: ("cost" if function is run_defense_job else "cell")
                                                 for identifier, function, _, _ in jobs}
    for identifier, row in collect_jobs(jobs, redis_url, queue, poll_seconds):
        yield kinds[identifier], dict(row or {})


def run_grid_worker(
    redis_url: str,
    queues: Sequence[str],
    options: WorkerOptions,
    *,
    burst: bool = False,
    name: str | None = None,
) -> None:
    """Consume grid jobs until stopped (SIGINT/SIGTERM: finish the current job) or, with ``burst``, empty queues."""
    from rq import SimpleWorker

    if _WorkerState.options is not None:
        raise StealsimError("a grid worker already runs in this process")
    connection = _connect(redis_url)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    _WorkerState.options = options
    try:
        worker = SimpleWorker(list(queues), connection=connection, name=name)
        logger.info("grid worker %s on %s, queues %s, runs in %s", worker.name, redis_url, list(queues),
                    options.work_dir)
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        for runner in _WorkerState.runners.values():
            runner.stop()
        _WorkerState.runners = {}
        _WorkerState.options = None
        connection.close()
