"""``stealsim audit SPEC.yaml``: what it costs an attacker to copy a model through its API, and who notices.

A security team names its model (a local checkpoint, or an endpoint it runs), its rate limits,
its price and its defenses, and the attackers to try with their resources (money, hours,
accounts); see ``examples/audit.yaml`` and docs/experiments.md, "Audit"::

    spec = load_audit_spec(Path("examples/audit.yaml"))
    result = run_audit(spec, Path("runs/audit"))          # OUT/report.md, OUT/runs/<cell>/

Orchestration: one service per audit (a local victim: ``stealsim serve`` in a child, the
defenses as the model's policy, the price and limits as the server's, its ``rate_limits``
``declare`` so that runs keep the limits on the attacker's virtual clock instead of sleeping); an
evaluation key with the full probabilities, so fidelity is measured against the undefended
model; then per attacker x account count x seed one attack run through that many accounts
(:class:`attacker.accounts.AccountsSpec`, opened through the admin API like any sign-up),
with honest users sending the test split beside it through keys priced like everyone's.
A finished run is not run again (the audit resumes); the report
(:mod:`experiments.audit_report`) is written from the run directories.

Everything the spec says is checked before anything runs: a bad value or an impossible
resource (negative money, zero accounts, money that pays for no query) is a one-line
:class:`ConfigError` (``stealsim audit`` exits 2), with no victim trained, no service started
and no key opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from experiments.audit_report import AuditRun, write_audit_report
from experiments.spec import read_spec
from stealsim.errors import ConfigError

__all__ = [
    "AttackerSpec",
    "AuditCell",
    "AuditResult",
    "AuditSpec",
    "audit_cells",
    "load_audit_spec",
    "resolve_taus",
    "run_audit",
    "run_budget",
]

logger = logging.getLogger(__name__)

MODEL = "victim"
"""The name a local victim is served under."""
EVAL_BUDGET = 1_000_000
"""Images of the audit's evaluation key (evaluation is not the attacker's spending)."""
VALIDATION = "validation"
"""``tau: validation`` in a defense step: the step's ``honest_rate`` quantile of the victim's
maximum softmax probability on the validation split."""


class VictimSpec(BaseModel):
    """The audited model: a built-in dataset's checkpoint, or an endpoint the team runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: Literal["digits", "mnist5k"]
    """The data of the model: evaluation, honest users and ``tau: validation`` use its splits."""
    checkpoint: Path | None = None
    """A local checkpoint directory; absent: trained (and cached) with the grid's victim settings."""
    epochs: int = Field(default=30, ge=1)
    """Training epochs of a victim trained here (the grid's default)."""
    url: str | None = None
    admin_key: str | None = Field(default=None, repr=False)
    admin_key_env: str | None = None
    model: str = MODEL

    @model_validator(mode="after")
    def _one_victim(self) -> VictimSpec:
        if self.url is None:
            if self.admin_key is not None or self.admin_key_env is not None:
                raise ValueError("admin_key and admin_key_env belong to a url victim")
            if self.model != MODEL:
                raise ValueError("model names a url victim's model; a local victim is served as 'victim'")
        else:
            if self.checkpoint is not None:
                raise ValueError("give either url (an endpoint you run) or checkpoint, not both")
            if (self.admin_key is None) == (self.admin_key_env is None):
                raise ValueError("a url victim needs admin_key or admin_key_env (one of them): "
                                 "the audit opens the attacker's accounts through the admin API")
        return self

    def admin(self) -> str:
        """The url victim's admin key (from the environment variable when named)."""
        if self.admin_key is not None:
            return self.admin_key
        assert self.admin_key_env is not None
        value = os.environ.get(self.admin_key_env)
        if not value:
            raise ConfigError(f"victim.admin_key_env: the environment variable {self.admin_key_env} is not set")
        return value


def _check_rate(rate: str | None) -> str | None:
    if rate is not None:
        import limits

        try:
            limits.parse(rate)
        except ValueError as exc:
            raise ValueError(f"{rate!r} is not a rate: use the limits syntax, e.g. '20/second'") from exc
    return rate


