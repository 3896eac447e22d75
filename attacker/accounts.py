"""Many accounts behind one victim: a Sybil thief's keys, their price and their clock.

:class:`AccountPool` is the victim a run talks to. It spreads the attack's
requests over accounts (API keys), one request to one account, by a
:data:`Rotation` policy:

- ``round-robin``: each request to the next account in turn (all of them opened
  at the start);
- ``fill``: one account until it is spent, blocked, revoked (or, with
  ``retire_flagged``, flagged by a detector), then the next, opened when needed.

Either way an account that is spent (429 ``budget_exhausted``), blocked (403) or
revoked (401) is retired and the request goes to the next account whole: the
server charged nothing for the refusal, so nothing is lost and nothing charged
twice. A request larger than an account's remaining budget is split across
accounts, so the run spends its budget exactly. Against stealsim's server the
accounts are opened through the admin API (the simulation of sign-up, priced
:attr:`~attacker.economics.Tariff.account_price` each); against any server the
user may pass keys instead (``--keys-file``).

Every answered request is priced and timed (:mod:`attacker.economics`), and the
flags the server reports in its answers (``parameters.flags``) are recorded per
detector: :meth:`AccountPool.economy` is what each evaluation point of the run
records (the interface docs/attacks.md documents: ``cost``, ``accounts_used``,
``simulated_seconds``, ``first_flag``, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from attacker.economics import ClockMode, FixedWindow, RunClock, Tariff, parse_limit
from attacker.victims import KeyUsage, Metering, Victim
from stealsim.errors import AttackError, BudgetExhaustedError, RunLimitReachedError, VictimAPIError

__all__ = ["Account", "AccountPool", "AccountsSpec", "Rotation", "account_budgets"]

logger = logging.getLogger(__name__)

Rotation = Literal["round-robin", "fill"]
ROTATIONS: tuple[Rotation, ...] = ("round-robin", "fill")


@dataclass(frozen=True)
class AccountsSpec:
    """How a run spends its budget over accounts, what they cost, and the clock it keeps.

    Attributes:
        count: accounts at most (``keys`` given: that many keys are used at most).
        policy: the :data:`Rotation`.
        retire_flagged: leave an account as soon as a detector flags it (``fill``).
        account_budget: images each opened account may spend (``None``: the run's budget
            split evenly, rounded up).
        admin_key: the server's admin key, to open accounts (stealsim servers).
        keys: the accounts' keys, when the user supplies them (``--keys-file``).
        account_price: the price of opening one account.
        price_per_1000_images: the price of 1,000 answered images (``None``: what the
            server's model metadata declares, else 0).
        currency: the prices' currency (``None``: the server's, else USD).
        rate / image_rate: each account's limits (``None``: what ``/v1/usage`` declares).
        clock: ``virtual`` or ``live`` (:mod:`attacker.economics`).
        max_seconds: stop when the simulated time passes this (``time_limit``).
        max_cost: stop before a request or an account would cost more (``money_limit``).
    """

    count: int = 1
    policy: Rotation = "round-robin"
    retire_flagged: bool = False
    account_budget: int | None = None
    admin_key: str | None = None
    keys: tuple[str, ...] = ()
    account_price: float = 0.0
    price_per_1000_images: float | None = None
    currency: str | None = None
    rate: str | None = None
    image_rate: str | None = None
    clock: ClockMode = "virtual"
    max_seconds: float | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.count < 1:
            problems.append(f"--accounts must be at least 1, got {self.count}")
        if self.policy not in ROTATIONS:
            problems.append(f"--rotation must be one of {', '.join(ROTATIONS)}, got {self.policy!r}")
        if self.account_budget is not None and self.account_budget < 1:
            problems.append(f"--account-budget must be at least 1, got {self.account_budget}")
        if not self.account_price >= 0:
            problems.append(f"--account-price must be >= 0, got {self.account_price}")
        if self.price_per_1000_images is not None and not self.price_per_1000_images >= 0:
            problems.append(f"--price must be >= 0, got {self.price_per_1000_images}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"--max-hours must be > 0, got {self.max_seconds / 3600:g}")
        if self.max_cost is not None and not self.max_cost >= 0:
            problems.append(f"--max-money must be >= 0, got {self.max_cost}")
        if self.count > 1 and not self.keys and not self.admin_key:
            problems.append(f"--accounts {self.count} needs accounts: --admin-key (open them on a stealsim server) "
                            "or --keys-file (yours)")
        if self.keys and self.count > len(self.keys):
            problems.append(f"--accounts {self.count} is more than the {len(self.keys)} keys of --keys-file")
        if self.clock not in ("virtual", "live"):
            problems.append(f"--clock must be virtual or live, got {self.clock!r}")
        if self.clock == "live" and (self.rate or self.image_rate):
            problems.append("--rate and --image-rate are simulated by the virtual clock; a live run keeps the "
                            "limits the server enforces (drop them, or use --clock virtual)")
        if (self.max_cost is not None and self.admin_key and self.policy == "round-robin"
                and self.count * self.account_price > self.max_cost):
            problems.append(f"round robin opens all {self.count} accounts at the start, "
                            f"{self.count * self.account_price:g} in all, more than --max-money {self.max_cost:g}")
        if self.keys and self.admin_key:
            problems.append("give either --keys-file (your accounts) or --admin-key (open accounts), not both")
        for text in (self.rate, self.image_rate):
            if text:
                parse_limit(text)
        if problems:
            raise AttackError("; ".join(problems))

    @property
    def opens_accounts(self) -> bool:
        """Whether the run opens its accounts through the admin API."""
        return self.admin_key is not None

    @property
    def many(self) -> bool:
        return self.count > 1 or bool(self.keys) or self.opens_accounts


def account_budgets(budget: int, count: int, account_budget: int | None) -> int:
    """Images each opened account gets: ``account_budget``, or the run's budget over ``count``, rounded up."""
    return account_budget if account_budget is not None else math.ceil(budget / count)


