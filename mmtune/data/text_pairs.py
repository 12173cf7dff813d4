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
from mmtune.data.readers import _rows, scalar
from mmtune.data.splits import split_name
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


def read_query_docs(source: str, query_column: str, positive_column: str, negative_column: Optional[str],
                    split_column: str, group_column: Optional[str]) -> tuple[list[QueryDoc], dict[str, str]]:
    """Rows of a CSV/JSONL manifest as `QueryDoc`s, plus {origin: reason} for rows missing text."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"query-document manifest not found: {path}")
    where = "row" if path.suffix.lower() in (".csv", ".tsv") else "line"
    rows, bad = [], {}
    for line, row in _rows(path):
        origin = f"{path} {where} {line}"
        for col in (query_column, positive_column):
            if not isinstance(row, dict) or col not in row:
                raise DataError(f"{origin}: no {col!r} column (columns: {list(row) if isinstance(row, dict) else row})")
        split = split_name(row.get(split_column), origin, split_column)
        query = str(scalar(row[query_column], query_column, origin, "text") or "").strip()
        positive = str(scalar(row[positive_column], positive_column, origin, "text") or "").strip()
        negative = (str(scalar(row.get(negative_column), negative_column, origin, "text") or "").strip() or None) \
            if negative_column else None
        group = str(scalar(row.get(group_column), group_column, origin, "a group key")) if group_column else None
        if not query or not positive:
            bad[origin] = "empty query" if not query else "empty positive"
        rows.append(QueryDoc(query, positive, negative, group, split, origin))
    if not rows:
        raise DataError(f"no rows in {path}")
    return rows, bad


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
        path: a manifest (`.csv/.tsv/.jsonl/.json`) with a query and a positive per row.
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
                 eval_batch_size: Optional[int] = None, num_workers: int = 0) -> None:
        columns = dict(query_column=query_column, positive_column=positive_column, negative_column=negative_column,
                       split_column=split_column, group_column=group_column)
        super().__init__(path, val_path, test_path, split, seed, columns, bad_pairs, batch_size, eval_batch_size,
                         num_workers)

    def read(self, source: str) -> tuple[list[QueryDoc], dict[str, str]]:
        return read_query_docs(source, **self.columns)

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
