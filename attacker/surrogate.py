"""Images the attacker has (surrogate data), and how queries are drawn from them.

The data-based attacks (Knockoff Nets, an ensemble fed with surrogate data)
query the victim with images the attacker owns, not with generated ones:

- a dataset by name (a built-in such as ``digits`` / ``mnist5k``, or an on-disk
  dataset with ``data_dir``), one of its splits;
- a directory of image files (PNG, JPEG, BMP, PGM/PPM, GIF), read with Pillow;
  first-level subdirectories are its classes (the ImageFolder layout), otherwise
  it is one class.

Images are converted to the victim's input shape (channels averaged or repeated,
area / bilinear resizing), so ``mnist5k`` can feed an 8x8 victim and ``digits``
a 28x28 one. Class labels of the surrogate data are never used as training
targets (the victim's answers are); the adaptive sampler uses them as the arms
of its bandit, as Knockoff Nets does with its image hierarchy.

Samplers (state checkpointed with the attack):

- :class:`RandomSampler`: a random permutation of the pool, drawn without
  replacement, reshuffled when exhausted;
- :class:`BanditSampler`: the adaptive strategy of Knockoff Nets (Orekondy,
  Schiele, Fritz, CVPR 2019, Sec. 4.1.2): a gradient bandit over classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from stealsim.errors import AttackError, StealsimError

__all__ = [
    "IMAGE_SUFFIXES",
    "BanditSampler",
    "RandomSampler",
    "SurrogateImages",
    "SurrogateSettings",
    "SurrogateSplit",
    "default_surrogate",
    "fit_images",
    "load_surrogate",
]

SurrogateSplit = Literal["train", "validation", "test", "all"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif")


@dataclass(frozen=True)
class SurrogateSettings:
    """Where a data-based attack (Knockoff, ART's, the ensemble fed with data) draws its images.

    Attributes:
        source: dataset name or image directory (``None``: :func:`default_surrogate`, the
            other built-in dataset).
        data_dir: ``--data-dir`` of an on-disk dataset.
        split: ``train``, ``validation``, ``test`` or ``all`` of a dataset.
    """

    KEYS: ClassVar[dict[str, str]] = {"surrogate": "source", "surrogate_dir": "data_dir",
                                      "surrogate_split": "split"}
    """Flat keys (``--set KEY=VALUE``)."""

    source: str | None = None
    data_dir: str | None = None
    split: SurrogateSplit = "train"

    def load(self, input_shape: tuple[int, int, int]) -> SurrogateImages:
        """The images, in ``input_shape`` (:func:`load_surrogate`)."""
        return load_surrogate(self.source, input_shape, self.data_dir, self.split)


@dataclass(frozen=True)
class SurrogateImages:
    """A pool of attacker images in the victim's shape, with their (surrogate) classes."""

    name: str
    images: Tensor
    classes: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def default_surrogate(input_shape: tuple[int, int, int]) -> str:
    """The other built-in dataset: ``mnist5k`` for an 8x8 victim, ``digits`` otherwise."""
    return "mnist5k" if input_shape[1] <= 16 else "digits"


def fit_images(images: Tensor, input_shape: tuple[int, int, int]) -> Tensor:
    """Convert float images ``[N, C, H, W]`` in [0, 1] to ``input_shape`` (channels, then size)."""
    channels, height, width = input_shape
    if images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise AttackError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if tuple(images.shape[2:]) != (height, width):
        shrinking = images.shape[2] > height
        # Area averaging when shrinking (no aliasing), bilinear when growing.
        images = F.interpolate(images, size=(height, width), mode="area" if shrinking else "bilinear",
                               **({} if shrinking else {"align_corners": False}))
    return images.clamp(0.0, 1.0).contiguous().float()


def _read_image_directory(directory: Path, input_shape: tuple[int, int, int]) -> SurrogateImages:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AttackError(f"{directory} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    channels, height, width = input_shape
    mode = "L" if channels == 1 else "RGB"
    names = sorted({p.relative_to(directory).parts[0] for p in files if len(p.relative_to(directory).parts) > 1})
    index = {name: i for i, name in enumerate(names)}
    pixels, classes = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                converted = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(converted, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise AttackError(f"cannot read image {path}: {exc}") from exc
        pixels.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        parts = path.relative_to(directory).parts
        classes.append(index[parts[0]] if len(parts) > 1 else 0)
    images = torch.from_numpy(np.stack(pixels)).clamp(0.0, 1.0)
    return SurrogateImages(directory.name, images, torch.tensor(classes, dtype=torch.long),
                           tuple(names) or ("all",))


def load_surrogate(
    source: str | None,
    input_shape: tuple[int, int, int],
    data_dir: str | Path | None = None,
    split: SurrogateSplit = "train",
) -> SurrogateImages:
    """The attacker's images from ``source`` (dataset name or image directory), in ``input_shape``.

    ``source=None`` picks :func:`default_surrogate`. A ``source`` that names an
    existing directory (and no dataset) is read as a directory of images.
    """
    from stealsim.data import DATASETS, load_dataset

    name = source or default_surrogate(input_shape)
    if name not in DATASETS:
        directory = Path(name).expanduser()
        if directory.is_dir():
            return _read_image_directory(directory, input_shape)
        raise AttackError(
            f"surrogate {name!r} is neither a dataset ({', '.join(sorted(DATASETS))}) nor a directory of images"
        )
    try:
        data = load_dataset(name, Path(data_dir) if data_dir is not None else None)
    except StealsimError as exc:
        raise AttackError(f"cannot load the surrogate dataset {name!r}: {exc}") from exc
    if split in ("train", "validation", "test"):
        images, classes = data.split(split)
    elif split == "all":
        images = torch.cat([data.x_train, data.x_val, data.x_test])
        classes = torch.cat([data.y_train, data.y_val, data.y_test])
    else:
        raise AttackError(f"surrogate split must be train, validation, test or all, got {split!r}")
    return SurrogateImages(f"{name}:{split}", fit_images(images, input_shape), classes.long(), data.class_names)


class RandomSampler:
    """Draws pool indices uniformly without replacement; reshuffles when the pool is spent."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise AttackError("the surrogate pool is empty")
        self.size = size
        self.order = torch.randperm(size)
        self.cursor = 0

    def draw(self, count: int) -> Tensor:
        parts = []
        while count > 0:
            if self.cursor >= self.size:
                self.order, self.cursor = torch.randperm(self.size), 0
            take = min(count, self.size - self.cursor)
            parts.append(self.order[self.cursor : self.cursor + take])
            self.cursor += take
            count -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.cursor = state["order"], int(state["cursor"])


Reward = Literal["certainty", "diversity", "loss", "all"]


class BanditSampler:
    """Knockoff Nets' adaptive sampling: a gradient bandit over the pool's classes.

    Paper: T. Orekondy, B. Schiele, M. Fritz, "Knockoff Nets: Stealing
    Functionality of Black-Box Models", CVPR 2019, Sec. 4.1.2. The policy is
    ``pi_t = softmax(H_t)`` over classes (arms ``z``); after the reward ``r_t`` of
    an image drawn from arm ``z_t``::

        H(z_t) += alpha * (r_t - mean r) * (1 - pi(z_t))
        H(z)   -= alpha * (r_t - mean r) * pi(z)        for z != z_t

    Rewards (each rescaled to [0, 1] by the minimum and maximum seen so far, and
    summed for ``all``): certainty ``P(y_1|x) - P(y_2|x)`` of the victim's answer,
    diversity ``sum_k max(0, y_k - mean y_k)`` against the mean of recent answers,
    and loss, the clone's loss on the answer before training on it. Within a
    class, images are drawn without replacement until the class is spent.
    """

    def __init__(self, classes: Tensor, num_outputs: int, learning_rate: float = 0.1,
                 reward: Reward = "all", window: int = 512) -> None:
        self.classes = classes.long()
        arms = int(self.classes.max()) + 1 if len(self.classes) else 0
        if arms < 1:
            raise AttackError("the surrogate pool is empty")
        self.members = [torch.nonzero(self.classes == arm).flatten() for arm in range(arms)]
        self.preferences = torch.zeros(arms, dtype=torch.float64)
        self.mask = torch.tensor([len(m) > 0 for m in self.members])
        self.used = torch.zeros(len(self.classes), dtype=torch.bool)
        self.learning_rate = learning_rate
        self.reward = reward
        self.window = window
        self.baseline = 0.0
        self.steps = 0
        self.recent = torch.zeros(0, num_outputs)
        # min / max seen per reward kind: certainty, diversity, loss
        self.low = torch.full((3,), math.inf, dtype=torch.float64)
        self.high = torch.full((3,), -math.inf, dtype=torch.float64)

    def policy(self) -> Tensor:
        logits = self.preferences.masked_fill(~self.mask, -math.inf)
        return torch.softmax(logits, dim=0)

    def draw(self, count: int) -> tuple[Tensor, Tensor]:
        """``(pool indices, their arms)`` for ``count`` images."""
        arms = torch.multinomial(self.policy().float(), count, replacement=True)
        picks = torch.empty(count, dtype=torch.long)
        for i, arm in enumerate(arms.tolist()):
            members = self.members[arm]
            fresh = members[~self.used[members]]
            if len(fresh) == 0:  # this class is spent: start it over
                self.used[members] = False
                fresh = members
            pick = fresh[int(torch.randint(len(fresh), (1,)))]
            self.used[pick] = True
            picks[i] = pick
        return picks, arms

    def rewards(self, answers: Tensor, losses: Tensor) -> Tensor:
        """Per-image rewards for the victim's ``answers`` (probabilities ``[N, K]``) and clone ``losses``."""
        answers = answers.float()
        top = answers.topk(2, dim=1).values
        certainty = top[:, 0] - top[:, 1]
        reference = self.recent.mean(dim=0) if len(self.recent) else answers.mean(dim=0)
        diversity = (answers - reference).clamp_min(0).sum(dim=1)
        self.recent = torch.cat([self.recent, answers])[-self.window :]
        raw = torch.stack([certainty, diversity, losses.float()], dim=1).double()
        self.low = torch.minimum(self.low, raw.min(dim=0).values)
        self.high = torch.maximum(self.high, raw.max(dim=0).values)
        scaled = (raw - self.low) / (self.high - self.low).clamp_min(1e-12)
        if self.reward == "all":
            return scaled.sum(dim=1)
        return scaled[:, ("certainty", "diversity", "loss").index(self.reward)]

    def update(self, arms: Tensor, rewards: Tensor) -> None:
        """The gradient-bandit update, one image at a time in the order drawn."""
        for arm, reward in zip(arms.tolist(), rewards.tolist(), strict=True):
            pi = self.policy()
            advantage = self.learning_rate * (reward - self.baseline)  # baseline: mean of earlier rewards
            self.preferences -= advantage * pi
            self.preferences[arm] += advantage
            self.steps += 1
            self.baseline += (reward - self.baseline) / self.steps

    def state_dict(self) -> dict[str, Any]:
        return {"preferences": self.preferences, "used": self.used, "baseline": self.baseline,
                "steps": self.steps, "recent": self.recent, "low": self.low, "high": self.high}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preferences, self.used = state["preferences"], state["used"]
        self.baseline, self.steps = float(state["baseline"]), int(state["steps"])
        self.recent, self.low, self.high = state["recent"], state["low"], state["high"]
