"""Datasets: the built-ins' fixed split, and every on-disk loader on files written here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stealsim.data import load_dataset, read_idx
from stealsim.errors import DatasetError

RNG = np.random.default_rng(0)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.flatten(1)}


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_builtin_splits_are_disjoint_deterministic_and_stratified(name: str) -> None:
    first, second = load_dataset(name), load_dataset(name)
    total = len(first.y_train) + len(first.y_val) + len(first.y_test)
    # 70 / 10 / 20, each within one image per class of its share.
    assert abs(len(first.y_val) - 0.1 * total) <= 10 and abs(len(first.y_test) - 0.2 * total) <= 10
    for split in ("train", "validation", "test"):
        mine, theirs = first.split(split), second.split(split)
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    # Disjoint: no image of one split is in another (both built-ins hold no duplicate images).
    train, val, test = _rows(first.x_train), _rows(first.x_val), _rows(first.x_test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train) + len(val) + len(test) == total
    # Stratified: every class's share of each split is within 2 points of its share overall.
    labels = torch.cat([first.y_train, first.y_val, first.y_test])
    overall = torch.bincount(labels, minlength=10).float() / len(labels)
    for split_labels in (first.y_train, first.y_val, first.y_test):
        share = torch.bincount(split_labels, minlength=10).float() / len(split_labels)
        assert float((share - overall).abs().max()) < 0.02


def test_unknown_split_is_refused() -> None:
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_dataset("digits").split("dev")


def test_digits_split_is_fixed_and_stratified() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.x_train.shape[1:] == (1, 8, 8)
    assert len(first.x_train) + len(first.x_val) + len(first.x_test) == 1797
    assert len(first.x_test) == 360  # the test split predates validation and did not change
    assert torch.equal(first.y_test, second.y_test)
    assert torch.equal(first.x_test, second.x_test)
    assert float(first.x_train.min()) >= 0.0 and float(first.x_train.max()) <= 1.0
    assert set(first.y_test.tolist()) == set(range(10))
    assert first.num_classes == 10


def test_mnist5k_is_28x28_in_unit_range() -> None:
    data = load_dataset("mnist5k")
    assert data.input_shape == (1, 28, 28)
    assert len(data.x_train) == 3500 and len(data.x_val) == 500 and len(data.x_test) == 1000
    assert float(data.x_train.max()) == 1.0 and float(data.x_train.min()) == 0.0


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'.*digits"):
        load_dataset("imagenet")


def test_on_disk_dataset_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="pass --data-dir"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "missing")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(directory: Path, compress: bool, train: int = 12, test: int = 5) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        files = {
            f"{prefix}-images-idx3-ubyte": _idx_bytes(RNG.integers(0, 256, (count, 28, 28))),
            f"{prefix}-labels-idx1-ubyte": _idx_bytes(np.arange(count) % 10),
        }
        for name, content in files.items():
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (directory / name).write_bytes(content)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader(tmp_path: Path, name: str, compress: bool) -> None:
    _write_idx_set(tmp_path, compress)
    data = load_dataset(name, tmp_path)
    # The official test split is kept; validation is carved from the training images.
    assert data.x_train.shape[1:] == (1, 28, 28) and len(data.x_train) + len(data.x_val) == 12
    assert len(data.x_val) >= 1
    assert data.x_test.shape == (5, 1, 28, 28)
    assert sorted(torch.cat([data.y_train, data.y_val]).tolist()) == sorted(i % 10 for i in range(12))
    assert data.x_train.dtype == torch.float32 and float(data.x_train.max()) <= 1.0
    assert data.num_classes == 10


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "bad")
    truncated = _idx_bytes(np.zeros((3, 28, 28)))[:-10]
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(DatasetError, match="file has"):
        read_idx(tmp_path / "short")


def test_idx_missing_file_is_named(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def _cifar_batch(count: int, label_key: str) -> dict[bytes, object]:
    return {
        b"data": RNG.integers(0, 256, (count, 3072)).astype(np.uint8),
        label_key.encode(): [int(i) % 10 for i in range(count)],
    }


def test_cifar10_loader(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for index in range(1, 3):
        (root / f"data_batch_{index}").write_bytes(pickle.dumps(_cifar_batch(4, "labels")))
    (root / "test_batch").write_bytes(pickle.dumps(_cifar_batch(3, "labels")))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    data = load_dataset("cifar10", tmp_path)
    assert len(data.x_train) + len(data.x_val) == 8 and data.x_test.shape == (3, 3, 32, 32)
    assert data.class_names[3] == "c3"
    # Channel-major CIFAR layout: the first 1024 bytes are the red plane.
    raw = pickle.loads((root / "data_batch_1").read_bytes())[b"data"]
    red = torch.from_numpy(raw[0, :1024] / 255.0).float()
    everything = torch.cat([data.x_train, data.x_val])
    assert any(torch.allclose(image[0].flatten(), red) for image in everything)


def test_cifar100_loader(tmp_path: Path) -> None:
    (tmp_path / "train").write_bytes(pickle.dumps(_cifar_batch(6, "fine_labels")))
    (tmp_path / "test").write_bytes(pickle.dumps(_cifar_batch(2, "fine_labels")))
    data = load_dataset("cifar100", tmp_path)
    assert len(data.x_train) + len(data.x_val) == 6 and data.x_train.shape[1:] == (3, 32, 32)
    assert data.num_classes == 100


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (tmp_path / "train").write_bytes(pickle.dumps({b"data": Exploit()}))
    (tmp_path / "test").write_bytes(pickle.dumps(_cifar_batch(2, "fine_labels")))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("cifar100", tmp_path)


def test_svhn_loader_maps_label_ten_to_zero(tmp_path: Path) -> None:
    from scipy.io import savemat

    for name, count in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        images = RNG.integers(0, 256, (32, 32, 3, count)).astype(np.uint8)
        labels = np.array([[10], [1], [2], [3], [4]][:count], dtype=np.uint8)
        savemat(tmp_path / name, {"X": images, "y": labels})
    data = load_dataset("svhn", tmp_path)
    assert len(data.x_train) + len(data.x_val) == 5
    assert sorted(torch.cat([data.y_train, data.y_val]).tolist()) == [0, 1, 2, 3, 4]


def test_npz_loader_layouts_and_split(tmp_path: Path) -> None:
    labels = np.arange(50) % 5
    np.savez(tmp_path / "hw.npz", x=RNG.integers(0, 256, (50, 12, 12)).astype(np.uint8), y=labels)
    data = load_dataset("npz", tmp_path / "hw.npz")
    assert data.input_shape == (1, 12, 12)
    assert len(data.x_train) == 35 and len(data.x_val) == 5 and len(data.x_test) == 10
    assert data.num_classes == 5

    nhwc = RNG.random((6, 16, 16, 3)).astype(np.float32)
    directory = tmp_path / "dir"
    directory.mkdir()
    np.savez(directory / "only.npz", x=nhwc, y=np.arange(6) % 2, x_test=nhwc[:2], y_test=[0, 1],
             class_names=np.array(["cat", "dog"]))
    data = load_dataset("npz", directory)
    assert data.input_shape == (3, 16, 16)
    assert data.class_names == ("cat", "dog")
    everything = torch.cat([data.x_train, data.x_val])
    assert any(torch.allclose(image[2], torch.from_numpy(nhwc[1, :, :, 2])) for image in everything)


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"missing arrays \['y'\]"):
        load_dataset("npz", tmp_path / "nolabels.npz")
    (tmp_path / "nolabels.npz").unlink()
    np.savez(tmp_path / "range.npz", x=np.full((4, 8, 8), 2.0), y=[0, 1, 0, 1])
    with pytest.raises(DatasetError, match=r"within \[0, 1\]"):
        load_dataset("npz", tmp_path / "range.npz")
    np.savez(tmp_path / "second.npz", x=np.zeros((4, 8, 8), np.uint8), y=[0, 1, 0, 1])
    with pytest.raises(DatasetError, match=r"exactly one \.npz"):
        load_dataset("npz", tmp_path)