@dataclass
class Account:
    """One account of the pool: its victim (an API key's client), what it spent, its state."""

    index: int
    victim: Victim
    key_id: str | None = None
    used_before: int = 0
    """What the server had counted against the key when the run took it."""
    remaining: int | None = None
    """Images its key may still spend (``None``: unlimited, or nobody says)."""
    used: int = 0
    """Images answered to the attack through it, this run."""
    flags: tuple[str, ...] = ()
    retired: str | None = None
    """Why the pool left it: ``spent``, ``blocked``, ``revoked``, ``flagged``; ``None``: in use."""
    windows: list[FixedWindow] = field(default_factory=list)
    """The rate limits the virtual clock applies to it."""

    def largest_request(self) -> int | None:
        """The most images one request may carry: an image limit's amount per window."""
        amounts = [window.amount for window in self.windows if window.kind == "images"]
        return min(amounts) if amounts else None


class Opener(Protocol):
    """Opens account ``index`` (through the admin API) with ``budget`` images and returns it."""

    budget: int

    def __call__(self, index: int) -> Account: ...

    def revoke(self) -> None: ...


class AccountPool:
    """The accounts of a run behind the :class:`~attacker.victims.Victim` interface (see the module docstring).

    Args:
        accounts: the accounts open at the start (at least one).
        spec: the policy, prices, limits and clock.
        tariff: the prices in force (the spec's, else the server's).
        opener: opens another account (admin API); ``None``: only ``accounts`` are used.
        limit: how many accounts may be used in all (opened or given).
    """

    def __init__(self, accounts: Sequence[Account], spec: AccountsSpec, tariff: Tariff,
                 opener: Opener | None = None, limit: int | None = None) -> None:
        if not accounts:
            raise AttackError("an account pool needs at least one account")
        self.accounts = list(accounts)
        self.spec = spec
        self.tariff = tariff
        self.opener = opener
        self.limit = limit if limit is not None else len(self.accounts)
        self.info = self.accounts[0].victim.info
        self.clock = RunClock(spec.clock)
        self.queries = 0
        """Images answered to the attack through the pool (this run, resumed counts included)."""
        self.opened = len(self.accounts) if spec.opens_accounts else 0
        """Accounts opened through the admin API (priced)."""
        self.first_flag: dict[str, dict[str, float]] = {}
        """Detector name -> the attack queries and simulated seconds when it first flagged an account."""
        self._next = 0

    # -- choosing an account ------------------------------------------------------------

    def _usable(self) -> list[Account]:
        return [account for account in self.accounts if account.retired is None]

    def _choose(self, images: int) -> Account:
        """The account for the next request of ``images`` (opening one if the policy may)."""
        usable = self._usable()
        if self.spec.policy == "round-robin" and usable:
            account = usable[self._next % len(usable)]
            self._next += 1
            return account
        if usable:
            return usable[0]
        if self.opener is not None and len(self.accounts) < self.limit:
            self._check_money(images, opening=True)
            account = self.opener(len(self.accounts))
            self.accounts.append(account)
            self.opened += 1
            return account
        states = sorted({str(account.retired) for account in self.accounts})
        # Every key's budget spent before the run's: the server's budget ran out (as with one key);
        # a key blocked, revoked or left when flagged: the accounts ran out.
        raise RunLimitReachedError(
            f"every account is used up ({len(self.accounts)} accounts: {', '.join(states)})",
            stop_reason="server_budget_exhausted" if states == ["spent"] else "accounts_exhausted")

    def _retire(self, account: Account, reason: str, detail: str) -> None:
        account.retired = reason
        logger.info("account %d (%s) retired: %s (%s)", account.index, account.key_id or "key", reason, detail)

    # -- limits: time and money -------------------------------------------------------

    def _check_money(self, images: int, opening: bool = False) -> None:
        if self.spec.max_cost is None:
            return
        after = self.tariff.cost(self.queries + images, self.opened + (1 if opening else 0))
        if after > self.spec.max_cost + 1e-9:
            raise RunLimitReachedError(
                f"the next {'account' if opening else f'{images} images'} would take the cost to "
                f"{after:.2f} {self.tariff.currency}, over the run's {self.spec.max_cost:g}",
                stop_reason="money_limit")

    def _wait_for_limits(self, account: Account, images: int) -> None:
        """Advance the virtual clock until the account's windows take ``images``; then charge them."""
        if self.clock.mode == "virtual":
            while True:
                wait = max((window.wait(self.clock.now(), images) for window in account.windows), default=0.0)
                if wait <= 0:
                    break
                if self.spec.max_seconds is not None and self.clock.now() + wait > self.spec.max_seconds:
                    raise RunLimitReachedError(
                        f"the next request waits {wait:g} s for its rate limit, past the run's "
                        f"{self.spec.max_seconds / 3600:g} h", stop_reason="time_limit")
                self.clock.wait(wait)
        now = self.clock.now()
        for window in account.windows:
            window.charge(now, images)

    # -- the victim interface --------------------------------------------------------

    def query(self, images: Tensor) -> Tensor:
        """Answers for ``images``, from one account or (past its remaining budget) several."""
        count = int(images.shape[0])
        self._check_money(count)
        if self.spec.max_seconds is not None and self.clock.now() >= self.spec.max_seconds:
            raise RunLimitReachedError(f"the simulated time is up ({self.spec.max_seconds / 3600:g} h)",
                                       stop_reason="time_limit")
        parts: list[Tensor] = []
        offset = 0
        while offset < count:
            try:
                account = self._choose(count - offset)
                take = count - offset
                for bound in (account.remaining, account.largest_request()):
                    if bound is not None:
                        take = min(take, bound)
                if take < 1:
                    self._retire(account, "spent", "no images left")
                    continue
                self._wait_for_limits(account, take)
            except RunLimitReachedError as exc:
                exc.answered = offset  # paid for, never answered to the attack (BudgetedVictim forfeits them)
                raise
            try:
                answers = account.victim.query(images[offset: offset + take])
            except BudgetExhaustedError as exc:
                self._retire(account, "spent", str(exc))
                continue
            except VictimAPIError as exc:
                if not self.spec.many or exc.status not in (401, 403):
                    raise  # one key: a refusal stops the run as any victim error does (resumable)
                self._retire(account, "blocked" if exc.status == 403 else "revoked", str(exc))
                continue
            offset += take
            self._answered(account, take)
            parts.append(answers)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _answered(self, account: Account, images: int) -> None:
        account.used += images
        self.queries += images
        parameters: dict[str, Any] = getattr(account.victim, "last_parameters", {}) or {}
        remaining = parameters.get("remaining")
        if isinstance(remaining, int):
            account.remaining = remaining
        elif account.remaining is not None:
            account.remaining = max(0, account.remaining - images)
        flags = parameters.get("flags")
        if isinstance(flags, list):
            self._flagged(account, flags)
        if account.remaining == 0 and account.retired is None:
            self._retire(account, "spent", "its budget is spent")

    def _flagged(self, account: Account, flags: Sequence[Any]) -> None:
        """Record the detectors that flag ``account`` now (the first flag of each: queries and time)."""
        new = [str(flag) for flag in flags if str(flag) not in account.flags]
        account.flags = account.flags + tuple(new)
        for name in new:
            self.first_flag.setdefault(name, {"queries": self.queries,
                                              "simulated_seconds": round(self.clock.now(), 3)})
        if new and self.spec.retire_flagged and account.retired is None:
            self._retire(account, "flagged", ", ".join(new))

    def refresh_flags(self) -> None:
        """Ask the server for the flags of the accounts it may have flagged since their last answer.

        A pooled detector flags every account it blames, also those that send nothing more;
        their answers never say so. ``GET /v1/usage`` of each account that has sent queries
        does (stealsim's server; nothing to ask elsewhere). Called at every evaluation point.
        """
        for account in self.accounts:
            if account.used == 0 or account.retired == "revoked" or account.victim.metering != "server":
                continue
            usage = getattr(account.victim, "usage", None)
            if usage is None:
                continue
            try:
                flags = usage().get("flags")
            except VictimAPIError as exc:  # a key revoked by the defender: nothing more to learn
                logger.info("account %d: usage not readable (%s)", account.index, exc)
                continue
            if isinstance(flags, list):
                self._flagged(account, flags)

    # -- what the run records -----------------------------------------------------------

    def sync(self, spent: int) -> None:
        """Count images paid for that did not pass through the pool: answers a resumed run replays
        from its journal, and queries charged but never received (``BudgetedVictim.spent``)."""
        self.queries = max(self.queries, spent)

    def economy(self) -> dict[str, Any]:
        """What an evaluation point records: money, accounts, simulated time, flags (refreshed first)."""
        self.refresh_flags()
        flagged: dict[str, int] = {}
        for account in self.accounts:
            for name in account.flags:
                flagged[name] = flagged.get(name, 0) + 1
        return {
            "cost": round(self.tariff.cost(self.queries, self.opened), 6),
            "currency": self.tariff.currency,
            "accounts_opened": self.opened,
            "accounts_used": sum(1 for account in self.accounts if account.used > 0),
            "simulated_seconds": round(self.clock.now(), 3),
            "rate_limit_wait_seconds": round(self.clock.waited_seconds, 3),
            "accounts_flagged": sum(1 for account in self.accounts if account.flags),
            "accounts_blocked": sum(1 for account in self.accounts if account.retired == "blocked"),
            "flags_by_detector": flagged,
            "first_flag": {name: dict(first) for name, first in self.first_flag.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (a resumed run goes on with the same accounts, in order)."""
        return {
            "clock": self.clock.state(), "queries": self.queries, "opened": self.opened, "next": self._next,
            "first_flag": self.first_flag,
            "accounts": [{"used": a.used, "flags": list(a.flags), "retired": a.retired,
                          "windows": [w.state() for w in a.windows]} for a in self.accounts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.restore(state.get("clock", {}))
        self.queries = int(state.get("queries", 0))
        self.opened = int(state.get("opened", self.opened))
        self._next = int(state.get("next", 0))
        self.first_flag = {str(k): dict(v) for k, v in state.get("first_flag", {}).items()}
        saved_accounts = state.get("accounts", [])
        if len(saved_accounts) != len(self.accounts):
            raise AttackError(f"the run was checkpointed with {len(saved_accounts)} accounts and is resumed with "
                              f"{len(self.accounts)}: resume it with the same keys (--api-key or --keys-file)")
        for account, saved in zip(self.accounts, saved_accounts, strict=True):
            account.used = int(saved["used"])
            account.flags = tuple(saved["flags"])
            account.retired = account.retired or saved["retired"]
            for window, window_state in zip(account.windows, saved.get("windows", []), strict=False):
                window.restore(window_state)

    @property
    def metering(self) -> Metering:
        return self.accounts[0].victim.metering

    def key_usage(self) -> KeyUsage | None:
        """The accounts' server counts added up; ``remaining`` includes the accounts not yet opened."""
        usages = [self._usage(account) for account in self.accounts]
        if any(usage is None for usage in usages):
            return None
        used = sum(usage.used for usage in usages if usage is not None)
        if any(usage.remaining is None for usage in usages if usage is not None):
            return KeyUsage(used=used, remaining=None)
        remaining = sum(usage.remaining or 0 for usage in usages if usage is not None)
        if self.opener is not None:
            remaining += self._unopened_capacity()
        return KeyUsage(used=used, remaining=remaining)

    def _usage(self, account: Account) -> KeyUsage | None:
        """The server's count of ``account``; a revoked key (401) counts what it had plus this run's answers."""
        if account.retired == "revoked":
            return KeyUsage(used=account.used_before + account.used, remaining=0)
        try:
            return account.victim.key_usage()
        except VictimAPIError as exc:
            if exc.status != 401:
                raise
            self._retire(account, "revoked", str(exc))
            return KeyUsage(used=account.used_before + account.used, remaining=0)

    def _unopened_capacity(self) -> int:
        per_account = self.opener.budget if self.opener is not None else 0
        return max(0, self.limit - len(self.accounts)) * per_account

    def endpoint_record(self) -> dict[str, Any] | None:
        record = self.accounts[0].victim.endpoint_record()
        if record is None and not self.spec.many:
            return None
        return {**(record or {}), "accounts": self.accounts_record()}

    def accounts_record(self) -> dict[str, Any]:
        """The accounts' settings for ``config.json`` (no secrets)."""
        spec = self.spec
        return {
            "count": spec.count, "policy": spec.policy, "retire_flagged": spec.retire_flagged,
            "opened_through_admin_api": spec.opens_accounts, "keys_supplied": len(spec.keys),
            "price_per_1000_images": self.tariff.price_per_1000_images, "account_price": self.tariff.account_price,
            "currency": self.tariff.currency, "clock": spec.clock,
            "limits": [{"kind": w.kind, "amount": w.amount, "window_seconds": w.window}
                       for w in self.accounts[0].windows],
            "max_seconds": spec.max_seconds, "max_cost": spec.max_cost,
        }

    def request_metrics(self) -> dict[str, Any]:
        retries = sum(int(account.victim.request_metrics().get("http_retries", 0)) for account in self.accounts)
        metrics: dict[str, Any] = {"http_retries": retries} if self.metering != "none" else {}
        if not self.spec.many:
            return metrics
        metrics["accounts"] = [{"index": a.index, "key_id": a.key_id, "used": a.used, "flags": list(a.flags),
                                "retired": a.retired} for a in self.accounts]
        return metrics

    def close(self) -> None:
        """Close every account's client; revoke the accounts the run opened (and nothing else)."""
        for account in self.accounts:
            account.victim.close()
        if self.opener is not None:
            self.opener.revoke()
