"""One supervised training loop; variants of training are loss functions on it.

Normal training, Nasty Teacher training and distillation all call :func:`fit`
with a different ``loss_fn(logits, images, labels)``: nothing is copied between
training scripts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stealsim.architectures import PixelClassifier, build_classifier
from stealsim.checkpoint import CheckpointMeta
from stealsim.data import Dataset
from stealsim.errors import ConfigError
from stealsim.progress import progress_bar

__all__ = [
    "LossFn",
    "TrainConfig",
    "accuracy",
    "augmentation_shift",
    "cross_entropy_loss",
    "fit",
    "predict_logits",
    "random_shift",
    "resolve_device",
    "seed_everything",
    "train_classifier",
    "untrained_classifier",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``loss_fn(logits, images, labels) -> scalar loss`` for one batch."""


def cross_entropy_loss(logits: Tensor, images: Tensor, labels: Tensor) -> Tensor:
    del images
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit` (Adam with a cosine learning-rate decay)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    """Random translation of up to this many pixels (0 disables augmentation)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.max_shift < 0:
            raise ConfigError(f"invalid training settings: {self}")


def augmentation_shift(image_size: int) -> int:
    """Random-translation augmentation: 1 pixel for 8x8 images, 2 for larger ones."""
    return 1 if image_size <= 16 else 2


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, zero-filling the border."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h)).to(images.device)  # [n, h]
    cols = (offsets[:, 1:2] + torch.arange(w)).to(images.device)  # [n, w]
    index = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers every shifted window in one operation.
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    loss_fn: LossFn = cross_entropy_loss,
    device: torch.device | str = "cpu",
    description: str = "train",
    show_progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``(images, labels)``; return the mean loss of each epoch."""
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, -(-len(images) // config.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    history: list[float] = []
    with progress_bar(description, total=config.epochs, enabled=show_progress) as advance:
        for epoch in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            total = 0.0
            for start in range(0, len(images), config.batch_size):
                batch = order[start : start + config.batch_size]
                x = random_shift(images[batch], config.max_shift, generator).to(device)
                y = labels[batch].to(device)
                loss = loss_fn(model(x), x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
            history.append(total / len(images))
            advance(f"loss {history[-1]:.4f}")
            logger.debug("%s epoch %d loss %.4f", description, epoch, history[-1])
    model.eval()
    return history


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: Tensor, device: torch.device | str = "cpu", batch_size: int = 1024
) -> Tensor:
    """Logits of ``model`` (in eval mode) for ``images``, on the CPU."""
    was_training = model.training
    model.eval()
    outputs = [model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``, in [0, 1]."""
    predictions = predict_logits(model, images, device).argmax(dim=1)
    return float((predictions == labels).float().mean())


def train_classifier(
    dataset: Dataset,
    architecture: str,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    loss_fn: LossFn = cross_entropy_loss,
    architecture_kwargs: dict[str, object] | None = None,
    description: str = "train",
    show_progress: bool = True,
    initial_state: dict[str, Tensor] | None = None,
) -> tuple[PixelClassifier, CheckpointMeta]:
    """Build ``architecture`` for ``dataset``, train it, and describe it for a checkpoint.

    ``initial_state`` (a state dict of the same architecture) starts training from
    those weights instead of a fresh initialisation. The returned metadata carries
    ``test_accuracy`` in its metrics; save both with
    :func:`stealsim.checkpoint.save_checkpoint`.
    """
    kwargs = dict(architecture_kwargs or {})
    channels, size, _ = dataset.input_shape
    mean, std = dataset.normalization()
    seed_everything(config.seed)
    net = build_classifier(
        architecture, in_channels=channels, image_size=size, num_classes=dataset.num_classes, **kwargs
    )
    if initial_state is not None:
        net.load_state_dict(initial_state)
    model = PixelClassifier(net, mean, std)
    started = time.perf_counter()
    history = fit(model, dataset.x_train, dataset.y_train, config, loss_fn, device, description, show_progress)
    meta = CheckpointMeta(
        architecture=architecture,
        architecture_kwargs=kwargs,
        input_shape=dataset.input_shape,
        mean=mean,
        std=std,
        class_names=list(dataset.class_names),
        dataset=dataset.name,
        metrics={
            "test_accuracy": accuracy(model, dataset.x_test, dataset.y_test, device),
            "validation_accuracy": accuracy(model, dataset.x_val, dataset.y_val, device),
            "train_accuracy": accuracy(model, dataset.x_train, dataset.y_train, device),
            "final_loss": history[-1],
            "train_seconds": time.perf_counter() - started,
        },
        training=asdict(config),
    )
    return model, meta


def untrained_classifier(dataset: Dataset, architecture: str, seed: int = 0) -> tuple[PixelClassifier, CheckpointMeta]:
    """``architecture`` for ``dataset`` with its seeded initial weights (a defender's random MAD proxy)."""
    channels, size, _ = dataset.input_shape
    mean, std = dataset.normalization()
    seed_everything(seed)
    net = build_classifier(architecture, in_channels=channels, image_size=size, num_classes=dataset.num_classes)
    model = PixelClassifier(net, mean, std).eval()
    meta = CheckpointMeta(
        architecture=architecture, input_shape=dataset.input_shape, mean=mean, std=std,
        class_names=list(dataset.class_names), dataset=dataset.name,
        metrics={"test_accuracy": accuracy(model, dataset.x_test, dataset.y_test)},
        training={"objective": "none", "seed": seed},
    )
    return model, meta
