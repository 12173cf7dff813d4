"""NumPy arrays of images and labels as classification samples: a `.npz` (the MedMNIST layout,
`train_images`/`train_labels`, `val_*`, `test_*`, or plain `images`/`labels`), or a `*_images.npy`
beside its `*_labels.npy`.

Labels may be class indices (`(N,)` or MedMNIST's `(N, 1)`), class names (strings), or a multi-hot
`(N, K)` matrix (multi-label); `class_names` turns indices into names. Pixels are read in the worker
that needs them: a `.npy` is memory-mapped, an array of a `.npz` is read once per process.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mmtune.data.samples import ImageLabel
from mmtune.data.splits import SPLIT_ALIASES
from mmtune.data.stored import StoredImage, opened
from mmtune.errors import DataError

IMAGE_KEYS = ("images", "imgs", "x")
LABEL_KEYS = ("labels", "y", "targets")


def open_array(file: str, key: str) -> np.ndarray:
    """The array `key` of a `.npz` (read once per process), or a `.npy` memory-mapped (`key` empty)."""
    if file.endswith(".npy"):
        return opened("array", file, "", lambda: np.load(file, mmap_mode="r", allow_pickle=False))

    def read() -> np.ndarray:
        with np.load(file, allow_pickle=False) as arrays:
            return arrays[key]
    return opened("array", file, key, read)


def _shape(file: Path, key: str) -> tuple[int, ...]:
    """An array's shape from its header, without reading its data."""
    if file.suffix == ".npy":
        return np.load(file, mmap_mode="r", allow_pickle=False).shape
    with zipfile.ZipFile(file) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
        return shape


def _pairs(path: Path) -> list[tuple[Optional[str], Path, str, Path, str]]:
    """(split, images file, images key, labels file, labels key) found at `path`."""
    if path.suffix == ".npy":
        stem = path.name[: -len("images.npy")] if path.name.endswith("images.npy") else None
        labels = path.with_name(f"{stem}labels.npy") if stem is not None else None
        if labels is None or not labels.exists():
            raise DataError(f"{path}: a .npy of images needs its labels beside it as <name>_labels.npy "
                            f"(for {path.name}: {path.name.replace('images', 'labels')})")
        split = SPLIT_ALIASES.get(stem.rstrip("_-.").lower()) if stem else None
        return [(split, path, "", labels, "")]
    try:
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a NumPy .npz file ({err})") from None
    found = []
    for key in keys:
        prefix, _, kind = key.rpartition("_")
        if kind in IMAGE_KEYS and (not prefix or prefix.lower() in SPLIT_ALIASES):
            label = next((f"{prefix}_{k}" if prefix else k for k in LABEL_KEYS
                          if (f"{prefix}_{k}" if prefix else k) in keys), None)
            if label is None:
                raise DataError(f"{path}: array {key!r} has no labels beside it (expected "
                                f"{prefix + '_' if prefix else ''}labels; arrays: {keys})")
            found.append((SPLIT_ALIASES[prefix.lower()] if prefix else None, path, key, path, label))
    if not found:
        raise DataError(f"{path}: no image arrays (expected images/labels or train_images/train_labels, "
                        f"val_*, test_*; arrays: {keys})")
    return found


def _label_names(labels: np.ndarray, where: str, class_names: Optional[Sequence[str]]) -> list[tuple[str, ...]]:
    def name(value) -> str:
        if class_names is not None and np.issubdtype(type(value), np.integer):
            if not 0 <= int(value) < len(class_names):
                raise DataError(f"{where}: label {value} is outside class_names ({len(class_names)} names)")
            return str(class_names[int(value)])
        return str(value.item() if hasattr(value, "item") else value)

    if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        return [(name(v),) for v in labels.reshape(-1)]
    if labels.ndim == 2 and np.isin(labels, (0, 1)).all():  # multi-hot: multi-label
        return [tuple(name(np.int64(j)) for j in np.flatnonzero(row)) for row in labels]
    raise DataError(f"{where}: labels must be (N,), (N, 1) or a multi-hot (N, K) of 0/1, got shape {labels.shape}")


def read_numpy(source: str, class_names: Optional[Sequence[str]] = None) -> list[ImageLabel]:
    """Samples of every image array at `source` (a `.npz`, or a `*images.npy` with its labels).

    Raises:
        DataError: no image arrays, labels missing, or images and labels that disagree in length
            (naming both arrays).
    """
    path = Path(source).expanduser()
    samples = []
    for split, image_file, image_key, label_file, label_key in _pairs(path):
        shape = _shape(image_file, image_key)
        labels = np.asarray(open_array(str(label_file), label_key))
        image_name = f"{image_file.name}[{image_key}]" if image_key else image_file.name
        label_name = f"{label_file.name}[{label_key}]" if label_key else label_file.name
        if len(shape) < 3:
            raise DataError(f"{image_name}: images must be (N, H, W) or (N, H, W, C), got shape {shape}")
        if shape[0] != len(labels):
            raise DataError(f"{image_name} has {shape[0]} images but {label_name} has {len(labels)} labels: "
                            "the arrays must agree in length")
        names = _label_names(labels, label_name, class_names)
        for i, row in enumerate(names):
            where = f"{image_name}[{i}]"
            samples.append(ImageLabel(where, row, None, split, where,
                                      image=StoredImage("array", str(image_file), image_key, i)))
    return samples
