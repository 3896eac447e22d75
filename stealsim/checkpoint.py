"""Checkpoints: safetensors weights plus a JSON sidecar that says how to rebuild them.

A checkpoint is a directory::

    DIR/model.safetensors   the network's state dict
    DIR/model.json          CheckpointMeta: architecture, input, normalisation,
                            classes, dataset, metrics, sha256 of the weights

Loading verifies the hash before touching the weights, rebuilds the
architecture from the registry and returns a :class:`PixelClassifier` that
takes pixels in [0, 1]::

    model, meta = load_checkpoint(Path("runs/victim"), device="cpu")
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stealsim.architectures import PixelClassifier, build_classifier
from stealsim.errors import ArchitectureError, CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointMeta",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
    "sha256_file",
]

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


class CheckpointMeta(BaseModel):
    """Everything needed to rebuild, serve and describe a trained classifier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    architecture: str
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: tuple[int, int, int]
    pixel_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float]
    std: list[float]
    class_names: list[str]
    dataset: str
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, model: PixelClassifier, meta: CheckpointMeta) -> CheckpointMeta:
    """Write ``model``'s network and ``meta`` (with the weights' hash) to ``directory``.

    Returns the metadata as written. Both files are written atomically, weights first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    _atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    written = meta.model_copy(update={"weights_sha256": sha256_file(weights)})
    text = json.dumps(written.model_dump(mode="json"), indent=2) + "\n"
    _atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(text))
    return written


def read_meta(directory: Path) -> CheckpointMeta:
    """Read and validate the sidecar of the checkpoint in ``directory``."""
    path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {META_FILE} is missing")
    try:
        return CheckpointMeta.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path}: invalid checkpoint metadata: {exc}") from exc


def build_from_meta(meta: CheckpointMeta) -> PixelClassifier:
    """Build an untrained :class:`PixelClassifier` with ``meta``'s architecture."""
    channels, height, width = meta.input_shape
    if height != width:
        raise CheckpointError(f"only square inputs are supported, got {meta.input_shape}")
    if len(meta.mean) != channels or len(meta.std) != channels:
        raise CheckpointError(
            f"normalization has {len(meta.mean)} means / {len(meta.std)} stds for {channels} channels"
        )
    try:
        net = build_classifier(
            meta.architecture,
            in_channels=channels,
            image_size=height,
            num_classes=meta.num_classes,
            **meta.architecture_kwargs,
        )
    except ArchitectureError as exc:
        raise CheckpointError(f"checkpoint names an architecture that cannot be built: {exc}") from exc
    return PixelClassifier(net, meta.mean, meta.std)


def load_checkpoint(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[PixelClassifier, CheckpointMeta]:
    """Load the checkpoint in ``directory`` onto ``device``, in eval mode.

    Raises:
        CheckpointError: missing files, hash mismatch, unknown architecture, or
            weights whose names or shapes do not fit the architecture.
    """
    meta = read_meta(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {WEIGHTS_FILE} is missing")
    actual = sha256_file(weights)
    if actual != meta.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {actual} does not match {meta.weights_sha256} in {META_FILE}"
        )
    model = build_from_meta(meta)
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {exc}") from exc
    _load_state(model.net, state, directory)
    return model.to(device).eval(), meta


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name}: {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{directory}: weights do not fit the architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]})"
        )
    net.load_state_dict(state)