class LimitsSpec(BaseModel):
    """Rate limits of every account (``limits`` syntax); absent: the server's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: str | None = None
    image_rate: str | None = None

    _rates = field_validator("rate", "image_rate")(_check_rate)


class AttackerSpec(BaseModel):
    """One attacker and its resources; each account count is tried with every seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attack: str
    name: str | None = None
    """How the report names it (default: the attack); unique in the spec."""
    budget: int | None = None
    """Attack queries at most."""
    money: float | None = None
    """What the attacker may spend (accounts and queries): the run's budget is the most it pays for."""
    hours: float | None = None
    """Simulated hours at most (the run stops at the time limit)."""
    accounts: list[int] = Field(default_factory=lambda: [1], min_length=1)
    policy: Literal["round-robin", "fill"] = "round-robin"
    retire_flagged: bool = False
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("budget")
    @classmethod
    def _budget(cls, budget: int | None) -> int | None:
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be at least 1 query, got {budget}")
        return budget

    @field_validator("money")
    @classmethod
    def _money(cls, money: float | None) -> float | None:
        if money is not None and not money >= 0:
            raise ValueError(f"money cannot be negative, got {money}")
        return money

    @field_validator("hours")
    @classmethod
    def _hours(cls, hours: float | None) -> float | None:
        if hours is not None and not hours > 0:
            raise ValueError(f"hours must be more than 0, got {hours}")
        return hours

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, accounts: list[int]) -> list[int]:
        if any(count < 1 for count in accounts):
            raise ValueError(f"every account count must be at least 1, got {accounts}")
        if len(set(accounts)) != len(accounts):
            raise ValueError(f"account counts repeat: {accounts}")
        return sorted(accounts)

    @property
    def label(self) -> str:
        return self.name or self.attack


class HonestSpec(BaseModel):
    """Honest users beside every attack run: each sends the test split through a key of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int = Field(default=2, ge=0)
    batch: int = Field(default=32, ge=1)
    passes: int = Field(default=1, ge=1)
    rate: float = Field(default=0.0, ge=0.0)
    """Requests per second per user at most (0: back to back)."""


class EvalSpec(BaseModel):
    """How fidelity is measured (against the undefended model, on a key of the audit's own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: Literal["test", "validation"] = "test"
    every: int = Field(default=0, ge=0)
    """Attack queries between evaluations (0: a twentieth of the budget)."""
    transfer_samples: int = Field(default=100, ge=1)
    reference_epochs: int = Field(default=3, ge=1)


class AuditSpec(BaseModel):
    """The audit (the YAML file's keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    victim: VictimSpec
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    clock: Literal["virtual", "live"] = "virtual"
    """``virtual``: the server declares its limits and the runs keep them on a simulated clock;
    ``live``: the server enforces them and the runs wait for them."""
    price_per_1000_images: float | None = Field(default=None, ge=0.0)
    account_price: float = Field(default=0.0, ge=0.0)
    currency: str = Field(default="USD", min_length=1)
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    attackers: list[AttackerSpec] = Field(min_length=1)
    honest: HonestSpec = Field(default_factory=HonestSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    out: Path | None = None
    cache_dir: Path = Path("runs/cache")
    threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> AuditSpec:
        labels = [attacker.label for attacker in self.attackers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"attackers need distinct names (give name: to tell two {labels} apart)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if self.victim.url is not None and self.defenses:
            raise ValueError("a url victim is audited as deployed: every account the audit opens gets its "
                             "model's own policy there; leave defenses out (they configure a local victim)")
        return self


def _one_line(error: ValidationError) -> str:
    """pydantic's errors as one line: ``where: what; where: what``."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


@dataclass(frozen=True)
class AuditCell:
    """One attack run: an attacker through ``accounts`` accounts with one seed and its budget."""

    attacker: str
    attack: str
    accounts: int
    seed: int
    budget: int

    @property
    def id(self) -> str:
        return f"{self.attacker}__a{self.accounts}__s{self.seed}"


def run_budget(attacker: AttackerSpec, accounts: int, price: float | None, account_price: float) -> int:
    """The attack queries of ``attacker`` through ``accounts`` accounts: its budget, or the most its
    money pays for after opening the accounts (the smaller when both are given).

    Raises:
        ConfigError: the money does not pay for the accounts and one query, or neither a budget
            nor a price that turns money into queries is given.
    """
    budget = attacker.budget
    if attacker.money is not None:
        left = attacker.money - accounts * account_price
        if price is None and budget is None:
            raise ConfigError(f"attacker {attacker.label!r}: money needs price_per_1000_images to buy queries, "
                              "or give budget too")
        image = (price or 0.0) / 1000.0
        if left < image or left < 0 or (left == 0 and accounts * account_price > 0):
            raise ConfigError(f"attacker {attacker.label!r}: money {attacker.money:g} does not pay for {accounts} "
                              f"account(s) at {account_price:g} each and one query at {image:g}")
        if image > 0:
            affordable = math.floor(left / image + 1e-9)
            budget = affordable if budget is None else min(budget, affordable)
    if budget is None:
        raise ConfigError(f"attacker {attacker.label!r}: give budget (queries) or money (with a price)")
    return budget


def audit_cells(spec: AuditSpec) -> list[AuditCell]:
    """Every run of the audit, each with its budget (a ConfigError for an impossible resource)."""
    return [AuditCell(attacker.label, attacker.attack, accounts, seed,
                      run_budget(attacker, accounts, spec.price_per_1000_images, spec.account_price))
            for attacker in spec.attackers for accounts in attacker.accounts for seed in spec.seeds]


def _step_default(name: str, parameter: str) -> Any:
    from defense.steps import step_class

    return step_class(name).model_fields[parameter].default


def resolve_taus(defenses: list[dict[str, Any]], validation_msp: Any) -> list[dict[str, Any]]:
    """``defenses`` with each ``tau: validation`` replaced by the step's ``honest_rate`` quantile of
    ``validation_msp`` (the victim's maximum softmax probabilities on validation images)."""
    import numpy as np

    resolved = []
    for step in defenses:
        if step.get("tau") == VALIDATION:
            rate = step.get("honest_rate", _step_default(str(step.get("name")), "honest_rate"))
            step = {**step, "tau": round(float(np.quantile(np.asarray(validation_msp), float(rate))), 6)}
        resolved.append(step)
    return resolved


def load_audit_spec(path: Path) -> AuditSpec:
    """Read and check an audit spec: the fields, the attacks, the policy and every run's resources."""
    from attacker.attacks import attack_class
    from defense.policies import parse_policy

    try:
        spec = read_spec(path, AuditSpec, "audit")
    except ConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, ValidationError):
            raise ConfigError(f"{path}: {_one_line(cause)}") from cause
        raise ConfigError(" ".join(str(exc).split())) from exc
    for attacker in spec.attackers:
        attack_class(attacker.attack)
    try:
        parse_policy(_placeholder_taus(spec.defenses))
    except ConfigError as exc:
        raise ConfigError(f"{path}: defenses: {' '.join(str(exc).split())}") from exc
    audit_cells(spec)  # every resource is possible, before anything runs
    return spec


def _placeholder_taus(defenses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``defenses`` with a number in place of each ``tau: validation`` (to check the rest of the policy)."""
    return [{**step, "tau": 0.5} if step.get("tau") == VALIDATION else step for step in defenses]


def detector_names(defenses: list[dict[str, Any]]) -> list[str]:
    """The detector steps of the policy (their flags are what the report follows)."""
    from defense.policies import parse_policy
    from defense.steps import DetectorStep

    return list(dict.fromkeys(step.name for step in parse_policy(_placeholder_taus(defenses)).steps
                              if isinstance(step, DetectorStep)))


# -- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    runs: list[AuditRun]
    report: Path
    failed: int


@dataclass
class _Target:
    """Where the runs go: the service's URL, its admin key and the model."""

    url: str
    admin_key: str
    model: str
    eval_key: str = ""
    price: float = 0.0
    """What honest users pay per 1,000 images: the spec's price, else the one the model's metadata declares."""


def _declared_price(target: _Target) -> float:
    """The price per 1,000 images the model's metadata declares to the evaluation key (0: none)."""
    from attacker.client import HttpVictim

    with HttpVictim(target.url, target.eval_key, target.model) as victim:
        parameters = (victim.metadata or {}).get("parameters") or {}
    declared = parameters.get("price_per_1000_images") if isinstance(parameters, dict) else None
    return float(declared) if isinstance(declared, int | float) else 0.0


def _victim_checkpoint(spec: AuditSpec, cache_dir: Path, show_progress: bool) -> Path:
    """The local victim: the spec's checkpoint, or one trained with the grid's settings (cached)."""
    from experiments.victims import VictimSettings, prepare_victims

    if spec.victim.checkpoint is not None:
        if not (spec.victim.checkpoint / "model.json").is_file():
            raise ConfigError(f"victim.checkpoint {spec.victim.checkpoint}: no checkpoint there (model.json)")
        return spec.victim.checkpoint
    settings = VictimSettings(dataset=spec.victim.dataset, epochs=spec.victim.epochs)
    return prepare_victims(settings, cache_dir, show_progress).normal


def _validation_msp(checkpoint: Path, dataset: str) -> Any:
    import torch

    from stealsim.checkpoint import load_checkpoint
    from stealsim.data import load_dataset

    data = load_dataset(dataset)
    model, _ = load_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        return torch.softmax(model(data.x_val), dim=1).max(dim=1).values.numpy()


def _server_settings(spec: AuditSpec, checkpoint: Path, policy: list[dict[str, Any]]) -> dict[str, Any]:
    model: dict[str, Any] = {"path": str(checkpoint.resolve()), "policy": policy}
    if spec.price_per_1000_images is not None:
        model["price_per_1000_images"] = spec.price_per_1000_images
    settings: dict[str, Any] = {"models": {MODEL: model}, "currency": spec.currency,
                                "rate_limits": "declare" if spec.clock == "virtual" else "enforce"}
    if spec.limits.rate is not None:
        settings["default_rate"] = spec.limits.rate
    if spec.limits.image_rate is not None:
        settings["default_image_rate"] = spec.limits.image_rate
    return settings


def _honest_users(spec: AuditSpec, target: _Target, cell: AuditCell, data: Any,
                  results: list[dict[str, Any]]) -> list[threading.Thread]:
    """Start the honest users of ``cell`` (threads appending one dict each to ``results``)."""
    from experiments.honest import HonestSettings, honest_traffic
    from stealsim.service_client import ServiceClient

    price = target.price
    images = len(data.y_test) * spec.honest.passes
    threads = []
    for user in range(spec.honest.users):
        with ServiceClient(target.url, target.admin_key, timeout=30.0) as service:
            key = service.create_key(images, name=f"audit/{cell.id}/honest{user}", models=[target.model]).api_key
        settings = HonestSettings(split="test", batch=spec.honest.batch, rate=spec.honest.rate,
                                  passes=spec.honest.passes, shuffle=True, seed=cell.seed * 1000 + user)

        def send(key: str = key, settings: HonestSettings = settings, user: int = user) -> None:
            try:
                result = honest_traffic(target.url, key, target.model, data, settings)
                results.append({"user": user, **result.to_dict(), "paid": result.images * price / 1000.0})
            except Exception as exc:  # reported, never hidden: the report counts failed honest users
                logger.exception("honest user %d of %s failed", user, cell.id)
                results.append({"user": user, "error": f"{type(exc).__name__}: {exc}"})

        thread = threading.Thread(target=send, name=f"honest-{cell.id}-{user}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _run_cell(spec: AuditSpec, attacker: AttackerSpec, cell: AuditCell, target: _Target, run_dir: Path,
              data: Any, show_progress: bool) -> AuditRun:
    """One attack run through ``cell.accounts`` accounts, honest users beside it."""
    from attacker.accounts import AccountsSpec
    from attacker.evaluation import EvalConfig
    from attacker.runner import RunSpec, run_attack
    from experiments.demo import attack_overrides

    accounts = AccountsSpec(
        count=cell.accounts, policy=attacker.policy, retire_flagged=attacker.retire_flagged,
        admin_key=target.admin_key, account_price=spec.account_price, clock=spec.clock,
        price_per_1000_images=spec.price_per_1000_images if spec.victim.url is not None else None,
        currency=spec.currency if spec.victim.url is not None else None,
        rate=spec.limits.rate if spec.victim.url is not None else None,
        image_rate=spec.limits.image_rate if spec.victim.url is not None else None,
        max_seconds=None if attacker.hours is None else attacker.hours * 3600.0,
        # The budget already is what the money pays for; the limit guards it (a float's rounding spared).
        max_cost=None if attacker.money is None else attacker.money + 1e-9,
    )
    run = RunSpec(
        attack=cell.attack, out=run_dir, budget=cell.budget, url=target.url, model=target.model,
        accounts=accounts, eval_api_key=target.eval_key, eval_every=spec.eval.every, seed=cell.seed,
        device="cpu", show_progress=show_progress, settings=attack_overrides(cell.attack, attacker.settings),
        evaluation=EvalConfig(split=spec.eval.split, transfer_samples=spec.eval.transfer_samples,
                              reference_epochs=spec.eval.reference_epochs, seed=cell.seed),
    )
    honest: list[dict[str, Any]] = []
    threads = _honest_users(spec, target, cell, data, honest)
    try:
        run_attack(run)
    finally:
        for thread in threads:
            thread.join()
        if run_dir.is_dir():
            (run_dir / "honest.json").write_text(json.dumps(sorted(honest, key=lambda user: user["user"]),
                                                            indent=2) + "\n")
    return AuditRun.read(run_dir, cell.attacker, cell.accounts, cell.seed)


def _finished(run_dir: Path) -> bool:
    from attacker.rundir import RunDirectory

    return RunDirectory(run_dir).finished_metrics() is not None and (run_dir / "honest.json").is_file()


def _setting_lines(spec: AuditSpec, policy: list[dict[str, Any]], target_url: str | None) -> list[str]:
    victim = (f"the endpoint {target_url} (model {spec.victim.model})" if spec.victim.url
              else f"a {spec.victim.dataset} checkpoint ({spec.victim.checkpoint or 'trained by the audit'})")
    price = ("the server's price" if spec.price_per_1000_images is None
             else f"{spec.price_per_1000_images:g} {spec.currency} per 1,000 images")
    limits = (f"rate {spec.limits.rate or 'the server default'}, images {spec.limits.image_rate or 'the server default'}"
              f" per account ({spec.clock} clock)")
    defenses = (f"`{json.dumps(policy)}`" if spec.victim.url is None
                else "the endpoint's own (the model's policy there)")
    return [f"Audited: {victim}; {price}, {spec.account_price:g} {spec.currency} per account; {limits}.",
            "", f"Defenses (every account's and honest user's policy): {defenses}."]


def run_audit(spec: AuditSpec, out: Path, *, cache_dir: Path | None = None, show_progress: bool = True,
              announce: Callable[[str], None] | None = None) -> AuditResult:
    """Run every run of the audit not yet finished in ``out/runs``; write ``out/report.md``."""
    import torch

    from experiments.service import ServiceProcess, create_key, new_admin_key
    from stealsim.data import load_dataset

    say = announce or (lambda text: logger.info("%s", text))
    cells = audit_cells(spec)
    attackers = {attacker.label: attacker for attacker in spec.attackers}
    detectors = detector_names(spec.defenses)
    torch.set_num_threads(spec.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(
        spec.model_dump(mode="json", exclude={"victim": {"admin_key"}}), sort_keys=False))
    todo = [cell for cell in cells if not _finished(out / "runs" / cell.id)]
    say(f"audit: {len(cells)} runs, {len(cells) - len(todo)} already finished, {len(todo)} to run")
    policy = spec.defenses
    service: ServiceProcess | None = None
    failures: dict[str, str] = {}
    extra: list[str] = []
    checkpoint: Path | None = None

    def connect(target: _Target) -> _Target:
        target.eval_key = create_key(target.url, target.admin_key, EVAL_BUDGET, name="audit/eval",
                                     models=[target.model], policy=[{"name": "probabilities"}])
        target.price = (spec.price_per_1000_images if spec.price_per_1000_images is not None
                        else _declared_price(target))
        return target

    try:
        if spec.victim.url is None:
            checkpoint = _victim_checkpoint(spec, cache_dir or spec.cache_dir, show_progress)
            if any(step.get("tau") == VALIDATION for step in policy):
                policy = resolve_taus(policy, _validation_msp(checkpoint, spec.victim.dataset))
            settings_path = out / "service.yaml"
            settings_path.write_text(yaml.safe_dump(_server_settings(spec, checkpoint, policy), sort_keys=False))
            extra = ["--config", str(settings_path), "--watermark-secret", new_admin_key()]
        elif todo:
            target = connect(_Target(spec.victim.url.rstrip("/"), spec.victim.admin(), spec.victim.model))
        if todo:
            data = load_dataset(spec.victim.dataset)
        for index, cell in enumerate(todo, start=1):
            run_dir = out / "runs" / cell.id
            say(f"[{index}/{len(todo)}] {cell.id}: {cell.budget:,} queries through {cell.accounts:,} "
                f"account{'s' if cell.accounts != 1 else ''}")
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an unfinished run of an earlier service (its accounts are gone)
            try:
                if checkpoint is not None:
                    # A fresh service per run: no detector state (a pooled window above all) and no
                    # flag carries over from the run before.
                    service = ServiceProcess({MODEL: checkpoint.resolve()}, admin_key=new_admin_key(),
                                             log_path=out / "service.log", extra_args=extra).start()
                    target = connect(_Target(service.url, service.admin_key, MODEL))
                _run_cell(spec, attackers[cell.attacker], cell, target, run_dir, data, show_progress)
            except Exception as exc:
                logger.exception("audit run %s failed", cell.id)
                failures[cell.id] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            finally:
                if service is not None:
                    service.stop()
                    service = None
    finally:
        if service is not None:
            service.stop()
    runs = []
    for cell in cells:
        run = AuditRun.read(out / "runs" / cell.id, cell.attacker, cell.accounts, cell.seed)
        if cell.id in failures:
            run = AuditRun(cell.attacker, cell.accounts, cell.seed, error=failures[cell.id])
        runs.append(run)
    seen = {name for run in runs for name in (run.metrics.get("flags_by_detector") or {})}
    detectors += sorted(seen - set(detectors))
    report = write_audit_report(out, runs, detectors, spec.currency,
                                _setting_lines(spec, policy, spec.victim.url))
    return AuditResult(runs, report, sum(not run.finished for run in runs))
