"""Robust image decoding: every mode users have (8/16-bit grayscale, RGBA, palette, CMYK) becomes
the 8-bit L or RGB image the model's transforms expect, and unreadable files are found up front."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Literal, Optional

import numpy as np
from PIL import Image, ImageFile

from mmtune.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad image, not a half-grey one

HighBitPolicy = Literal["min_max", "full_range"]


def _to_8bit(img: Image.Image, policy: HighBitPolicy) -> Image.Image:
    """Windows a 16-bit or float grayscale image to 8 bits.

    `min_max` stretches each image's own range (robust for 12-bit data stored in 16-bit PNGs, such as
    X-rays); `full_range` divides by the type's maximum.
    """
    arr = np.asarray(img).astype(np.float32)
    if policy == "min_max":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    else:
        arr = arr / (65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0)
    return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _check_pixel_count(img: Image.Image, path: str) -> None:
    """Refuses an image over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`). PIL itself only warns
    between one and two times the limit and decodes it, so a small file could still take gigabytes
    (a decompression bomb); set `PIL.Image.MAX_IMAGE_PIXELS` higher (or None) for genuine huge images."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit and width * height > limit:
        raise DataError(f"cannot read image {path}: {width}x{height} = {width * height} pixels is over PIL's limit of "
                        f"{limit} (Image.MAX_IMAGE_PIXELS; a decompression bomb?)")


def to_model_mode(img: Image.Image, channels: int = 3, high_bit: HighBitPolicy = "min_max") -> Image.Image:
    """Any PIL mode -> the 8-bit L (`channels` 1) or RGB image the transforms expect."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img, high_bit)
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: a transparent background is "nothing", not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def load_image(path: str, channels: int = 3, high_bit: HighBitPolicy = "min_max",
               at_least: Optional[int] = None) -> Image.Image:
    """Opens `path` as an 8-bit image with `channels` (1: L, 3: RGB) channels; a `.dcm` path is read
    as DICOM (its first frame).

    `at_least`: the smallest side the transforms need (`decode_side`). A JPEG much larger than that is
    decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL's `draft`), still at least that size: a 1024 px
    X-ray trained at 224 px decodes several times faster, with no detail the resize would have kept.

    Raises:
        DataError: the file is missing, not an image, or truncated.
    """
    if path.lower().endswith(".dcm"):
        from mmtune.data.formats_dicom import dicom_frame

        return to_model_mode(dicom_frame(path, 0, None), channels, high_bit)
    try:
        with Image.open(path) as img:
            _check_pixel_count(img, path)
            if at_least and img.format == "JPEG" and min(img.size) >= 2 * at_least:
                img.draft(None, (at_least, at_least))
            img.load()
            return to_model_mode(img, channels, high_bit)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as err:  # over twice the limit, refused by PIL at open
        raise DataError(f"cannot read image {path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def load_sample_image(sample, channels: int = 3, high_bit: HighBitPolicy = "min_max",
                      at_least: Optional[int] = None) -> Image.Image:
    """The image of an `ImageLabel`: its file, or the array row, table cell or frame it names."""
    if sample.image is None:
        return load_image(sample.path, channels, high_bit, at_least)
    from mmtune.data.stored import stored_image

    img = stored_image(sample.image)
    _check_pixel_count(img, sample.path)
    return to_model_mode(img, channels, high_bit)


def find_unreadable(paths: Iterable[str], workers: int = 4) -> dict[str, str]:
    """Decodes every image (in threads: PIL releases the GIL) and returns {path: reason} for failures."""

    def check(path: str) -> tuple[str, str | None]:
        try:
            load_image(path)
            return path, None
        except DataError as err:
            return path, str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return {p: reason for p, reason in pool.map(check, list(paths)) if reason}


def find_unreadable_stored(samples: list, workers: int = 4) -> dict[str, str]:
    """`find_unreadable` for samples whose images live inside other files: {sample path: reason}."""

    def check(sample) -> tuple[str, str | None]:
        try:
            load_sample_image(sample)
            return sample.path, None
        except DataError as err:
            return sample.path, str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return {p: reason for p, reason in pool.map(check, samples) if reason}
