"""Images that are not image files of their own: a row of a NumPy array, a cell of a Parquet/Arrow
table (Hugging Face `datasets`), a frame of a DICOM file, a member of a tar shard.

A sample names its image with a small, picklable `StoredImage` (kind, file, key, index); the decode
happens where the sample is loaded, in a DataLoader worker, which opens each file once (memory-mapped
where the format allows) and keeps it open for the worker's life.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from mmtune.errors import DataError

_OPEN: dict[tuple, Any] = {}  # per process: (kind, file, key) -> the opened array / table / handle


@dataclass(frozen=True)
class StoredImage:
    """Where an image lives inside a file.

    Attributes:
        kind: `array` (NumPy), `table` (an Arrow/Parquet column of images, as bytes or paths),
            `dicom`, `tar` (a member of a WebDataset shard).
        file: the file (or saved-dataset folder) holding it.
        key: the array name, `split/column` of a table, or the tar member's name.
        index: the row, frame, or the member's byte offset.
        size: a tar member's byte count (unused by the other kinds).
        window: DICOM window (center, width) set in the config; None reads the file's own.
    """

    kind: str
    file: str
    key: str = ""
    index: int = 0
    size: int = 0
    window: Optional[tuple[float, float]] = None


def opened(kind: str, file: str, key: str, open_it: Callable[[], Any]) -> Any:
    """The object `open_it` makes, once per process."""
    handle = (kind, file, key)
    if handle not in _OPEN:
        _OPEN[handle] = open_it()
    return _OPEN[handle]


def array_to_image(arr: np.ndarray, where: str) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels -> a PIL image (16-bit and float stay wide, for
    the high-bit policy; channel-first (C, H, W) is turned)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise DataError(f"{where}: an image must be (H, W) or (H, W, 1/3/4) pixels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim == 2 and arr.dtype in (np.uint16, np.int16, np.int32, np.uint32):
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.int32)), mode="I")
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.float32)), mode="F")
    if np.issubdtype(arr.dtype, np.floating) and float(np.nanmax(arr)) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _array_image(ref: StoredImage) -> Image.Image:
    from mmtune.data.formats_numpy import open_array

    return array_to_image(open_array(ref.file, ref.key)[ref.index], f"{ref.file}[{ref.key}][{ref.index}]")


def _table_image(ref: StoredImage) -> Image.Image:
    from mmtune.data.formats_tables import image_cell

    return image_cell(ref)


def _dicom_image(ref: StoredImage) -> Image.Image:
    from mmtune.data.formats_dicom import dicom_frame

    return dicom_frame(ref.file, ref.index, ref.window)


def _tar_image(ref: StoredImage) -> Image.Image:
    handle = opened("tar", ref.file, "", lambda: open(ref.file, "rb"))
    handle.seek(ref.index)
    return Image.open(io.BytesIO(handle.read(ref.size)))


_LOADERS = {"array": _array_image, "table": _table_image, "dicom": _dicom_image, "tar": _tar_image}


def stored_image(ref: StoredImage) -> Image.Image:
    """The PIL image `ref` names (any mode; `images.to_model_mode` makes it 8-bit L or RGB).

    Raises:
        DataError: naming the file and where in it, when it cannot be decoded.
    """
    try:
        return _LOADERS[ref.kind](ref)
    except DataError:
        raise
    except Exception as err:  # a decoder's own error (PIL, pydicom, pyarrow): name the image instead
        raise DataError(f"cannot read image {ref.file} [{ref.key or ref.kind} {ref.index}]: {err}") from None
