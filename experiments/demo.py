"""The one-command demo: train (or reuse) two victims, serve them, steal them with every attack.

``stealsim demo`` runs, on the embedded default (no Redis, no GPU, no network):

1. a normal victim and its Nasty Teacher on a built-in dataset, trained or
   reused from a cache keyed by a hash of their settings
   (:mod:`experiments.victims`);
2. the victim service as a child process (``stealsim serve``) on a free port
   serving both as ``normal`` and ``nasty`` (:mod:`experiments.service`);
3. one API key per attack and victim with the attack's budget (admin API), and
   one evaluation key per run so the attack budget is spent on the attack only;
4. every attack of the registry (:data:`attacker.attacks.ATTACKS`) against both
   victims over HTTP (:func:`attacker.runner.run_attack`);
5. one table (attack x victim: queries, accuracy, fidelity, transfer success,
   wall time), ``summary.json`` and ``report.md`` with plots.

With ``url`` set, steps 1-2 are skipped and the attacks run against an existing
service (the docker-compose attacker does this). The summary and report are
rewritten after every run, so an interrupted demo (Ctrl-C, SIGTERM) leaves a
usable partial report; the service is stopped on success, failure and interrupt.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from experiments.service import ServiceProcess, create_key, new_admin_key, wait_ready
from experiments.victims import VICTIM_NAMES, PreparedVictims, VictimSettings, prepare_victims
from stealsim.errors import ConfigError

__all__ = [
    "DemoConfig",
    "DemoResult",
    "RunRow",
    "attack_overrides",
    "demo_attacks",
    "markdown_table",
    "run_demo",
]

logger = logging.getLogger(__name__)

RunStatus = Literal["pending", "running", "done", "failed", "interrupted"]

EVAL_BUDGET = 1_000_000
"""Budget of an evaluation key: evaluation is counted apart from the attack budget."""

QUICK_SETTINGS: dict[str, Any] = {
    "batch_size": 128, "student_width": 8, "generator_width": 8, "latent_dim": 16, "replay": 1000,
    "student_steps": 2, "members": 2, "updates_per_batch": 2, "train_batch": 64,
}
"""Small clones and generators for ``--quick`` (applied where an attack has the setting)."""


def demo_attacks() -> tuple[str, ...]:
    """Every registered attack of stealsim's own, in registry order (new attacks join the demo
    when registered; ART's, which need the optional ``stealsim[art]`` extra, do not)."""
    from attacker.attacks import ATTACKS

    return tuple(name for name, cls in ATTACKS.items() if cls.extra is None)


