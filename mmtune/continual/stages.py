"""Stage data: fixed splits, the leakage check, seeded replay manifests, the growing class list.

Only manifests are written (rows pointing at the original files): nothing is copied.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from mmtune.data.splits import add_split_column
from mmtune.errors import DataError
from mmtune.federated.partition import read_rows


def stage_rows(manifest: Path, split_ratios, seed: int, group_column: Optional[str], label_column: str = "label",
               label_separator: str = "|", stratify: bool = True) -> tuple[list[str], list[dict]]:
    """The stage manifest's rows with absolute paths and a fixed `split` column (the data module's rule)."""
    header, rows = read_rows(manifest)
    header = add_split_column(header, rows, split_ratios, seed, group_column, label_column, label_separator, stratify)
    for row in rows:
        if not Path(row["path"]).is_absolute():
            row["path"] = str((manifest.parent / row["path"]).resolve())
    return header, rows


def check_leakage(name: str, rows: list[dict], earlier_tests: dict[str, set[str]]) -> None:
    """Raises DataError when a stage's rows repeat an earlier stage's test samples (by image path)."""
    paths = {r["path"] for r in rows}
    for earlier, tests in earlier_tests.items():
        shared = sorted(paths & tests)
        if shared:
            raise DataError(f"continual stage {name} repeats {len(shared)} test sample(s) of stage {earlier} "
                            f"(e.g. {shared[0]}): a stage may not train or test on an earlier stage's test set")


def draw_replay(pool: list[dict], count: int, share: float, seed: int) -> list[dict]:
    """A seeded draw of earlier training rows: `count` of them, or `share` of the pool."""
    n = count if count > 0 else int(round(share * len(pool)))
    n = min(n, len(pool))
    if n <= 0:
        return []
    picked = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [{**pool[i], "split": "train"} for i in sorted(picked)]


def grown_classes(previous: list[str], rows: list[dict], label_column: str = "label") -> list[str]:
    """The class list after a stage: earlier classes in their order, new ones appended (sorted)."""
    seen = {r[label_column] for r in rows}
    return [*previous, *sorted(seen - set(previous))]


def write_manifest(path: Path, header: list[str], rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
