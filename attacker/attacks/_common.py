"""Pieces the generator-based attacks share: the generator, its optimiser, frozen students."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attacker.students import MemoryFormat, schedule_factor, set_learning_rate, with_memory_format
from attacker.victims import VictimInfo
from stealsim.architectures import DCGANGenerator, build_generator
from stealsim.errors import AttackError

__all__ = ["GeneratorSettings", "GeneratorTrainer", "frozen", "generator_preactivation", "make_generator"]


@dataclass(frozen=True)
class GeneratorSettings:
    """The query generator of the data-free attacks (Dual Student, DFME, the ensemble).

    Attributes:
        learning_rate: Adam learning rate (scheduled over the budget as the attack says).
        latent_dim: size of the noise vector.
        width: channels of the DCGAN generator's first map.
        gain: images are ``sigmoid(gain * BN(a))`` (0: the plain ``sigmoid(a)``;
            :class:`GeneratorTrainer`).
        betas: Adam's betas; (0.5, 0.999), the DCGAN recipe (Radford et al. 2016).
    """

    KEYS: ClassVar[dict[str, str]] = {
        "generator_lr": "learning_rate", "latent_dim": "latent_dim", "generator_width": "width",
        "generator_gain": "gain",
    }
    """Flat keys (``--set KEY=VALUE``) of every generator; Dual Student adds ``generator_betas``."""

    learning_rate: float = 1e-3
    latent_dim: int = 64
    width: int = 16
    gain: float = 3.0
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.learning_rate <= 0 or self.latent_dim < 1 or self.width < 1 or len(self.betas) != 2:
            raise AttackError(f"invalid generator settings: {self}")


def make_generator(info: VictimInfo, settings: GeneratorSettings, device: torch.device) -> DCGANGenerator:
    channels, size, _ = info.input_shape
    return build_generator(latent_dim=settings.latent_dim, image_size=size, channels=channels,
                           width=settings.width).to(device)


def generator_preactivation(generator: DCGANGenerator, z: Tensor) -> Tensor:
    """The generator's output before its final sigmoid (``images = sigmoid(a)``).

    DFME perturbs here (before the squashing non-linearity) so that every
    perturbed image stays a valid image in [0, 1].
    """
    return generator.preactivation(z)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter gradients for ``modules`` inside the block (inputs still get theirs)."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, saved in zip(modules, flags, strict=True):
            for parameter, flag in zip(module.parameters(), saved, strict=True):
                parameter.requires_grad_(flag)


class GeneratorTrainer:
    """A generator with its Adam optimiser and cosine schedule over the budget.

    Images are ``sigmoid(b)`` with ``b = gain * BN(a)``: ``a`` the DCGAN
    generator's pre-sigmoid output, ``BN`` a batch normalisation without affine
    parameters. As the final ``BatchNorm2d(affine=False)`` of the DFAD / DFME
    generators, it keeps every batch spread over the pixel range (the plain
    sigmoid output drifts to low-contrast grey, far from any real image);
    ``gain`` sets how much of the batch saturates towards 0 and 1.
    """

    def __init__(
        self,
        info: VictimInfo,
        settings: GeneratorSettings,
        device: torch.device,
        schedule: str = "cosine",
        memory_format: MemoryFormat = "channels_last",
    ) -> None:
        self.generator = with_memory_format(make_generator(info, settings, device), memory_format)
        self.gain = settings.gain
        self.learning_rate = settings.learning_rate
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=settings.learning_rate,
                                          betas=settings.betas)
        self.device = device
        self.schedule_kind = schedule

    def schedule(self, progress: float, floor: float = 0.05) -> None:
        set_learning_rate(self.optimizer, self.learning_rate, schedule_factor(progress, self.schedule_kind, floor))

    def latent(self, count: int) -> Tensor:
        return torch.randn(count, self.generator.latent_dim, device=self.device)

    def points(self, count: int) -> Tensor:
        """``b = gain * BN(a)`` for ``count`` latent draws (images are ``sigmoid(b)``), in float32
        (images are data, whatever precision the generator computed in)."""
        self.generator.train()
        preactivation = generator_preactivation(self.generator, self.latent(count)).float()
        if self.gain <= 0:
            return preactivation
        normalised = F.batch_norm(preactivation, None, None, training=True, eps=1e-5)
        return self.gain * normalised

    def images(self, count: int) -> Tensor:
        """``count`` images in [0, 1], differentiable with respect to the generator."""
        return torch.sigmoid(self.points(count))

    @torch.no_grad()
    def sample(self, count: int, eval_mode: bool = False) -> Tensor:
        """``count`` images in [0, 1] from the current generator (no gradient).

        ``eval_mode``: the generator's batch norms use their running statistics (the
        Dual Student authors' code); by default they use the batch's, as in training.
        """
        if not eval_mode:
            return self.images(count)
        self.generator.eval()
        try:
            preactivation = generator_preactivation(self.generator, self.latent(count)).float()
        finally:
            self.generator.train()
        if self.gain <= 0:
            return torch.sigmoid(preactivation)
        return torch.sigmoid(self.gain * F.batch_norm(preactivation, None, None, training=True, eps=1e-5))

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
