"""Prompts for reinforcement fine-tuning (GRPO): rows with a prompt plus the columns rewards check
(`answer`, test cases, ...) -> left-padded prompt ids with each row's metadata.

Read by the same readers as SFT data (JSON/JSONL/CSV/Parquet, splits, weighted sources, resumable
shuffling): a row is `{"prompt": text}`, `{"instruction", "input"}` or `{"messages": [turns]}` (the
turns before the reply, e.g. a system and a user turn); every other column travels to the rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmtune.data.text import TextData
from mmtune.data.text_reading import TextSource, _load_rows, prompt_conversation
from mmtune.errors import DataError

PROMPT_COLUMNS = {"prompt", "system", "instruction", "input", "messages", "conversations"}


@dataclass
class PromptRow:
    """One prompt (its turns, ending with a user turn), where it came from, and its other columns."""

    messages: list[dict[str, str]]
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptTokens:
    input_ids: list[int]
    row: PromptRow

    def __len__(self) -> int:
        return len(self.input_ids)


def row_to_prompt(row: dict, origin: str) -> PromptRow:
    """A prompt row as turns plus metadata; a row whose turns end with an assistant reply is an error
    (GRPO generates the reply)."""
    clean = {k: v for k, v in row.items() if v is not None}
    conv = prompt_conversation(clean, origin)
    if conv.messages[-1]["role"] == "assistant":
        raise DataError(f"{origin}: the prompt's last turn is an assistant reply; GRPO prompts end with the user's turn")
    return PromptRow(conv.messages, origin, {k: v for k, v in row.items() if k not in PROMPT_COLUMNS})


class PromptBatches:
    """Left-padded prompt ids (generation continues on the right) with each row's turns and metadata."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[PromptTokens]) -> dict:
        width = max(len(x) for x in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, item in enumerate(items):
            n = len(item)
            ids[r, width - n:] = torch.tensor(item.input_ids)
            mask[r, width - n:] = 1
        return {"input_ids": ids, "attention_mask": mask, "messages": [x.row.messages for x in items],
                "origins": [x.row.origin for x in items], "meta": [x.row.meta for x in items],
                "sample_id": [x.row.origin for x in items]}


class _Prompts(Dataset):
    def __init__(self, items: list[PromptTokens]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> PromptTokens:
        return self.items[key[1] if isinstance(key, tuple) else key]


class PromptData(TextData):
    """Prompt rows for `GRPOTask`, read and split like `TextData`.

    `max_length` is the longest prompt in tokens: longer prompts keep their end (where the question
    usually is) with `overlong: truncate`, or are dropped with `drop`; either way they are counted in
    `data_stats.json`. `batch_size` counts prompts (each gets `grpo.num_generations` completions).
    `packing` and `assistant_only_loss` do not apply.
    """

    def _read(self, source: TextSource) -> list:
        rows, origins = _load_rows(Path(source.path).expanduser())
        return [row_to_prompt(row, origin) for row, origin in zip(rows, origins)]

    def _tokenize(self, samples: list) -> tuple[list, dict[str, int]]:
        if self.packing:
            raise DataError("data.packing does not apply to GRPO prompts")
        out: list[PromptTokens] = []
        st = {"samples": len(samples), "truncated": 0, "dropped": 0, "no_target": 0, "tokens": 0}
        for row in samples:
            ids = self.tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
            if len(ids) > self.max_length:
                if self.overlong == "drop":
                    st["dropped"] += 1
                    continue
                st["truncated"] += 1
                ids = ids[-self.max_length:]
            st["tokens"] += len(ids)
            out.append(PromptTokens(list(ids), row))
        return out, st

    def _rows(self, split: str, packed: bool) -> Dataset:
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data")
        items = self.tokenized.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path or [s.path for s in self.sources]}); "
                            "add data or adjust data.split")
        return _Prompts(items)

    def _collator(self, packed: bool):
        return PromptBatches(self.tokenizer.pad_token_id)
