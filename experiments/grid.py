"""Experiment grids: attacks x victims x API defenses x budgets x seeds, resumable.

A spec (YAML, see ``examples/grid.yaml`` and docs/demo.md) names the axes::

    spec = load_spec(Path("examples/grid.yaml"))
    rows = run_grid(spec, Path("runs/grid"))                       # in this process
    rows = run_grid(spec, Path("runs/grid"), redis_url="redis://...", queue="grid")  # on rq workers

Every cell is one attack run over HTTP against the victim service, with an API
key whose per-key output policy is the cell's defense; evaluation uses a second
key without a policy, so fidelity is measured against the undefended victim.
For each victim and defense the grid also measures what the defense costs
honest users: accuracy and expected calibration error (ECE) of the defended
answers on the test set.

Results go to ``OUT/results.csv`` (one line per cell, appended as cells
finish) and ``OUT/defenses.csv`` (:mod:`experiments.store`); a cell already in
the CSV is skipped, so a grid resumes where it stopped. ``OUT/report.md`` has
the tables and plots (:mod:`experiments.grid_report`). In-process, the grid
trains (or reuses) the victims and runs its own service (:class:`GridRunner`);
on Redis, each ``stealsim grid-worker`` does that on its own host
(:mod:`experiments.queue`) and the grid command only enqueues and
collects (:func:`run_cell_job`, :func:`run_defense_job` are the jobs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from experiments.cells import run_cell
from experiments.grid_report import write_grid_report
from experiments.honest import HonestSettings, honest_traffic
from experiments.queue import Job, collect_jobs, worker_options, worker_resource
from experiments.service import ServiceProcess, create_key, new_admin_key
from experiments.spec import read_spec
from experiments.store import ResultsStore
from experiments.victims import (
    DEFENDER_MODELS,
    PreparedVictims,
    VictimSettings,
    prepare_defender_models,
    prepare_victims,
)
from stealsim.errors import ConfigError
from stealsim.service_client import ServiceClient

__all__ = [
    "DEFENSE_COLUMNS",
    "RESULT_COLUMNS",
    "Cell",
    "DefenseCell",
    "GridRunner",
    "GridSpec",
    "cells_of",
    "defense_cells_of",
    "key_flags",
    "load_spec",
    "run_cell_job",
    "run_defense_job",
    "run_grid",
    "verify_clone",
]

logger = logging.getLogger(__name__)

VictimName = Literal["normal", "nasty"]
_VICTIMS: tuple[VictimName, ...] = ("normal", "nasty")

RESULT_COLUMNS = ("cell", "attack", "victim", "defense", "budget", "seed", "status", "queries", "accuracy",
                  "fidelity", "transfer_success_rate", "victim_accuracy", "flags", "flagged_at",
                  "first_flags", "fidelity_at_flags", "watermark_marked", "watermark_matches", "watermark_p_value", "wall_seconds", "error")
DEFENSE_COLUMNS = ("cell", "victim", "defense", "accuracy", "ece", "test_images", "flags", "latency_ms", "refusal")
HONEST_BATCH = 32
"""Images per request of the honest user (the test split, in order, one request after another)."""

EVAL_BUDGET = 1_000_000
"""Budget of a cell's evaluation key: evaluation is counted apart from the attack budget."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class GridSpec(BaseModel):
    """The axes of a grid and the settings shared by its cells (the YAML file's keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = "digits"
    victim_epochs: int = Field(default=30, ge=1)
    nasty_epochs: int | None = Field(default=None, ge=1)
    victims: list[VictimName] = Field(default_factory=lambda: list(_VICTIMS), min_length=1)
    attacks: list[str] = Field(min_length=1)
    defenses: dict[str, list[dict[str, Any]]] = Field(default_factory=lambda: {"none": list[dict[str, Any]]()}, min_length=1)
    budgets: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    attack_settings: dict[str, Any] = Field(default_factory=dict)
    transfer_samples: int = Field(default=100, ge=1)
    reference_epochs: int = Field(default=3, ge=1)
    eval_every: int = Field(default=0, ge=0)
    threads: int = Field(default=1, ge=1)

    @field_validator("budgets")
    @classmethod
    def _positive(cls, budgets: list[int]) -> list[int]:
        if any(budget < 1 for budget in budgets):
            raise ValueError(f"budgets must be >= 1, got {budgets}")
        return budgets

    @field_validator("defenses")
    @classmethod
    def _names(cls, defenses: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        for name in defenses:
            if not _NAME.fullmatch(name) or "__" in name:
                raise ValueError(f"defense name {name!r}: use letters, digits, '-' and single '_'")
        return defenses

    def victim_settings(self) -> VictimSettings:
        return VictimSettings(dataset=self.dataset, epochs=self.victim_epochs, nasty_epochs=self.nasty_epochs)

    def policy(self, defense: str) -> list[dict[str, Any]]:
        """The defense's output policy; an empty list means the full probabilities."""
        return self.defenses[defense] or [{"name": "probabilities"}]


