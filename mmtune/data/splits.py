"""Deterministic, seeded train/val/test splits that keep each group (patient, lot) in one split."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Optional, Sequence

from mmtune.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def assign_splits(
    n: int, ratios: Sequence[float], seed: int, groups: Optional[Sequence[Optional[str]]] = None,
    labels: Optional[Sequence[Sequence[str]]] = None,
) -> list[str]:
    """Assigns each of `n` items to train/val/test.

    Whole groups are assigned (items without a group are their own group). With `labels` the split is
    stratified (`mmtune.data.stratify`): every class falls into the splits in their shares. Without,
    groups are shuffled with `seed`, then each goes to the split furthest below its target share of
    items, so splits come out close to `ratios` even when groups differ in size.

    Args:
        n: number of items.
        ratios: train, val, test shares (normalized; a zero share gets nothing).
        seed: shuffle seed; the same inputs always give the same assignment.
        groups: group key of each item, or None.
        labels: the class names of each item, to stratify by (None: not stratified).

    Returns:
        The split name of each item.
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {list(ratios)}")
    total = float(sum(ratios))
    shares = [r / total for r in ratios]
    members: dict[str, list[int]] = defaultdict(list)
    if labels is not None and n:
        from mmtune.data.stratify import stratified_splits

        if len(labels) != n:
            raise ValueError(f"{len(labels)} label rows for {n} items")
        if groups is None:
            return stratified_splits(labels, shares, seed)
    for i in range(n):
        key = groups[i] if groups is not None and groups[i] not in (None, "") else f"\0item{i}"
        members[key].append(i)
    if labels is not None and n:
        return stratified_splits(labels, shares, seed, members)
    keys = sorted(members)
    random.Random(seed).shuffle(keys)
    counts = [0, 0, 0]
    out = [""] * n
    for key in keys:
        size = len(members[key])
        # deficit of each split after taking this group; pick the one furthest below target
        placed = sum(counts) + size
        deficits = [shares[s] * placed - counts[s] if shares[s] > 0 else float("-inf") for s in range(3)]
        s = max(range(3), key=lambda j: deficits[j])
        counts[s] += size
        for i in members[key]:
            out[i] = SPLIT_NAMES[s]
    return out


def split_name(value, where: str, column: str = "split") -> Optional[str]:
    """The canonical split (`train`, `val`, `test`) a source names, or None when it names none.

    Raises:
        DataError: naming `where` (and the `column`, for a list or an object), for a value that is not
            a split (or one of its aliases).
    """
    if isinstance(value, (list, tuple, dict)):
        raise DataError(f"{where}: field {column!r} must be a split name (train, val or test), got a "
                        f"{type(value).__name__}")
    if value is None or str(value).strip() == "":
        return None
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise DataError(f"{where}: unknown split {value!r} (use train, val or test)")
    return name


def place_in_splits(rows: list, extra: dict[str, list], ratios: Sequence[float], seed: int, grouped: bool,
                    source: str) -> list:
    """Gives every row of a data module a split and returns the rows of all splits.

    `rows` (from `path`) keep the split they name, or, when none names one, get one by `ratios`
    (whole groups together when `grouped`); a split that comes from its own file (`extra`: split name
    -> rows) gets no share of `rows`. Rows carry `split`, `group` and an `origin` or `id`.

    Raises:
        DataError: some rows name a split and others do not.
    """
    named = [r for r in rows if r.split]
    if named and len(named) != len(rows):
        lacking = next(r for r in rows if not r.split)
        where = getattr(lacking, "origin", "") or getattr(lacking, "id", "")
        raise DataError(f"some rows of {source} name a split and some do not (e.g. {where}); "
                        "give every row a split or none")
    for name, more in extra.items():
        for r in more:
            r.split = name
    if not named:
        shares = [0.0 if name in extra else r for name, r in zip(SPLIT_NAMES, ratios)]
        groups = [r.group for r in rows] if grouped else None
        for r, name in zip(rows, assign_splits(len(rows), shares, seed, groups)):
            r.split = name
    return [r for r in rows if r.split not in extra] + [r for more in extra.values() for r in more]


def add_split_column(header: list[str], rows: list[dict], ratios: Sequence[float], seed: int,
                     group_column: Optional[str] = None, label_column: Optional[str] = "label",
                     label_separator: str = "|", stratify: bool = True) -> list[str]:
    """Gives manifest rows (dicts) a fixed `split` column by the classification data module's own rule
    (whole groups; stratified by label unless `stratify` is off), unless they already name one, and
    returns the header. Used where rows must be split before a data module sees them (federated sites,
    continual stages), so that the split they fix is the one the data module would have made."""
    if "split" in header:
        return header
    groups = [r.get(group_column) for r in rows] if group_column else None
    labels = None
    if stratify and label_column and rows and label_column in rows[0]:
        labels = [tuple(p.strip() for p in str(r.get(label_column) or "").split(label_separator) if p.strip())
                  for r in rows]
    for row, name in zip(rows, assign_splits(len(rows), ratios, seed, groups, labels)):
        row["split"] = name
    return [*header, "split"]
