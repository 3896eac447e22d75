"""Distillation losses shared by the distillation check and the attacks."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> Tensor:
    """Knowledge distillation (Hinton et al., 2015, eq. 2 with the T^2 scaling).

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``;
    with ``labels=None`` only the KL term is used (weight 1, as when stealing).
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    ) * temperature**2
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