def load_spec(path: Path) -> GridSpec:
    """Read and validate a grid spec; errors name the file and the bad field."""
    from attacker.attacks import attack_class
    from defense.policies import parse_policy

    spec = read_spec(path, GridSpec, "grid")
    for name in spec.attacks:
        attack_class(name)
    for name, steps in spec.defenses.items():
        try:
            parse_policy(steps)
        except Exception as exc:
            raise ConfigError(f"{path}: defense {name!r}: {exc}") from exc
    return spec


@dataclass(frozen=True)
class Cell:
    """One attack run of the grid."""

    attack: str
    victim: str
    defense: str
    budget: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.attack}__{self.victim}__{self.defense}__b{self.budget}__s{self.seed}"


@dataclass(frozen=True)
class DefenseCell:
    """What one defense costs honest users of one victim."""

    victim: str
    defense: str

    @property
    def id(self) -> str:
        return f"{self.victim}__{self.defense}"


def cells_of(spec: GridSpec) -> list[Cell]:
    return [Cell(attack, victim, defense, budget, seed)
            for attack in spec.attacks for victim in spec.victims for defense in spec.defenses
            for budget in spec.budgets for seed in spec.seeds]


def defense_cells_of(spec: GridSpec) -> list[DefenseCell]:
    return [DefenseCell(victim, defense) for victim in spec.victims for defense in spec.defenses]


# -- cells against a service of the grid's own ---------------------------------------------


