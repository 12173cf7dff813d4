"""Readers for labeled image collections: an ImageFolder tree, or a CSV/JSONL manifest.

Manifests are read with the stdlib `csv`/`json` rather than `datasets`: errors must name the file and
row, paths resolve relative to the manifest, and a classification manifest is small enough that
Arrow conversion buys nothing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from mmtune.data.samples import ImageLabel
from mmtune.data.splits import SPLIT_ALIASES, split_name
from mmtune.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}


@dataclass
class ManifestColumns:
    """Column names in a manifest (`group` is optional and off by default)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    group: Optional[str] = None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_folder(root: Path) -> list[ImageLabel]:
    """`root/<class>/*.png`, or `root/<split>/<class>/*.png`, or a flat folder of unlabeled images."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    samples: list[ImageLabel] = []
    if split_dirs and len(split_dirs) == len(subdirs):
        for split_dir in split_dirs:
            for sample in _read_folder(split_dir):
                sample.split = SPLIT_ALIASES[split_dir.name.lower()]
                samples.append(sample)
        return samples
    if subdirs:
        for class_dir in subdirs:
            for img in _images_in(class_dir):
                samples.append(ImageLabel(str(img), (class_dir.name,), origin=str(img)))
    samples += [ImageLabel(str(p), (), origin=str(p)) for p in sorted(root.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return samples


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs from a CSV, JSONL or JSON-list file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), start=2):
                yield i, row
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path} line {i}: invalid JSON ({err.msg})") from None
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        yield from enumerate(data, start=1)
    else:
        raise DataError(f"{path}: unsupported manifest type {suffix!r} (use .csv, .tsv, .jsonl or .json)")


def _read_manifest(path: Path, columns: ManifestColumns, separator: str) -> list[ImageLabel]:
    samples = []
    where = "row" if path.suffix.lower() in (".csv", ".tsv") else "line"
    for line, row in _rows(path):
        origin = f"{path} {where} {line}"
        if not isinstance(row, dict) or not row.get(columns.path):
            raise DataError(f"{origin}: no {columns.path!r} value (columns: {list(row) if isinstance(row, dict) else row})")
        image = Path(str(row[columns.path])).expanduser()
        image = image if image.is_absolute() else path.parent / image
        raw = row.get(columns.label)
        if isinstance(raw, list):
            labels = tuple(str(x).strip() for x in raw if str(x).strip())
        elif raw is None:
            labels = ()
        else:
            labels = tuple(x.strip() for x in str(raw).split(separator) if x.strip())
        split = split_name(row.get(columns.split), origin)
        group = None
        if columns.group:
            if columns.group not in row:
                raise DataError(f"{origin}: no group column {columns.group!r} (columns: {list(row)})")
            group = str(row[columns.group])
        used = {columns.path, columns.label, columns.split}
        meta = {k: v for k, v in row.items() if k not in used and k is not None}
        samples.append(ImageLabel(str(image), labels, group, split, origin, meta))
    return samples


def read_image_labels(source: str, columns: ManifestColumns = ManifestColumns(), separator: str = "|") -> list[ImageLabel]:
    """Reads an image folder or manifest into samples and checks that every image file exists.

    Raises:
        DataError: the source is missing or empty, or rows name missing files (all of them are listed).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    samples = _read_folder(path) if path.is_dir() else _read_manifest(path, columns, separator)
    if not samples:
        raise DataError(f"no images found in {path}")
    missing = [s for s in samples if not Path(s.path).is_file()]
    if missing:
        shown = "; ".join(f"{s.origin}: {s.path}" for s in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} image file(s) are missing: {shown}{more}")
    return samples


def read_saved_dataset(folder: Path) -> tuple[list[dict], list[str], list[Optional[str]]]:
    """Rows of a `datasets` DatasetDict (or Dataset) saved with `save_to_disk`, e.g. by `mmtune data align`,
    with an origin (`folder[train] row 3`) and the split its part names (None for a plain Dataset)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{folder}: not a dataset written by save_to_disk ({err})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    rows, origins, splits = [], [], []
    for name, ds in parts:
        split = split_name(name, str(folder))
        for i, row in enumerate(ds.to_list()):
            rows.append(row)
            origins.append(f"{folder}[{name}] row {i}" if name else f"{folder} row {i}")
            splits.append(split)
    return rows, origins, splits
