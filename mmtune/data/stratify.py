"""Splits stratified by label: each class falls into train/val/test in the split's shares.

Three cases, each the usual method for it:
- one label per item, no groups: per class, a seeded shuffle cut by shares (largest remainder), so a
  class's count in every split is within one item of its target; the leftover items of a class go to
  the splits furthest below their total size, so split sizes stay on target too;
- several labels per item (multi-label), no groups: iterative stratification (Sechidis et al. 2011)
  into the three splits at once;
- groups (patient, lot): whole groups, largest first, each to the split whose class counts it brings
  closest to their targets (the greedy of scikit-learn's `StratifiedGroupKFold`). It is written here
  because `StratifiedGroupKFold` makes k equal folds, not 70/15/15 shares.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _single_label(labels: Sequence[str], shares: list[float], seed: int) -> list[int]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    rng = random.Random(seed)
    out = [0] * len(labels)
    totals = [0.0, 0.0, 0.0]
    targets = [share * len(labels) for share in shares]
    for label in sorted(members):
        items = members[label]
        rng.shuffle(items)
        exact = [share * len(items) for share in shares]
        counts = [int(x) for x in exact]
        # leftovers: to the splits with a fractional claim, furthest below their total target first
        claims = [s for s in range(3) if exact[s] > counts[s]]
        claims.sort(key=lambda s: (-(targets[s] - totals[s] - counts[s]), -(exact[s] - counts[s])))
        for s in claims[:len(items) - sum(counts)]:
            counts[s] += 1
        start = 0
        for s in range(3):
            for i in items[start:start + counts[s]]:
                out[i] = s
            start += counts[s]
            totals[s] += counts[s]
    return out


def _multi_label(labels: Sequence[Sequence[str]], shares: list[float], seed: int) -> list[int]:
    """Iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011, Algorithm 1) into the three splits
    at once: the rarest label still unplaced goes first, each of its items to the split that lacks the
    most of that label (then the split furthest below its size, then a seeded coin).

    Written here, not taken from `iterative-stratification`: that wheel installs a top-level `tests`
    package into site-packages, which shadows the `tests` package of whoever installs it (ours too).
    """
    classes = sorted({c for row in labels for c in row})
    index = {c: j for j, c in enumerate(classes)}
    n = len(labels)
    y = np.zeros((n, len(classes)), dtype=bool)
    for i, row in enumerate(labels):
        for c in row:
            y[i, index[c]] = True
    rng = np.random.default_rng(seed)
    r = np.asarray(shares, dtype=float)
    size_need = r * n  # items each split still wants
    label_need = np.outer(r, y.sum(0))  # [split, class]: positives each split still wants
    out = np.full(n, -1)
    open_splits = r > 0

    def place(i: int, by: np.ndarray) -> None:
        """Item i to the open split with the largest `by`, then the largest size need, then by chance."""
        key = np.where(open_splits, by, -np.inf)
        best = np.flatnonzero(key == key.max())
        if len(best) > 1:
            sizes = size_need[best]
            best = best[sizes == sizes.max()]
        s = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        out[i] = s
        size_need[s] -= 1
        label_need[s] -= y[i]

    unplaced = y.copy()
    while unplaced.any():
        counts = unplaced.sum(0)
        rarest = np.flatnonzero(counts == counts[counts > 0].min())
        label = int(rarest[rng.integers(len(rarest))])
        items = np.flatnonzero(unplaced[:, label])
        for i in rng.permutation(items):
            place(int(i), label_need[:, label])
        unplaced[items] = False
    for i in rng.permutation(np.flatnonzero(out < 0)):  # items with no positive label: by size alone
        place(int(i), size_need)
    return out.tolist()


def _grouped(labels: Sequence[Sequence[str]], groups: dict[str, list[int]], shares: list[float],
             seed: int) -> dict[str, int]:
    vector = {key: Counter(c for i in items for c in (labels[i] or ("",))) for key, items in groups.items()}
    totals = Counter(c for counts in vector.values() for c in counts.elements())
    targets = [{c: share * n for c, n in totals.items()} for share in shares]
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda k: -len(groups[k]))  # stable: equal sizes keep the seeded order
    counts = [Counter() for _ in range(3)]
    placed = [0, 0, 0]
    out = {}
    for key in keys:
        size = len(groups[key])

        def cost(s: int) -> float:
            # how much farther (or closer) this split's class counts get from their targets, relative to
            # the target (a small class matters as much as a large one), plus the split's size
            change = sum(((counts[s][c] + n - targets[s][c]) ** 2 - (counts[s][c] - targets[s][c]) ** 2)
                         / max(targets[s][c], 1.0) for c, n in vector[key].items())
            goal = shares[s] * (sum(placed) + size)
            return change + ((placed[s] + size - goal) ** 2 - (placed[s] - goal) ** 2) / max(goal, 1.0)

        s = min((s for s in range(3) if shares[s] > 0), key=lambda s: (cost(s), s))
        counts[s].update(vector[key])
        placed[s] += size
        out[key] = s
    return out


def stratified_splits(labels: Sequence[Sequence[str]], shares: list[float], seed: int,
                      groups: Optional[dict[str, list[int]]] = None) -> list[str]:
    """Split name of each item, stratified by `labels` (a tuple of class names per item).

    Args:
        labels: the classes of each item (one for multi-class; any number for multi-label).
        shares: train, val, test shares, summing to 1.
        seed: the same inputs and seed always give the same splits.
        groups: {group key: item positions} when groups must stay whole.
    """
    if groups is not None:
        where = _grouped(labels, groups, shares, seed)
        out = [""] * len(labels)
        for key, items in groups.items():
            for i in items:
                out[i] = SPLITS[where[key]]
        return out
    if any(len(row) != 1 for row in labels):
        return [SPLITS[s] for s in _multi_label(labels, shares, seed)]
    return [SPLITS[s] for s in _single_label([row[0] for row in labels], shares, seed)]


def missing_from_splits(labels_by_split: dict[str, Sequence[Sequence[str]]], classes: Sequence[str],
                        shares: dict[str, float]) -> list[str]:
    """Warnings for classes too small to appear in every split that has a share (one line per class)."""
    present = {name: {c for row in rows for c in row} for name, rows in labels_by_split.items()}
    lines = []
    for c in classes:
        lacking = [name for name, share in shares.items() if share > 0 and c not in present.get(name, set())]
        if lacking:
            total = sum(1 for rows in labels_by_split.values() for row in rows if c in row)
            lines.append(f"class {c!r} ({total} item(s)) is not in the {' and '.join(lacking)} split(s): too small to "
                         "appear in every split; its metrics there are undefined (add images or adjust data.split)")
    return lines
