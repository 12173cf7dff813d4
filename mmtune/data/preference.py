"""Preference data: (prompt, chosen, rejected) rows -> paired token ids with reply-only labels (DPO, IPO,
ORPO, SimPO), and unpaired (prompt, completion, label) rows -> labeled completions (KTO)."""

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
UNPAIRED_COLUMNS = {"prompt", "completion", "label"}
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass
class Preference:
    """A prompt (turns) with a preferred and a dispreferred assistant reply; `meta` holds the row's other columns."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    """An unpaired row (TRL's unpaired preference format): a prompt, one assistant reply and whether the
    reply is desirable (`label: true`) or undesirable (`label: false`)."""

    prompt: list[dict[str, str]]
    completion: str
    desirable: bool
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


def _label(value: Any, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise DataError(f"{origin}: field 'label' must be true or false (desirable or not), got {value!r}")


def row_to_completion(row: dict, origin: str) -> Completion:
    """`{prompt, completion, label}`: prompt and completion as text or turns (the completion's last turn
    is the assistant's reply), label true/false (also 1/0, "true"/"false" from CSV)."""
    for key in ("prompt", "completion", "label"):
        if row.get(key) is None:
            raise DataError(f"{origin}: missing field {key!r} of an unpaired row (fields: "
                            f"{sorted(k for k, v in row.items() if v is not None)})")
    head, reply = _reply(row["completion"], origin, "completion")
    if not reply.strip():
        raise DataError(f"{origin}: empty completion")
    meta = {k: v for k, v in row.items() if k not in UNPAIRED_COLUMNS and k is not None}
    return Completion(_turns(row["prompt"], origin, "prompt") + head, reply, _label(row["label"], origin), origin, meta)


def read_preference_row(row: dict, origin: str):
    """A paired row (`chosen`/`rejected`) as a `Preference`, an unpaired one (`completion`/`label`) as a
    `Completion`."""
    paired = row.get("chosen") is not None or row.get("rejected") is not None
    if not paired and (row.get("completion") is not None or row.get("label") is not None):
        return row_to_completion(row, origin)
    return row_to_preference(row, origin)


def unpair(pref: Preference) -> list[Completion]:
    """A pair as two unpaired rows, the chosen reply desirable and the rejected one not (as TRL's KTO does)."""
    return [Completion(pref.prompt, pref.chosen, True, f"{pref.origin} chosen", pref.meta),
            Completion(pref.prompt, pref.rejected, False, f"{pref.origin} rejected", pref.meta)]


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


@dataclass
class CompletionTokens(Tokenized):
    """A tokenized unpaired row: its first `prompt_len` tokens are the prompt, the rest the completion."""

    prompt_len: int = 0
    desirable: bool = True


def mismatched(prompt: CompletionTokens, reply: CompletionTokens, max_length: int) -> Tokenized:
    """One row's prompt followed by another row's completion (KTO's reference-point estimate), cut at
    `max_length`."""
    ids = prompt.input_ids[:prompt.prompt_len] + reply.input_ids[reply.prompt_len:]
    labels = [IGNORE] * prompt.prompt_len + reply.labels[reply.prompt_len:]
    return Tokenized(ids[:max_length], labels[:max_length], prompt.origin, prompt.meta)


class UnpairedCollator:
    """KTO batches: the n rows, then n mismatched rows (row i's prompt with row i-1's completion, the
    rotation TRL uses, so the mismatched completions are the batch's own), padded together so the
    reference scores all 2n rows in one pass. `desirable` holds the n labels."""

    def __init__(self, pad_id: int, max_length: int) -> None:
        self.inner = Collator(pad_id)
        self.max_length = max_length

    def __call__(self, items: list[list[CompletionTokens]]) -> dict[str, torch.Tensor]:
        rows = [item[0] for item in items]
        kl_rows = [mismatched(rows[i], rows[i - 1], self.max_length) for i in range(len(rows))]
        batch = self.inner([[r] for r in rows] + [[r] for r in kl_rows])
        batch["desirable"] = torch.tensor([r.desirable for r in rows])
        for key in ("origins", "meta", "sample_id"):
            batch[key] = batch[key][:len(rows)]
        return batch


class PreferenceData(TextData):
    """Preference data for `DPOTask` from JSON/JSONL/CSV/Parquet files.

    Paired rows (DPO, IPO, ORPO, SimPO; KTO splits each into a desirable and an undesirable row):
    `{"prompt": text or turns, "chosen": text or turns, "rejected": text or turns}`, or the messages form
    `{"chosen": [turns], "rejected": [turns]}` (the shared turns before the last are the prompt).
    Unpaired rows (KTO only, TRL's unpaired format): `{"prompt": ..., "completion": ..., "label": true|false}`.
    Labels cover the final reply only. Arguments as in `TextData`; `packing` is not supported.
    """

    unpaired = False  # set by the task through `connect`: KTO reads rows one by one

    def _read(self, source: TextSource) -> list:
        rows, origins = _load_rows(Path(source.path).expanduser())
        return [read_preference_row(row, origin) for row, origin in zip(rows, origins)]

    def connect(self, tokenizer, unpaired: bool = False) -> None:
        """Tokenizes every split for a paired loss, or (`unpaired`, KTO) one row per completion."""
        if unpaired != self.unpaired:
            self.tokenized = {}
        self.unpaired = unpaired
        super().connect(tokenizer)

    def _reply_tokens(self, prompt: list[dict[str, str]], reply: str, origin: str, meta: dict) -> tuple[Tokenized, int]:
        conv = Conversation(prompt + [{"role": "assistant", "content": reply}], origin)
        item = tokenize_conversation(self.tokenizer, conv, assistant_only=True)
        prompt_len = len(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"])
        labels = [IGNORE] * prompt_len + item.labels[prompt_len:]  # earlier assistant turns are context
        return Tokenized(item.input_ids, labels, origin, meta), prompt_len

    def _examples(self, samples: list) -> list[list[Tokenized]]:
        """Each sample's rows: [chosen, rejected] for a pair, [completion] for an unpaired row."""
        out = []
        for sample in samples:
            if isinstance(sample, Completion) and not self.unpaired:
                raise DataError(f"{sample.origin}: an unpaired row (prompt/completion/label) needs preference.loss: kto; "
                                "the other losses need paired rows (prompt/chosen/rejected)")
            if isinstance(sample, Preference) and not self.unpaired:
                out.append([self._reply_tokens(sample.prompt, reply, sample.origin, sample.meta)[0]
                            for reply in (sample.chosen, sample.rejected)])
                continue
            for row in unpair(sample) if isinstance(sample, Preference) else [sample]:
                item, prompt_len = self._reply_tokens(row.prompt, row.completion, row.origin, row.meta)
                out.append([CompletionTokens(item.input_ids, item.labels, item.origin, item.meta, prompt_len,
                                             row.desirable)])
        return out

    def _tokenize(self, samples: list) -> tuple[list, dict[str, int]]:
        if self.packing:
            raise DataError("data.packing is not supported for preference data")
        out = []
        st = {"samples": len(samples), "truncated": 0, "dropped": 0, "no_target": 0, "tokens": 0}
        for rows in self._examples(samples):
            if max(len(x) for x in rows) > self.max_length:
                if self.overlong == "drop":
                    st["dropped"] += 1
                    continue
                st["truncated"] += 1
                rows = [replace(x, input_ids=x.input_ids[:self.max_length], labels=x.labels[:self.max_length])
                        for x in rows]
            if any(all(label == IGNORE for label in x.labels[1:]) for x in rows):
                st["no_target"] += 1
                continue
            st["tokens"] += sum(len(x) for x in rows)
            out.append(rows)
        return out, st

    def _rows(self, split: str, packed: bool):
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data")
        items = self.tokenized.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path}); add data or adjust data.split")
        return TokenDataset(items)

    def _collator(self, packed: bool):
        if self.unpaired:
            return UnpairedCollator(self.tokenizer.pad_token_id, self.max_length)
        return PairCollator(self.tokenizer.pad_token_id)
