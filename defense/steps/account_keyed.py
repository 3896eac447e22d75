"""The ``account_keyed`` step: per-account answers that cannot be pooled (B4B adapted to classifiers).

Dubinski, Pawlak, Boenisch, Trzcinski, Dziedzic (NeurIPS 2023, arXiv 2310.08571),
"Bucks for Buckets (B4B)", transform each account's answers of an SSL encoder
with a transformation keyed to the account, so a thief who combines accounts
trains on representations that contradict each other. Here, for classifiers:
each account ``a`` has a key ``k_a = HMAC-SHA256(secret, a)``, and for every
top-1 class ``c`` a fixed permutation ``sigma_{a,c}`` of the ``K - 1`` other
classes (ordered by ``HMAC-SHA256(k_a, "K:c:j")``). A row ``p`` with arg-max ``c``
is served as::

    q[c] = p[c]                   q[sigma_{a,c}(j)] = p[j]   for j != c

The arg-max and the top probability stay exactly as they were, so an honest
user's accuracy and top-1 calibration are unchanged by construction, and the row
still sums to 1 (the same values in other places). What moves is the rest of the
vector, which a distilling thief learns from: two accounts get different
answers to one image, one account gets the same answer twice (re-asking reveals
nothing). A row whose top probability is tied with another class would risk a
different arg-max after the permutation; it is served unchanged. The secret is
the server's ``watermark_secret``. This adaptation (a keyed permutation of the
non-top classes) is stealsim's own; B4B's own transformations are for encoders.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import ClassVar, Literal

import numpy as np

from defense.steps.base import ContextStep, PolicyContext
from stealsim.errors import ConfigError

__all__ = ["AccountKeyed", "account_key", "account_permute", "destinations"]


def account_key(secret: bytes, key_id: str) -> bytes:
    """``HMAC-SHA256(secret, "account_keyed" || key_id)``: the account's own key."""
    return hmac.new(secret, b"account_keyed\x00" + key_id.encode(), hashlib.sha256).digest()


@functools.lru_cache(maxsize=4096)
def destinations(account: bytes, classes: int, top: int) -> np.ndarray:
    """Where each class's probability goes in a row with arg-max ``top`` (int64 ``[classes]``).

    ``top`` stays in place; the other classes go to a permutation of themselves, ordered by
    their keyed hashes. Read-only (cached).
    """
    others = [j for j in range(classes) if j != top]
    order = sorted(others, key=lambda j: hmac.new(account, f"{classes}:{top}:{j}".encode(),
                                                  hashlib.sha256).digest())
    where = np.arange(classes, dtype=np.int64)
    where[others] = order
    where.flags.writeable = False
    return where


def account_permute(p: np.ndarray, account: bytes) -> np.ndarray:
    """The rows of ``p`` ``[N, K]`` with each one's non-top probabilities moved by the account's
    permutation of its top class; never modifies ``p``."""
    if len(p) == 0 or p.shape[1] < 3:
        return p.copy()  # with two classes there is nothing to permute
    top = p.argmax(axis=1)
    where = np.stack([destinations(account, p.shape[1], int(c)) for c in top])
    served = np.empty_like(p)
    np.put_along_axis(served, where, p, axis=1)
    tied = served.argmax(axis=1) != top  # a tie at the top could change the arg-max: keep such rows
    served[tied] = p[tied]
    return served


class AccountKeyed(ContextStep):
    """B4B-style account-keyed answers (Dubinski et al., NeurIPS 2023); see the module docstring.

    No parameters: the permutations come from the server's ``watermark_secret`` and the key id.
    Arg-max and top probability are kept exactly; rows still sum to 1.
    """

    name: Literal["account_keyed"] = "account_keyed"

    at_most_one: ClassVar[bool] = True
    needs_watermark_secret: ClassVar[bool] = True

    def apply_with(self, p: np.ndarray, rng: np.random.Generator, context: PolicyContext) -> np.ndarray:
        if context.watermark_secret is None:
            raise ConfigError("the account_keyed step needs the server's watermark_secret")
        return account_permute(p, account_key(context.watermark_secret, context.key_id))
