"""The data module for image classification: folders or manifests -> splits -> batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset

from mmtune.data.bad_rows import stop_or_skip, write_skipped
from mmtune.data.image_headers import HeaderCache, cache_file, find_bad_headers
from mmtune.data.image_sources import SourceOptions, read_source
from mmtune.data.images import HighBitPolicy, find_unreadable, find_unreadable_stored, load_image, load_sample_image
from mmtune.data.readers import ManifestColumns
from mmtune.data.samplers import EpochSampler, ResumableLoader, seed_everything_from
from mmtune.data.samples import ImageLabel
from mmtune.data.splits import SPLIT_NAMES, assign_splits
from mmtune.data.stratify import missing_from_splits
from mmtune.data.transforms import AugmentSpec, build_transform, decode_side
from mmtune.errors import DataError
from mmtune.files import write_text_atomic



class ImageClassificationDataset(Dataset):
    """Samples -> {"pixels", "target" (if labeled), "index", "sample_id"}; multi-label targets are multi-hot.
    `sample_id` (the row's origin, collated to a list per batch) names the samples of a batch in errors."""

    def __init__(self, samples: list[ImageLabel], transform, classes: Optional[list[str]], multi_label: bool,
                 channels: int, high_bit: HighBitPolicy, seed: int = 0, decode_side: Optional[int] = None) -> None:
        self.samples = samples
        self.transform = transform
        self.index = {c: i for i, c in enumerate(classes)} if classes is not None else None
        self.multi_label = multi_label
        self.channels = channels
        self.high_bit = high_bit
        self.seed = seed
        self.decode_side = decode_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):  # (epoch, index) from EpochSampler: seed this sample's augmentation
            epoch, i = key
            seed_everything_from(self.seed, epoch, i)
        else:
            i = key
        sample = self.samples[i]
        item = {"pixels": self.transform(load_sample_image(sample, self.channels, self.high_bit, self.decode_side)), "index": i,
                "sample_id": sample.origin or sample.path}
        if self.index is not None:
            if self.multi_label:
                target = torch.zeros(len(self.index))
                target[[self.index[c] for c in sample.labels]] = 1.0
            else:
                target = torch.tensor(self.index[sample.labels[0]])
            item["target"] = target
        return item