class GridRunner:
    """Runs grid cells against the victims behind a service of its own.

    ``start()`` trains or reuses the victims and starts the service (with a
    watermark secret of its own); ``stop()`` stops it. Cells of any spec with
    these victim settings may run on it: a worker keeps one runner per victim
    setting for every grid job it gets.
    """

    def __init__(self, victims: VictimSettings, work_dir: Path, cache_dir: Path, *, threads: int = 1,
                 show_progress: bool = False) -> None:
        self.settings = victims
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.threads = threads
        self.show_progress = show_progress
        self.admin_key = new_admin_key()
        self.service: ServiceProcess | None = None
        self.victims: PreparedVictims | None = None
        self._defender_models: dict[str, Path] | None = None

    @classmethod
    def for_spec(cls, spec: GridSpec, work_dir: Path, cache_dir: Path, show_progress: bool = False) -> GridRunner:
        """A runner of ``spec``'s victims, with its torch threads."""
        return cls(spec.victim_settings(), work_dir, cache_dir, threads=spec.threads, show_progress=show_progress)

    def start(self) -> GridRunner:
        import torch

        torch.set_num_threads(self.threads)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.victims = prepare_victims(self.settings, self.cache_dir, self.show_progress)
        self.service = ServiceProcess(self.victims.models(), admin_key=self.admin_key,
                                      log_path=self.work_dir / "service.log",
                                      extra_args=["--watermark-secret", new_admin_key()])
        self.service.start()
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    @property
    def url(self) -> str:
        """The started service's URL."""
        if self.service is None:
            raise ConfigError("the grid runner is not started")
        return self.service.url

    def _defender_model(self, name: str, defense: str) -> Path:
        """``@misinformation`` and ``@proxy`` (the defender's models, trained on first use) or ``@victim``."""
        if self._defender_models is None:
            assert self.victims is not None
            models = prepare_defender_models(self.settings, self.cache_dir, self.show_progress)
            self._defender_models = {**models, "victim": self.victims.normal}  # e.g. SEAT's encoder
        if name not in self._defender_models:
            raise ConfigError(f"defense {defense!r}: unknown defender model {'@' + name!r} "
                              f"(known: {['@' + known for known in (*DEFENDER_MODELS, 'victim')]})")
        return self._defender_models[name]

    def policy(self, spec: GridSpec, defense: str) -> list[dict[str, Any]]:
        """The defense's policy with ``"@misinformation"``, ``"@proxy"`` (the defender's models) and
        ``"@victim"`` (the normal victim's checkpoint) replaced by their directories."""
        def resolve(value: Any) -> Any:
            if isinstance(value, str) and value.startswith("@"):
                return str(self._defender_model(value[1:], defense))
            return value
        return [{name: resolve(value) for name, value in step.items()} for step in spec.policy(defense)]

    def run(self, spec: GridSpec, cell: Cell) -> dict[str, Any]:
        """Run one cell (:func:`experiments.cells.run_cell`): its attack over HTTP through a key with the
        defense's policy, then the key's detector flags and, under a watermark, the clone's verification."""
        from attacker.evaluation import EvalConfig
        from attacker.runner import RunSpec
        from experiments.demo import attack_overrides

        url = self.url
        key = ""
        policy: list[dict[str, Any]] = []

        def attack(run_dir: Path) -> RunSpec:
            nonlocal key, policy
            policy = self.policy(spec, cell.defense)
            key = create_key(url, self.admin_key, cell.budget, name=f"grid/{cell.id}", models=[cell.victim],
                             policy=policy)
            eval_key = create_key(url, self.admin_key, EVAL_BUDGET, name=f"grid/{cell.id}/eval",
                                  models=[cell.victim], policy=[{"name": "probabilities"}])
            return RunSpec(
                attack=cell.attack, out=run_dir, budget=cell.budget, url=url, api_key=key,
                model=cell.victim, eval_api_key=eval_key, eval_every=spec.eval_every, seed=cell.seed, device="cpu",
                show_progress=self.show_progress, settings=attack_overrides(cell.attack, spec.attack_settings),
                evaluation=EvalConfig(transfer_samples=spec.transfer_samples, reference_epochs=spec.reference_epochs),
            )

        def results(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
            return {"queries": int(metrics["queries_used"]), "accuracy": metrics["accuracy"],
                    "fidelity": metrics["fidelity"], "transfer_success_rate": metrics["transfer_success_rate"],
                    "victim_accuracy": metrics["victim_accuracy"],
                    "first_flags": first_flags(metrics.get("first_flag") or {}),
                    "fidelity_at_flags": fidelity_at_flags(metrics.get("first_flag") or {},
                                                           run_dir / "metrics.jsonl")}

        def extras(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
            found = key_flags(url, self.admin_key, key)
            if any(step.get("name") == "watermark" for step in policy):
                found |= verify_clone(url, self.admin_key, key, cell.victim, run_dir)
            return found

        return run_cell({"cell": cell.id, **asdict(cell)}, self.work_dir / "runs" / cell.id, attack, results,
                        extras)

    def defense_cost(self, spec: GridSpec, cell: DefenseCell) -> dict[str, Any]:
        """What an honest user of the defended key gets on one pass over the test set."""
        from stealsim.data import load_dataset

        url = self.url
        data = load_dataset(spec.dataset)
        key = create_key(url, self.admin_key, len(data.y_test), name=f"grid/honest/{cell.id}",
                         models=[cell.victim], policy=self.policy(spec, cell.defense))
        result = honest_traffic(url, key, cell.victim, data, HonestSettings(batch=HONEST_BATCH))
        return {"cell": cell.id, "victim": cell.victim, "defense": cell.defense, "accuracy": result.accuracy,
                "ece": result.ece, "test_images": result.images, "flags": result.flags,
                "latency_ms": result.latency_ms_mean, "refusal": result.refusal}


def key_flags(url: str, admin_key: str, api_key: str) -> dict[str, Any]:
    """The key's detector flags and, from the audit log, the images it had sent when first flagged."""
    with ServiceClient(url, admin_key) as service:
        usage = service.usage(api_key)
        flags = list(usage.get("flags", []))
        flagged_at = None
        if flags:
            sent = 0
            for record in service.audit():
                if record.get("key_id") != usage["key_id"]:
                    continue
                sent += int(record["images"])
                if record.get("flags"):
                    flagged_at = sent
                    break
    return {"flags": "+".join(flags), "flagged_at": flagged_at}


def first_flags(first_flag: dict[str, dict[str, float]]) -> str:
    """Each detector's first flag of a run as ``name:queries`` (the attack queries answered when its
    flag first came back), space-separated in the order they came: ``ood_rate:128 seat:4096``."""
    ordered = sorted(first_flag.items(), key=lambda item: item[1]["queries"])
    return " ".join(f"{name}:{int(first['queries'])}" for name, first in ordered)


def fidelity_at_flags(first_flag: dict[str, dict[str, float]], history_path: Path) -> str:
    """What a detector that blocked at its first flag would have left the thief, per detector, as
    ``name:fidelity``: the fidelity at the run's last evaluation at or before the flag (the first
    evaluation's when the flag came before it: then an upper bound)."""
    if not first_flag or not history_path.is_file():
        return ""
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    history = [line for line in history if "fidelity" in line and "queries" in line]
    if not history:
        return ""
    parts = []
    for name, first in sorted(first_flag.items(), key=lambda item: item[1]["queries"]):
        before = [line for line in history if line["queries"] <= first["queries"]]
        parts.append(f"{name}:{float((before[-1] if before else history[0])['fidelity']):.4f}")
    return " ".join(parts)


def verify_clone(url: str, admin_key: str, api_key: str, model: str, run_dir: Path) -> dict[str, Any]:
    """DAWN verification of a cell's clone against the watermark its key was served."""
    from defense.watermark import WatermarkRecord, load_suspect, verify

    with ServiceClient(url, admin_key) as service:
        data = service.watermark_record(service.usage(api_key)["key_id"], model)
    (run_dir / "watermark.npz").write_bytes(data)
    record = WatermarkRecord.from_bytes(data).distinct()
    if len(record) == 0:
        return {"watermark_marked": 0}
    verdict = verify(record, load_suspect(run_dir)(record.images))
    return {"watermark_marked": verdict.marked, "watermark_matches": verdict.matches,
            "watermark_p_value": verdict.p_value}


# -- jobs for `stealsim grid-worker` -----------------------------------------------------------


def _worker_runner(spec: GridSpec) -> GridRunner:
    """The worker's runner of ``spec``'s victims (started by the first job that needs them)."""
    options = worker_options()
    return worker_resource(f"grid-victims-{spec.victim_settings().cache_key()}",
                           lambda: GridRunner.for_spec(spec, options.work_dir, options.cache_dir,
                                                       options.show_progress).start())


def run_cell_job(spec_data: dict[str, Any], cell_data: dict[str, Any]) -> dict[str, Any]:
    """An rq job: one grid cell; returns its result row."""
    spec = GridSpec.model_validate(spec_data)
    return _worker_runner(spec).run(spec, Cell(**cell_data))


def run_defense_job(spec_data: dict[str, Any], cell_data: dict[str, Any]) -> dict[str, Any]:
    """An rq job: what one defense costs honest users of one victim."""
    spec = GridSpec.model_validate(spec_data)
    return _worker_runner(spec).defense_cost(spec, DefenseCell(**cell_data))


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
    # Job ids name the spec too: two grids on one queue with the same cells (another defense's
    # settings, another attack variant) are other jobs, not one job's result read twice.
    digest = hashlib.sha256(json.dumps(spec_data, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def failed(cell: Cell) -> Callable[[str], dict[str, Any]]:
        return lambda error: {"cell": cell.id, **asdict(cell), "status": "failed", "error": error}

    jobs = [Job(f"{queue}-{digest}-cost-{cell.id}", run_defense_job, (spec_data, asdict(cell))) for cell in defense_cells]
    jobs += [Job(f"{queue}-{digest}-cell-{cell.id}", run_cell_job, (spec_data, asdict(cell)), failed(cell))
             for cell in cells]
    kinds: dict[str, Literal["cell", "cost"]] = {job.id: ("cost" if job.function is run_defense_job else "cell")
                                                 for job in jobs}
    for identifier, row in collect_jobs(jobs, redis_url, queue, poll_seconds):
        yield kinds[identifier], dict(row or {})


# -- driving ---------------------------------------------------------------------------------


def run_grid(
    spec: GridSpec,
    out: Path,
    *,
    cache_dir: Path = Path("runs/cache"),
    redis_url: str | None = None,
    queue: str = "stealsim-grid",
    show_progress: bool = True,
    announce: Callable[[str], None] | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, str]]:
    """Run every cell not yet in ``out/results.csv``; return all result rows."""
    say = announce or (lambda text: logger.info("%s", text))
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    results = ResultsStore(out / "results.csv", RESULT_COLUMNS)
    costs = ResultsStore(out / "defenses.csv", DEFENSE_COLUMNS)
    finished, costs_done = results.finished(), costs.cells()
    todo = [cell for cell in cells_of(spec) if cell.id not in finished]
    todo_costs = [cell for cell in defense_cells_of(spec) if cell.id not in costs_done]
    total = len(cells_of(spec))
    say(f"grid: {total} cells, {total - len(todo)} already finished, {len(todo)} to run"
        + (f" on Redis queue {queue!r}" if redis_url else " in this process"))
    if todo or todo_costs:
        if redis_url is None:
            runner = GridRunner.for_spec(spec, out, cache_dir, show_progress)
            try:
                runner.start()
                for cost_cell in todo_costs:
                    costs.append(runner.defense_cost(spec, cost_cell))
                for index, cell in enumerate(todo, start=1):
                    say(f"[{index}/{len(todo)}] {cell.id}")
                    results.append(runner.run(spec, cell))
            finally:
                runner.stop()
        else:
            for kind, row in run_on_queue(spec, todo, todo_costs, redis_url, queue, poll_seconds):
                if kind == "cost":
                    costs.append(row)
                else:
                    say(f"finished {row['cell']} ({row['status']})")
                    results.append(row)
    write_grid_report(out)
    return results.rows()
