"""Per-sample evaluation records: the one seam between the tasks and everything that judges them.

Every task's test step hands out one `SampleRecord` per test sample (what the sample is, what it
should be, what the model said, the raw scores and the sample's metadata columns). Bootstrap
intervals, baseline comparisons, subgroup audits, calibration, reports and export checks read these
records and the run directory's files; none of them reaches into a task, and no task grows a branch
for any of them. The records are kept on disk (`records/<stage>.jsonl` in the run directory) so an
interval can be recomputed exactly, later, without the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmtune.errors import DataError
from mmtune.files import atomic_write

FORMAT_VERSION = 1

# What kind of predictions a record set holds: it decides which metrics can be computed from it.
KINDS = ("classification", "generation", "language_model", "retrieval", "preference")


@dataclass
class SampleRecord:
    """One evaluated sample.

    Attributes:
        id: stable sample id (the manifest row, the dataset row); a baseline and a tuned model scored
            on the same data have the same ids, which is what pairs them in a paired bootstrap.
        target: what the sample should be: class indices (classification), the reference text
            (generation), None where the task has no single target.
        prediction: what the model said: predicted class indices, the generated text.
        scores: raw per-class scores (classification logits, before any softmax or temperature).
        stats: per-sample numbers the metrics are built from (`loss_sum`, `tokens`, `rank`, ...).
        meta: the sample's metadata columns (group, subgroup keys, image path, answer type, ...).
    """

    id: str
    target: Any = None
    prediction: Any = None
    scores: Optional[list[float]] = None
    stats: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordSet:
    """The records of one evaluation, with what is needed to read them.

    Attributes:
        kind: one of `KINDS`.
        records: one per sample, in the data's order.
        info: task facts the metrics need (`classes`, `multi_label`, `thresholds`, `temperature`,
            `recall_at`, the checkpoint, the split).
    """

    kind: str
    records: list[SampleRecord]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown record kind {self.kind!r}; known: {', '.join(KINDS)}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def meta_columns(self) -> list[str]:
        """Every metadata column that any record has, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r.meta))
        return list(seen)


def _plain(value: Any) -> Any:
    """JSON-safe values: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_records(path: Path, records: RecordSet) -> Path:
    """Writes a record set as JSONL (a header line, then one record a line), atomically: a kill
    during the write leaves the previous file whole."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as f:
        header = {"mmtune_records": FORMAT_VERSION, "kind": records.kind, "count": len(records.records),
                  "info": _plain(records.info)}
        f.write(json.dumps(header) + "\n")
        for r in records.records:
            f.write(json.dumps(_plain(asdict(r)), ensure_ascii=False) + "\n")
    return path


def read_records(path: Path) -> RecordSet:
    """Reads a file written by `write_records`.

    Raises:
        DataError: the file is missing, not a record file, or cut short.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no evaluation records at {path} (run `mmtune test` first)")
    with path.open(encoding="utf-8") as f:
        try:
            header = json.loads(f.readline() or "null")
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("mmtune_records") != FORMAT_VERSION:
            raise DataError(f"{path}: not an mmtune records file (version {FORMAT_VERSION})")
        records = []
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                records.append(SampleRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise DataError(f"{path} line {line_no}: not a sample record ({err})") from None
    if len(records) != header.get("count", len(records)):
        raise DataError(f"{path}: holds {len(records)} records, its header says {header.get('count')} (cut short?)")
    return RecordSet(header["kind"], records, header.get("info") or {})
