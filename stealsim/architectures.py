"""Architectures by name: classifiers for victims and clones, and the generator.

One registry serves every role (victim training, students, generators), so a
checkpoint names its architecture and anyone can rebuild it::

    net = build_classifier("lenet5", in_channels=1, image_size=28, num_classes=10)
    gen = build_generator(latent_dim=100, image_size=28, channels=1)

Classifiers take *normalised* images; :class:`PixelClassifier` wraps one with the
dataset's normalisation so that callers (the service, the attacker) always pass
raw pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stealsim.errors import ArchitectureError

__all__ = [
    "CLASSIFIERS",
    "ArchitectureSpec",
    "CifarResNet",
    "DCGANGenerator",
    "LeNet5",
    "PixelClassifier",
    "SmallCNN",
    "build_classifier",
    "build_generator",
    "default_architecture",
    "default_student_architecture",
]


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; fits 8x8 and 28x28 grayscale.

    Args:
        in_channels: image channels.
        image_size: height (= width) of the input.
        num_classes: number of outputs.
        width: channels of the first block (doubled in the next two).
        dropout: dropout before the head (0 disables; MC dropout uses it).
        pool_first: each block is conv, max-pool, batch norm, ReLU instead of conv, batch
            norm, ReLU, max-pool. Max-pooling commutes with a per-channel non-decreasing map
            (ReLU after a batch norm with a non-negative scale), so the two compute the same
            kind of function; pooling first normalises and rectifies a quarter of the
            activations, which makes a training step about a third cheaper on a CPU. Only the
            batch-norm statistics differ (taken over the pooled map).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 32,
        dropout: float = 0.0,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for out_channels in widths:
            pool = size >= 4  # pool while the map is big enough to halve
            block: list[nn.Module] = [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)]
            if pool and pool_first:
                block.append(nn.MaxPool2d(2))
            block += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            if pool and not pool_first:
                block.append(nn.MaxPool2d(2))
            layers += block
            size = size // 2 if pool else size
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x).flatten(1)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling.

    For 28x28 the first conv pads by 2, as the classic net sees 32x32; for small
    images (8x8) the second conv pads too so the maps do not vanish.
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        second_padding = 0 if image_size >= 16 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=second_padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        size = ((image_size // 2) + 2 * second_padding - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * size * size, 120),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al., 2016, CIFAR variant: 3x3 stem, no max pool).

    Args:
        blocks: basic blocks per stage, (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for 34.
        width: channels of the first stage (64 in the paper; doubled per stage).
        dropout: dropout before the head.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_planes = width
        for index, count in enumerate(blocks):
            planes = width * 2**index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stages(self.stem(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(self.dropout(out))


class DCGANGenerator(nn.Module):
    """DCGAN-style generator (Radford et al., 2016), as used by DFME and Dual Student.

    Maps ``z ~ N(0, I)`` of size ``latent_dim`` to images in [0, 1] of shape
    ``[channels, image_size, image_size]``: a linear layer to a map of a quarter
    of the size, then two (upsample, conv, batch-norm, leaky ReLU) stages.

    Args:
        latent_dim: size of the noise vector.
        image_size: output height and width; a multiple of 4.
        channels: output channels.
        width: channels of the first map (``ngf`` in the DCGAN paper).
    """

    def __init__(
        self, latent_dim: int = 100, image_size: int = 32, channels: int = 3, width: int = 64
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ArchitectureError(
                f"generator image_size must be a multiple of 4, got {image_size}"
            )
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.width = width
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * self.init_size**2),
        )
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def preactivation(self, z: Tensor) -> Tensor:
        """The output before the final sigmoid (``images = sigmoid(preactivation(z))``).

        Attacks that perturb or re-normalise the generator's output work here, so
        every image they make stays a valid image in [0, 1].
        """
        out = self.project(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        return self.body(out)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.preactivation(z))

    def sample_latent(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``count`` latent vectors on the generator's device."""
        device = next(self.parameters()).device
        return torch.randn(count, self.latent_dim, generator=generator).to(device)


class PixelClassifier(nn.Module):
    """A classifier that takes raw pixels in [0, 1] and normalises them itself.

    The normalisation (per-channel mean and std) comes from the checkpoint, so
    the service can accept raw pixels and an attacker never needs to know it.
    ``forward`` returns logits.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ArchitectureError(f"bad normalization: mean={list(mean)} std={list(std)}")
        self.net = net
        # Not persistent: the weights file holds only the network; the sidecar the stats.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net((pixels - self.mean) / self.std)


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build one classifier architecture, and what it is meant for."""

    name: str
    build: Callable[..., nn.Module]
    description: str
    defaults: tuple[tuple[str, Any], ...] = ()


CLASSIFIERS: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        ArchitectureSpec("small-cnn", SmallCNN, "3 conv blocks; 8x8 / 28x28 grayscale"),
        ArchitectureSpec("lenet5", LeNet5, "LeNet-5; 8x8 / 28x28 grayscale"),
        ArchitectureSpec(
            "resnet18", CifarResNet, "CIFAR ResNet-18; 32x32 colour", (("blocks", (2, 2, 2, 2)),)
        ),
        ArchitectureSpec(
            "resnet34", CifarResNet, "CIFAR ResNet-34; 32x32 colour", (("blocks", (3, 4, 6, 3)),)
        ),
    )
}


def build_classifier(
    name: str, *, in_channels: int, image_size: int, num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build the classifier ``name`` for the given input and class count.

    Raises:
        ArchitectureError: unknown name, unsupported input, or bad keyword arguments.
    """
    spec = CLASSIFIERS.get(name)
    if spec is None:
        raise ArchitectureError(
            f"unknown architecture {name!r}; choose one of {sorted(CLASSIFIERS)}"
        )
    if image_size < 8 or in_channels < 1 or num_classes < 2:
        raise ArchitectureError(
            f"{name}: unsupported input {in_channels}x{image_size}x{image_size} "
            f"with {num_classes} classes (need >= 8 pixels, >= 1 channel, >= 2 classes)"
        )
    arguments = dict(spec.defaults) | kwargs
    try:
        return spec.build(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, **arguments
        )
    except TypeError as exc:
        raise ArchitectureError(f"{name}: bad architecture arguments {kwargs}: {exc}") from exc


def build_generator(
    *, latent_dim: int = 100, image_size: int, channels: int, width: int = 64
) -> DCGANGenerator:
    """Build the DCGAN-style generator for images of the given size and channels."""
    return DCGANGenerator(latent_dim=latent_dim, image_size=image_size, channels=channels, width=width)


def default_architecture(in_channels: int, image_size: int) -> str:
    """The architecture a victim (teacher) of this input shape trains with unless told otherwise."""
    return "small-cnn" if in_channels == 1 else "resnet18"


def default_student_architecture(in_channels: int, image_size: int) -> str:
    """The smaller network distilled from a teacher of this input shape.

    As in Ma et al. (2021), students are smaller than their teachers (LeNet-5
    under a small CNN for grayscale; a small CNN under a ResNet for colour).
    """
    del image_size
    return "lenet5" if in_channels == 1 else "small-cnn"
