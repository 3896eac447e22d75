"""A run directory: what an attack run writes, and reads back to resume.

::

    RUN/config.json       the run's settings (attack, victim, budget, seed, ...)
    RUN/ledger.json       queries spent so far, rewritten after every answered request
    RUN/answers.journal   every request answered since the checkpoint: images and answers, on disk
                          before the ledger counts them (:mod:`attacker.journal`); replayed on resume
    RUN/eval-answers.journal  the same for the evaluation's queries
    RUN/checkpoint.pt     attack state (students, generator, optimisers, replay memories, RNG) at the
                          last evaluation
    RUN/clone.ts          the final clone as a TorchScript graph (pixels in [0, 1] -> logits), for
                          ``stealsim verify-watermark`` or any later use without the attack's code
    RUN/metrics.jsonl     one line per evaluation
    RUN/metrics.json      the final metrics
    RUN/report.md         a human-readable summary
    RUN/progress.png      fidelity and accuracy against queries

Every file is written atomically (temporary file, then rename), so a killed run
leaves the previous version, never half a file; the journal, appended to, drops a
record cut short when it is read back. :class:`RunDirectory` is also the
one reader of this format: a resumed run, the multi-run report, the grid, the
uq-study and the demo read a run back through it::

    record = RunDirectory(Path("runs/ds-s0")).read_record()   # config, metrics, history
    history = RunDirectory(Path("runs/ds-s0")).read_history()  # the evaluations only
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from attacker.journal import AnswerJournal
from stealsim.errors import AttackError

if TYPE_CHECKING:
    import torch

__all__ = ["Ledger", "RunDirectory", "RunRecord"]

logger = logging.getLogger(__name__)


@dataclass
class Ledger:
    """Queries spent by a run: attack queries against the budget, evaluation queries apart."""

    attack_queries: int = 0
    eval_queries: int = 0
    server_used_at_start: int | None = None
    """The key's server-side ``used`` when the run began (HTTP only), to reconcile."""
    eval_on_attack_key: bool = False
    """Whether evaluation queries are charged to the attack's key (then the server counts both)."""
    lost_queries: int = 0
    """Queries the server charged but the run never recorded (a kill mid-request), found on resume."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class RunRecord:
    """A run directory read back: its settings, its metrics and its evaluations."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    """The final metrics (``metrics.json``); for a run without them (stopped, or still running),
    its last evaluation with ``stopped_at`` (the queries spent then) added."""
    history: list[dict[str, Any]]
    """One line per evaluation (``metrics.jsonl``)."""

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


class RunDirectory:
    """Reads and writes the files of one attack run in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def prepare(self, resume: bool) -> None:
        """Create the directory; refuse to mix a new run into an old one."""
        if self.path.exists() and not self.path.is_dir():
            raise AttackError(f"--out {self.path} exists and is not a directory")
        if resume:
            if not (self.path / "config.json").is_file():
                raise AttackError(f"cannot resume: {self.path} holds no run (config.json is missing)")
            return
        if self.path.is_dir() and (self.path / "config.json").exists():
            raise AttackError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    # -- JSON files -------------------------------------------------------------------

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        text = json.dumps(content, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write_bytes(self.path / name, text.encode())

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AttackError(f"cannot read {path}: {exc}") from exc
        if not isinstance(content, dict):
            raise AttackError(f"{path} does not hold a JSON object")
        return content

    def write_ledger(self, ledger: Ledger) -> None:
        self.write_json("ledger.json", asdict(ledger))

    def read_ledger(self) -> Ledger:
        """The ledger, counting every journaled answer (a kill can fall between the journal and the ledger)."""
        ledger = Ledger(**self.read_json("ledger.json")) if (self.path / "ledger.json").is_file() else Ledger()
        ledger.attack_queries = max(ledger.attack_queries, self.journal().answered_until())
        ledger.eval_queries = max(ledger.eval_queries, self.journal("evaluation").answered_until())
        return ledger

    def journal(self, queries: Literal["attack", "evaluation"] = "attack") -> AnswerJournal:
        """The answers journal of the attack's queries (``answers.journal``) or of the
        evaluation's (``eval-answers.journal``)."""
        return AnswerJournal(self.path / ("answers.journal" if queries == "attack" else "eval-answers.journal"))

    def finished_metrics(self) -> dict[str, Any] | None:
        """The final metrics of a finished run; ``None`` while it is not (no ``metrics.json``, or a
        final evaluation that failed, which a resume runs again)."""
        if not (self.path / "metrics.json").is_file():
            return None
        metrics = self.read_json("metrics.json")
        return None if metrics.get("evaluation_error") else metrics

    def append_metrics(self, line: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        """The evaluation lines of ``metrics.jsonl`` (none when the file is missing)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def read_record(self) -> RunRecord:
        """Config, metrics and history of a run with results (see :class:`RunRecord`).

        A run that was stopped (or is still running) has no ``metrics.json``: its metrics
        are its last evaluation in ``metrics.jsonl``, with ``stopped_at`` added, so tables
        can say the row is not a finished run. Raises AttackError for a directory with no
        run, or a run without any evaluation.
        """
        problem = f"{self.path} is not an attack run with results"
        try:
            config = json.loads((self.path / "config.json").read_text())
            history = self.read_history()
            metrics_path = self.path / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        except (OSError, json.JSONDecodeError) as exc:
            raise AttackError(f"{problem}: {exc}") from exc
        if metrics is None:
            evaluated = [entry for entry in history if "fidelity" in entry]
            if not evaluated:
                raise AttackError(f"{problem}: no metrics.json and no evaluation in metrics.jsonl")
            metrics = {**evaluated[-1], "stopped_at": evaluated[-1].get("queries")}
        return RunRecord(self.path, config, metrics, history)

    def interruption_note(self, budget: int, resumed: bool, command: str | None = None,
                          what: str = "interrupted") -> str:
        """Where a run that did not finish stopped (its ledger, last evaluation, journal) and how to go on.

        ``what`` says how it stopped (``interrupted``, ``stopped``); ``command``: the command line
        to resume with (else "the same command with --resume").
        """
        if not (self.path / "config.json").is_file():
            return f"{what} before the run started: nothing was written"
        try:
            budget = int(self.read_json("config.json").get("budget", budget))
            used = self.read_ledger().attack_queries
            history = self.read_history()
            journaled = sum(record.count for record in self.journal().read())
        except (AttackError, ValueError, TypeError, KeyError):
            return f"{what}; rerun the same command with --resume to continue the run in {self.path}"
        checkpoint = "no checkpoint yet: training restarts from the start"
        if (self.path / "checkpoint.pt").is_file() and history:
            checkpoint = f"training resumes from its checkpoint at {int(history[-1]['queries']):,} queries"
        if journaled:
            checkpoint += f", replaying the {journaled:,} answers received since from its journal (not asked again)"
        again = command or ("the same command" if resumed else "the same command with --resume")
        return (f"{what} at {used:,} of {budget:,} queries; {checkpoint}. "
                f"The run directory {self.path} keeps everything paid for; to continue: {again}")

    def rewrite_history(self, history: list[dict[str, Any]]) -> None:
        """Drop evaluation lines written after the checkpoint a resumed run restarts from."""
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in history)
        _atomic_write_bytes(self.path / "metrics.jsonl", text.encode())

    # -- checkpoint -------------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch

        descriptor, temporary = tempfile.mkstemp(dir=self.path, prefix=".checkpoint.pt.")
        os.close(descriptor)
        try:
            torch.save(state, temporary)
            os.replace(temporary, self.path / "checkpoint.pt")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def save_clone(self, clone: torch.nn.Module, input_shape: tuple[int, ...]) -> bool:
        """The final clone, traced on CPU and saved as ``clone.ts`` (atomically).

        Returns False, with a warning in the log, for a clone TorchScript cannot trace
        (SWAG's and Laplace's, which call ``torch.func.functional_call``): no ``clone.ts``.
        """
        import torch

        module = copy.deepcopy(clone).to("cpu").eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still portable
                traced = torch.jit.trace(module, torch.rand((2, *input_shape)), check_trace=False)
        except RuntimeError as exc:
            logger.warning("clone.ts not written: TorchScript cannot trace this clone (%s)", exc)
            return False
        descriptor, temporary = tempfile.mkstemp(dir=self.path, prefix=".clone.ts.")
        os.close(descriptor)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(traced, temporary)
            os.replace(temporary, self.path / "clone.ts")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return True

    def load_checkpoint(self) -> dict[str, Any] | None:
        import torch

        path = self.path / "checkpoint.pt"
        if not path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError) as exc:
            raise AttackError(f"cannot read the checkpoint {path}: {exc}") from exc
        return state