class ImageClassificationData(L.LightningDataModule):
    """Image folders or CSV/JSONL manifests for single- and multi-label classification.

    The class list comes from the training split. The task connects itself in its `setup`
    (`connect(classes, multi_label, data_config)`): it decides the final class list (the checkpoint's
    when testing one) and gives the model's input size and normalization.

    Args:
        path: an image folder (`<class>/x.png` or `<split>/<class>/x.png`) or a manifest
            (`.csv/.tsv/.jsonl/.json` with `path,label[,split][,group]`; paths relative to it;
            multi-label as `a|b`).
        val_path: a separate validation source (otherwise split from `path`).
        test_path: a separate test source (otherwise split from `path`).
        predict_path: images to predict (folder or manifest; labels not needed).
        split: train/val/test shares for rows without a split; deterministic given `seed`.
        stratify: split each class in those shares (multi-label: iterative stratification), keeping
            groups whole when `group_column` is set; False draws rows (or groups) regardless of label.
        seed: split and shuffle seed.
        group_column: manifest column whose groups (patient, study, lot) never cross splits.
        path_column: manifest column with the image path.
        label_column: manifest column with the label(s).
        split_column: manifest column with train/val/test, when present.
        label_separator: separator of labels in multi-label rows.
        multi_label: force multi-label (sigmoid) or multi-class; None infers it from the labels.
        batch_size: training batch size per device.
        eval_batch_size: evaluation batch size (default: `batch_size`).
        num_workers: data loading processes.
        image_size: train and evaluate at this square size instead of the model's default.
        augment: training augmentation.
        sampler: `shuffle`, or `balanced` (draws classes equally often, for imbalanced data).
        bad_images: `error` stops at setup listing unreadable images; `skip` drops them and lists
            them in the run directory (`skipped_images.csv`).
        verify_images: `headers` (default) checks each image's header and end (truncation) at setup, in
            threads, caching the verdict by path, size and modification time so the next setup only
            stats the files; `full` (or true) decodes every image; `off` (or false) checks nothing.
        header_cache: folder of the header cache (default `$MMTUNE_CACHE` or `~/.cache/mmtune`);
            `off` keeps none.
        prefetch_factor: batches each loader worker decodes ahead.
        class_names: names of integer labels (index -> name), e.g. for a MedMNIST `.npz`.
        dicom_group: `PatientID` or `StudyInstanceUID`: the DICOM tag whose value keeps a patient's
            (or study's) images in one split.
        dicom_window: (center, width) for every DICOM image instead of each file's own window.
        anonymize_ids: DICOM patient/study ids become one-way hashes and stay out of every file written.
        high_bit: how 16-bit images become 8-bit: `min_max` per image, or `full_range`.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        stratify: bool = True,
        seed: int = 42,
        group_column: Optional[str] = None,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str = "split",
        label_separator: str = "|",
        multi_label: Optional[bool] = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        image_size: Optional[int] = None,
        augment: AugmentSpec = AugmentSpec(),
        sampler: Literal["shuffle", "balanced"] = "shuffle",
        bad_images: Literal["error", "skip"] = "error",
        verify_images: Union[bool, Literal["headers", "full", "off"]] = "headers",
        header_cache: Optional[str] = None,
        prefetch_factor: int = 2,
        high_bit: HighBitPolicy = "min_max",
        class_names: Optional[list[str]] = None,
        dicom_group: Optional[Literal["PatientID", "StudyInstanceUID"]] = None,
        dicom_window: Optional[tuple[float, float]] = None,
        anonymize_ids: bool = True,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        self.split_ratios = tuple(split)
        self.stratify = stratify
        self.split_warnings: list[str] = []
        self.seed = seed
        self.columns = ManifestColumns(path_column, label_column, split_column, group_column)
        self.label_separator = label_separator
        self.multi_label_option = multi_label
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.augment = augment
        self.sampler = sampler
        self.bad_images = bad_images
        self.verify_images = {True: "full", False: "off"}.get(verify_images, verify_images)
        self.header_cache = header_cache
        self.prefetch_factor = prefetch_factor
        self.source_options = SourceOptions(self.columns, label_separator, class_names, dicom_group,
                                            tuple(dicom_window) if dicom_window else None, anonymize_ids)
        self.high_bit = high_bit

        self.splits: dict[str, list[ImageLabel]] = {}
        self.skipped: dict[str, str] = {}  # {row (origin): reason}, one entry per dropped row
        self._skipped_paths: dict[str, str] = {}  # {row: image path}, for skipped_images.csv
        self.classes: list[str] = []
        self.multi_label = False
        self.data_config: Optional[dict] = None

    # ---- reading -------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", "validate", "test", None) and not self.splits:
            self._read_labeled()
        if stage == "predict" and "predict" not in self.splits:
            if not self.predict_path:
                raise DataError("data.predict_path is not set: name the images to predict (a folder or manifest)")
            self.splits["predict"] = self._checked(self._read(self.predict_path, labeled=False))
        write_skipped(self.trainer, [(self._skipped_paths[o], reason) for o, reason in self.skipped.items()],
                      "skipped_images.csv", "path")

    def teardown(self, stage: Optional[str] = None) -> None:
        self._write_stats()

    def _write_stats(self) -> None:
        """`data_stats.json` in the run directory: each split's size and class counts, and how many
        images were skipped (the run report's data summary reads it).

        Written at teardown, once the verb has run, not at setup: a fit whose checkpoint turns out not
        to fit the model fails after setup, and must leave no run folder behind."""
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir or not self.splits:
            return
        stats = {"splits": {name: {"samples": len(rows)} for name, rows in self.splits.items()},
                 "class_counts": {name: dict(sorted(Counter(c for s in rows for c in s.labels).items()))
                                  for name, rows in self.splits.items() if name != "predict"},
                 "skipped": len(self.skipped),
                 "split": {"shares": list(self.split_ratios), "stratified": self.stratify,
                           "grouped_by": self.columns.group, "seed": self.seed},
                 "warnings": self.split_warnings}
        write_text_atomic(Path(log_dir) / "data_stats.json", json.dumps(stats, indent=2))

    def _read_labeled(self) -> None:
        if not self.path:
            raise DataError("data.path is not set: name an image folder or a manifest")
        samples = self._read(self.path)
        explicit = {"val": self.val_path, "test": self.test_path}
        extra = {name: self._read(src) for name, src in explicit.items() if src}
        with_split = [s for s in samples if s.split]
        if with_split and len(with_split) != len(samples):
            lacking = next(s for s in samples if not s.split)
            raise DataError(f"some rows name a split and some do not (e.g. {lacking.origin}); give every row a split or none")
        if not with_split:
            ratios = [0.0 if name in extra else r for name, r in zip(SPLIT_NAMES, self.split_ratios)]
            groups = [s.group for s in samples] if self.columns.group or self.source_options.dicom_group else None
            labels = [s.labels for s in samples] if self.stratify else None
            for s, name in zip(samples, assign_splits(len(samples), ratios, self.seed, groups, labels)):
                s.split = name
        for name, rows in extra.items():
            samples = [s for s in samples if s.split != name]
            for s in rows:
                s.split = name
            samples += rows
        samples = self._checked(samples)
        self.splits = {name: [s for s in samples if s.split == name] for name in SPLIT_NAMES}
        train = self.splits["train"]
        if not train:
            raise DataError(f"the train split of {self.path} is empty")
        for s in train:
            if not s.labels and self.multi_label_option is not True:
                raise DataError(f"{s.origin}: empty label (multi-label data with no positive label needs data.multi_label: true)")
        self.multi_label = self.multi_label_option if self.multi_label_option is not None else any(len(s.labels) > 1 for s in samples)
        self.classes = sorted({c for s in train for c in s.labels})
        if not self.multi_label and len(self.classes) < 2:
            raise DataError(f"the train split has {len(self.classes)} class(es) {self.classes}; classification needs at least 2")
        self._announce_splits()

    def _announce_splits(self) -> None:
        """Prints each split's size and class counts, and warns of a class missing from a split that
        has rows (an empty split is refused when a loader asks for it)."""
        shares = {name: float(bool(rows)) for name, rows in self.splits.items()}
        self.split_warnings = missing_from_splits({n: [s.labels for s in rows] for n, rows in self.splits.items()},
                                                  sorted({c for rows in self.splits.values() for s in rows for c in s.labels}),
                                                  shares)
        for line in self.split_warnings:
            rank_zero_warn(f"[mmtune] {line}")
        for name, rows in self.splits.items():
            counts = Counter(c for s in rows for c in s.labels)
            shown = ", ".join(f"{c} {n}" for c, n in sorted(counts.items())[:20]) + (" …" if len(counts) > 20 else "")
            rank_zero_info(f"[mmtune] {name}: {len(rows)} images ({shown})")

    def _read(self, source: str, labeled: bool = True) -> list[ImageLabel]:
        """The samples of any source `read_source` knows; DICOM files it cannot decode go under the
        bad-image policy."""
        samples, bad = read_source(source, self.source_options, labeled)
        self._drop(bad, {origin: reason.split(": ", 1)[0] for origin, reason in bad.items()})
        return samples

    def _drop(self, rows: dict[str, str], paths: dict[str, str]) -> None:
        stop_or_skip(rows, self.bad_images, "unreadable image", "data.bad_images", "skipped_images.csv")
        self.skipped.update(rows)
        self._skipped_paths.update(paths)

    def _checked(self, samples: list[ImageLabel]) -> list[ImageLabel]:
        if self.verify_images == "off":
            return samples
        workers = max(2, self.num_workers)
        files = [s.path for s in samples if s.image is None]
        if self.verify_images == "headers":
            cache = HeaderCache(cache_file(self.path or self.predict_path or files[0], self.header_cache))
            bad = find_bad_headers(files, cache, load_image, workers)
        else:
            bad = find_unreadable(files, workers)
            bad.update(find_unreadable_stored([s for s in samples if s.image is not None], workers))
        rows = {s.origin: bad[s.path] for s in samples if s.path in bad}  # per row: two rows may name one file
        self._drop(rows, {s.origin: s.path for s in samples if s.path in bad})
        return [s for s in samples if s.path not in bad]

    # ---- connection to the task ------------------------------------------------------------------
    def connect(self, classes: list[str], multi_label: bool, data_config: dict) -> None:
        """Fixes the class list and the model's input config; every labeled row must use known classes."""
        known = set(classes)
        for name, samples in self.splits.items():
            for s in samples:
                unknown = [c for c in s.labels if c not in known]
                if unknown and name != "predict":
                    raise DataError(f"{s.origin}: label {unknown[0]!r} is not in the class list {classes}")
                if not multi_label and name != "predict" and len(s.labels) != 1:
                    raise DataError(f"{s.origin}: multi-class data needs exactly one label per image, got {list(s.labels)}")
        self.classes = list(classes)
        self.multi_label = multi_label
        self.data_config = dict(data_config)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (positives per label for multi-label)."""
        counts = Counter(c for s in self.splits.get("train", []) for c in s.labels)
        return [counts.get(c, 0) for c in self.classes]

    # ---- loaders --------------------------------------------------------------------------------
    def _dataset(self, split: str, train: bool = False) -> ImageClassificationDataset:
        if self.data_config is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        samples = self.splits.get(split) or []
        if not samples:
            raise DataError(f"the {split} split is empty (source: {self.path}); add data or adjust data.split")
        transform = build_transform(self.data_config, train, self.augment, self.image_size)
        labeled = split != "predict" or all(s.labels for s in samples)
        return ImageClassificationDataset(samples, transform, self.classes if labeled else None, self.multi_label,
                                          self.data_config["input_size"][0], self.high_bit, self.seed,
                                          decode_side(self.data_config, train, self.augment, self.image_size))

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs) -> DataLoader:
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader  # training: resumes mid-epoch
        if self.num_workers > 0:  # decode in worker processes that live across epochs, a few batches ahead
            kwargs.update(persistent_workers=True, prefetch_factor=self.prefetch_factor)
        return loader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                      pin_memory=torch.cuda.is_available(), **kwargs)

    def _sample_weights(self, samples: list[ImageLabel]) -> list[float]:
        counts = Counter(c for s in samples for c in s.labels)
        # an item weighs as much as its rarest label, so each class is drawn about equally often
        return [max((1.0 / counts[c] for c in s.labels), default=1.0) for s in samples]

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", train=True)
        weights = self._sample_weights(dataset.samples) if self.sampler == "balanced" else None
        sampler = EpochSampler.for_this_process(len(dataset), self.seed, weights)
        return self._loader(dataset, self.batch_size, sampler=sampler.no_single_item_batch(self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("predict"), self.eval_batch_size)
