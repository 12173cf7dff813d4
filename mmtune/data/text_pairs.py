"""(query, positive[, hard negative]) text pairs for embedding fine-tuning with in-batch negatives.

Same drop-or-stop policy as image-text pairs: a row with an empty query or positive stops the run
(`bad_pairs: error`, naming file and row) or is dropped (`skip`). Rows get keys of their normalized
query and positive so duplicates in a batch count as positives, not negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset

from mmtune.data.pair_module import ContrastivePairData
from mmtune.data.pairs import normalize_text, stable_key
from mmtune.data.readers import _rows, read_saved_dataset, scalar
from mmtune.data.splits import split_name
from mmtune.data.text_groups import pairs_from_groups
from mmtune.errors import DataError



@dataclass
class QueryDoc:
    """A query, its relevant document, and optionally a hard negative document."""

    query: str
    positive: str
    negative: Optional[str] = None
    group: Optional[str] = None
    split: Optional[str] = None
    origin: str = ""


def _table(source: str) -> tuple[Path, list[tuple[str, dict]]]:
    """(origin, row) of a CSV/JSONL manifest, or of a `datasets` folder (e.g. written by `mmtune data
    align`) whose parts name the splits."""
    path = Path(source).expanduser()
    if path.is_dir():
        rows, origins, splits = read_saved_dataset(path)
        return path, [(o, {**r, "split": s} if s else r) for r, o, s in zip(rows, origins, splits)]
    if not path.is_file():
        raise DataError(f"query-document manifest not found: {path}")
    where = "row" if path.suffix.lower() in (".csv", ".tsv") else "line"
    return path, [(f"{path} {where} {line}", row) for line, row in _rows(path)]


def read_query_docs(source: str, query_column: str, positive_column: str, negative_column: Optional[str],
                    split_column: str, group_column: Optional[str], positive_from: str = "column",
                    seed: int = 0) -> tuple[list[QueryDoc], dict[str, str]]:
    """Rows of a manifest or `datasets` folder as `QueryDoc`s, plus {origin: reason} for rows missing
    text. With `positive_from: group` the positive of each row's text is another text of its group
    (`text_groups.pairs_from_groups`), and a text alone in its group is such a bad row."""
    path, table = _table(source)
    needed = (query_column,) if positive_from == "group" else (query_column, positive_column)
    if positive_from == "group" and not group_column:
        raise DataError("positive_from: group needs group_column (the texts of one group are each other's positives)")
    rows, bad = [], {}
    for origin, row in table:
        for col in needed + ((group_column,) if positive_from == "group" else ()):
            if not isinstance(row, dict) or col not in row:
                raise DataError(f"{origin}: no {col!r} column (columns: {list(row) if isinstance(row, dict) else row})")
        split = split_name(row.get(split_column), origin, split_column)
        query = _text(row[query_column], query_column, origin)
        positive = _text(row[positive_column], positive_column, origin) if positive_from == "column" else ""
        negative = (_text(row.get(negative_column), negative_column, origin) or None) if negative_column else None
        group = str(scalar(row.get(group_column), group_column, origin, "a group key")) if group_column else None
        if not query or (positive_from == "column" and not positive):
            bad[origin] = "empty query" if not query else "empty positive"
        rows.append(QueryDoc(query, positive, negative, group, split, origin))
    if not rows:
        raise DataError(f"no rows in {path}")
    if positive_from == "group":
        usable = [i for i, r in enumerate(rows) if r.origin not in bad]
        # pairs only within a split: a group drawn across splits (a split column) would leak its texts
        keys = [f"{rows[i].split}\0{rows[i].group}" if rows[i].group not in (None, "") else None for i in usable]
        pairs, alone = pairs_from_groups([rows[i].query for i in usable], keys, seed)
        for q, d in pairs:
            rows[usable[q]].positive = rows[usable[d]].query
        for a in alone:
            bad[rows[usable[a]].origin] = "alone in its group (no other text to be its positive)"
    return rows, bad


def _text(value, column: str, origin: str) -> str:
    """A text cell; a number or an object is an error naming it, never made into text silently."""
    value = scalar(value, column, origin, "text")
    if value is not None and not isinstance(value, str):
        raise DataError(f"{origin}: field {column!r} must be text, got a {type(value).__name__} ({str(value)[:60]})")
    return (value or "").strip()


class QueryDocDataset(Dataset):
    def __init__(self, rows: list[QueryDoc]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> QueryDoc:
        return self.rows[key[1] if isinstance(key, tuple) else key], (key[1] if isinstance(key, tuple) else key)


class QueryDocCollate:
    """Tokenizes queries (`query_*`), positives (`input_ids`, `attention_mask`) and negatives (`neg_*`)."""

    def __init__(self, tokenize, with_negatives: bool) -> None:
        self.tokenize, self.with_negatives = tokenize, with_negatives

    def __call__(self, items) -> dict:
        rows = [r for r, _ in items]
        batch = {"index": torch.tensor([i for _, i in items]),
                 "query_key": torch.tensor([stable_key(normalize_text(r.query)) for r in rows], dtype=torch.long),
                 "text_key": torch.tensor([stable_key(normalize_text(r.positive)) for r in rows], dtype=torch.long),
                 "labels": [None] * len(rows), "sample_id": [r.origin for r in rows]}
        batch.update(self.tokenize([r.positive for r in rows]))
        batch.update({f"query_{k}": v for k, v in self.tokenize([r.query for r in rows]).items()})
        if self.with_negatives:
            batch.update({f"neg_{k}": v for k, v in self.tokenize([r.negative for r in rows]).items()})
            batch["neg_key"] = torch.tensor([stable_key(normalize_text(r.negative)) for r in rows], dtype=torch.long)
        return batch


class QueryDocData(ContrastivePairData):
    """Query-document pairs (with optional hard negatives) for text embedding fine-tuning.

    Args:
        path: a manifest (`.csv/.tsv/.jsonl/.json`) with a query and a positive per row, or a
            `datasets` folder (e.g. from `mmtune data align`; its parts are the splits).
        val_path: a separate validation manifest (otherwise split from `path`).
        test_path: a separate test manifest.
        split: train/val/test shares for rows without a split (whole groups go to one split).
        seed: split and shuffle seed.
        query_column: column with the query.
        positive_column: column with the relevant document.
        negative_column: column with a hard negative document (every training row needs one).
        split_column: column with train/val/test, when present.
        group_column: column whose groups never cross splits (e.g. the document id, so held-out
            queries are about held-out documents).
        positive_from: `column` reads each positive from `positive_column`; `group` makes another
            text of the row's group (`group_column`) its positive, drawn with `seed`: the captions of
            one image in a set aligned with `text_lists: explode` (`query_column: text`,
            `group_column: group`). A text alone in its group is a bad pair.
        bad_pairs: `error` stops on rows with an empty query or positive; `skip` drops them.
        batch_size: training pairs per device; every other pair's document is a negative.
        eval_batch_size: evaluation chunk size.
        num_workers: data loading processes.
    """

    kind = "query-document pairs"

    def __init__(self, path: Optional[str] = None, val_path: Optional[str] = None, test_path: Optional[str] = None,
                 split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 42, query_column: str = "query",
                 positive_column: str = "positive", negative_column: Optional[str] = None,
                 split_column: str = "split", group_column: Optional[str] = None,
                 bad_pairs: Literal["error", "skip"] = "error", batch_size: int = 32,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0,
                 positive_from: Literal["column", "group"] = "column") -> None:
        columns = dict(query_column=query_column, positive_column=positive_column, negative_column=negative_column,
                       split_column=split_column, group_column=group_column)
        self.positive_from = positive_from
        super().__init__(path, val_path, test_path, split, seed, columns, bad_pairs, batch_size, eval_batch_size,
                         num_workers)

    def read(self, source: str) -> tuple[list[QueryDoc], dict[str, str]]:
        return read_query_docs(source, **self.columns, positive_from=self.positive_from, seed=self.seed)

    def check_train(self, train: list[QueryDoc]) -> None:
        if self.columns["negative_column"]:
            missing = [r.origin for r in train if not r.negative]
            if missing:
                raise DataError(f"{len(missing)} training row(s) lack a hard negative "
                                f"({self.columns['negative_column']!r}), e.g. {missing[0]}")

    def dataset(self, split: str, rows: list[QueryDoc]) -> Dataset:
        return QueryDocDataset(rows)

    def collate(self, split: str) -> QueryDocCollate:
        # hard negatives are extra documents in training only; evaluation ranks the positives
        return QueryDocCollate(self.preprocess.text, split == "train" and bool(self.columns["negative_column"]))
