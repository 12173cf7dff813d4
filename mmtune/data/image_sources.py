"""Which reader a classification source needs, by what it is: an image folder or CSV/JSONL manifest,
a NumPy `.npz`/`.npy`, a Hugging Face `datasets` folder or Parquet/Arrow file, or WebDataset tar
shards; DICOM files (in a folder or named by a manifest) become one sample per frame. Every reader
returns the same `ImageLabel` samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mmtune.data.readers import ManifestColumns, read_image_labels
from mmtune.data.samples import ImageLabel


@dataclass
class SourceOptions:
    """How to read a source (the data module's settings that concern reading).

    Attributes:
        columns: manifest / table column names (`columns.path` is a table's image column when the
            table has it, else `image`).
        separator: multi-label separator in manifest cells.
        class_names: names for integer labels of NumPy arrays (index -> name).
        dicom_group: `PatientID` or `StudyInstanceUID`: DICOM tag whose value groups the split.
        dicom_window: (center, width) for every DICOM image instead of the file's own window.
        anonymize_ids: DICOM ids become one-way hashes and stay out of everything written.
    """

    columns: ManifestColumns
    separator: str = "|"
    class_names: Optional[list[str]] = None
    dicom_group: Optional[str] = None
    dicom_window: Optional[tuple[float, float]] = None
    anonymize_ids: bool = True


def read_source(source: str, options: SourceOptions, labeled: bool = True) -> tuple[list[ImageLabel], dict[str, str]]:
    """The samples of `source` and {origin: reason} of the DICOM files that cannot be decoded (for the
    bad-image policy); `labeled` False reads images to predict (a table may lack its label column)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        from mmtune.data.formats_numpy import read_numpy

        return read_numpy(str(path), options.class_names), {}
    from mmtune.data.formats_tables import is_table_source

    if path.exists() and is_table_source(path):
        from mmtune.data.formats_tables import open_parts, read_table

        names = next(iter(open_parts(str(path)).values())).column_names
        image = options.columns.path if options.columns.path in names else "image"
        return read_table(str(path), image, options.columns.label, labeled), {}
    from mmtune.data.formats_shards import is_shard_source, read_shards

    if is_shard_source(path):
        return read_shards(str(path)), {}
    samples = read_image_labels(source, options.columns, options.separator)
    if not any(s.path.lower().endswith(".dcm") for s in samples):
        return samples, {}
    from mmtune.data.formats_dicom import expand_dicom

    return expand_dicom(samples, options.dicom_group, options.anonymize_ids, options.dicom_window)
