"""The attacks' losses and the zeroth-order gradient estimator, as plain functions.

Notation: ``p = V(x)`` the victim's probabilities, ``S(x)`` a student's logits.

- Logit recovery (DFME, Truong et al. 2021, Sec. 3.3): the victim's logits up to
  a constant are ``l = log p - mean_k(log p)`` (:func:`victim_targets`).
- Student loss, soft labels: ``L1(S(x), l) = mean |S(x) - l|``; hard labels:
  ``CE(S(x), argmax p)`` (:func:`student_loss`).
- Disagreement (Dual Student, Beetham et al. 2023, eq. 2): the generator
  minimises ``-L1(S1(x), S2(x))`` (:func:`disagreement_loss`).
- Forward-difference gradient (DFME eq. 6):
  ``grad f(x) ~ (d / m) * sum_j [(f(x + eps u_j) - f(x)) / eps] u_j``, ``u_j``
  uniform on the unit sphere of the ``d``-dimensional input
  (:func:`forward_difference_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "LOG_EPSILON",
    "SoftLoss",
    "class_balance_loss",
    "confidence_shortfall",
    "disagreement_loss",
    "forward_difference_gradient",
    "per_sample_student_loss",
    "student_loss",
    "unit_directions",
    "victim_targets",
]

SoftLoss = Literal["l1", "kl"]
"""The students' loss on soft targets: L1 on recovered logits (DFME, Dual Student) or KL."""

LOG_EPSILON = 1e-8
"""Added to probabilities before the log, so zeros (top-k, rounding) stay finite."""


def victim_targets(answers: Tensor, hard_label: bool) -> Tensor:
    """Training targets from the victim's answers.

    Probabilities ``[N, K]`` become mean-centred log-probabilities (soft mode) or
    their arg-max (hard mode); labels ``[N]`` (a label-only victim) stay labels.
    """
    if answers.dim() == 1:
        return answers.long()
    if hard_label:
        return answers.argmax(dim=1)
    logp = torch.log(answers.float() + LOG_EPSILON)
    return logp - logp.mean(dim=1, keepdim=True)


def per_sample_student_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-image loss ``[N]``: mean absolute error to target logits, or cross-entropy to labels."""
    logits = logits.float()  # bfloat16 logits under autocast: the loss itself in float32
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    return (logits - targets).abs().mean(dim=1)


def student_loss(logits: Tensor, targets: Tensor, soft_loss: SoftLoss = "l1", label_smoothing: float = 0.0) -> Tensor:
    """``L1(S(x), l)`` (or ``KL(softmax(l) || softmax(S(x)))``) for soft targets ``[N, K]``,
    ``CE(S(x), y)`` for labels ``[N]``.

    ``label_smoothing`` (labels only): the cross-entropy's target puts ``1 - eps + eps / K``
    on ``y`` and ``eps / K`` on every other class (Szegedy et al., CVPR 2016, Sec. 7).
    """
    logits = logits.float()  # bfloat16 logits under autocast: the loss itself in float32
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if soft_loss == "kl":
        return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(targets, dim=1),
                        reduction="batchmean", log_target=True)
    return F.l1_loss(logits, targets)


def disagreement_loss(first: Tensor, second: Tensor, probabilities: bool = False) -> Tensor:
    """The Dual Student generator loss ``-L1(S1(x), S2(x))`` (minimised).

    On the students' logits (the paper's form), or with ``probabilities`` on
    their softmax outputs: a bounded disagreement that the generator cannot
    inflate by driving the logits' scale up with saturated images.
    """
    first, second = first.float(), second.float()
    if probabilities:
        first, second = torch.softmax(first, dim=1), torch.softmax(second, dim=1)
    return -F.l1_loss(first, second)


def class_balance_loss(logits: Tensor) -> Tensor:
    """``log K - H(mean_i softmax(S(x_i)))``: zero when a batch covers all classes evenly.

    The information-entropy term of DAFL (Chen et al., ICCV 2019, eq. 4), added
    to the generator's loss so that it does not collapse onto one class.
    """
    mean = torch.softmax(logits.float(), dim=1).mean(dim=0)
    entropy = -(mean * torch.log(mean + LOG_EPSILON)).sum()
    return math.log(logits.shape[1]) - entropy


def confidence_shortfall(logits: Tensor) -> Tensor:
    """``mean_i (1 - max_k softmax(S(x_i))_k)``: zero when the student is sure of every image.

    The query-shaping term (``shape_confidence``, issue #38; stealsim's own): added to a
    generator's loss, it pulls the queries towards images the clone, and so hopefully the
    victim, answers confidently, i.e. into what the maximum-softmax OOD tests (Hendrycks and
    Gimpel, ICLR 2017; ``ood_rate``, ``pooled_ood``) call in-distribution. It works against
    the disagreement the generator is after, so its weight trades fidelity for cover.
    """
    return 1.0 - torch.softmax(logits.float(), dim=1).max(dim=1).values.mean()


def unit_directions(
    count: int, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> Tensor:
    """``count`` directions drawn uniformly from the unit sphere, each of ``shape``."""
    directions = torch.randn((count, *shape), generator=generator)
    norms = directions.flatten(1).norm(dim=1).clamp_min(1e-12)
    return directions / norms.view(-1, *([1] * len(shape)))


def forward_difference_gradient(
    function: Callable[[Tensor], Tensor],
    points: Tensor,
    directions: Tensor,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    """Forward-difference estimate of the gradient of a per-sample black box.

    Args:
        function: maps ``[B, *D]`` to per-sample values ``[B]``; called **once**,
            on the ``N * (m + 1)`` points ``x`` and ``x + eps u_j`` together (one
            batch of victim queries).
        points: ``x``, shape ``[N, *D]``.
        directions: ``u``, shape ``[N, m, *D]``, unit norm each.
        epsilon: the step ``eps``.

    Returns:
        ``(gradient [N, *D], f(x) [N])`` with
        ``gradient_i = (d / m) sum_j (f(x_i + eps u_ij) - f(x_i)) / eps * u_ij``.
    """
    n, m = directions.shape[:2]
    dims = points[0].numel()
    shifted = points.unsqueeze(1) + epsilon * directions  # [N, m, *D]
    values = function(torch.cat([points, shifted.flatten(0, 1)]))
    base, moved = values[:n], values[n:].view(n, m)
    slopes = (moved - base.unsqueeze(1)) / epsilon  # [N, m]
    gradient = (slopes.view(n, m, *([1] * (points.dim() - 1))) * directions).sum(dim=1)
    return gradient * (dims / m), base
