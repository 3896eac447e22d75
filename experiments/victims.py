"""Victims: one trained to order (:func:`train_victim`, ``stealsim train``), and the two of an
experiment, a normally trained classifier and its Nasty Teacher (:func:`prepare_victims`).

Training is cached: :func:`prepare_victims` keys a directory by a hash of the
settings and reuses it when it holds both checkpoints, so a second demo (or
every grid worker on one host) starts serving at once::

    victims = prepare_victims(VictimSettings(dataset="digits", epochs=30), Path("runs/cache"))
    victims.normal, victims.nasty  # checkpoint directories
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from stealsim.checkpoint import CheckpointMeta
    from stealsim.data import Dataset

__all__ = [
    "DEFENDER_MODELS",
    "VICTIM_NAMES",
    "NastyObjective",
    "PreparedVictims",
    "TrainObjective",
    "VictimSettings",
    "VictimTraining",
    "prepare_defender_models",
    "prepare_victims",
    "train_victim",
]

logger = logging.getLogger(__name__)

VICTIM_NAMES = ("normal", "nasty")
"""The model names the experiments serve the two victims under."""

_CACHE_FORMAT = 1

TrainObjective = Literal["cross-entropy", "misinformation", "none"]
"""cross-entropy: a victim; misinformation: the adaptive-misinformation model (Kariyappa &
Qureshi 2020, Eq. 3); none: initialised weights only (a random MAD proxy)."""


@dataclass(frozen=True)
class NastyObjective:
    """Train a Nasty Teacher (Ma et al., 2021) departing from the normally trained ``adversary``.

    ``tau`` and ``omega`` (``None``: the dataset's settings, :func:`defense.nasty_teacher.settings_for`).
    """

    adversary: Path
    tau: float | None = None
    omega: float | None = None


@dataclass(frozen=True)
class VictimTraining:
    """One classifier trained to order (``stealsim train``).

    Attributes:
        objective: a :data:`TrainObjective`, or a :class:`NastyObjective`.
        architecture: ``None``: the default for the input (a Nasty Teacher: its adversary's).
        epochs: ``None``: 30 (a Nasty Teacher: its settings' epochs).
        batch_size, learning_rate, seed: as :class:`stealsim.training.TrainConfig`.
    """

    objective: TrainObjective | NastyObjective = "cross-entropy"
    architecture: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def train_victim(data: Dataset, training: VictimTraining, out: Path, device: torch.device,
                 show_progress: bool = True) -> CheckpointMeta:
    """Train a classifier as ``training`` says and write its checkpoint and ``metrics.json`` to ``out``."""
    from stealsim.architectures import default_architecture
    from stealsim.checkpoint import load_checkpoint, save_checkpoint
    from stealsim.training import TrainConfig, augmentation_shift, train_classifier

    channels, size, _ = data.input_shape
    architecture = training.architecture or default_architecture(channels, size)
    config = TrainConfig(epochs=training.epochs or 30, batch_size=training.batch_size,
                         learning_rate=training.learning_rate, seed=training.seed,
                         max_shift=augmentation_shift(size))
    objective = training.objective
    if isinstance(objective, NastyObjective):
        from dataclasses import replace

        from defense.nasty_teacher import settings_for, train_nasty_teacher

        settings = settings_for(data.name, objective.tau, objective.omega)
        if training.epochs is not None:
            settings = replace(settings, epochs=training.epochs)
        adversary_model, adversary_meta = load_checkpoint(objective.adversary, device)
        model, meta = train_nasty_teacher(data, training.architecture, config, adversary_model, adversary_meta,
                                          settings, device, show_progress=show_progress)
    elif objective == "none":
        from stealsim.training import untrained_classifier

        model, meta = untrained_classifier(data, architecture, training.seed)
    else:
        from defense.misinformation import misinformation_loss
        from stealsim.training import cross_entropy_loss

        loss = misinformation_loss if objective == "misinformation" else cross_entropy_loss
        model, meta = train_classifier(data, architecture, config, device, loss_fn=loss,
                                       description=f"train {architecture} ({objective})",
                                       show_progress=show_progress)
        meta = meta.model_copy(update={"training": {**meta.training, "objective": objective}})
    meta = save_checkpoint(out, model, meta)
    (out / "metrics.json").write_text(json.dumps(dict(meta.metrics), indent=2, sort_keys=True) + "\n")
    return meta


@dataclass(frozen=True)
class VictimSettings:
    """How the two victims are trained.

    Attributes:
        dataset: a built-in dataset (``digits``, ``mnist5k``).
        architecture: the victims' architecture (``None``: the default for the input).
        epochs: epochs of normal training.
        nasty_epochs: epochs of Nasty Teacher training (``None``: the dataset's setting, else ``epochs``).
        tau, omega: Nasty Teacher settings (``None``: the dataset's defaults).
        seed: training seed.
    """

    dataset: str = "digits"
    architecture: str | None = None
    epochs: int = 30
    nasty_epochs: int | None = None
    tau: float | None = None
    omega: float | None = None
    seed: int = 0

    def cache_key(self) -> str:
        text = json.dumps({"format": _CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedVictims:
    """Checkpoint directories of both victims and their test accuracies."""

    normal: Path
    nasty: Path
    cache_key: str
    reused: bool
    metrics: dict[str, Any]

    def models(self) -> dict[str, Path]:
        return {"normal": self.normal, "nasty": self.nasty}


def _complete(directory: Path) -> bool:
    return all((directory / name / "model.json").is_file() and (directory / name / "model.safetensors").is_file()
               for name in VICTIM_NAMES) and (directory / "victims.json").is_file()


def prepare_victims(settings: VictimSettings, cache_dir: Path, show_progress: bool = True) -> PreparedVictims:
    """Train (or reuse from ``cache_dir``) a normal victim and its Nasty Teacher."""
    key = settings.cache_key()
    directory = cache_dir / f"victims-{key}"
    if _complete(directory):
        logger.info("reusing the victims in %s", directory)
        metrics = json.loads((directory / "victims.json").read_text())["metrics"]
        return PreparedVictims(directory / "normal", directory / "nasty", key, True, metrics)

    from dataclasses import replace

    from defense.nasty_teacher import settings_for, train_nasty_teacher
    from stealsim.architectures import default_architecture
    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import TrainConfig, augmentation_shift, train_classifier

    data = load_dataset(settings.dataset)
    channels, size, _ = data.input_shape
    architecture = settings.architecture or default_architecture(channels, size)
    config = TrainConfig(epochs=settings.epochs, seed=settings.seed, max_shift=augmentation_shift(size))
    nasty_settings = settings_for(data.name, settings.tau, settings.omega)
    if settings.nasty_epochs is not None:
        nasty_settings = replace(nasty_settings, epochs=settings.nasty_epochs)
    logger.info("training the victims (%s, %s, %d epochs) into %s", data.name, architecture, settings.epochs, directory)
    normal, normal_meta = train_classifier(data, architecture, config, "cpu", description="victim: normal",
                                           show_progress=show_progress)
    nasty, nasty_meta = train_nasty_teacher(data, architecture, config, normal, normal_meta, nasty_settings,
                                            "cpu", show_progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".victims-{key}-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the victims from other users of the cache
    try:
        save_checkpoint(staging / "normal", normal, normal_meta)
        save_checkpoint(staging / "nasty", nasty, nasty_meta)
        metrics = {"normal_test_accuracy": normal_meta.metrics["test_accuracy"],
                   "nasty_test_accuracy": nasty_meta.metrics["test_accuracy"]}
        (staging / "victims.json").write_text(json.dumps(
            {"settings": asdict(settings), "architecture": architecture,
             "nasty": asdict(nasty_settings), "metrics": metrics}, indent=2) + "\n")
        if directory.exists() and not _complete(directory):  # an incomplete earlier attempt
            shutil.rmtree(directory, ignore_errors=True)
        try:
            staging.rename(directory)  # atomic: a reader sees no victims or both
        except OSError:
            if not _complete(directory):
                raise
            # Another process on this host (a second grid worker) finished first: use its victims.
            shutil.rmtree(staging, ignore_errors=True)
            return prepare_victims(settings, cache_dir, show_progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreparedVictims(directory / "normal", directory / "nasty", key, False, metrics)


DEFENDER_MODELS = ("misinformation", "proxy")
"""The defender's models a grid spec can name in a policy step as ``"@misinformation"`` or ``"@proxy"``."""


def prepare_defender_models(settings: VictimSettings, cache_dir: Path, show_progress: bool = True) -> dict[str, Path]:
    """Train (or reuse) the defender's models beside the victims: the adaptive-misinformation
    model (Kariyappa & Qureshi 2020, Eq. 3; same data, architecture and epochs as the victim)
    and a MAD proxy (the victim's architecture, randomly initialised, as in their comparison)."""
    directory = cache_dir / f"defenders-{settings.cache_key()}"
    paths = {name: directory / name for name in DEFENDER_MODELS}
    if all((path / "model.json").is_file() for path in paths.values()):
        return paths

    from defense.misinformation import misinformation_loss
    from stealsim.architectures import default_architecture
    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import (
        TrainConfig,
        augmentation_shift,
        train_classifier,
        untrained_classifier,
    )

    data = load_dataset(settings.dataset)
    channels, size, _ = data.input_shape
    architecture = settings.architecture or default_architecture(channels, size)
    config = TrainConfig(epochs=settings.epochs, seed=settings.seed + 1, max_shift=augmentation_shift(size))
    logger.info("training the defender's models (%s) into %s", ", ".join(DEFENDER_MODELS), directory)
    wrong, wrong_meta = train_classifier(data, architecture, config, "cpu", loss_fn=misinformation_loss,
                                         description="defender: misinformation", show_progress=show_progress)
    proxy, proxy_meta = untrained_classifier(data, architecture, settings.seed + 2)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".defenders-", dir=cache_dir))
    staging.chmod(0o755)
    try:
        save_checkpoint(staging / "misinformation", wrong, wrong_meta)
        save_checkpoint(staging / "proxy", proxy, proxy_meta)
        try:
            staging.rename(directory)
        except OSError:
            if not all((path / "model.json").is_file() for path in paths.values()):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths
