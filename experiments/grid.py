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
finish) and ``OUT/defenses.csv``; a cell already in the CSV is skipped, so a
grid resumes where it stopped. ``OUT/report.md`` has the tables and plots.
In-process, the grid trains (or reuses) the victims and runs its own service;
on Redis, each ``stealsim grid-worker`` does that on its own host
(:mod:`experiments.grid_worker`) and the grid command only enqueues and collects.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from experiments.honest import HonestSettings, expected_calibration_error, honest_traffic
from experiments.service import ServiceProcess, create_key, new_admin_key
from experiments.victims import (
    DEFENDER_MODELS,
    VictimSettings,
    prepare_defender_models,
    prepare_victims,
)
from stealsim.errors import ConfigError

__all__ = [
    "DEFENSE_COLUMNS",
    "RESULT_COLUMNS",
    "Cell",
    "CellRunner",
    "DefenseCell",
    "GridSpec",
    "append_csv",
    "cells_of",
    "defense_cells_of",
    "expected_calibration_error",
    "finished_cells",
    "load_spec",
    "pareto_front",
    "read_csv",
    "read_spec",
    "run_grid",
    "write_grid_report",
]

logger = logging.getLogger(__name__)

VictimName = Literal["normal", "nasty"]
_VICTIMS: tuple[VictimName, ...] = ("normal", "nasty")

RESULT_COLUMNS = ("cell", "attack", "victim", "defense", "budget", "seed", "status", "queries", "accuracy",
                  "fidelity", "transfer_success_rate", "victim_accuracy", "flags", "flagged_at",
                  "watermark_marked", "watermark_matches", "watermark_p_value", "wall_seconds", "error")
DEFENSE_COLUMNS = ("cell", "victim", "defense", "accuracy", "ece", "test_images", "flags", "latency_ms")
HONEST_BATCH = 32
"""Images per request of the honest user (the test split, in order, one request after another)."""

EVAL_BUDGET = 1_000_000
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


SpecModel = TypeVar("SpecModel", bound=BaseModel)


