"""DICOM images through pydicom: rescale slope/intercept (the modality LUT), a window (the file's own
WindowCenter/WindowWidth, or one set in the config; else the image's min-max), MONOCHROME1 inverted,
and a multi-frame file as one sample per frame.

Patient and study ids (`PatientID`, `StudyInstanceUID`) can be the group keys of the split; with
`anonymize_ids` (the default) a key is a one-way hash of the id, so no id reaches the run directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Optional

import numpy as np
from PIL import Image

from mmtune.data.samples import ImageLabel
from mmtune.data.stored import StoredImage, opened
from mmtune.errors import DataError

ID_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def _header(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, defer_size="1 KB")
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read DICOM file {path}: {err}") from None


def header_problem(ds) -> Optional[str]:
    """Why the pixels of a DICOM dataset cannot be decoded here (None when they can)."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no pixel data (a DICOM file without an image: a report or structured document?)"
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax {syntax} ({getattr(syntax, 'name', syntax)})"
    if not decoder.is_available:
        return (f"transfer syntax {syntax.name} needs a decoder plugin that is not installed "
                "(pydicom's docs list them: pylibjpeg, gdcm)")
    return None


def _window(ds, window: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    if window is not None:
        return float(window[0]), float(window[1])
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = (lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v))
    return first(center), first(width)


def dicom_frame(path: str, frame: int, window: Optional[tuple[float, float]]) -> Image.Image:
    """Frame `frame` of a DICOM file as an 8-bit L image (or RGB for color files)."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    ds = opened("dicom", path, "", lambda: _header(path))
    problem = header_problem(ds)
    if problem:
        raise DataError(f"cannot read DICOM file {path}: {problem}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pixel_array(path, index=frame if frames > 1 else None)
    if ds.get("PhotometricInterpretation", "").startswith(("RGB", "YBR")) or arr.ndim == 3:
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    values = apply_modality_lut(arr, ds).astype(np.float32)  # RescaleSlope, RescaleIntercept
    chosen = _window(ds, window)
    if chosen is not None:
        center, width = chosen
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        lo, hi = float(values.min()), float(values.max())
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white
        scaled = 1.0 - scaled
    return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")


def _key(value: str, anonymize: bool) -> str:
    return "id-" + hashlib.sha256(value.encode()).hexdigest()[:16] if anonymize else value


def expand_dicom(samples: list[ImageLabel], group_tag: Optional[str], anonymize: bool,
                 window: Optional[tuple[float, float]]) -> tuple[list[ImageLabel], dict[str, str]]:
    """Each `.dcm` sample -> one sample per frame, grouped by the tag `group_tag` when it is one of
    `ID_TAGS`; returns the samples and {origin: reason} of the files that cannot be decoded.

    With `anonymize` the ids are hashed and left out of `meta`; without, they are also in `meta` (for
    audits by site or study)."""
    out, bad = [], {}
    for s in samples:
        if not s.path.lower().endswith(".dcm"):
            out.append(s)
            continue
        try:
            ds = _header(s.path)
            problem = header_problem(ds)
        except DataError as err:
            problem = str(err)
        if problem:
            bad[s.origin] = f"{s.path}: {problem}"
            continue
        ids = {tag: str(ds.get(tag, "")) for tag in ID_TAGS if ds.get(tag)}
        group = s.group
        if group_tag in ID_TAGS:
            if group_tag not in ids:
                raise DataError(f"{s.origin}: {s.path} has no {group_tag} tag to group by")
            group = _key(ids[group_tag], anonymize)
        meta = dict(s.meta) if anonymize else {**s.meta, **ids}
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for f in range(frames):
            name = s.path if frames == 1 else f"{s.path}[frame {f}]"
            origin = s.origin if frames == 1 else f"{s.origin} frame {f}"
            out.append(replace(s, path=name, group=group, origin=origin, meta=meta,
                               image=StoredImage("dicom", s.path, "", f, window=window)))
    return out, bad
