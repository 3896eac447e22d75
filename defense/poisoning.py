"""Prediction poisoning (MAD): perturb each posterior to turn the thief's gradient away.

Orekondy, Schiele, Fritz (2020), "Prediction Poisoning: Towards Defenses Against
DNN Model Stealing Attacks", ICLR. The attacker trains its clone ``F_A`` on the
answers ``ỹ``; the gradient of its loss on one answer is ``a(ỹ) = G^T ỹ`` with
``G = ∇_w log F_A(x; w)`` (``K x D``, one row per class). MAD serves, within an
``ε``-ball around the true posterior ``y`` and inside the simplex,

    ỹ* = argmax_ỹ  || a(ỹ)/||a(ỹ)|| - a(y)/||a(y)|| ||²      (Eq. 5: angular deviation)

The defender does not have ``F_A``; it uses a proxy (a model it trains itself).
Like the authors' code (``defenses/victim/bb_mad.py``), ``G`` is taken over the
proxy's last linear layer ``z = W h + b``. There ``∂ log p_k / ∂W = (e_k - p) hᵀ``
with ``p`` the proxy's softmax, so for any ``ỹ`` on the simplex::

    G^T ỹ = (ỹ - p) ⊗ h

and the objective needs only the proxy's probabilities: the ``h`` factor cancels
in the normalised (angular) objective and scales the unnormalised one by
``||h||²`` for every candidate alike. This module therefore computes it exactly
from ``p``, without backward passes.

The maximiser of a convex objective over a polytope is a vertex, so like the
paper (Sec. 4.2) an oracle picks the best vertex ``y*`` and a line search moves
``ỹ = (1 - α) y + α y*`` with the largest ``α ≤ 1`` such that ``||ỹ - y||_p ≤ ε``
(closed form: ``α = min(1, ε / ||y* - y||_p)``). Oracles:

- ``extreme``: the one-hot vertices ``e_k`` (MAD);
- ``argmax``: the uniform distributions over class subsets that contain the top
  class (slightly up-weighted so it stays on top): MAD-argmax, which keeps every
  answer's top-1 label and so costs honest users no accuracy. Exact over all
  ``2^(K-1)`` subsets for ``K ≤ 12``; above, the authors' greedy growth.

Objectives: ``angular`` (Eq. 5, needs a proxy) and ``gradient_distance``
(``||G^T ỹ - G^T y||²``, the default of the authors' code, ``objmax=False``,
where the proxy cancels out entirely).
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

__all__ = ["MadObjective", "MadOracle", "mad_objective", "mad_perturb", "mad_vertices"]

MadObjective = Literal["angular", "gradient_distance"]
MadOracle = Literal["extreme", "argmax"]

_TOP_BOOST = 1e-5  # the authors' up-weight of the top class in argmax-preserving vertices
_EXACT_MAX_CLASSES = 12
_TINY = 1e-12


def mad_objective(candidates: np.ndarray, y: np.ndarray, proxy: np.ndarray | None,
                  objective: MadObjective) -> np.ndarray:
    """The objective of ``candidates`` ``[N, C, K]`` for posteriors ``y`` ``[N, K]``: ``[N, C]``.

    ``proxy`` ``[N, K]``: the proxy's probabilities (needed by ``angular`` only).
    """
    if objective == "gradient_distance":
        return np.sum((candidates - y[:, None, :]) ** 2, axis=2)
    if proxy is None:
        raise ValueError("the angular objective needs the proxy's probabilities")
    a = candidates - proxy[:, None, :]
    b = (y - proxy)[:, None, :]
    a = a / np.maximum(np.linalg.norm(a, axis=2, keepdims=True), _TINY)
    b = b / np.maximum(np.linalg.norm(b, axis=2, keepdims=True), _TINY)
    return np.sum((a - b) ** 2, axis=2)


def mad_vertices(top: np.ndarray, classes: int) -> np.ndarray:
    """Argmax-preserving vertices ``[N, 2^(K-1), K]``: uniform over each subset holding ``top[i]``."""
    others = np.asarray(list(itertools.product((0.0, 1.0), repeat=classes - 1)))  # [2^(K-1), K-1]
    vertices = np.empty((len(top), len(others), classes))
    for row, label in enumerate(top.tolist()):
        vertices[row] = np.insert(others, label, 1.0 + _TOP_BOOST, axis=1)
    return vertices / vertices.sum(axis=2, keepdims=True)


def _greedy_argmax_vertex(y: np.ndarray, proxy: np.ndarray | None, objective: MadObjective) -> np.ndarray:
    """The authors' heuristic for many classes: grow the subset one best class at a time."""
    n, k = y.shape
    top = y.argmax(axis=1)
    members = np.zeros((n, k), bool)
    members[np.arange(n), top] = True
    best = np.zeros_like(y)
    best_value = np.full(n, -np.inf)
    for _ in range(k - 1):
        # Every way of adding one more class to each row's subset.
        trial = np.repeat(members[:, None, :], k, axis=1) | np.eye(k, dtype=bool)[None]
        weights = trial.astype(np.float64)
        weights[np.arange(n), :, top] += _TOP_BOOST
        candidates = weights / weights.sum(axis=2, keepdims=True)
        values = mad_objective(candidates, y, proxy, objective)
        values[members] = -np.inf  # adding a class already in the subset changes nothing
        pick = values.argmax(axis=1)
        value = values[np.arange(n), pick]
        better = value > best_value
        best[better] = candidates[np.arange(n), pick][better]
        best_value = np.where(better, value, best_value)
        members[np.arange(n), pick] = True
    return best


def mad_perturb(y: np.ndarray, proxy: np.ndarray | None, epsilon: float, norm: Literal["l1", "l2"] = "l1",
                objective: MadObjective = "angular", oracle: MadOracle = "argmax") -> np.ndarray:
    """MAD's answers ``ỹ`` ``[N, K]`` for posteriors ``y`` ``[N, K]`` (float64 inside)."""
    y64 = y.astype(np.float64)
    p = None if proxy is None else proxy.astype(np.float64)
    n, k = y64.shape
    if epsilon <= 0:
        return y.copy()
    if oracle == "extreme":
        candidates = np.broadcast_to(np.eye(k), (n, k, k))
        values = mad_objective(candidates, y64, p, objective)
        y_star = candidates[np.arange(n), values.argmax(axis=1)]
    elif k <= _EXACT_MAX_CLASSES:
        candidates = mad_vertices(y64.argmax(axis=1), k)
        values = mad_objective(candidates, y64, p, objective)
        y_star = candidates[np.arange(n), values.argmax(axis=1)]
    else:
        y_star = _greedy_argmax_vertex(y64, p, objective)
    order = 1 if norm == "l1" else 2
    distance = np.linalg.norm(y_star - y64, ord=order, axis=1)
    alpha = np.clip(epsilon / np.maximum(distance, _TINY), 0.0, 1.0)[:, None]
    answer = (1.0 - alpha) * y64 + alpha * y_star
    return (answer / answer.sum(axis=1, keepdims=True)).astype(y.dtype)
