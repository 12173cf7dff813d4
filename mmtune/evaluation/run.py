"""What `mmtune test` and `mmtune evaluate` do after the task has scored the test set: intervals,
the baseline comparison, and their place in the run directory (`metrics.json`, `evaluation/`)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

from mmtune.evaluation.bootstrap import Comparison, Interval, compare, intervals
from mmtune.evaluation.calibration import calibration_entry
from mmtune.evaluation.spec import EvaluationSpec
from mmtune.files import read_json, update_json, write_text_atomic
from mmtune.metrics.records import RecordSet, write_records

log = logging.getLogger("mmtune")


def data_summary(records: RecordSet) -> dict:
    """The test set's size and, for classification, how many samples each class has."""
    out: dict = {"samples": len(records)}
    if records.kind == "classification":
        classes = records.info.get("classes") or []
        counts = Counter(c for r in records.records for c in (r.target or []))
        out["class_counts"] = {name: counts.get(i, 0) for i, name in enumerate(classes)}
    return out


def summarize_test(run_dir: Path, records: RecordSet, spec: EvaluationSpec, section: str = "test") -> dict:
    """Adds the test set's size, class counts and every metric's bootstrap interval to the `section`
    entry of `metrics.json` (and, when `spec.subgroups` names columns, their subgroup audits under
    `subgroups`), and writes the run report. Returns the entry.

    A calibrated classifier's records also give the top-level `calibration` entry (what was fitted on
    validation, and the test set's calibration error before and after the temperature)."""
    path = Path(run_dir) / "metrics.json"
    entry = dict((read_json(path, {}) or {}).get(section) or {})
    entry.update(data_summary(records))
    entry["intervals"] = {name: iv.as_dict() for name, iv in intervals(records, spec.bootstrap).items()}
    entry["bootstrap"] = {"resamples": spec.bootstrap.resamples, "confidence": spec.bootstrap.confidence,
                          "seed": spec.bootstrap.seed}
    update_json(path, section, entry)
    calibration = calibration_entry(records)
    if calibration is not None:
        update_json(path, "calibration", calibration)
    if spec.subgroups:  # after the intervals are saved: a misnamed column loses no result
        from mmtune.evaluation.subgroups import audit  # it imports this module's tables

        entry["subgroups"] = audit(records, spec)
        update_json(path, section, entry)
    return entry


def compare_records(run_dir: Path, tuned: RecordSet, baseline: RecordSet, baseline_name: str,
                    spec: EvaluationSpec) -> dict[str, Comparison]:
    """Paired comparison of the two record sets (per subgroup too, when `spec.subgroups` names
    columns), written to `evaluation/` (both record sets and `comparison.json`) and to the `evaluate`
    entry of `metrics.json`."""
    result = compare(tuned, baseline, spec.bootstrap)
    folder = Path(run_dir) / "evaluation"
    write_records(folder / "tuned.jsonl", tuned)
    write_records(folder / "baseline.jsonl", baseline)
    entry = {"baseline": baseline_name, "tuned": tuned.info.get("ckpt_path"), "samples": len(tuned),
             "bootstrap": {"resamples": spec.bootstrap.resamples, "confidence": spec.bootstrap.confidence,
                           "seed": spec.bootstrap.seed},
             "comparison": {name: c.as_dict() for name, c in result.items()}}
    if spec.subgroups:
        from mmtune.evaluation.subgroups import compare_subgroups

        entry["subgroups"] = compare_subgroups(tuned, baseline, spec)
    write_text_atomic(folder / "comparison.json", json.dumps(entry, indent=2))
    update_json(Path(run_dir) / "metrics.json", "evaluate", entry)
    return result


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def interval_table(values: dict[str, Interval], confidence: float, limit: Optional[int] = None) -> str:
    """The intervals as an aligned text table for the terminal."""
    pct = f"{confidence:.0%} CI"
    rows = [(name, _fmt(iv.value), f"[{_fmt(iv.ci_low)}, {_fmt(iv.ci_high)}]") for name, iv in values.items()]
    rows = rows[:limit] if limit else rows
    return _table(("metric", "value", pct), rows)


def comparison_table(values: dict[str, Comparison], confidence: float) -> str:
    """The comparison as an aligned text table: baseline, tuned, difference, its interval, verdict."""
    pct = f"{confidence:.0%} CI of difference"
    rows = [(name, _fmt(c.baseline), _fmt(c.tuned), _fmt(c.difference), f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]",
             c.verdict) for name, c in values.items()]
    return _table(("metric", "baseline", "tuned", "difference", pct, "verdict"), rows)


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def headline(values: dict, limit: int = 12) -> dict:
    """The overall metrics first (no per-class `name/class` entries), for the terminal."""
    overall = {k: v for k, v in values.items() if "/" not in k}
    return dict(list(overall.items())[:limit])
