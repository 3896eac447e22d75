"""What a theft costs and how long it takes: the price of the answers, and a clock for the rate limits.

A run's **cost** is what the attacker paid: the images answered to the attack at
the endpoint's price per 1,000 images, plus a price per account opened
(:class:`Tariff`). Its **simulated time** is what the theft would take under the
deployed rate limits, without sleeping through them (:class:`RunClock`): the
attacker's own time (its training and the requests' latency, measured) plus the
waits the limits impose, computed from each account's fixed windows
(:class:`FixedWindow`) as the server's ``limits`` library counts them. Accounts
recover in parallel: while one account's window is full the next request may go
to another account whose window is not.

The clock has two modes. ``virtual`` adds the computed waits of limits that the
server *declares* but does not enforce (``stealsim serve --rate-limits
declare``, or ``--rate``/``--image-rate`` for a third-party endpoint); ``live``
computes nothing: the server enforces its limits, the client sleeps through its
429s (``Retry-After``), and the measured time is the simulated time. A short run
of one rate-limited key reads the same in both (``tests/test_accounts_http.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import limits

from stealsim.errors import AttackError

__all__ = ["ClockMode", "FixedWindow", "RunClock", "Tariff", "parse_limit"]

ClockMode = Literal["virtual", "live"]


def parse_limit(text: str) -> tuple[int, float]:
    """``"5000/minute"`` -> ``(5000, 60.0)``: images (or requests) per window of seconds."""
    try:
        item = limits.parse(text)
    except ValueError as exc:
        raise AttackError(f"invalid rate limit {text!r}: use the limits syntax, e.g. '20/second' or "
                          "'5000/minute'") from exc
    return int(item.amount), float(item.get_expiry())


class FixedWindow:
    """One fixed-window limit of one account, counted as the server's ``limits`` library does.

    A window opens at the first hit after the last one closed and lasts ``window``
    seconds; a request that would take the count past ``amount`` waits for the next
    window. The wait is what the server's ``Retry-After`` says: the seconds left in
    the window rounded up, at least 1 (what :class:`~attacker.client.HttpVictim`
    sleeps in a live run).
    """

    def __init__(self, amount: int, window: float, kind: str) -> None:
        if amount < 1 or window <= 0:
            raise AttackError(f"a rate limit needs amount >= 1 and a window > 0, got {amount} per {window} s")
        self.amount = amount
        self.window = window
        self.kind = kind
        """``requests`` (each request costs 1) or ``images`` (each costs its images)."""
        self.start: float | None = None
        self.count = 0

    def cost(self, images: int) -> int:
        return 1 if self.kind == "requests" else images

    def wait(self, now: float, images: int) -> float:
        """Seconds to wait at ``now`` before a request of ``images`` fits (0: it fits now)."""
        if self.start is None or now >= self.start + self.window:
            return 0.0
        if self.count + self.cost(images) <= self.amount:
            return 0.0
        return float(max(1, math.ceil(self.start + self.window - now)))

    def charge(self, now: float, images: int) -> None:
        if self.start is None or now >= self.start + self.window:
            self.start, self.count = now, 0
        self.count += self.cost(images)

    def state(self) -> list[float]:
        return [-1.0 if self.start is None else self.start, float(self.count)]

    def restore(self, state: list[float]) -> None:
        self.start = None if state[0] < 0 else float(state[0])
        self.count = int(state[1])


@dataclass(frozen=True)
class Tariff:
    """What answers and accounts cost (``currency`` units).

    ``price_per_1000_images``: per 1,000 images answered; ``account_price``: per account
    opened (the sign-up's cost: a phone number, a card, a CAPTCHA farm's fee).
    """

    price_per_1000_images: float = 0.0
    account_price: float = 0.0
    currency: str = "USD"

    def __post_init__(self) -> None:
        if not (self.price_per_1000_images >= 0 and self.account_price >= 0):  # also refuses NaN
            raise AttackError(f"prices must be >= 0, got {self.price_per_1000_images} per 1,000 images and "
                              f"{self.account_price} per account")

    def cost(self, images: int, accounts: int) -> float:
        return images * self.price_per_1000_images / 1000.0 + accounts * self.account_price


class RunClock:
    """A run's simulated seconds: the attacker's measured time plus the limits' computed waits.

    The attack loop runs each attack step inside :meth:`running`, so evaluation and
    checkpoints (the experimenter's, not the thief's) do not count.
    """

    def __init__(self, mode: ClockMode = "virtual") -> None:
        if mode not in ("virtual", "live"):
            raise AttackError(f"clock must be virtual or live, got {mode!r}")
        self.mode: ClockMode = mode
        self.active_seconds = 0.0
        """Measured: the attacker's training, its requests' latency (and, live, the 429 sleeps)."""
        self.waited_seconds = 0.0
        """Computed (virtual mode): the waits the declared rate limits impose."""
        self._since: float | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count the time inside the block as the attacker's own."""
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self.active_seconds += time.perf_counter() - self._since
            self._since = None

    def now(self) -> float:
        """Simulated seconds since the run began."""
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.active_seconds + running + self.waited_seconds

    def wait(self, seconds: float) -> None:
        """Advance the simulated time by a wait the limits impose (virtual mode)."""
        self.waited_seconds += seconds

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "active_seconds": self.active_seconds, "waited_seconds": self.waited_seconds}

    def restore(self, state: dict[str, Any]) -> None:
        self.active_seconds = float(state.get("active_seconds", 0.0))
        self.waited_seconds = float(state.get("waited_seconds", 0.0))
