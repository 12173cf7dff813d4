"""Hugging Face `datasets` data as classification samples: a folder saved with `save_to_disk` (a
Dataset or a DatasetDict, whose parts become the splits), or Parquet / Arrow files.

Images are an `Image` column (bytes, or a path) or a column of paths; labels a `ClassLabel` (its
names are used), strings, integers, or lists of them (multi-label). Setup reads only the label column;
each worker opens the table itself (memory-mapped for saved folders and Arrow files) and decodes a
cell when a batch needs it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mmtune.data.samples import ImageLabel
from mmtune.data.splits import split_name
from mmtune.data.stored import StoredImage, opened
from mmtune.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")


def is_table_source(path: Path) -> bool:
    """A saved `datasets` folder, or a Parquet/Arrow file."""
    if path.is_dir():
        return any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    return path.suffix.lower() in TABLE_SUFFIXES


def open_parts(source: str) -> dict[Optional[str], Any]:
    """{part name (None for a single table): `datasets.Dataset`} of a folder, Parquet or Arrow file,
    without a copy into the `datasets` cache."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
        if path.suffix.lower() == ".arrow":
            return {None: datasets.Dataset.from_file(str(path))}
        import pyarrow.parquet as pq

        return {None: datasets.Dataset(pq.read_table(str(path)))}
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk, nor a Parquet/Arrow file ({err})") from None


def _names(feature, values: list) -> list[tuple[str, ...]]:
    """Label cells -> class-name tuples (`ClassLabel` ids become their names)."""
    import datasets

    inner = getattr(feature, "feature", None)
    if isinstance(feature, (list, datasets.Sequence)) or type(feature).__name__ == "List":
        inner = feature[0] if isinstance(feature, list) else inner
    else:
        inner = None

    def one(v, f) -> str:
        if isinstance(f, datasets.ClassLabel) and isinstance(v, int):
            return f.int2str(v)
        if isinstance(v, (dict, bytes)):
            raise DataError(f"a label must be a class name or index, got a {type(v).__name__}")
        return str(v)

    out = []
    for v in values:
        if v is None:
            out.append(())
        elif isinstance(v, (list, tuple)):
            out.append(tuple(one(x, inner) for x in v))
        else:
            out.append((one(v, feature),))
    return out


def read_table(source: str, image_column: str, label_column: str, labeled: bool = True) -> list[ImageLabel]:
    """Samples of every part of a saved `datasets` folder, or of a Parquet/Arrow file (without
    `labeled`, images to predict: the label column may be missing).

    Raises:
        DataError: a named column is missing (listing the columns the data has), or a label cell is
            not a class name or index.
    """
    path = Path(source).expanduser()
    samples = []
    for part, ds in open_parts(str(path)).items():
        where = f"{path}[{part}]" if part else str(path)
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if image_column in missing or (label_column in missing and labeled):
            raise DataError(f"{where}: no column {missing[0]!r} (its columns: {ds.column_names}); "
                            "set data.path_column / data.label_column")
        labels = ([()] * len(ds) if label_column in missing else
                  _names(ds.features[label_column], ds.data.table.column(label_column).to_pylist()))
        split = split_name(part, where)
        key = f"{part or ''}/{image_column}"
        for i, row in enumerate(labels):
            samples.append(ImageLabel(f"{where} row {i}", row, None, split, f"{where} row {i}",
                                      image=StoredImage("table", str(path), key, i)))
    return samples


def image_cell(ref: StoredImage) -> Image.Image:
    """The image in one cell: `Image` feature bytes, or a path (relative to the data's folder)."""
    part, _, column = ref.key.partition("/")

    def column_of() -> Any:
        return open_parts(ref.file)[part or None].data.table.column(column)

    value = opened("table", ref.file, ref.key, column_of)[ref.index].as_py()
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and value:
        image = Path(value).expanduser()
        base = Path(ref.file) if Path(ref.file).is_dir() else Path(ref.file).parent
        return Image.open(image if image.is_absolute() else base / image)
    raise DataError(f"{ref.file} [{ref.key} row {ref.index}]: no image (a {type(value).__name__})")
