"""Retrieval metrics over a whole evaluation set: Recall@K and MRR over distinct items, computed in
chunks of queries.

Evaluation sets are pairs, and one item often appears in several of them: an image with five
captions is five pair rows. Ranking pair rows would count every wrong image five times (Recall@5
would equal Recall@1) and score each image as a query five times. Both sides are therefore reduced
to distinct items by key first (rows sharing an image key are one image, rows sharing a text key one
text), as CLIP-style benchmarks do on COCO/Flickr (5k image queries against 25k captions, 25k caption
queries against 5k images); a document is relevant to a query when some pair joins them. Rows that
share a key are the same input, so the first row's embedding stands for the item.

Hand-written rather than torchmetrics' `RetrievalHitRate`/`RetrievalMRR`: those take one flat
(query, document, score) triple per entry, i.e. Q*D rows, while this scores one chunk of queries
against all documents at a time. Definitions match torchmetrics' hit rate and MRR (a test checks it):
a query counts as a hit at K when any relevant document ranks in its top K; MRR is the mean of
1 / rank of the best-ranked relevant document. Ties count against the query. (torchmetrics 1.9's
`retrieval_reciprocal_rank` also ignores relevant documents scored <= 0, which cosine scores often are.)
"""

from __future__ import annotations

from typing import Sequence

import torch


def ranks_of_first_relevant(queries: torch.Tensor, docs: torch.Tensor, relevant_fn, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of the best-scored relevant document for each query (cosine/dot scores).

    Args:
        queries: [Q, d] embeddings.
        docs: [D, d] embeddings, one per distinct document (a repeated document would be counted
            once per copy).
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


def distinct_items(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of each distinct key (in order of first appearance) and each row's item number."""
    unique_keys, item = torch.unique(keys, return_inverse=True)
    rows = torch.arange(len(keys))
    first = torch.full((len(unique_keys),), len(keys), dtype=torch.long).scatter_reduce(0, item, rows, "amin")
    order = first.argsort()
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(len(order))
    return first[order], renumber[item]


def distinct_ranks(queries: torch.Tensor, docs: torch.Tensor, query_keys: torch.Tensor, doc_keys: torch.Tensor,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of distinct queries among distinct documents, for pairs (row i of `queries` and `docs`).

    Returns:
        the 0-based rank of each distinct query (how many distinct non-relevant documents score at or
        above its best relevant one), and the first pair row of each, naming the query.
    """
    query_rows, query_item = distinct_items(query_keys)
    doc_rows, doc_item = distinct_items(doc_keys)
    # relevant (query item, document item) couples, sorted by query item, so a chunk of queries
    # builds its relevance mask from a contiguous slice (never the whole Q x D matrix)
    links = torch.unique(torch.stack([query_item, doc_item], dim=1), dim=0)
    starts = torch.searchsorted(links[:, 0].contiguous(), torch.arange(len(query_rows) + 1))

    def relevant(rows: slice) -> torch.Tensor:
        chunk_links = links[starts[rows.start]:starts[rows.stop]]
        mask = torch.zeros(rows.stop - rows.start, len(doc_rows), dtype=torch.bool)
        mask[chunk_links[:, 0] - rows.start, chunk_links[:, 1]] = True
        return mask

    return ranks_of_first_relevant(queries[query_rows], docs[doc_rows], relevant, chunk), query_rows


def summarize_ranks(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """`{prefix}_r@k` hit rates and `{prefix}_mrr` from 0-based ranks."""
    values = {f"{prefix}_r@{k}": (ranks < k).float().mean().item() for k in ks}
    values[f"{prefix}_mrr"] = (1.0 / (ranks.float() + 1.0)).mean().item()
    return values


def pair_retrieval_metrics(image: torch.Tensor, text: torch.Tensor, keys: Sequence[torch.Tensor] = (),
                           ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                           names: tuple[str, str] = ("i2t", "t2i")) -> dict[str, float]:
    """Recall@K and MRR both ways for N pairs (row i of `image` and `text` is a pair), over distinct items.

    Args:
        image, text: [N, d] embeddings of the two sides (images or queries, and texts/documents).
        keys: (image keys, text keys), int [N] each: rows with equal keys are one item (an image with
            several captions, identical captions); empty: every row is its own item.
        names: metric prefixes of the two directions (`q2d`/`d2q` for query-document data).

    Returns:
        `i2t_r@1`, ..., `i2t_mrr`, `t2i_r@1`, ..., `t2i_mrr` and `mean_recall` (mean of all R@K).
    """
    if len(keys) == 0:
        keys = (torch.arange(image.shape[0]), torch.arange(image.shape[0]))
    if len(keys) != 2:
        raise ValueError(f"keys must be (image keys, text keys), got {len(keys)} tensors")
    image_keys, text_keys = keys
    values = summarize_ranks(distinct_ranks(image, text, image_keys, text_keys, chunk)[0], ks, names[0])
    values.update(summarize_ranks(distinct_ranks(text, image, text_keys, image_keys, chunk)[0], ks, names[1]))
    values["mean_recall"] = sum(values[f"{n}_r@{k}"] for n in names for k in ks) / (2 * len(ks))
    return values
