"""Standard samples that readers produce and data modules consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(slots=True)  # no per-instance __dict__: a million samples are ~100 MB smaller
class ImageLabel:
    """One image with zero or more labels.

    Attributes:
        path: absolute image path.
        labels: class names (one for multi-class; any number for multi-label; empty when unlabeled).
        group: group key (patient, study, lot) that must not cross splits.
        split: split named by the source (`train`, `val`, `test`), if any.
        origin: where it came from, for error messages (`manifest.csv row 12`).
        meta: the manifest's other columns (sex, age band, site, scanner, ...), for subgroup audits.
        image: where the image lives when it is not a file of its own (an array row, a table cell, a
            DICOM frame, a shard member; `mmtune.data.stored.StoredImage`); `path` then names it.
    """

    path: str
    labels: tuple[str, ...]
    group: Optional[str] = None
    split: Optional[str] = None
    origin: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image: Optional[Any] = None
