"""Batches of tokenized text: best-fit packing, padded or packed training rows, left-padded prompts."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from mmtune.data.text_reading import Conversation
from mmtune.data.text_tokens import IGNORE, Tokenized


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, each bin's total length at most `capacity`.

    Deterministic (ties keep input order), so resumed runs pack identically.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


class TokenDataset(Dataset):
    """Items are lists of tokenized samples: one each without packing, several per packed row."""

    def __init__(self, rows: list[list[Tokenized]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> list[Tokenized]:
        return self.rows[key[1] if isinstance(key, tuple) else key]


@dataclass
class Collator:
    """Pads rows on the right. A packed row concatenates its samples with position ids restarting at 0
    for each; it gets no 2D attention mask, so transformers derives a block-diagonal causal mask from
    the position ids (sdpa, eager, flex) or varlen boundaries (flash attention): attention stays inside
    each sample. The first token of each sample carries no label, as it has no predecessor unpacked.

    Besides the model inputs, a batch says whose each token is: `row_ids` (`[B, T]`) is the index of
    the token's sample among the batch's samples (-1 on padding), and `origins`/`meta` list those
    samples' ids and metadata in that order, so per-sample losses are exact under packing too
    (`mmtune.losses.tokens.token_loss_per_row`).
    """

    pad_id: int
    packed: bool = False

    def __call__(self, items: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(s) for s in row) for row in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(items), width), dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        row_ids = torch.full((len(items), width), -1, dtype=torch.long)
        samples: list[Tokenized] = []
        for r, row in enumerate(items):
            at = 0
            for s in row:
                n = len(s)
                ids[r, at:at + n] = torch.tensor(s.input_ids)
                labels[r, at:at + n] = torch.tensor(s.labels)
                labels[r, at] = IGNORE
                positions[r, at:at + n] = torch.arange(n)
                attention[r, at:at + n] = 1
                row_ids[r, at:at + n] = len(samples)
                samples.append(s)
                at += n
            # padding continues as its own "sample" (positions from 0): it never joins a real one
            positions[r, at:] = torch.arange(width - at)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 "num_tokens": attention.sum(), "row_ids": row_ids,
                 "origins": [s.origin for s in samples], "meta": [s.meta for s in samples],
                 # where each sample came from (file and line), named by errors about the batch
                 "sample_id": [s.origin for s in samples]}
        if not self.packed:
            batch["attention_mask"] = attention
        return batch


@dataclass
class PromptCollator:
    """Left-padded chat prompts (with the generation prompt) for `generate`."""

    tokenizer: Any

    def __call__(self, items: list[tuple[int, Conversation]]) -> dict:
        texts = [self.tokenizer.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True) for _, c in items]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "index": torch.tensor([i for i, _ in items])}


class PromptDataset(Dataset):
    def __init__(self, convs: list[Conversation]) -> None:
        self.convs = convs

    def __len__(self) -> int:
        return len(self.convs)

    def __getitem__(self, i: int) -> tuple[int, Conversation]:
        return i, self.convs[i]
