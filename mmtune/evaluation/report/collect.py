"""Reads a run directory into plain data for the report: only files the verbs wrote there, never a task.

Every file is optional (a run with only a fit has no records and no test entry); a file that exists
but cannot be read is not fatal either: its problem is kept (`RunData.problems`) and shown in the
report, so one damaged file never hides what the others hold.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mmtune.errors import ConfigError, MMTuneError
from mmtune.metrics.records import RecordSet, read_records

# Any of these marks a folder as a run directory (`runs/<name>/version_N/`).
RUN_FILES = ("config.yaml", "metrics.json", "metrics.csv", "records", "checkpoints", "hparams.yaml")
SKIPPED_FILES = ("skipped_images.csv", "skipped_pairs.csv", "skipped_samples.csv")


@dataclass
class Confusion:
    """A confusion matrix: rows are true classes; `columns` are predicted classes (multi-class) or
    tn/fp/fn/tp (multi-label, one row per label); `shares` is each row as a share of its true class."""

    rows: list[str]
    columns: list[str]
    counts: list[list[float]]
    shares: list[list[float]]
    source: str


@dataclass
class Skipped:
    """The rows a data module dropped, from one `skipped_*.csv`: (key, reason) pairs."""

    file: str
    key: str
    rows: list[tuple[str, str]]


@dataclass
class RunData:
    """What a run directory holds, as plain values (None where a file is missing)."""

    run_dir: Path
    config: Optional[dict] = None
    metrics: dict = field(default_factory=dict)
    curves: list[dict] = field(default_factory=list)
    records: Optional[RecordSet] = None
    baseline_records: Optional[RecordSet] = None
    comparison: Optional[dict] = None
    skipped: list[Skipped] = field(default_factory=list)
    data_stats: Optional[dict] = None
    confusion: Optional[Confusion] = None
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """`<run name> · version N` for `runs/<name>/version_N`, else the folder's name."""
        number = re.fullmatch(r"version_(\d+)", self.run_dir.name)
        return f"{self.run_dir.parent.name} · version {number.group(1)}" if number else self.run_dir.name

    @property
    def test(self) -> dict:
        return self.metrics.get("test") or {}

    @property
    def fit(self) -> dict:
        return self.metrics.get("fit") or {}

    @property
    def kind(self) -> Optional[str]:
        return self.records.kind if self.records is not None else None


def _read(run: RunData, path: Path, reader) -> Any:
    """`reader(path)`, or None when the file is missing; a damaged file becomes a problem, not an error."""
    if not path.exists():
        return None
    try:
        return reader(path)
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError, MMTuneError) as err:
        run.problems.append(f"{path.name}: could not be read ({type(err).__name__}: {err})"[:300])
        return None


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _yaml(path: Path) -> Any:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data is not None and not isinstance(data, dict):
        raise ValueError("not a mapping")
    return data


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_curves(path: Path) -> list[dict]:
    """The CSVLogger's `metrics.csv` as rows of numbers: every logged value with its `epoch` and
    `step` (one row per logging call, so most columns are empty in most rows)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {k: _number(v) for k, v in raw.items() if k is not None and _number(v) is not None}
            if row:
                rows.append(row)
    return rows


def read_skipped(path: Path) -> Skipped:
    """A `skipped_*.csv` of `mmtune.data.bad_rows.write_skipped`: a key column, then `reason`."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or ["row", "reason"]
        rows = [(r[0], r[1] if len(r) > 1 else "") for r in reader if r]
    return Skipped(path.name, header[0], rows)


def read_confusion(counts_path: Path) -> Confusion:
    """`confusion_matrix.csv` (counts) and, beside it, `confusion_matrix_normalized.csv` (shares),
    as written by `mmtune.metrics.classification.write_confusion_matrix`."""
    def grid(path: Path) -> tuple[list[str], list[str], list[list[float]]]:
        with path.open(newline="", encoding="utf-8") as f:
            table = [r for r in csv.reader(f) if r]
        if not table or len(table[0]) < 2:
            raise ValueError("no matrix")
        values = [[float(v) for v in r[1:]] for r in table[1:]]
        return [r[0] for r in table[1:]], table[0][1:], values

    rows, columns, counts = grid(counts_path)
    shares_path = counts_path.with_name("confusion_matrix_normalized.csv")
    if shares_path.is_file():
        shares = grid(shares_path)[2]
    else:
        shares = _row_shares(counts, multi_label=columns == ["tn", "fp", "fn", "tp"])
    return Confusion(rows, columns, counts, shares, counts_path.name)


def _row_shares(counts: list[list[float]], multi_label: bool) -> list[list[float]]:
    out = []
    for row in counts:
        if multi_label:  # tn, fp as shares of the negatives; fn, tp of the positives
            neg, pos = row[0] + row[1], row[2] + row[3]
            out.append([row[0] / neg if neg else 0.0, row[1] / neg if neg else 0.0,
                        row[2] / pos if pos else 0.0, row[3] / pos if pos else 0.0])
        else:
            total = sum(row)
            out.append([v / total if total else 0.0 for v in row])
    return out


def confusion_from_records(records: RecordSet) -> Optional[Confusion]:
    """The test confusion matrix recomputed from classification records (their decisions)."""
    classes = list(records.info.get("classes") or [])
    if records.kind != "classification" or not classes:
        return None
    k = len(classes)
    if records.info.get("multi_label"):
        counts = [[0.0] * 4 for _ in classes]
        for r in records.records:
            t, p = set(r.target or []), set(r.prediction or [])
            for c in range(k):
                counts[c][2 * (c in t) + (c in p)] += 1  # tn, fp, fn, tp
        return Confusion(classes, ["tn", "fp", "fn", "tp"], counts, _row_shares(counts, True), "records/test.jsonl")
    counts = [[0.0] * k for _ in classes]
    for r in records.records:
        if r.target and r.prediction:
            counts[r.target[0]][r.prediction[0]] += 1
    return Confusion(classes, classes, counts, _row_shares(counts, False), "records/test.jsonl")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def collect(run_dir: Path) -> RunData:
    """Reads everything the report can show from a run directory.

    Raises:
        ConfigError: `run_dir` is not a folder, or holds none of the files a run writes.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"mmtune report: {path} is not a folder (give a run directory such as runs/<name>/version_0)")
    if not is_run_dir(path):
        raise ConfigError(f"mmtune report: {path} is not a run directory: it has none of {', '.join(RUN_FILES)} "
                          "(give a folder such as runs/<name>/version_0)")
    run = RunData(path)
    run.config = _read(run, path / "config.yaml", _yaml)
    metrics = _read(run, path / "metrics.json", _json)
    if metrics is not None and not isinstance(metrics, dict):
        run.problems.append("metrics.json: not a JSON object")
        metrics = None
    run.metrics = metrics or {}
    run.curves = _read(run, path / "metrics.csv", read_curves) or []
    run.records = _read(run, path / "records" / "test.jsonl", read_records)
    run.baseline_records = _read(run, path / "evaluation" / "baseline.jsonl", read_records)
    run.comparison = run.metrics.get("evaluate") or _read(run, path / "evaluation" / "comparison.json", _json)
    run.skipped = [s for name in SKIPPED_FILES if (s := _read(run, path / name, read_skipped)) is not None]
    run.data_stats = _read(run, path / "data_stats.json", _json)
    run.confusion = _read(run, path / "confusion_matrix.csv", read_confusion)
    if run.confusion is None and run.records is not None:
        run.confusion = confusion_from_records(run.records)
    return run