def attack_overrides(attack: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``settings`` that ``attack``'s settings type has (others are skipped)."""
    from attacker.attacks import setting_keys

    known = set(setting_keys(attack))
    return {key: value for key, value in settings.items() if key in known}


@dataclass(frozen=True)
class DemoConfig:
    """Everything one demo needs.

    Attributes:
        out: directory of the runs, ``summary.json`` and ``report.md``.
        victims: how the victims are trained (ignored with ``url``).
        cache_dir: where trained victims are cached, keyed by their settings' hash.
        attacks: attack names (``None``: every registered attack).
        budget: attack queries (images) per run.
        budgets: per-attack budgets that replace ``budget``.
        attack_settings: settings given to every attack that has them.
        transfer_samples, reference_epochs: evaluation settings (see ``attacker.evaluation``).
        eval_every: queries between evaluations (0: a twentieth of the budget).
        seed: seed of every run.
        threads: ``torch.set_num_threads`` of the attacks (the service uses one thread).
        url: an existing victim service; ``None`` trains, serves and stops its own.
        admin_key: the existing service's admin key (needed with ``url``).
        models: model names of the two victims on the service.
        victims_only: prepare the victims, copy them to ``out/victims`` and stop (docker-compose).
        show_progress: progress bars.
    """

    out: Path
    victims: VictimSettings = field(default_factory=VictimSettings)
    cache_dir: Path = Path("runs/cache")
    attacks: tuple[str, ...] | None = None
    budget: int = 20_000
    budgets: dict[str, int] = field(default_factory=dict)
    attack_settings: dict[str, Any] = field(default_factory=dict)
    transfer_samples: int = 200
    reference_epochs: int = 5
    eval_every: int = 0
    seed: int = 0
    threads: int = 2
    url: str | None = None
    admin_key: str | None = None
    models: dict[str, str] = field(default_factory=lambda: {name: name for name in VICTIM_NAMES})
    victims_only: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1 or any(value < 1 for value in self.budgets.values()):
            raise ConfigError(f"budgets must be >= 1, got {self.budget} and {self.budgets}")
        if self.url is not None and not self.admin_key:
            raise ConfigError("--url needs --admin-key (the demo creates one API key per attack)")
        if self.url is not None and self.victims_only:
            raise ConfigError("--victims-only trains victims; it does not take --url")
        if set(self.models) != set(VICTIM_NAMES):
            raise ConfigError(f"models must name both victims {VICTIM_NAMES}, got {sorted(self.models)}")

    @classmethod
    def standard(cls, out: Path, quick: bool = False, **overrides: Any) -> DemoConfig:
        """The demo's settings: full (about 5-8 minutes on 2 cores) or ``quick`` (the CI smoke test)."""
        if quick:
            base: dict[str, Any] = dict(
                victims=VictimSettings(epochs=4, nasty_epochs=4), budget=1_000,
                attack_settings=dict(QUICK_SETTINGS), transfer_samples=50, reference_epochs=1,
                eval_every=250,
            )
        else:
            base = dict(victims=VictimSettings(epochs=30), budget=20_000, transfer_samples=200,
                        reference_epochs=5)
        return cls(out=out, **(base | {k: v for k, v in overrides.items() if v is not None}))


@dataclass
class RunRow:
    """One cell of the table: an attack against a victim."""

    attack: str
    victim: str
    status: RunStatus = "pending"
    queries: int | None = None
    accuracy: float | None = None
    fidelity: float | None = None
    transfer_success_rate: float | None = None
    wall_seconds: float | None = None
    victim_accuracy: float | None = None
    eval_queries: int | None = None
    eval_images: int | None = None
    """Images of the evaluation split: the resolution of accuracy and fidelity."""
    server_count_matches: bool | None = None
    stop_reason: str | None = None
    error: str | None = None

    @property
    def run_name(self) -> str:
        return f"{self.attack}-{self.victim}"


@dataclass
class DemoResult:
    """What the demo wrote: its rows and where."""

    rows: list[RunRow]
    summary_path: Path
    report_path: Path
    wall_seconds: float
    status: Literal["done", "failed", "interrupted"]


# -- reports ---------------------------------------------------------------------------------


def _cell(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


TABLE_COLUMNS = ("attack", "victim", "queries", "accuracy", "fidelity", "transfer success", "wall s", "status")


def _row_cells(row: RunRow) -> list[str]:
    return [row.attack, row.victim, _cell(row.queries), _cell(row.accuracy), _cell(row.fidelity),
            _cell(row.transfer_success_rate), _cell(row.wall_seconds, 1), row.status]


def markdown_table(rows: Sequence[RunRow]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _print_table(rows: Sequence[RunRow], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="left" if name in ("attack", "victim", "status") else "right")
    for row in rows:
        table.add_row(*_row_cells(row))
    console = Console()
    console.width = max(console.width, 110)  # the whole table even when piped
    console.print(table)


def _write_outputs(config: DemoConfig, rows: Sequence[RunRow], meta: dict[str, Any], status: str) -> tuple[Path, Path]:
    """``summary.json``, ``report.md`` and the per-victim plots (rewritten after every run)."""
    from attacker.rundir import RunDirectory
    from experiments.report import plot_runs

    out = config.out
    plots: dict[str, str] = {}
    for victim in VICTIM_NAMES:
        runs = [(row.attack, RunDirectory(out / "runs" / row.run_name).read_history())
                for row in rows if row.victim == victim]
        if any(history for _, history in runs):
            name = f"fidelity_{victim}.png"
            if plot_runs(runs, out / name, f"attacks against the {victim} victim"):
                plots[victim] = name
    summary = {"status": status, **meta, "rows": [asdict(row) for row in rows], "plots": plots}
    summary_path = out / "summary.json"
    temporary = summary_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    temporary.replace(summary_path)

    victims = meta.get("victims", {})
    accuracy_lines = "\n".join(
        f"- `{name}`: test accuracy {_cell(victims.get(f'{name}_test_accuracy'))}" for name in VICTIM_NAMES
    )
    figures = "\n\n".join(f"![fidelity against queries, {victim} victim]({name})" for victim, name in plots.items())
    run_links = "\n".join(
        f"- [{row.run_name}](runs/{row.run_name}/report.md)" for row in rows if row.status == "done"
    )
    errors = "\n".join(f"- {row.run_name}: {row.error}" for row in rows if row.error)
    sizes = sorted({row.eval_images for row in rows if row.eval_images})
    resolution = (f" Accuracy and fidelity are shares of {' or '.join(f'{n:,}' for n in sizes)} test images: "
                  f"one image is {100 / sizes[-1]:.2f} points; each run's report gives their 95 % interval."
                  if sizes else "")
    text = f"""# stealsim demo

Status: **{status}**. Budget {_cell(meta.get('budget'))} attack queries per run
(evaluation queries are charged to a separate key), seed {meta.get('seed')},
victims served at {meta.get('url')} ({meta.get('mode')}).

Victims ({meta.get('dataset')}):

{accuracy_lines}

## Results

`fidelity`: share of test images on which the clone agrees with the victim;
`transfer success`: share of PGD examples crafted on the clone that fool the
victim; `wall s`: seconds of the run (attack and evaluation).{resolution}

{markdown_table(rows)}
{figures}

## Runs

{run_links or '(none finished)'}
{('## Errors' + chr(10) + chr(10) + errors + chr(10)) if errors else ''}"""
    report_path = out / "report.md"
    report_path.write_text(text)
    return summary_path, report_path


# -- running ---------------------------------------------------------------------------------


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (docker stop, kill) ends the demo as Ctrl-C does: cleanup and a partial report."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DropRepeats(logging.Filter):
    """Drops a record whose message repeats the one before it (until :meth:`reset`).

    A demo run opens the victim twice, with its attack key and with its evaluation
    key, and the HTTP client logs the same negotiated endpoint for each: the run
    shows it once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def reset(self) -> None:
        self.last = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        repeated = message == self.last
        self.last = message
        return not repeated


@contextmanager
def _one_negotiation_line() -> Iterator[_DropRepeats]:
    """The HTTP client's repeated lines dropped while the demo runs (see :class:`_DropRepeats`)."""
    client_logger = logging.getLogger("attacker.client")
    repeats = _DropRepeats()
    client_logger.addFilter(repeats)
    try:
        yield repeats
    finally:
        client_logger.removeFilter(repeats)


def _run_one(config: DemoConfig, row: RunRow, url: str, admin_key: str) -> None:
    from attacker.evaluation import EvalConfig
    from attacker.runner import RunSpec, run_attack

    model = config.models[row.victim]
    budget = config.budgets.get(row.attack, config.budget)
    key = create_key(url, admin_key, budget, name=f"demo/{row.run_name}", models=[model])
    eval_key = create_key(url, admin_key, EVAL_BUDGET, name=f"demo/{row.run_name}/eval", models=[model])
    run_dir = config.out / "runs" / row.run_name
    if run_dir.exists():  # a fresh run each demo (keys are new too)
        shutil.rmtree(run_dir)
    metrics = run_attack(RunSpec(
        attack=row.attack, out=run_dir, budget=budget, url=url, api_key=key, model=model,
        eval_api_key=eval_key, eval_every=config.eval_every, seed=config.seed, device="cpu", show_progress=config.show_progress,
        settings=attack_overrides(row.attack, config.attack_settings),
        evaluation=EvalConfig(transfer_samples=config.transfer_samples, reference_epochs=config.reference_epochs),
    ))
    row.queries = int(metrics["queries_used"])
    row.accuracy = float(metrics["accuracy"])
    row.fidelity = float(metrics["fidelity"])
    row.transfer_success_rate = float(metrics["transfer_success_rate"])
    row.victim_accuracy = float(metrics["victim_accuracy"])
    row.eval_queries = int(metrics["eval_queries"])
    row.eval_images = int(metrics["eval_images"]) if metrics.get("eval_images") else None
    row.server_count_matches = bool(metrics.get("server_count_matches")) if "server_count_matches" in metrics else None
    row.stop_reason = str(metrics.get("stop_reason"))


def _export_victims(victims: PreparedVictims, out: Path) -> dict[str, Path]:
    """Copy the checkpoints to ``out/victims/{normal,nasty}`` (paths that do not depend on the hash)."""
    exported = {}
    for name, source in victims.models().items():
        target = out / "victims" / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        exported[name] = target
    return exported


def run_demo(config: DemoConfig, announce: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo; write ``summary.json`` and ``report.md`` (also when interrupted); stop every child."""
    import torch

    from attacker.attacks import attack_class

    started = time.perf_counter()
    say = announce or (lambda text: logger.info("%s", text))
    attacks = config.attacks if config.attacks is not None else demo_attacks()
    for name in attacks:
        attack_class(name)  # unknown names fail before anything is trained or started
    if config.out.exists() and not config.out.is_dir():
        raise ConfigError(f"--out {config.out} exists and is not a directory")
    config.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    rows = [RunRow(attack, victim) for victim in VICTIM_NAMES for attack in attacks]
    meta: dict[str, Any] = {
        "budget": config.budget, "budgets": config.budgets, "seed": config.seed, "attacks": list(attacks),
        "dataset": config.victims.dataset, "mode": "external service" if config.url else "own service",
        "url": config.url, "victims": {}, "settings": {
            "victims": asdict(config.victims), "attack_settings": config.attack_settings,
            "transfer_samples": config.transfer_samples, "reference_epochs": config.reference_epochs,
        },
    }
    service: ServiceProcess | None = None
    status: Literal["done", "failed", "interrupted"] = "done"
    current: RunRow | None = None
    with _sigterm_as_interrupt(), _one_negotiation_line() as repeats:
        try:
            if config.url is None:
                say(f"victims: {config.victims.dataset}, {config.victims.epochs} epochs (cache {config.cache_dir})")
                victims = prepare_victims(config.victims, config.cache_dir, config.show_progress)
                meta["victims"] = dict(victims.metrics) | {"cache_key": victims.cache_key, "reused": victims.reused}
                if config.victims_only:
                    exported = _export_victims(victims, config.out)
                    say(f"victims written to {', '.join(str(path) for path in exported.values())}")
                    meta["victims"]["exported"] = {k: str(v) for k, v in exported.items()}
                    summary_path = config.out / "victims.json"
                    summary_path.write_text(json.dumps(meta["victims"], indent=2) + "\n")
                    return DemoResult([], summary_path, summary_path, time.perf_counter() - started, "done")
                admin_key = new_admin_key()
                service = ServiceProcess(victims.models(), admin_key=admin_key,
                                         log_path=config.out / "service.log")
                say("starting the victim service")
                service.start()
                url = service.url
                meta["service_pid"] = service.pid
            else:
                assert config.admin_key is not None
                admin_key = config.admin_key
                url = config.url.rstrip("/")
                say(f"waiting for the victim service at {url}")
                wait_ready(url, timeout=300.0)
            meta["url"] = url
            _write_outputs(config, rows, meta, "running")
            for index, row in enumerate(rows, start=1):
                current = row
                repeats.reset()
                row.status = "running"
                _write_outputs(config, rows, meta, "running")
                say(f"[{index}/{len(rows)}] {row.attack} against the {row.victim} victim, "
                    f"budget {config.budgets.get(row.attack, config.budget):,} queries")
                run_started = time.perf_counter()
                try:
                    _run_one(config, row, url, admin_key)
                    row.status = "done"
                    meta["victims"].setdefault(f"{row.victim}_test_accuracy", row.victim_accuracy)
                except Exception as exc:
                    logger.error("%s failed: %s\n%s", row.run_name, exc, traceback.format_exc())
                    row.status, row.error, status = "failed", f"{type(exc).__name__}: {exc}", "failed"
                row.wall_seconds = time.perf_counter() - run_started
                current = None
                _write_outputs(config, rows, meta, "running")
        except KeyboardInterrupt:
            status = "interrupted"
            if current is not None:
                current.status = "interrupted"
            say("interrupted: stopping the service and writing a partial report")
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            if service is not None:
                service.stop()  # logs how it ended: "victim service stopped (pid N)" after our SIGTERM
            meta["wall_seconds"] = time.perf_counter() - started
            if not config.victims_only:
                summary_path, report_path = _write_outputs(config, rows, meta, status)
    _print_table(rows, f"stealsim demo: {config.victims.dataset}, budget {config.budget:,} queries per run")
    return DemoResult(rows, summary_path, report_path, meta["wall_seconds"], status)
