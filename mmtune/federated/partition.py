"""One labeled manifest split into simulated sites: by a column (a real site, plant or hospital
column) or by a seeded Dirichlet label split (the usual non-IID benchmark).

Only manifests are written (rows pointing at the original files): no image is copied.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from mmtune.errors import ConfigError, DataError


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file() or path.suffix.lower() not in (".csv", ".tsv"):
        raise DataError(f"--simulate splits a CSV/TSV manifest; {path} is not one")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return list(reader.fieldnames or []), list(reader)


def split_rows(rows: list[dict], sites: int, partition_by: str, label_column: str = "label",
               alpha: float = 0.5, seed: int = 0) -> list[list[dict]]:
    """`sites` lists of rows: by the values of `partition_by` (its `sites` most frequent values; rows
    of other values are left out) or, for `dirichlet`, each class's rows dealt to sites in shares
    drawn from Dirichlet(alpha) with `seed`."""
    if sites < 1:
        raise ConfigError("--simulate needs at least 1 site")
    if not rows:
        raise DataError("the manifest has no rows to split into sites")
    if partition_by != "dirichlet":
        if partition_by not in rows[0]:
            raise ConfigError(f"--partition_by {partition_by}: no such manifest column (columns: {sorted(rows[0])})")
        common = [v for v, _ in Counter(r[partition_by] for r in rows).most_common(sites)]
        if len(common) < sites:
            raise DataError(f"--partition_by {partition_by} has {len(common)} distinct values, fewer than {sites} sites")
        order = sorted(common)
        return [[r for r in rows if r[partition_by] == value] for value in order]
    if label_column not in rows[0]:
        raise ConfigError(f"dirichlet split: no label column {label_column!r} in the manifest")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row[label_column]].append(row)
    out: list[list[dict]] = [[] for _ in range(sites)]
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        shares = rng.dirichlet([alpha] * sites)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for site, part in enumerate(np.split(order, cuts)):
            out[site].extend(members[i] for i in part)
    for site, part in enumerate(out):
        if not part:
            raise DataError(f"dirichlet split (alpha {alpha}, seed {seed}) left site {site} without rows; "
                            "raise alpha or change the seed")
    return out


def write_site_manifests(manifest: Path, out_dir: Path, sites: int, partition_by: str, label_column: str = "label",
                         alpha: float = 0.5, seed: int = 0) -> list[Path]:
    """Writes `site_<k>.csv` manifests (absolute image paths) under `out_dir` and returns them."""
    header, rows = read_rows(manifest)
    path_column = "path"
    for row in rows:  # paths in a manifest are relative to it: make them absolute for the new folder
        if path_column in row and not Path(row[path_column]).is_absolute():
            row[path_column] = str((manifest.parent / row[path_column]).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(split_rows(rows, sites, partition_by, label_column, alpha, seed)):
        path = out_dir / f"site_{k}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(part)
        paths.append(path)
    return paths
