"""The aligner's report: what matched, what did not and why, what was scrubbed, how it was split.

A plain JSON-able dict, so that it can be written next to the data set, diffed between runs and read
without mmtune; `format_summary` turns it into the few lines printed on the terminal. Keys:

- `images_source`, `texts_source`, `key`, `mode`: what was aligned, and how;
- `images`, `texts`: how many were read; `matched`: `pairs`, `images`, `texts` that share a key;
- `unmatched_images`, `unmatched_texts`: `count` and the first `examples` (`where`, `key`);
- `checks`: the checks that ran; `dropped`: per reason (`missing_image`, `unreadable_image`,
  `duplicate_image`, `empty_text`, `too_long`, and `no_images_left`: texts whose every image was dropped) the `count` of
  images or texts (`unit`) with the problem and the first `examples` (`where`, `detail`);
- `pii`: replacements per kind (None when scrubbing is off);
- `rows`: rows written; `columns`: their columns;
- `splits`: `rows` and distinct `groups` per split; `groups_in_several_splits`: groups found in more
  than one split (only possible with a source's own split column).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from mmtune.data.splits import SPLIT_NAMES

REPORT_FILE = "align_report.json"


def listing(indices: Sequence[int], describe: Callable[[int], dict], limit: int) -> dict:
    """{"count": n, "examples": [first `limit` items described]} for unmatched items."""
    return {"count": len(indices), "examples": [describe(i) for i in indices[:limit]]}


def dropped_entry(found: dict[int, str], unit: str, where: Callable[[int], str], limit: int) -> dict:
    """One reason's entry: how many images or texts had it, and the first `limit` with their details."""
    return {"count": len(found), "unit": unit,
            "examples": [{"where": where(i), "detail": detail} for i, detail in list(found.items())[:limit]]}


def split_stats(splits: Sequence[str], groups: Sequence[str]) -> tuple[dict, int]:
    """Rows and distinct groups per split, and how many groups appear in more than one split (always 0
    when the aligner assigned the splits; a source's own split column may mix them)."""
    rows = Counter(splits)
    placed = set(zip(splits, groups))  # distinct (split, group)
    groups_in = Counter(s for s, _ in placed)
    splits_per_group = Counter(g for _, g in placed)
    stats = {s: {"rows": rows.get(s, 0), "groups": groups_in.get(s, 0)} for s in SPLIT_NAMES}
    return stats, sum(n > 1 for n in splits_per_group.values())


def write_report(report: dict, path: Path) -> Path:
    """Writes the report as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _n(value: int) -> str:
    return f"{value:,}"


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}{'' if n == 1 else 's'}"


def _join(parts: Iterable[str]) -> str:
    return ", ".join(parts) or "none"


def format_summary(report: dict, out: Optional[str] = None) -> str:
    """A short human summary of `report` (a few lines for the terminal)."""
    unit = "samples" if report["mode"] == "list" else "pairs"
    m = report["matched"]
    lines = [
        f"aligned {_n(report['rows'])} {unit} from {_n(report['images'])} images and {_n(report['texts'])} texts"
        + (f" -> {out}" if out else ""),
        f"  matched {_count(m['pairs'], 'pair')} ({_count(m['images'], 'image')}, {_count(m['texts'], 'text')}); "
        f"unmatched {_count(report['unmatched_images']['count'], 'image')}, "
        f"{_count(report['unmatched_texts']['count'], 'text')}",
        "  dropped: " + _join(f"{k} {_count(v['count'], v['unit'])}" for k, v in report["dropped"].items() if v["count"]),
    ]
    if report.get("pii") is not None:
        lines.append("  pii replaced: " + _join(f"{_n(v)} {k}" for k, v in report["pii"].items()))
    splits = report["splits"]
    lines.append("  splits: " + ", ".join(f"{s} {_count(v['rows'], 'row')} / {_count(v['groups'], 'group')}"
                                          for s, v in splits.items()))
    if report.get("groups_in_several_splits"):
        lines.append(f"  warning: {report['groups_in_several_splits']} group(s) appear in several splits of the source's split column")
    return "\n".join(lines)
