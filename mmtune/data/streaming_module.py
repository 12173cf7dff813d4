"""The data module for image classification streamed from litdata chunks (local disk or object storage).

It is `ImageClassificationData`'s counterpart for data that is not on the local disk or is larger than
it: the splits are the root's `train/`, `val/`, `test/` folders written by `litdata.optimize`
(`tools/make_litdata.py`), samples are decoded and transformed as every other classification source, and
the training loader is litdata's `StreamingDataLoader`, whose `state_dict` Lightning saves in every
checkpoint and gives back on `--ckpt_path`, so a fit killed mid-epoch resumes at the next batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mmtune.data.images import HighBitPolicy
from mmtune.data.splits import SPLIT_NAMES
from mmtune.data.transforms import AugmentSpec, build_transform
from mmtune.errors import DataError

if TYPE_CHECKING:  # litdata (the `data` extra) is imported when a streamed set is opened, not with mmtune
    from litdata import StreamingDataLoader

    from mmtune.data.formats_litdata import StreamingImageDataset


class StreamingImageData(L.LightningDataModule):
    """Image classification from litdata optimized chunks, streamed through a bounded local cache.

    Under several processes litdata gives each rank its own chunks and equal whole shares: the items
    left over after the largest share every rank can have (fewer than world size x batch size) are not
    trained in that epoch (litdata's `drop_last` under distributed training, which keeps the ranks'
    batch counts equal); on one process the last short batch trains. The order is litdata's shuffle of
    chunks and of items within them, seeded by (seed, epoch); it depends on the number of processes,
    workers and the batch size, so resume with the same ones.

    Args:
        root: a folder or URL (`s3://`, `gs://`, `azure://`, `r2://`, `hf://`, `local:/path`) holding
            `train/` (required), `val/` and `test/` litdata sets.
        classes: the class list (names of string labels, or of integer labels by index); default: the
            root's `classes.json` (written by `tools/make_litdata.py`).
        multi_label: multi-hot targets; default from `classes.json`, else False.
        image_key: the item field holding the encoded image (bytes) or a PIL image.
        label_key: the item field holding the label: a class name, names joined by `label_separator`,
            an index into `classes`, or a list of these.
        label_separator: separator of multi-label string labels.
        cache_dir: where streamed chunks are cached (default `$MMTUNE_CACHE/litdata`, else litdata's).
        max_cache_size: the cache's budget ("50GB", "500MB"): litdata deletes chunks it has read to stay
            under it, so a set larger than the disk streams through. Default: litdata's (75% of free disk).
        storage_options: passed to the storage client (endpoint, credentials profile, ...).
        seed: shuffle and augmentation seed.
        shuffle: shuffle the training chunks and items each epoch.
        batch_size: training batch size per device.
        eval_batch_size: evaluation batch size (default: `batch_size`).
        num_workers: data loading processes (each streams its own chunks).
        image_size: train and evaluate at this square size instead of the model's default.
        augment: training augmentation.
        prefetch_factor: batches each worker prepares ahead.
        high_bit: how 16-bit images become 8-bit: `min_max` per image, or `full_range`.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        classes: Optional[list[str]] = None,
        multi_label: Optional[bool] = None,
        image_key: str = "image",
        label_key: str = "label",
        label_separator: str = "|",
        cache_dir: Optional[str] = None,
        max_cache_size: Optional[str] = None,
        storage_options: Optional[dict] = None,
        seed: int = 42,
        shuffle: bool = True,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        image_size: Optional[int] = None,
        augment: AugmentSpec = AugmentSpec(),
        prefetch_factor: int = 2,
        high_bit: HighBitPolicy = "min_max",
    ) -> None:
        super().__init__()
        self.root = root
        self.classes_option = list(classes) if classes else None
        self.multi_label_option = multi_label
        self.image_key, self.label_key, self.label_separator = image_key, label_key, label_separator
        self.cache_dir = _cache_dir(cache_dir)
        self.max_cache_size = _cache_budget(max_cache_size)
        self.storage_options = storage_options
        self.seed, self.shuffle = seed, shuffle
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.augment = augment
        self.prefetch_factor = prefetch_factor
        self.high_bit = high_bit

        self.splits: dict[str, "StreamingImageDataset"] = {}
        self.classes: list[str] = []
        self.multi_label = False
        self.counts: dict[str, dict[str, int]] = {}
        self.data_config: Optional[dict] = None

    # ---- reading -------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        if not self.root:
            raise DataError("data.root is not set: name a folder or URL of litdata sets (train/, val/, test/)")
        if stage == "predict":
            raise DataError("StreamingImageData has no predict split: predict from an image folder or manifest "
                            "with ImageClassificationData")
        from mmtune.data.formats_litdata import read_classes_file

        listed = read_classes_file(self.root, self.cache_dir, self.storage_options) or {}
        self.classes = self.classes_option or list(listed.get("classes") or [])
        if not self.classes:
            raise DataError(f"{self.root}: no classes.json; set data.classes (tools/make_litdata.py writes the file)")
        self.multi_label = bool(self.multi_label_option if self.multi_label_option is not None
                                else listed.get("multi_label", False))
        self.counts = dict(listed.get("counts") or {})
        present = listed.get("splits") or SPLIT_NAMES
        needed = {"validate": "val", "test": "test"}.get(stage or "fit", "train")  # the split this verb runs on
        for name in SPLIT_NAMES:
            if name != needed and name not in present:
                continue
            try:
                self.splits[name] = self._open(name, shuffle=self.shuffle and name == "train")
            except DataError:
                if name == needed or listed.get("splits"):
                    raise
        for name, dataset in self.splits.items():
            rank_zero_info(f"[mmtune] {name}: {len(dataset)} images streamed from {dataset.input_dir.url or dataset.input_dir.path}")
        train = len(self.splits.get("train") or ())
        if self.batch_size > 1 and train % self.batch_size == 1 and not _distributed():
            rank_zero_warn(f"[mmtune] {train} training images in batches of {self.batch_size} end in a batch of one, "
                           "which BatchNorm refuses in training: choose another batch_size")

    def _open(self, split: str, shuffle: bool) -> "StreamingImageDataset":
        from mmtune.data.formats_litdata import open_split

        return open_split(self.root, split, self.cache_dir, self.max_cache_size, self.storage_options, self.seed,
                          shuffle=shuffle)

    # ---- connection to the task ------------------------------------------------------------------
    def connect(self, classes: list[str], multi_label: bool, data_config: dict) -> None:
        """Fixes the class list (the checkpoint's when testing one) and the model's input config."""
        if set(self.classes) - set(classes):
            raise DataError(f"the data's classes {self.classes} are not all in the model's class list {classes}")
        self.classes = list(classes)
        self.multi_label = multi_label
        self.data_config = dict(data_config)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class, from `classes.json` (a streamed set is never read whole at setup)."""
        counts = self.counts.get("train")
        if not counts:
            raise DataError(f"{self.root}: class_weights: balanced needs the train class counts of classes.json")
        return [int(counts.get(c, 0)) for c in self.classes]

    # ---- loaders --------------------------------------------------------------------------------
    def _dataset(self, split: str, train: bool = False) -> "StreamingImageDataset":
        from mmtune.data.formats_litdata import ItemDecoder

        if self.data_config is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        dataset = self.splits.get(split)
        if dataset is None:
            raise DataError(f"{self.root}: no {split}/ litdata set (write it with tools/make_litdata.py)")
        transform = build_transform(self.data_config, train, self.augment, self.image_size)
        dataset.decoder = ItemDecoder(transform, self.classes, self.multi_label, self.data_config["input_size"][0],
                                      self.high_bit, self.image_key, self.label_key, self.label_separator,
                                      self.seed, augments=train and self.augment.enabled)
        return dataset

    def _loader(self, dataset: "StreamingImageDataset", batch_size: int, **kwargs) -> "StreamingDataLoader":
        from mmtune.data.formats_litdata import StreamingLoader
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return StreamingLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> "StreamingDataLoader":
        return self._loader(self._dataset("train", train=True), self.batch_size)

    def val_dataloader(self) -> "StreamingDataLoader":
        # every validation item counts, on each rank its own (ranks may end with unequal batch counts)
        return self._loader(self._dataset("val"), self.eval_batch_size, drop_last=False)

    def test_dataloader(self) -> "StreamingDataLoader":
        return self._loader(self._dataset("test"), self.eval_batch_size, drop_last=False)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cache_budget(max_cache_size: Optional[str]) -> Optional[str]:
    """`max_cache_size` as litdata reads it ("50GB", "500MB"), or None for litdata's default."""
    if max_cache_size is None:
        return None
    value = str(max_cache_size).strip().upper().replace(" ", "")
    if not value[:1].isdigit():
        raise DataError(f"data.max_cache_size {max_cache_size!r}: give a size such as 50GB or 500MB")
    return value


def _cache_dir(cache_dir: Optional[str]) -> Optional[str]:
    """The chunk cache: `cache_dir`, else `$MMTUNE_CACHE/litdata`, else litdata's default."""
    if cache_dir:
        return str(Path(cache_dir).expanduser())
    if os.environ.get("MMTUNE_CACHE"):
        return str(Path(os.environ["MMTUNE_CACHE"]) / "litdata")
    return None
