"""Detect-then-recover against output perturbation, after D-DAE (Chen et al., IEEE S&P 2023).

Paper: Y. Chen, R. Guan, X. Gong, J. Dong, M. Xue, "D-DAE: Defense-Penetrating Model
Extraction Attacks", IEEE S&P 2023. Its attacker does not know whether, or how exactly,
the API perturbs its answers; it follows two stages, which this module follows:

1. **Simulate the suspected defenses on a shadow model.** The attacker has a model of its
   own (the shadow); its softmax outputs ``p`` stand for clean answers, and the defenses
   it suspects, applied to them with parameters drawn from a range (the thief does not
   know them), give perturbed answers ``q = D_theta(p)`` (:func:`perturb`).
2. **Detect** (a binary classifier on answers: perturbed or clean, trained on the pairs),
   **then recover** (a network trained to map ``q`` back to ``p``); at attack time the
   victim's answers go through the recovery only when the detector says the victim
   perturbs them (:mod:`attacker.adaptive` decides and wires it into the loop).

The families simulated, as the server's defense steps compute them (``defense/steps``):

- ``reverse_sigmoid`` (Lee et al. 2019, eq. 3): ``q = norm(clip(y - beta * (sigmoid(gamma *
  logit(y)) - 1/2), 0, 1))`` with ``beta ~ U`` :data:`RANGES` ``["reverse_sigmoid"]``'s
  ``beta``, ``gamma`` log-uniform on its range;
- ``gaussian_noise``: ``q = norm(max(p + N(0, std^2), 0))`` with ``std`` log-uniform on its range.

Departures from the paper (named in docs/attacks.md, "Adaptive attackers"):

- The recovery is a small regression network (an MLP on the answer's probabilities sorted
  in decreasing order, so one network serves every class; its output is put back in the
  answer's class order), trained on ``KL(p || r(q)) + |p - r(q)|_1``; the paper trains a
  generative model for the recovery. The losses here are ours, not the paper's equations.
- The detector judges one answer at a time (an MLP on the same sorted features); the
  victim's verdict is the share of its warm-up answers judged perturbed (>= 1/2: perturbed).
- One shadow (:class:`~attacker.adaptive.AnswerAdapter` trains it on the victim's arg-max
  labels of the attack's own warm-up queries), not a set of shadow models on auxiliary data.
- The victim's confidence profile is unknown, so the clean answers simulated are widened: the
  shadow's logits are divided by a temperature drawn log-uniformly from
  :data:`COLDEST_TEMPERATURE` up to the one at which the shadow's mean top softmax is the
  victim's served answers' (the perturbations lower it, so the victim's clean answers are at
  least that confident), and as many softmaxes of Gaussian logits (scales in
  :data:`RANDOM_LOGIT_SCALES`) join them: clean shapes one shadow does not give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stealsim.errors import AttackError

__all__ = ["COLDEST_TEMPERATURE", "FAMILIES", "RANDOM_LOGIT_SCALES", "RANGES", "Restorer", "perturb", "reverse_sigmoid"]

FAMILIES = ("reverse_sigmoid", "gaussian_noise")
"""The perturbation families the restoration can simulate (``restore_families``)."""

RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "reverse_sigmoid": {"beta": (0.3, 1.5), "gamma": (0.05, 0.5)},
    "gaussian_noise": {"std": (0.005, 0.1)},
}
"""The parameter ranges the attacker suspects (``beta`` uniform, the others log-uniform); the
server's defaults (``beta`` 1, ``gamma`` 0.1; ``std`` 0.01, the grid's 0.05) lie inside."""

COLDEST_TEMPERATURE = 0.5
"""The shadow's logits are divided by a temperature drawn log-uniformly from this to the one at which
its mean top softmax is the victim's answers' (:mod:`attacker.adaptive`)."""

RANDOM_LOGIT_SCALES = (0.5, 5.0)
"""Clean answers also include softmaxes of Gaussian logits ``N(0, s^2)``, ``s`` log-uniform in this range."""

_EPS = 1e-8


def _normalise(q: Tensor) -> Tensor:
    """Rows divided by their sums; a row that lost all its mass becomes uniform (the server's ``renormalise``)."""
    total = q.sum(dim=1, keepdim=True)
    uniform = torch.full_like(q, 1.0 / q.shape[1])
    return torch.where(total > 1e-12, q / total.clamp_min(1e-12), uniform)


def reverse_sigmoid(p: Tensor, beta: Tensor | float, gamma: Tensor | float) -> Tensor:
    """Lee et al.'s reverse sigmoid (eq. 3) with ``beta``/``gamma`` scalars or per-row ``[N, 1]``."""
    y = p.double().clamp(1e-9, 1.0 - 1e-9)
    logit = torch.log(y) - torch.log1p(-y)
    r = beta * (torch.sigmoid(gamma * logit) - 0.5)
    return _normalise((y - r).clamp(0.0, 1.0)).to(p.dtype)


def _uniform(count: int, low: float, high: float, generator: torch.Generator | None, log: bool) -> Tensor:
    u = torch.rand(count, 1, generator=generator, dtype=torch.float64)
    if log:
        return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return low + u * (high - low)


def perturb(p: Tensor, family: str, generator: torch.Generator | None = None) -> Tensor:
    """``p`` (``[N, K]`` probabilities) perturbed by ``family``, parameters drawn per row from :data:`RANGES`."""
    count = p.shape[0]
    if family == "reverse_sigmoid":
        ranges = RANGES[family]
        beta = _uniform(count, *ranges["beta"], generator, log=False)
        gamma = _uniform(count, *ranges["gamma"], generator, log=True)
        return reverse_sigmoid(p, beta, gamma)
    if family == "gaussian_noise":
        std = _uniform(count, *RANGES[family]["std"], generator, log=True).to(p.dtype)
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * std
        return _normalise((p + noise).clamp_min(0.0))
    raise AttackError(f"restore_families: unknown perturbation {family!r}; choose from {', '.join(FAMILIES)}")


def _features(q: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted (decreasing) probabilities and their log, side by side ``[N, 2K]``; and the sort order."""
    ordered, order = q.float().sort(dim=1, descending=True)
    return torch.cat([ordered, torch.log(ordered + _EPS)], dim=1), order


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


class Restorer(nn.Module):
    """D-DAE's detector and recovery network for ``num_classes``-way answers (see the module).

    Example::

        restorer = Restorer(10)
        report = restorer.fit(clean_probabilities)        # the shadow's softmax outputs
        share = float(restorer.detect(answers).mean())   # answers judged perturbed
        cleaner = restorer.restore(answers)
    """

    def __init__(self, num_classes: int, families: Sequence[str] = FAMILIES, hidden: int = 128) -> None:
        super().__init__()
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown or not families:
            raise AttackError(f"restore_families must name some of {', '.join(FAMILIES)}, got {list(families)}")
        self.num_classes = num_classes
        self.families = tuple(families)
        self.detector = _mlp(2 * num_classes, hidden, 1)
        self.recovery = _mlp(2 * num_classes, hidden, num_classes)
        self.fitted = False

    def _pairs(self, clean: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Perturbed versions of ``clean``, each row by a family drawn uniformly; ``(perturbed, clean)``."""
        family = torch.randint(len(self.families), (clean.shape[0],), generator=generator)
        perturbed = clean.clone()
        for index, name in enumerate(self.families):
            rows = family == index
            if bool(rows.any()):
                perturbed[rows] = perturb(clean[rows], name, generator)
        return perturbed, clean

    def _restore_logits(self, q: Tensor) -> Tensor:
        """Log-probabilities of the restored answers, in the answers' class order."""
        features, order = _features(q)
        restored_sorted = F.log_softmax(self.recovery(features), dim=1)
        return torch.empty_like(restored_sorted).scatter_(1, order, restored_sorted)

    def fit(self, clean: Tensor, steps: int = 1500, batch: int = 256, seed: int = 0,
            learning_rate: float = 2e-3) -> dict[str, float]:
        """Train detector and recovery on ``clean`` (``[N, K]`` shadow probabilities); a held-out report.

        A fifth of ``clean`` (at least one row) is held out: the report gives the detector's
        accuracy there (clean and perturbed rows, half each) and the mean L1 distance to the
        clean vectors before and after restoration.
        """
        if clean.dim() != 2 or clean.shape[1] != self.num_classes or clean.shape[0] < 2:
            raise AttackError(f"the restoration needs [N >= 2, {self.num_classes}] clean probabilities, "
                              f"got {tuple(clean.shape)}")
        generator = torch.Generator().manual_seed(seed)
        clean = clean.detach().float().cpu()
        clean = clean[torch.randperm(clean.shape[0], generator=generator)]
        held = max(1, clean.shape[0] // 5)
        held_out, train = clean[:held], clean[held:]
        optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        self.train()
        for step in range(steps):
            for group in optimizer.param_groups:  # cosine decay to 5 %
                group["lr"] = learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            index = torch.randint(train.shape[0], (batch,), generator=generator)
            perturbed, target = self._pairs(train[index], generator)
            restored = self._restore_logits(perturbed)
            recovery_loss = (F.kl_div(restored, target, reduction="batchmean")
                             + (restored.exp() - target).abs().sum(dim=1).mean())
            both = torch.cat([target, perturbed])
            labels = torch.cat([torch.zeros(batch), torch.ones(batch)])
            detector_loss = F.binary_cross_entropy_with_logits(self.detector(_features(both)[0]).squeeze(1), labels)
            optimizer.zero_grad(set_to_none=True)
            (recovery_loss + detector_loss).backward()
            optimizer.step()
        self.eval()
        self.fitted = True
        perturbed, target = self._pairs(held_out, generator)
        with torch.no_grad():
            flagged_clean = self.detect(target)
            flagged_perturbed = self.detect(perturbed)
            restored = self.restore(perturbed)
        return {
            "detector_accuracy": float(torch.cat([1 - flagged_clean, flagged_perturbed]).mean()),
            "l1_before": float((perturbed - target).abs().sum(dim=1).mean()),
            "l1_after": float((restored - target).abs().sum(dim=1).mean()),
        }

    @torch.no_grad()
    def detect(self, answers: Tensor) -> Tensor:
        """1.0 where an answer (a row of ``[N, K]`` probabilities) looks perturbed, else 0.0."""
        logits = self.detector(_features(answers.float().cpu())[0]).squeeze(1)
        return (logits > 0).float()

    @torch.no_grad()
    def restore(self, answers: Tensor) -> Tensor:
        """The answers mapped back towards clean probabilities (float32 ``[N, K]``, rows sum to 1)."""
        return self._restore_logits(answers.float().cpu()).exp()

    def get_extra_state(self) -> dict[str, Any]:
        return {"fitted": self.fitted}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.fitted = bool(state["fitted"])
