"""Preference data for DPO/IPO: (prompt, chosen, rejected) rows -> paired token ids with reply-only labels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmtune.data.text import TextData
from mmtune.data.text_batches import Collator, TokenDataset
from mmtune.data.text_reading import Conversation, TextFields, TextSource, _load_rows, row_to_sample
from mmtune.data.text_tokens import IGNORE, Tokenized, tokenize_conversation
from mmtune.errors import DataError

PREFERENCE_COLUMNS = {"prompt", "chosen", "rejected"}


@dataclass
class Preference:
    """A prompt (turns) with a preferred and a dispreferred assistant reply; `meta` holds the row's other columns."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


def _turns(value: Any, origin: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        return row_to_sample({"messages": value}, "messages", TextFields(), f"{origin} field {key!r}").messages
    raise DataError(f"{origin}: field {key!r} must be text or a non-empty list of turns")


def _reply(value: Any, origin: str, key: str) -> tuple[list[dict[str, str]], str]:
    """(the turns before the reply, the reply) of a `chosen`/`rejected` value."""
    if isinstance(value, str):
        return [], value
    turns = _turns(value, origin, key)
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{origin}: the last turn of {key!r} must be the assistant's reply")
    return turns[:-1], turns[-1]["content"]


def row_to_preference(row: dict, origin: str) -> Preference:
    """`{prompt, chosen, rejected}` with text or turns; without `prompt`, chosen/rejected are whole
    conversations sharing everything but their last (assistant) turn."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{origin}: missing field {key!r} (fields: {sorted(k for k, v in row.items() if v is not None)})")
    (head_c, chosen), (head_r, rejected) = _reply(row["chosen"], origin, "chosen"), _reply(row["rejected"], origin, "rejected")
    if row.get("prompt") is not None:
        prompt = _turns(row["prompt"], origin, "prompt") + head_c
    elif head_c and head_c == head_r:
        prompt = head_c
    else:
        raise DataError(f"{origin}: no 'prompt' field, and 'chosen'/'rejected' do not share the turns before their replies")
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{origin}: empty chosen or rejected reply")
    meta = {k: v for k, v in row.items() if k not in PREFERENCE_COLUMNS and k is not None}
    return Preference(prompt, chosen, rejected, origin, meta)


class PairCollator:
    """[chosen rows..., rejected rows...] in one padded batch, so both pass through the model together."""

    def __init__(self, pad_id: int) -> None:
        self.inner = Collator(pad_id)

    def __call__(self, items: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        batch = self.inner([[pair[0]] for pair in items] + [[pair[1]] for pair in items])
        batch["sample_id"] = [pair[0].origin for pair in items]  # one id per pair, not per half
        return batch


class PreferenceData(TextData):
    """Preference pairs for `DPOTask` from JSON/JSONL/CSV/Parquet files.

    Rows: `{"prompt": text or turns, "chosen": text or turns, "rejected": text or turns}`, or the messages
    form `{"chosen": [turns], "rejected": [turns]}` (the shared turns before the last are the prompt).
    Labels cover the final reply only. Arguments as in `TextData`; `packing` is not supported.
    """

    def _read(self, source: TextSource) -> list:
        rows, origins = _load_rows(Path(source.path).expanduser())
        return [row_to_preference(row, origin) for row, origin in zip(rows, origins)]

    def _reply_tokens(self, pref: Preference, reply: str) -> Tokenized:
        conv = Conversation(pref.prompt + [{"role": "assistant", "content": reply}], pref.origin)
        item = tokenize_conversation(self.tokenizer, conv, assistant_only=True)
        prompt_len = len(self.tokenizer.apply_chat_template(pref.prompt, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"])
        labels = [IGNORE] * prompt_len + item.labels[prompt_len:]  # earlier assistant turns are context
        return Tokenized(item.input_ids, labels, pref.origin, pref.meta)

    def _tokenize(self, samples: list) -> tuple[list, dict[str, int]]:
        if self.packing:
            raise DataError("data.packing is not supported for preference data")
        out = []
        st = {"samples": len(samples), "truncated": 0, "dropped": 0, "no_target": 0, "tokens": 0}
        for pref in samples:
            pair = [self._reply_tokens(pref, pref.chosen), self._reply_tokens(pref, pref.rejected)]
            if max(len(x) for x in pair) > self.max_length:
                if self.overlong == "drop":
                    st["dropped"] += 1
                    continue
                st["truncated"] += 1
                pair = [replace(x, input_ids=x.input_ids[:self.max_length], labels=x.labels[:self.max_length])
                        for x in pair]
            if any(all(label == IGNORE for label in x.labels[1:]) for x in pair):
                st["no_target"] += 1
                continue
            st["tokens"] += sum(len(x) for x in pair)
            out.append(pair)
        return out, st

    def _rows(self, split: str, packed: bool):
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data")
        items = self.tokenized.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path}); add data or adjust data.split")
        return TokenDataset(items)

    def _collator(self, packed: bool):
        return PairCollator(self.tokenizer.pad_token_id)
