"""Robust image decoding: every mode users have (8/16-bit grayscale, RGBA, palette, CMYK) becomes
the 8-bit L or RGB image the model's transforms expect, and unreadable files are found up front."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Literal

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


def load_image(path: str, channels: int = 3, high_bit: HighBitPolicy = "min_max") -> Image.Image:
    """Opens `path` as an 8-bit image with `channels` (1: L, 3: RGB) channels.

    Raises:
        DataError: the file is missing, not an image, or truncated.
    """
    try:
        with Image.open(path) as img:
            _check_pixel_count(img, path)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                img = _to_8bit(img, high_bit)
            elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite on white: a transparent background is "nothing", not black.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as err:  # over twice the limit, refused by PIL at open
        raise DataError(f"cannot read image {path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


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
