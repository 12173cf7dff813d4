"""Preference data for vision-language models: image + prompt + chosen/rejected rows -> pairs of samples
that share the image and the prompt, encoded by the model's own processor.

Each row becomes a `VisualPreference` (the chosen conversation, plus the rejected reply); once the task
connects its encoding, both conversations are prepared with it (labels on the reply only) and a batch
holds the chosen rows, then the rejected ones, with each image given twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from mmtune.data.images import load_image
from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.text_reading import _load_rows
from mmtune.data.vl_data import VisionTextData
from mmtune.data.vl_encoding import Prepared
from mmtune.data.vl_samples import VisualConversation, VisualFields, row_to_sample, text_part
from mmtune.errors import DataError

PAIR_COLUMNS = ("chosen", "rejected")


@dataclass
class VisualPreference(VisualConversation):
    """The chosen conversation (its last turn the chosen reply) and the rejected reply to the same turns."""

    rejected: str = ""

    def rejected_conversation(self) -> VisualConversation:
        messages = self.messages[:-1] + [{"role": "assistant", "content": [text_part(self.rejected)]}]
        plain = {f.name: getattr(self, f.name) for f in fields(VisualConversation)}
        return VisualConversation(**{**plain, "messages": messages, "answers": [self.rejected]})


def row_to_preference(row: dict, vqa_fields: VisualFields, root: Path, origin: str, placeholder: str) -> VisualPreference:
    """`{image, prompt, chosen, rejected}` (image: a path or a list; the prompt may place images with
    placeholders, else they go first) as a `VisualPreference`; a bad row raises a DataError naming it."""
    sid = str(row.get(vqa_fields.id)) if row.get(vqa_fields.id) not in (None, "") else origin
    replies = {}
    for key in PAIR_COLUMNS:
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"sample {sid}: field {key!r} must be a non-empty reply text")
        replies[key] = value.strip()
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"sample {sid}: field 'prompt' must be a non-empty text")
    as_vqa = {k: v for k, v in row.items() if k not in ("prompt", *PAIR_COLUMNS)}
    as_vqa.update({vqa_fields.question: prompt, vqa_fields.answer: replies["chosen"]})
    sample = row_to_sample(as_vqa, "vqa", vqa_fields, root, origin, "", placeholder)
    plain = {f.name: getattr(sample, f.name) for f in fields(VisualConversation)}
    return VisualPreference(**{**plain, "format": "preference"}, rejected=replies["rejected"])


class PairDataset(Dataset):
    """Prepared (chosen, rejected) pairs with their images decoded once per pair."""

    def __init__(self, items: list[tuple[Prepared, Prepared]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) from EpochSampler
        chosen, rejected = self.items[i]
        return i, chosen, rejected, [load_image(p) for p in chosen.sample.images]


class PairCollate:
    """One batch of [chosen rows..., rejected rows...] through the encoding (each pair's images twice)."""

    def __init__(self, encoding, max_length: Optional[int]) -> None:
        self.encoding, self.max_length = encoding, max_length

    def __call__(self, rows: list) -> dict:
        items = [r[1] for r in rows] + [r[2] for r in rows]
        images = [r[3] for r in rows] * 2
        batch = self.encoding.train_batch(items, images, self.max_length)
        batch["index"] = torch.tensor([r[0] for r in rows])
        batch["sample_id"] = [r[1].sample.id for r in rows]  # one id per pair, named by errors about the batch
        batch["origins"] = batch["sample_id"]
        batch["meta"] = [r[1].sample.meta for r in rows]
        return batch


class VisionPreferenceData(VisionTextData):
    """Image + prompt + chosen/rejected rows for `VisionPreferenceTask` (DPO and the other preference
    losses on vision-language models), from .jsonl/.json/.csv/.parquet files.

    Rows: `{"image": path or [paths], "prompt": text (with <image> placeholders or without), "chosen": text,
    "rejected": text}` plus optional `id`, `group`, `split` and other columns (kept as metadata). Arguments
    as in `VisionTextData` (`format` and `prompt` do not apply: every row brings its prompt).
    """

    def _source(self, path: str) -> list[VisualConversation]:
        source = Path(path).expanduser()
        if source.is_dir():
            raise DataError(f"{source}: preference data must be a .jsonl/.json/.csv/.parquet file")
        rows, origins = _load_rows(source)
        root = Path(self.image_root).expanduser() if self.image_root else source.parent
        out = []
        for row, origin in zip(rows, origins):
            try:
                out.append(row_to_preference(row, self.fields, root, origin, self.image_placeholder))
            except DataError as err:
                message = str(err) if origin in str(err) else f"{origin}: {err}"
                self._skip(str(row.get(self.fields.id)) if row.get(self.fields.id) not in (None, "") else origin,
                           DataError(message))
        return out

    dataset_class = PairDataset

    def _prepare(self, encoding, sample):
        """Both conversations of a pair (a pair with a bad half is an error naming it, or a counted skip)."""
        return encoding.prepare(sample), encoding.prepare(sample.rejected_conversation())

    def _loader(self, split: str, batch_size: int, with_prompts: bool, **kwargs):
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader
        return loader(self._dataset(split), batch_size=batch_size, num_workers=self.num_workers,
                      collate_fn=PairCollate(self.encoding, self.max_length), persistent_workers=self.num_workers > 0,
                      **kwargs)
