"""Opening a run's accounts: the keys, the prices and the limits the pool starts with.

:func:`open_http_pool` builds the :class:`~attacker.accounts.AccountPool` of an
HTTP run: the key given (``--api-key``), the user's keys (``--keys-file``), or
accounts opened through the admin API of a stealsim server (``--admin-key``:
round robin opens them all now, ``fill`` one by one as they are used up). The
prices and limits are the spec's where given, else what the server declares
(model metadata ``price_per_1000_images``; ``/v1/usage`` ``rate_limits``).
:func:`local_pool` wraps a victim in this process (one account, the spec's
prices and limits).
"""

from __future__ import annotations

import logging
from typing import Any

from attacker.accounts import Account, AccountPool, AccountsSpec, account_budgets
from attacker.client import HttpVictim
from attacker.economics import FixedWindow, Tariff, parse_limit
from attacker.endpoint import EndpointOptions
from attacker.victims import Victim
from stealsim.errors import AttackError, StealsimError
from stealsim.service_client import ServiceClient

__all__ = ["AdminOpener", "local_pool", "open_http_pool"]

logger = logging.getLogger(__name__)


def _windows(spec: AccountsSpec, declared: list[dict[str, Any]], warn: bool = True) -> list[FixedWindow]:
    """The limits the virtual clock applies: the spec's, else those the server declares but does not enforce.

    A limit the server enforces is not simulated: its 429s are real, the client sleeps
    through them, and the clock measures the sleep.
    """
    windows = []
    for kind, text in (("requests", spec.rate), ("images", spec.image_rate)):
        if text:
            amount, window = parse_limit(text)
            windows.append(FixedWindow(amount, window, kind))
    given = {window.kind for window in windows}
    for entry in declared:
        kind = str(entry.get("kind"))
        if kind in given or kind not in ("requests", "images"):
            continue
        if entry.get("enforced", True):
            if spec.clock == "virtual" and warn:
                logger.info("the server enforces its %s limit (%s): its waits are real, not simulated "
                               "(serve with --rate-limits declare to simulate them)", kind, entry.get("limit"))
            continue
        windows.append(FixedWindow(int(entry["amount"]), float(entry["window_seconds"]), kind))
    return windows


def _tariff(spec: AccountsSpec, metadata: dict[str, Any] | None) -> Tariff:
    parameters = (metadata or {}).get("parameters") or {}
    price = spec.price_per_1000_images
    if price is None:
        declared = parameters.get("price_per_1000_images") if isinstance(parameters, dict) else None
        price = float(declared) if isinstance(declared, (int, float)) else 0.0
    currency = spec.currency or (str(parameters.get("currency")) if isinstance(parameters, dict)
                                 and parameters.get("currency") else "USD")
    return Tariff(price, spec.account_price, currency)


def _account(index: int, victim: HttpVictim, spec: AccountsSpec, key_id: str | None = None) -> Account:
    """``victim`` as account ``index``: its remaining budget, limits and flags as the server counts them now.

    Closes ``victim`` if that cannot be read. Flags it already has are not this run's (no ``first_flag``).
    """
    try:
        usage: dict[str, Any] = victim.usage() if victim.metering == "server" else {}
    except BaseException:
        victim.close()
        raise
    remaining = usage.get("remaining")
    return Account(index, victim, key_id=key_id or usage.get("key_id"), used_before=int(usage.get("used", 0)),
                   remaining=None if remaining is None else int(remaining),
                   flags=tuple(str(flag) for flag in usage.get("flags") or ()),
                   windows=_windows(spec, list(usage.get("rate_limits") or []), warn=index == 0))


class AdminOpener:
    """Opens accounts through ``POST /v1/admin/keys``, ``budget`` images each (the simulation of sign-up)."""

    def __init__(self, url: str, model: str, spec: AccountsSpec, budget: int, name: str,
                 options: EndpointOptions, headers: dict[str, str]) -> None:
        self.url, self.model, self.spec, self.budget, self.name = url, model, spec, budget, name
        self.options, self.headers = options, headers
        self.opened: list[str] = []
        """Key ids opened and not yet revoked."""

    def __call__(self, index: int) -> Account:
        with ServiceClient(self.url, self.spec.admin_key, headers=self.headers) as admin:
            issued = admin.create_key(self.budget, name=f"{self.name} account {index}")
        self.opened.append(issued.key_id)
        return _account(index, HttpVictim(self.url, issued.api_key, self.model, options=self.options,
                                          headers=self.headers), self.spec, issued.key_id)

    def revoke(self) -> None:
        """Revoke the keys this opener opened (after the run, or when opening failed): none stays funded."""
        if not self.opened:
            return
        try:
            with ServiceClient(self.url, self.spec.admin_key, headers=self.headers) as admin:
                for key_id in self.opened:
                    admin.revoke(key_id)
        except StealsimError as exc:  # the run's result stands; the keys are named for the operator
            logger.error("could not revoke the run's accounts %s: %s", ", ".join(self.opened), exc)
            return
        self.opened = []


def open_http_pool(url: str, api_key: str | None, model: str, spec: AccountsSpec, budget: int, name: str,
                   options: EndpointOptions, headers: dict[str, str]) -> AccountPool:
    """The pool of an HTTP run (see the module docstring); closes what it opened if it fails."""
    accounts: list[Account] = []
    opener: AdminOpener | None = None
    try:
        if spec.opens_accounts:
            opener = AdminOpener(url, model, spec, account_budgets(budget, spec.count, spec.account_budget),
                                 name, options, headers)
            first = spec.count if spec.policy == "round-robin" else 1
            accounts = []
            for index in range(first):
                accounts.append(opener(index))
        else:
            keys: list[str | None] = list(spec.keys) or [api_key]
            if spec.keys and api_key:
                raise AttackError("give either --api-key or --keys-file, not both")
            for index, key in enumerate(keys[: spec.count]):
                accounts.append(_account(index, HttpVictim(url, key, model, options=options, headers=headers),
                                         spec))
        tariff = _tariff(spec, getattr(accounts[0].victim, "metadata", None))
        limit = spec.count if opener is not None else len(accounts)
        return AccountPool(accounts, spec, tariff, opener=opener, limit=limit)
    except BaseException:
        for account in accounts:
            account.victim.close()
        if opener is not None:
            opener.revoke()
        raise


def local_pool(victim: Victim, spec: AccountsSpec) -> AccountPool:
    """One account in this process, with the spec's prices and limits."""
    if spec.many:
        raise AttackError("--accounts, --keys-file and --admin-key need an HTTP victim (--url)")
    return AccountPool([Account(0, victim, windows=_windows(spec, []))], spec, _tariff(spec, None))
