"""Nasty Teacher: self-undermining knowledge distillation (Ma et al., ICLR 2021).

The teacher keeps its own accuracy while its softened outputs mislead any
student distilled from them. It is trained against a frozen, normally trained
adversary network ``f_A`` (Ma et al., eq. 3)::

    L(x, y) = CE(f_T(x), y) - omega * tau^2 * KL(softmax(f_T(x)/tau) || softmax(f_A(x)/tau))

Maximising the KL term pushes the teacher's temperature-softened distribution
away from the "natural" one the adversary produces, while the cross-entropy
keeps its arg-max correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stealsim.architectures import PixelClassifier
from stealsim.checkpoint import CheckpointMeta, load_checkpoint
from stealsim.data import Dataset
from stealsim.errors import ConfigError
from stealsim.training import LossFn, TrainConfig, accuracy, train_classifier

__all__ = [
    "NASTY_DEFAULTS",
    "PAPER_SETTINGS",
    "NastySettings",
    "make_nasty_loss",
    "nasty_teacher_loss",
    "settings_for",
    "train_nasty_teacher",
]


@dataclass(frozen=True)
class NastySettings:
    """Temperature ``tau`` and weight ``omega`` of the KL term."""

    tau: float
    omega: float


PAPER_SETTINGS = NastySettings(tau=4.0, omega=0.04)
"""The paper's CIFAR-10 setting (Ma et al., Sec. 4.1)."""

NASTY_DEFAULTS: dict[str, NastySettings] = {
    "digits": NastySettings(tau=4.0, omega=0.04),
    "mnist5k": NastySettings(tau=4.0, omega=0.04),
}
"""Per-dataset defaults, chosen by the seed sweep in the README."""


def nasty_teacher_loss(
    teacher_logits: Tensor, adversary_logits: Tensor, labels: Tensor, tau: float, omega: float
) -> Tensor:
    """Ma et al. (2021), eq. 3: ``CE(f_T, y) - omega * tau^2 * KL(p_T^tau || p_A^tau)``."""
    # F.kl_div(log q, p) = sum p * (log p - log q) = KL(p || q), with p the teacher.
    kl = F.kl_div(
        F.log_softmax(adversary_logits / tau, dim=1),
        F.softmax(teacher_logits / tau, dim=1),
        reduction="batchmean",
    )
    return F.cross_entropy(teacher_logits, labels) - omega * tau**2 * kl


def make_nasty_loss(adversary: nn.Module, settings: NastySettings) -> LossFn:
    """A :data:`~stealsim.training.LossFn` for :func:`~stealsim.training.fit` with a frozen adversary."""
    adversary.eval()
    for parameter in adversary.parameters():
        parameter.requires_grad_(False)

    def loss(logits: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        return nasty_teacher_loss(logits, adversary(images), labels, settings.tau, settings.omega)

    return loss


def settings_for(dataset: str, tau: float | None = None, omega: float | None = None) -> NastySettings:
    """The dataset's default settings (the paper's for unknown datasets), with overrides."""
    base = NASTY_DEFAULTS.get(dataset, PAPER_SETTINGS)
    settings = NastySettings(tau=base.tau if tau is None else tau, omega=base.omega if omega is None else omega)
    if settings.tau <= 0 or settings.omega < 0:
        raise ConfigError(f"--tau must be > 0 and --omega >= 0, got {settings}")
    return settings


def train_nasty_teacher(
    dataset: Dataset,
    architecture: str,
    config: TrainConfig,
    adversary_dir: Path,
    tau: float | None = None,
    omega: float | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> tuple[PixelClassifier, CheckpointMeta]:
    """Train a Nasty Teacher on ``dataset`` against the checkpoint at ``adversary_dir``."""
    settings = settings_for(dataset.name, tau, omega)
    adversary, adversary_meta = load_checkpoint(adversary_dir, device)
    if tuple(adversary_meta.input_shape) != dataset.input_shape or adversary_meta.num_classes != dataset.num_classes:
        raise ConfigError(
            f"adversary {adversary_dir} takes {adversary_meta.input_shape} with "
            f"{adversary_meta.num_classes} classes; dataset {dataset.name} has "
            f"{dataset.input_shape} with {dataset.num_classes}"
        )
    model, meta = train_classifier(
        dataset, architecture, config, device, loss_fn=make_nasty_loss(adversary, settings),
        description=f"nasty {architecture}", show_progress=show_progress,
    )
    metrics = dict(meta.metrics) | {"adversary_test_accuracy": accuracy(adversary, dataset.x_test, dataset.y_test, device)}
    training = dict(meta.training) | {
        "nasty": {"tau": settings.tau, "omega": settings.omega, "adversary_sha256": adversary_meta.weights_sha256}
    }
    return model, meta.model_copy(update={"metrics": metrics, "training": training})