def read_spec(path: Path, model: type[SpecModel], what: str) -> SpecModel:
    """A YAML file validated as ``model``; errors name the file and the bad field (``what``: "grid")."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} spec {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} settings, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


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


class CellRunner:
    """Runs cells against a victim service: its own (started here) for a grid in one process or a worker.

    ``start()`` trains or reuses the victims and starts the service; ``stop()`` stops it.
    """

    def __init__(self, spec: GridSpec, work_dir: Path, cache_dir: Path, show_progress: bool = False) -> None:
        self.spec = spec
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.show_progress = show_progress
        self.service: ServiceProcess | None = None
        self.admin_key = new_admin_key()
        self.defender_models: dict[str, Path] = {}

    @property
    def victim_key(self) -> str:
        return self.spec.victim_settings().cache_key()

    def start(self) -> CellRunner:
        import torch

        torch.set_num_threads(self.spec.threads)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        victims = prepare_victims(self.spec.victim_settings(), self.cache_dir, self.show_progress)
        if any(_placeholders(steps) for steps in self.spec.defenses.values()):
            self.defender_models = prepare_defender_models(self.spec.victim_settings(), self.cache_dir,
                                                           self.show_progress)
            self.defender_models["victim"] = victims.normal  # e.g. SEAT's encoder: the victim's own features
        self.service = ServiceProcess(victims.models(), admin_key=self.admin_key,
                                      log_path=self.work_dir / "service.log",
                                      extra_args=["--watermark-secret", new_admin_key()])
        self.service.start()
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def policy(self, defense: str) -> list[dict[str, Any]]:
        """The defense's policy with ``"@misinformation"``, ``"@proxy"`` (the defender's models) and
        ``"@victim"`` (the normal victim's checkpoint) replaced by their directories."""
        def resolve(value: Any) -> Any:
            if isinstance(value, str) and value.startswith("@"):
                if value[1:] not in self.defender_models:
                    raise ConfigError(f"defense {defense!r}: unknown defender model {value!r} "
                                      f"(known: {['@' + name for name in (*DEFENDER_MODELS, 'victim')]})")
                return str(self.defender_models[value[1:]])
            return value
        return [{name: resolve(value) for name, value in step.items()} for step in self.spec.policy(defense)]

    @property
    def url(self) -> str:
        """The started service's URL."""
        if self.service is None:
            raise ConfigError("the cell runner is not started")
        return self.service.url

    def run(self, cell: Cell) -> dict[str, Any]:
        """Run one cell; a failed attack is a row with ``status`` failed (the grid goes on)."""
        from attacker.evaluation import EvalConfig
        from attacker.runner import RunSpec, run_attack
        from experiments.demo import attack_overrides

        url = self.url
        row: dict[str, Any] = {"cell": cell.id, **asdict(cell), "status": "failed"}
        started = time.perf_counter()
        try:
            policy = self.policy(cell.defense)
            key = create_key(url, self.admin_key, cell.budget, name=f"grid/{cell.id}", models=[cell.victim],
                             policy=policy)
            eval_key = create_key(url, self.admin_key, EVAL_BUDGET, name=f"grid/{cell.id}/eval",
                                  models=[cell.victim], policy=[{"name": "probabilities"}])
            run_dir = self.work_dir / "runs" / cell.id
            if run_dir.exists():  # an unfinished earlier attempt: start the cell again
                shutil.rmtree(run_dir)
            metrics = run_attack(RunSpec(
                attack=cell.attack, out=run_dir, budget=cell.budget, url=url, api_key=key, model=cell.victim,
                eval_api_key=eval_key, eval_every=self.spec.eval_every, seed=cell.seed, device="cpu",
                show_progress=self.show_progress, settings=attack_overrides(cell.attack, self.spec.attack_settings),
                evaluation=EvalConfig(transfer_samples=self.spec.transfer_samples,
                                      reference_epochs=self.spec.reference_epochs),
            ))
            row.update(status="done", queries=int(metrics["queries_used"]), accuracy=metrics["accuracy"],
                       fidelity=metrics["fidelity"], transfer_success_rate=metrics["transfer_success_rate"],
                       victim_accuracy=metrics["victim_accuracy"])
            row.update(key_flags(url, self.admin_key, key))
            if any(step.get("name") == "watermark" for step in policy):
                row.update(verify_clone(url, self.admin_key, key, cell.victim, run_dir))
        except Exception as exc:
            logger.exception("cell %s failed", cell.id)
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["wall_seconds"] = time.perf_counter() - started
        return row

    def defense_cost(self, cell: DefenseCell) -> dict[str, Any]:
        """What an honest user of the defended key gets on one pass over the test set."""
        from stealsim.data import load_dataset

        url = self.url
        data = load_dataset(self.spec.dataset)
        key = create_key(url, self.admin_key, len(data.y_test), name=f"grid/honest/{cell.id}",
                         models=[cell.victim], policy=self.policy(cell.defense))
        result = honest_traffic(url, key, cell.victim, data, HonestSettings(batch=HONEST_BATCH))
        return {"cell": cell.id, "victim": cell.victim, "defense": cell.defense, "accuracy": result.accuracy,
                "ece": result.ece, "test_images": result.images, "flags": result.flags,
                "latency_ms": result.latency_ms_mean}


def _placeholders(steps: list[dict[str, Any]]) -> bool:
    return any(isinstance(value, str) and value.startswith("@") for step in steps for value in step.values())


def _admin_get(url: str, admin_key: str, path: str, **params: Any) -> Any:
    import httpx

    response = httpx.get(f"{url}{path}", params=params, headers={"X-API-Key": admin_key}, timeout=120.0)
    if response.status_code != 200:
        raise ConfigError(f"GET {path} failed: {response.status_code} {response.text[:300]}")
    return response


def key_flags(url: str, admin_key: str, api_key: str) -> dict[str, Any]:
    """The key's detector flags and, from the audit log, the images it had sent when first flagged."""
    import httpx

    usage = httpx.get(f"{url}/v1/usage", headers={"X-API-Key": api_key}, timeout=30.0).json()
    flags = list(usage.get("flags", []))
    flagged_at = None
    if flags:
        import json

        sent = 0
        for line in _admin_get(url, admin_key, "/v1/admin/audit").text.splitlines():
            record = json.loads(line)
            if record.get("key_id") != usage["key_id"]:
                continue
            sent += int(record["images"])
            if record.get("flags"):
                flagged_at = sent
                break
    return {"flags": "+".join(flags), "flagged_at": flagged_at}


def verify_clone(url: str, admin_key: str, api_key: str, model: str, run_dir: Path) -> dict[str, Any]:
    """DAWN verification of a cell's clone against the watermark its key was served."""
    import httpx

    from defense.watermark import WatermarkRecord, load_suspect, verify

    key_id = httpx.get(f"{url}/v1/usage", headers={"X-API-Key": api_key}, timeout=30.0).json()["key_id"]
    data = _admin_get(url, admin_key, f"/v1/admin/keys/{key_id}/watermark", model=model).content
    (run_dir / "watermark.npz").write_bytes(data)
    record = WatermarkRecord.from_bytes(data).distinct()
    if len(record) == 0:
        return {"watermark_marked": 0}
    verdict = verify(record, load_suspect(run_dir)(record.images))
    return {"watermark_marked": verdict.marked, "watermark_matches": verdict.matches,
            "watermark_p_value": verdict.p_value}


# -- results ---------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def append_csv(path: Path, columns: Sequence[str], row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
        handle.flush()


def finished_cells(path: Path) -> set[str]:
    """Cells already in the CSV with status done (failed cells are run again)."""
    return {row["cell"] for row in read_csv(path) if row.get("status", "done") == "done"}


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


_SEED_COLUMNS = ("fidelity", "accuracy", "transfer_success_rate")
"""The metrics of the grid report's table over seeds."""
_BASELINE = "random"

SeedKey = tuple[str, str, str, int]
"""``(attack, victim, defense, budget)``: the cells that differ only by seed."""


def _seed_groups(results: Iterable[dict[str, str]]) -> dict[SeedKey, list[dict[str, str]]]:
    """Finished rows by (attack, victim, defense, budget); a cell counts once (its last line)."""
    latest = {row["cell"]: row for row in results}
    groups: dict[SeedKey, list[dict[str, str]]] = {}
    for row in latest.values():
        groups.setdefault((row["attack"], row["victim"], row["defense"], int(row["budget"])), []).append(row)
    return dict(sorted(groups.items()))


def _seed_table(groups: dict[SeedKey, list[dict[str, str]]]) -> str:
    """Markdown: ``mean ± std (min)`` per metric over each cell's seeds, n, and the random baseline."""
    from experiments.stats import format_spread, spread

    def mean_fidelity(rows: list[dict[str, str]]) -> float | None:
        value = spread([_number(row["fidelity"]) for row in rows])
        return None if value is None else value.mean

    columns = ("attack", "victim", "defense", "budget", "n", "seeds", *_SEED_COLUMNS, f"fidelity − {_BASELINE}")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for (attack, victim, defense, budget), rows in groups.items():
        cells = [format_spread(spread([_number(row.get(name)) for row in rows])) for name in _SEED_COLUMNS]
        baseline = groups.get((_BASELINE, victim, defense, budget))
        ours, theirs = mean_fidelity(rows), mean_fidelity(baseline) if baseline else None
        if attack == _BASELINE:
            versus = "baseline"
        elif ours is None or theirs is None:
            versus = "no baseline"
        else:
            versus = f"{ours - theirs:+.3f}"
        seeds = ", ".join(row["seed"] for row in sorted(rows, key=lambda row: int(row["seed"])))
        count = "1 seed" if len(rows) == 1 else str(len(rows))
        lines.append("| " + " | ".join([attack, victim, defense, f"{budget:,}", count, seeds, *cells, versus]) + " |")
    return "\n".join(lines) + "\n"


def write_grid_report(out: Path) -> Path:
    """``report.md`` with the tables and two plots: fidelity against budget per defense, and the trade-off.

    Cells that differ only by seed are aggregated: mean ± sample std (min) and n
    in the table, the mean with a ±1 std band in the plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from experiments.stats import spread

    results = [row for row in read_csv(out / "results.csv") if row["status"] == "done"]
    costs = read_csv(out / "defenses.csv")
    groups = _seed_groups(results)
    fidelity = {key: spread([_number(row["fidelity"]) for row in rows]) for key, rows in groups.items()}
    defenses = sorted({key[2] for key in groups})
    lines = sorted({(key[0], key[1]) for key in groups})
    plots = []
    if any(value is not None for value in fidelity.values()):
        figure, axes = plt.subplots(1, len(defenses), figsize=(4.5 * len(defenses) + 2, 4), squeeze=False)
        handles: dict[str, Any] = {}
        for axis, defense in zip(axes[0], defenses, strict=True):
            for index, (attack, victim) in enumerate(lines):
                points = sorted((budget, value) for (a, v, d, budget), value in fidelity.items()
                                if (a, v, d) == (attack, victim, defense) and value is not None)
                if not points:
                    continue
                colour = f"C{index % 10}"
                budgets = [budget for budget, _ in points]
                means = [value.mean for _, value in points]
                (line,) = axis.plot(budgets, means, "-o" if victim == "normal" else "--s", color=colour, ms=4)
                spreads = [(value.mean - value.std, value.mean + value.std) if value.n > 1 else
                           (value.mean, value.mean) for _, value in points]
                axis.fill_between(budgets, [low for low, _ in spreads], [high for _, high in spreads],
                                  color=colour, alpha=0.2, linewidth=0)
                seeds = max(value.n for _, value in points)
                handles.setdefault(f"{attack} / {victim} ({seeds} seed{'s' if seeds > 1 else ''})", line)
            axis.set_xscale("log")
            axis.set_ylim(0, 1.02)
            axis.set_title(f"defense: {defense}")
            axis.set_xlabel("attack budget (queries)")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel("fidelity: mean over seeds, band ±1 std")
        figure.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                      fontsize=7, frameon=False)
        figure.tight_layout()
        figure.savefig(out / "fidelity_vs_budget.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        plots.append("![fidelity against budget, one panel per defense: mean over seeds, band ±1 std]"
                     "(fidelity_vs_budget.png)")
    fronts: dict[str, list[str]] = {}
    if costs and any(value is not None for value in fidelity.values()):
        top = max(key[3] for key, value in fidelity.items() if value is not None)
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for panel, (axis, (column, label)) in enumerate(zip(axes, (("accuracy", "honest users' error rate (1 − accuracy)"),
                                                                   ("ece", "honest users' calibration error (ECE)")),
                                                        strict=True)):
            for index, (attack, victim) in enumerate(lines):
                placed: list[tuple[float, Any, str]] = []
                for cost in costs:
                    value = fidelity.get((attack, victim, cost["defense"], top))
                    if cost["victim"] == victim and value is not None:
                        harm = _number(cost[column])
                        placed.append((1.0 - harm if column == "accuracy" else harm, value, cost["defense"]))
                if not placed:
                    continue
                colour = f"C{index % 10}"
                front = pareto_front([(x, value.mean) for x, value, _ in placed])
                if panel == 0:
                    fronts[f"{attack} / {victim}"] = [placed[i][2] for i in front]
                ordered = sorted(front, key=lambda i: placed[i][0])
                axis.step([placed[i][0] for i in ordered], [placed[i][1].mean for i in ordered], where="post",
                          color=colour, alpha=0.6, linewidth=1)
                # Defenses that change nothing here (detectors, say) share one point: one label for all.
                names_at: dict[tuple[float, float], list[str]] = {}
                for x, value, name in placed:
                    names_at.setdefault((round(x, 6), round(value.mean, 6)), []).append(name)
                for i, (x, value, name) in enumerate(placed):
                    axis.errorbar([x], [value.mean], yerr=[value.std if value.n > 1 else 0.0], capsize=3,
                                  fmt="o" if victim == "normal" else "s", color=colour,
                                  markerfacecolor=colour if i in front else "white",
                                  label=f"{attack} / {victim}" if i == 0 else None)
                    shared = names_at[(round(x, 6), round(value.mean, 6))]
                    if shared[0] == name:
                        axis.annotate(", ".join(shared), (x, value.mean), fontsize=7, xytext=(3, 3),
                                      textcoords="offset points")
            axis.set_xlabel(label)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel(f"attacker's fidelity at budget {top:,}\n(mean over seeds, bar ±1 std)")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        figure.suptitle("defenses: cost to honest users against fidelity left to the attacker; filled and "
                        "joined: Pareto-optimal (nothing cheaper stops it better)", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "tradeoff.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        plots.append("![what a defense costs honest users against the fidelity it leaves](tradeoff.png)")
    if not plots:
        plots.append("No plots: no finished cell has a fidelity yet.")

    def table(rows: Iterable[dict[str, str]], columns: Sequence[str]) -> str:
        head = "| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns) + "\n"
        body = "\n".join("| " + " | ".join(_short(row.get(c, "")) for c in columns) + " |" for row in rows)
        return head + body + "\n"

    single = sum(1 for rows in groups.values() if len(rows) == 1)
    text = f"""# Grid report

{len(results)} finished cells (`results.csv`) in {len(groups)} groups of seeds
({single} with a single seed); defended answers' cost to honest users on the
test set (`defenses.csv`): accuracy and ECE (15 bins; label-only answers count
as one-hot, confidence 1).

{chr(10).join(plots)}

## Over seeds

Each row: the cells that differ only by seed. Cells: mean ± sample std (n − 1)
(min) over the seeds; `fidelity − {_BASELINE}`: mean fidelity minus that of the
random-noise baseline with the same victim, defense and budget.

{_seed_table(groups)}
## What each defense costs honest users

{table(costs, ("victim", "defense", "accuracy", "ece", "flags", "latency_ms"))}
## Pareto-optimal defenses

Per attack, at the largest budget: the defenses no other defense beats on both
honest error rate and the attacker's mean fidelity.

{chr(10).join(f"- {line}: {', '.join(names)}" for line, names in fronts.items()) or "None yet."}

## Cells (one line per seed)

{table(results, ("attack", "victim", "defense", "budget", "seed", "queries", "accuracy", "fidelity",
                 "transfer_success_rate", "wall_seconds"))}"""
    path = out / "report.md"
    path.write_text(text)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, leak)`` no other point dominates (both lower is better).

    A point is dominated when another is no worse on both and better on one; ties
    (the same point twice) both stay on the front.
    """
    front = []
    for i, (cost, leak) in enumerate(points):
        dominated = any(other_cost <= cost and other_leak <= leak and (other_cost < cost or other_leak < leak)
                        for j, (other_cost, other_leak) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "." not in value:
        return value
    return f"{number:.3f}"


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
    results_path, costs_path = out / "results.csv", out / "defenses.csv"
    todo = [cell for cell in cells_of(spec) if cell.id not in finished_cells(results_path)]
    done_costs = {row["cell"] for row in read_csv(costs_path)}
    todo_costs = [cell for cell in defense_cells_of(spec) if cell.id not in done_costs]
    total = len(cells_of(spec))
    say(f"grid: {total} cells, {total - len(todo)} already finished, {len(todo)} to run"
        + (f" on Redis queue {queue!r}" if redis_url else " in this process"))
    if todo or todo_costs:
        if redis_url is None:
            runner = CellRunner(spec, out, cache_dir, show_progress)
            try:
                runner.start()
                for cost_cell in todo_costs:
                    append_csv(costs_path, DEFENSE_COLUMNS, runner.defense_cost(cost_cell))
                for index, cell in enumerate(todo, start=1):
                    say(f"[{index}/{len(todo)}] {cell.id}")
                    append_csv(results_path, RESULT_COLUMNS, runner.run(cell))
            finally:
                runner.stop()
        else:
            from experiments.grid_worker import run_on_queue

            for kind, row in run_on_queue(spec, todo, todo_costs, redis_url, queue, poll_seconds):
                if kind == "cost":
                    append_csv(costs_path, DEFENSE_COLUMNS, row)
                else:
                    say(f"finished {row['cell']} ({row['status']})")
                    append_csv(results_path, RESULT_COLUMNS, row)
    write_grid_report(out)
    return read_csv(results_path)
