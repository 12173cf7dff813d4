"""Retrieval metrics over a whole evaluation set: Recall@K and MRR, computed in chunks of queries.

Hand-written rather than torchmetrics' `RetrievalHitRate`/`RetrievalMRR`: those take one flat
(query, document, score) triple per entry, i.e. N*N rows for N pairs, while this scores one chunk of
queries against all documents at a time. Definitions match torchmetrics' hit rate and MRR (a test
checks it): a query counts as a hit at K when any relevant document ranks in its top K; MRR is the mean
of 1 / rank of the best-ranked relevant document. Ties count against the query. (torchmetrics 1.9's
`retrieval_reciprocal_rank` also ignores relevant documents scored <= 0, which cosine scores often are.)
"""

from __future__ import annotations

from typing import Sequence

import torch


def ranks_of_first_relevant(queries: torch.Tensor, docs: torch.Tensor, relevant_fn, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of the best-scored relevant document for each query (cosine/dot scores).

    Args:
        queries: [Q, d] embeddings.
        docs: [D, d] embeddings.
        relevant_fn: (row slice) -> bool [rows, D] relevance of those queries' documents; every query
            needs at least one relevant document.
        chunk: queries scored at once (bounds memory at chunk * D scores).
    """
    out = []
    for start in range(0, queries.shape[0], chunk):
        rows = slice(start, min(start + chunk, queries.shape[0]))
        scores = queries[rows].float() @ docs.float().T
        rel = relevant_fn(rows)
        best = scores.masked_fill(~rel, float("-inf")).max(dim=1).values
        # ties count against the query: a collapsed model (all scores equal) must not look perfect
        out.append(((scores >= best[:, None]) & ~rel).sum(dim=1))
    return torch.cat(out)


def summarize_ranks(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """`{prefix}_r@k` hit rates and `{prefix}_mrr` from 0-based ranks."""
    values = {f"{prefix}_r@{k}": (ranks < k).float().mean().item() for k in ks}
    values[f"{prefix}_mrr"] = (1.0 / (ranks.float() + 1.0)).mean().item()
    return values


def pair_retrieval_metrics(image: torch.Tensor, text: torch.Tensor, keys: Sequence[torch.Tensor],
                           ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                           names: tuple[str, str] = ("i2t", "t2i")) -> dict[str, float]:
    """Recall@K and MRR both ways for N pairs (row i of `image` and `text` is a pair).

    A document is relevant to a query when any of their keys match (its own pair, identical captions,
    other captions of the same image), so duplicates are not scored as misses.

    Returns:
        `i2t_r@1`, ..., `i2t_mrr`, `t2i_r@1`, ..., `t2i_mrr` and `mean_recall` (mean of all R@K).
    """
    def relevant(rows: slice) -> torch.Tensor:
        mask = None
        for k in keys:
            eq = k[rows][:, None] == k[None, :]
            mask = eq if mask is None else mask | eq
        if mask is None:
            n = rows.stop - rows.start
            mask = torch.zeros(n, image.shape[0], dtype=torch.bool)
            mask[torch.arange(n), torch.arange(rows.start, rows.stop)] = True
        return mask

    values = summarize_ranks(ranks_of_first_relevant(image, text, relevant, chunk), ks, names[0])
    values.update(summarize_ranks(ranks_of_first_relevant(text, image, relevant, chunk), ks, names[1]))
    values["mean_recall"] = sum(values[f"{n}_r@{k}"] for n in names for k in ks) / (2 * len(ks))
    return values
