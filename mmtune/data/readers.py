"""Readers for labeled image collections: an ImageFolder tree, or a CSV/JSONL manifest.

Manifests are read with the stdlib `csv`/`json` rather than `datasets`: errors must name the file and
row, paths resolve relative to the manifest, and a classification manifest is small enough that
Arrow conversion buys nothing.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from mmtune.data.samples import ImageLabel
from mmtune.data.splits import SPLIT_ALIASES, split_name
from mmtune.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".dcm"}


@dataclass
class ManifestColumns:
    """Column names in a manifest (`group` is optional and off by default)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    group: Optional[str] = None


def _is_image_entry(p: Path) -> bool:
    """An image-named entry that is not a folder: files, and also broken or looping symlinks, so that
    the image check names them instead of the listing dropping them unseen."""
    return p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.is_dir()))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image_entry(p))


def file_problem(path: str) -> Optional[str]:
    """Why `path` is not a readable file (None when it is): not found, a broken symlink, a symlink
    loop, a folder."""
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"a broken symlink (to {os.readlink(path)})"
        return "not found"
    return "a folder, not a file" if stat.S_ISDIR(st.st_mode) else None  # one stat a row, not two


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
    samples += [ImageLabel(str(p), (), origin=str(p)) for p in sorted(root.iterdir()) if _is_image_entry(p)]
    return samples


# (byte-order mark, codec), longest first: a UTF-32 LE mark starts like a UTF-16 LE one
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_LONGEST_FIELD = 1 << 30  # csv's default limit (128 KiB) refuses a long report; a field is only bounded by memory


