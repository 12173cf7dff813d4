"""The data module of vision-language fine-tuning: captions/reports, VQA and multimodal chat.

Reading and checking happen at setup (every bad sample is an error naming it, or a counted skip
listed in `skipped_samples.csv`); the task then connects the model's processor, every sample is
rendered and its loss mask computed once, and batches are built by the processor in the collate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmtune.data.bad_rows import write_skipped
from mmtune.data.images import find_unreadable, load_image
from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.splits import SPLIT_NAMES, place_in_splits
from mmtune.data.vl_encoding import Prepared
from mmtune.data.vl_samples import VisualConversation, VisualFields, VisualFormat, read_visual_source
from mmtune.errors import DataError

log = logging.getLogger("mmtune")


def unique_ids(samples: list[VisualConversation], split: str) -> list[VisualConversation]:
    """The split's samples with ids that name one sample each: a repeated id (several captions or
    questions of one image under its id) gets `#2`, `#3`, ... in file order, so per-sample records,
    predictions and the pairing of a baseline with the tuned model stay one-to-one and stable."""
    seen: dict[str, int] = {}
    renamed = 0
    for s in samples:
        n = seen[s.id] = seen.get(s.id, 0) + 1
        if n > 1:
            s.id, renamed = f"{s.id}#{n}", renamed + 1
    if renamed:
        log.warning("[mmtune] %s split: %d sample(s) repeat an earlier sample's id; they are told apart as "
                    "<id>#2, <id>#3, ... in file order", split, renamed)
    return samples


class VisualDataset(Dataset):
    """Prepared samples with their images decoded (in the loader's workers)."""

    def __init__(self, items: list[Prepared]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> tuple[int, Prepared, list]:
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) from EpochSampler
        item = self.items[i]
        return i, item, [load_image(p) for p in item.sample.images]


class VisualCollate:
    """Batches through the encoding: training inputs and labels, plus generation prompts for evaluation."""

    def __init__(self, encoding, max_length: Optional[int], with_prompts: bool) -> None:
        self.encoding, self.max_length, self.with_prompts = encoding, max_length, with_prompts

    def __call__(self, rows: list[tuple[int, Prepared, list]]) -> dict:
        items = [r[1] for r in rows]
        images = [r[2] for r in rows]
        batch = self.encoding.train_batch(items, images, self.max_length)
        batch["index"] = torch.tensor([r[0] for r in rows])
        batch["sample_id"] = [r[1].sample.id for r in rows]  # named by errors about the batch
        if self.with_prompts:
            batch["prompt_inputs"] = dict(self.encoding.prompt_batch(items, images))
        return batch


class VisionTextData(L.LightningDataModule):
    """Images with captions or reports, VQA items, or multi-turn chats with images.

    Args:
        path: a .jsonl/.json/.csv/.parquet file, or a DatasetDict folder written by `mmtune data align`
            (its splits are used). Split by `split` (keeping `fields.group` groups whole) unless the
            rows or `val_path`/`test_path` give the splits.
        format: `caption` (image + text), `vqa` (image + question + answer), `chat` (LLaVA/ShareGPT
            conversations with `<image>` placeholders), or `auto` (from the fields present).
        fields: field names where they differ from the defaults.
        val_path: a separate validation file.
        test_path: a separate test file.
        image_root: folder that relative image paths start from (default: the data file's folder).
        prompt: the instruction of caption rows without their own `prompt` field (e.g. "Write the
            findings."); empty for plain captioning.
        image_placeholder: the placeholder string for an image in question and chat texts.
        split: train/val/test shares when the source gives no splits.
        seed: split and shuffle seed.
        bad_samples: `error` stops at setup naming every bad sample (missing or unreadable image,
            missing answer, placeholders and images that do not match, an answer that tokenizes to
            nothing); `skip` drops them, counts them and lists them in `skipped_samples.csv`.
        verify_images: decode every image at setup (in threads), finding corrupt files up front.
        max_length: longest sequence in tokens (images included); longer samples lose the end of
            their text (counted as `truncated`); None: no limit.
        batch_size: samples per training batch per device.
        eval_batch_size: samples per evaluation batch (default: `batch_size`).
        num_workers: data loading processes.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        format: VisualFormat = "auto",
        fields: VisualFields = VisualFields(),
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        image_root: Optional[str] = None,
        prompt: str = "Describe the image.",
        image_placeholder: str = "<image>",
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 42,
        bad_samples: Literal["error", "skip"] = "error",
        verify_images: bool = True,
        max_length: Optional[int] = 1024,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.test_path = path, val_path, test_path
        self.format, self.fields, self.image_root = format, fields, image_root
        self.prompt, self.image_placeholder = prompt, image_placeholder
        self.split_ratios, self.seed = tuple(split), seed
        self.bad_samples, self.verify_images = bad_samples, verify_images
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.samples: dict[str, list[VisualConversation]] = {}
        self.prepared: dict[str, list[Prepared]] = {}
        self.skipped: dict[str, str] = {}
        self.encoding = None

    # ---- reading and checking --------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if not self.samples:
            self._read()
        self._write_report()

    def _skip(self, origin: str, err: DataError) -> None:
        if self.bad_samples == "error":
            raise err
        key, n = origin, 1
        while key in self.skipped:  # samples that share an id are each listed (as <id>#2, ... like unique_ids)
            n += 1
            key = f"{origin}#{n}"
        self.skipped[key] = str(err)

    def _source(self, path: str) -> list[VisualConversation]:
        return read_visual_source(path, self.format, self.fields, self.image_root, self.prompt, self.image_placeholder,
                                  self._skip)

    def _read(self) -> None:
        if not self.path:
            raise DataError("data.path is not set: name a data file or an aligned DatasetDict folder")
        samples = self._source(self.path)
        extra = {name: self._source(src) for name, src in (("val", self.val_path), ("test", self.test_path)) if src}
        samples = place_in_splits(samples, extra, self.split_ratios, self.seed, True, self.path)
        samples = self._check_images(samples)
        self.samples = {name: unique_ids([s for s in samples if s.split == name], name) for name in SPLIT_NAMES}
        if not self.samples["train"]:
            raise DataError(f"the train split of {self.path} is empty")
        if self.skipped:
            log.warning("[mmtune] skipped %d bad sample(s); see skipped_samples.csv in the run directory", len(self.skipped))

    def _check_images(self, samples: list[VisualConversation]) -> list[VisualConversation]:
        paths = sorted({p for s in samples for p in s.images})
        missing = {p for p in paths if not Path(p).is_file()}
        bad = {p: f"image not found: {p}" for p in missing}
        if self.verify_images:
            bad.update(find_unreadable([p for p in paths if p not in missing], workers=max(2, self.num_workers)))
        kept = []
        for s in samples:
            reasons = [bad[p] for p in s.images if p in bad]
            if reasons:
                self._skip(s.id, DataError(f"sample {s.id}: {reasons[0]}"))
                continue
            kept.append(s)
        return kept

    def _write_report(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        write_skipped(trainer, self.skipped, "skipped_samples.csv", "sample")  # on every rank: it asks log_dir
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        stats = {name: len(rows) for name, rows in self.samples.items()}
        (out / "data_stats.json").write_text(json.dumps({"samples": stats, "skipped": len(self.skipped)}, indent=2))

    # ---- connection to the task -----------------------------------------------------------------------
    def connect(self, encoding) -> None:
        """Takes the model's encoding (`mmtune.data.vl_encoding`) and prepares every sample with it."""
        if self.encoding is encoding and self.prepared:
            return
        self.encoding = encoding
        self.prepared = {}
        for name, samples in self.samples.items():
            kept = []
            for s in samples:
                try:
                    kept.append(self._prepare(encoding, s))
                except DataError as err:
                    self._skip(s.id, err)
            self.prepared[name] = kept

    # What one sample becomes, and the dataset of a split: the seams a subclass changes (preference
    # pairs prepare both conversations and pair them up).
    dataset_class = VisualDataset

    def _prepare(self, encoding, sample):
        return encoding.prepare(sample)

    # ---- loaders -----------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> Dataset:
        if self.encoding is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        items = self.prepared.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path}); add data or adjust data.split")
        return self.dataset_class(items)

    def _loader(self, split: str, batch_size: int, with_prompts: bool, **kwargs) -> DataLoader:
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader  # training: resumes mid-epoch
        return loader(self._dataset(split), batch_size=batch_size, num_workers=self.num_workers,
                      collate_fn=VisualCollate(self.encoding, self.max_length, with_prompts),
                      persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler.for_this_process(len(self.prepared.get("train") or []), self.seed)
        return self._loader("train", self.batch_size, False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, True)
