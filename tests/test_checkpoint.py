"""Checkpoint round trip and every load error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stealsim.architectures import PixelClassifier, build_classifier
from stealsim.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)
from stealsim.errors import CheckpointError


def _model_and_meta(num_classes: int = 10) -> tuple[PixelClassifier, CheckpointMeta]:
    torch.manual_seed(0)
    net = build_classifier("small-cnn", in_channels=1, image_size=8, num_classes=num_classes, width=4)
    model = PixelClassifier(net, [0.3], [0.4]).eval()
    meta = CheckpointMeta(
        architecture="small-cnn",
        architecture_kwargs={"width": 4},
        input_shape=(1, 8, 8),
        mean=[0.3],
        std=[0.4],
        class_names=[str(i) for i in range(num_classes)],
        dataset="digits",
        metrics={"test_accuracy": 0.5},
    )
    return model, meta


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, PixelClassifier]:
    model, meta = _model_and_meta()
    save_checkpoint(tmp_path / "ckpt", model, meta)
    return tmp_path / "ckpt", model


def test_round_trip_gives_identical_outputs_and_metadata(saved: tuple[Path, PixelClassifier]) -> None:
    directory, model = saved
    loaded, meta = load_checkpoint(directory)
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert meta.architecture == "small-cnn"
    assert meta.architecture_kwargs == {"width": 4}
    assert meta.input_shape == (1, 8, 8)
    assert meta.num_classes == 10
    assert meta.metrics["test_accuracy"] == 0.5
    assert len(meta.weights_sha256) == 64
    assert not loaded.training


def _rewrite_meta(directory: Path, **changes: object) -> None:
    path = directory / META_FILE
    content = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(content))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_sidecar(saved: tuple[Path, PixelClassifier]) -> None:
    (saved[0] / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.json is missing"):
        load_checkpoint(saved[0])


def test_missing_weights(saved: tuple[Path, PixelClassifier]) -> None:
    (saved[0] / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(saved[0])


def test_hash_mismatch(saved: tuple[Path, PixelClassifier]) -> None:
    weights = saved[0] / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(saved[0])


def test_unknown_architecture(saved: tuple[Path, PixelClassifier]) -> None:
    _rewrite_meta(saved[0], architecture="transformer")
    with pytest.raises(CheckpointError, match="unknown architecture 'transformer'"):
        load_checkpoint(saved[0])


def test_shape_mismatch(saved: tuple[Path, PixelClassifier]) -> None:
    _rewrite_meta(saved[0], class_names=[str(i) for i in range(5)])
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_checkpoint(saved[0])


def test_invalid_json(saved: tuple[Path, PixelClassifier]) -> None:
    (saved[0] / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(saved[0])


def test_unexpected_metadata_field_is_refused(saved: tuple[Path, PixelClassifier]) -> None:
    _rewrite_meta(saved[0], surprise=1)
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(saved[0])