def read_text(path: Path) -> str:
    """The text of a data file: UTF-8, or UTF-8/16/32 with a byte-order mark (what spreadsheet tools
    export as "Unicode text").

    Raises:
        DataError: the file cannot be read, is not text in one of those encodings (naming the line), or
            holds NUL characters (UTF-16 without a mark, or a binary file).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    codec = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not {codec.upper().replace('-SIG', '')} text (byte {data[err.start]:#04x} "
                        f"at offset {err.start}); save the file as UTF-8") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise DataError(f"{path} line {line}: a NUL character (UTF-16 text without a byte-order mark, or a binary "
                        "file?); save the file as UTF-8")
    return text


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """Strict CSV: a quote left open, text after a closing quote, or a row with more cells than the
    header is an error naming the row (a lenient reader would swallow the rows after an open quote)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                            strict=True)
    limit = csv.field_size_limit(_LONGEST_FIELD)
    i = 1
    try:
        for i, row in enumerate(reader, start=2):
            if None in row:
                raise DataError(f"{path} row {i}: {len(row[None])} more cell(s) than the header's "
                                f"{len(reader.fieldnames)} columns (an unquoted separator in a value?)")
            yield i, row
    except csv.Error as err:
        raise DataError(f"{path} row {i + 1}: malformed CSV ({err}; a quote left open?)") from None
    finally:
        csv.field_size_limit(limit)


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines text; a bad line is an error naming it."""
    # split on newlines only: str.splitlines would also cut at U+2028, which JSON strings may hold
    for i, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {i}: invalid JSON ({err.msg})") from None


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs from a CSV, JSONL or JSON-list file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported manifest type {suffix!r} (use .csv, .tsv, .jsonl or .json)")
    text = read_text(path)
    if suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, text)
    elif suffix == ".jsonl":
        yield from json_lines(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        yield from enumerate(data, start=1)


_NO_META: dict = {}  # shared by the rows of a manifest without other columns (a million rows: 64 bytes each)


def _read_manifest(path: Path, columns: ManifestColumns, separator: str) -> list[ImageLabel]:
    """Rows -> samples. String paths (not pathlib) and one label tuple per distinct label cell keep a
    million rows at a few hundred bytes each and a few seconds."""
    samples = []
    where = "row" if path.suffix.lower() in (".csv", ".tsv") else "line"
    base = str(path.parent)
    used = {columns.path, columns.label, columns.split}
    label_tuples: dict[str, tuple[str, ...]] = {}
    for line, row in _rows(path):
        origin = f"{path} {where} {line}"
        if not isinstance(row, dict) or not row.get(columns.path):
            raise DataError(f"{origin}: no {columns.path!r} value (columns: {list(row) if isinstance(row, dict) else row})")
        image = str(scalar(row[columns.path], columns.path, origin, "a file path"))
        if image.startswith("~"):
            image = os.path.expanduser(image)
        if not os.path.isabs(image):
            image = os.path.join(base, image)
        raw = row.get(columns.label)
        if isinstance(raw, list):
            labels = tuple(str(scalar(x, columns.label, origin, "a class name")).strip() for x in raw)
            labels = tuple(x for x in labels if x)
        elif raw is None:
            labels = ()
        else:
            text = str(scalar(raw, columns.label, origin, "a class name or a list of them"))
            labels = label_tuples.get(text)
            if labels is None:
                labels = label_tuples[text] = tuple(x.strip() for x in text.split(separator) if x.strip())
        split = split_name(row.get(columns.split), origin, columns.split)
        group = None
        if columns.group:
            if columns.group not in row:
                raise DataError(f"{origin}: no group column {columns.group!r} (columns: {list(row)})")
            group = str(scalar(row[columns.group], columns.group, origin, "a group key"))
        meta = {k: v for k, v in row.items() if k not in used and k is not None} if len(row) > len(used & row.keys()) else _NO_META
        samples.append(ImageLabel(image, labels, group, split, origin, meta))
    return samples


def scalar(value, key: str, where: str, what: str):
    """`value` when it is text, a number or a boolean (or None); a list or an object is an error naming
    `where` and the field `key` (it would otherwise become a path, label or group like "{'x': 1}")."""
    if isinstance(value, (list, tuple, dict)):
        raise DataError(f"{where}: field {key!r} must be {what}, got a {type(value).__name__} ({str(value)[:60]})")
    return value


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
    if path.is_dir():
        return samples  # every entry was listed; broken links are unreadable images, under data.bad_images
    problems = {s.path: file_problem(s.path) for s in samples}
    missing = [s for s in samples if problems[s.path]]
    if missing:
        shown = "; ".join(f"{s.origin}: {s.path} ({problems[s.path]})" for s in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} image file(s) are missing: {shown}{more}")
    return samples


def read_saved_dataset(folder: Path) -> tuple[list[dict], list[str], list[Optional[str]]]:
    """Rows of a `datasets` DatasetDict (or Dataset) saved with `save_to_disk`, e.g. by `mmtune data align`,
    or of a Parquet/Arrow file, with an origin (`folder[train] row 3`) and the split its part names
    (None for a single table). An `Image` cell reads as its file path."""
    from mmtune.data.formats_tables import open_parts

    rows, origins, splits = [], [], []
    base = str(folder if folder.is_dir() else folder.parent)
    for name, ds in open_parts(str(folder)).items():
        split = split_name(name, str(folder))
        images = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
        for i, row in enumerate(ds.data.table.to_pylist()):  # the stored values: Image cells undecoded
            for c in images:
                cell = row.get(c)
                if not isinstance(cell, dict):
                    continue
                path = cell.get("path")
                if path and (os.path.isfile(path) or os.path.isfile(os.path.join(base, path)) or not cell.get("bytes")):
                    row[c] = path
                else:  # embedded bytes (datasets keeps only the file's name beside them)
                    raise DataError(f"{folder} row {i}: Image column {c!r} holds image bytes, not a file this reader "
                                    "can open; save the images as files and store their paths (image "
                                    "classification reads the bytes)")
            rows.append(row)
            origins.append(f"{folder}[{name}] row {i}" if name else f"{folder} row {i}")
            splits.append(split)
    return rows, origins, splits
