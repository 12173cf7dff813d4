"""Image-text pairs from a CSV/JSONL manifest or the pair aligner's output folder (`mmtune data
align`): checked, split by group, augmented for training, tokenized in the collate.

Every row is checked before training: an empty text or a missing/unreadable image either stops the run
(`bad_pairs: error`, listing file and row) or drops the row (`bad_pairs: skip`, listed with reasons in
`skipped_pairs.csv` in the run directory): the aligner's drop-or-stop policy.

Rows get integer keys for their image (resolved path) and normalized text, so losses and metrics
treat identical captions or images in a batch as positives, not as negatives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from torch.utils.data import Dataset

from mmtune.data.images import find_unreadable, load_image
from mmtune.data.pair_module import ContrastivePairData
from mmtune.data.readers import _rows, read_saved_dataset, scalar
from mmtune.data.samplers import seed_everything_from
from mmtune.data.transforms import AugmentSpec, build_transform
from mmtune.data.splits import split_name
from mmtune.errors import DataError



@dataclass
class ImageText:
    """One image with its text.

    Attributes:
        path: absolute image path.
        text: the caption or report.
        group: group key (patient, study) that must not cross splits.
        split: split named by the source, if any.
        label: class name, for zero-shot evaluation (optional).
        origin: where it came from (`pairs.csv row 12`).
        meta: the row's other columns with plain values (site, scanner, sex, ...), for subgroup audits.
    """

    path: str
    text: str
    group: Optional[str] = None
    split: Optional[str] = None
    label: Optional[str] = None
    origin: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def stable_key(value: str) -> int:
    """A 63-bit integer hash that is the same in every process (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def normalize_text(text: str) -> str:
    """Texts equal up to case and whitespace count as duplicates."""
    return " ".join(text.lower().split())


def _manifest_rows(path: Path) -> Iterator[tuple[str, dict, Optional[str]]]:
    """(origin, row, split) of a manifest file, or of a DatasetDict folder written by `mmtune data align`
    (its parts give the split; a study of several images, `mode: list`, gives one pair per image)."""
    if path.is_dir() or path.suffix.lower() in (".parquet", ".arrow"):
        rows, origins, splits = read_saved_dataset(path)
        for row, origin, split in zip(rows, origins, splits):
            images = row.get("image")
            if isinstance(images, list):
                for k, image in enumerate(images):
                    yield f"{origin} image {k}", {**row, "image": image}, split
            else:
                yield origin, row, split
        return
    where = "row" if path.suffix.lower() in (".csv", ".tsv") else "line"
    for line, row in _rows(path):
        yield f"{path} {where} {line}", row, None


def read_pairs(source: str, image_column: str = "image", text_column: str = "text", split_column: str = "split",
               group_column: Optional[str] = None, label_column: Optional[str] = None) -> tuple[list[ImageText], dict[str, str]]:
    """Reads a manifest (paths relative to it) or an aligner output folder into pairs, plus
    {origin: reason} for bad rows.

    Raises:
        DataError: the source is missing or has no rows, a row lacks the image column, or a split is unknown.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"pair manifest not found: {path}")
    root = path if path.is_dir() else path.parent
    pairs, bad = [], {}
    for origin, row, folder_split in _manifest_rows(path):
        if not isinstance(row, dict) or image_column not in row:
            raise DataError(f"{origin}: no {image_column!r} column (columns: {list(row) if isinstance(row, dict) else row})")
        if text_column not in row:
            raise DataError(f"{origin}: no {text_column!r} column (columns: {list(row)})")
        image = Path(str(scalar(row[image_column], image_column, origin, "a file path") or "")).expanduser()
        image = image if image.is_absolute() else root / image
        text = str(scalar(row[text_column], text_column, origin, "text") or "").strip()
        split = split_name(folder_split or row.get(split_column), origin, split_column)
        group = None
        if group_column:
            if group_column not in row:
                raise DataError(f"{origin}: no group column {group_column!r} (columns: {list(row)})")
            group = str(scalar(row[group_column], group_column, origin, "a group key"))
        label = (str(scalar(row.get(label_column), label_column, origin, "a class name") or "").strip() or None) \
            if label_column else None
        used = {image_column, text_column, split_column, label_column}
        meta = {k: v for k, v in row.items()
                if k not in used and k is not None and isinstance(v, (str, int, float, bool))}
        pair = ImageText(str(image), text, group, split, label, origin, meta)
        if not text:
            bad[origin] = "empty text"
        elif not row[image_column] or not image.is_file():
            bad[origin] = f"image not found: {image}"
        pairs.append(pair)
    if not pairs:
        raise DataError(f"no rows in {path}")
    return pairs, bad


class PairDataset(Dataset):
    """Pairs -> {"pixels", "text", "image_key", "text_key", "index", "sample_id"[, "label"]}; texts are tokenized
    per batch in the collate (padding to the longest text of the batch).

    Training keys are (epoch, index) from `EpochSampler`: each sample's augmentation is seeded by
    (seed, epoch, index), so it is the same on any number of processes and after a resume.
    """

    def __init__(self, pairs: list[ImageText], transform, channels: int = 3, seed: int = 0) -> None:
        self.pairs, self.transform, self.channels, self.seed = pairs, transform, channels, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            epoch, i = key
            seed_everything_from(self.seed, epoch, i)
        else:
            i = key
        p = self.pairs[i]
        return {"pixels": self.transform(load_image(p.path, self.channels)), "text": p.text, "index": i,
                "image_key": stable_key(str(Path(p.path).resolve())), "text_key": stable_key(normalize_text(p.text)),
                "label": p.label, "sample_id": p.origin or p.path}


class PairCollate:
    """Stacks images and tokenizes texts with the model's tokenizer."""

    def __init__(self, tokenize) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[dict]) -> dict:
        batch = {"pixels": torch.stack([it["pixels"] for it in items]),
                 "index": torch.tensor([it["index"] for it in items]),
                 "image_key": torch.tensor([it["image_key"] for it in items], dtype=torch.long),
                 "text_key": torch.tensor([it["text_key"] for it in items], dtype=torch.long),
                 "labels": [it["label"] for it in items], "sample_id": [it["sample_id"] for it in items]}
        batch.update(self.tokenize([it["text"] for it in items]))
        return batch


class ImageTextPairData(ContrastivePairData):
    """Image-text pairs for contrastive alignment (CLIP, SigLIP, dual encoders).

    The task connects itself in its `setup` (`connect(preprocess)`), giving the model's image
    transform and tokenizer, so the YAML names the model once.

    Args:
        path: a manifest (`.csv/.tsv/.jsonl/.json`) with an image path (relative to the manifest) and a
            text per row, optionally a split, a group and a label; or the folder `mmtune data align`
            wrote (its train/val/test parts are the splits, `group` its group column).
        val_path: a separate validation manifest (otherwise split from `path`).
        test_path: a separate test manifest (otherwise split from `path`).
        split: train/val/test shares for rows without a split.
        seed: split and shuffle seed.
        image_column: manifest column with the image path.
        text_column: manifest column with the caption or report.
        split_column: manifest column with train/val/test, when present.
        group_column: column whose groups (patient, study) never cross splits.
        label_column: column with a class name per row, for zero-shot accuracy.
        bad_pairs: `error` stops at setup listing every pair with an empty text or a missing or
            unreadable image; `skip` drops them and lists them in `skipped_pairs.csv`.
        verify_images: decode every image at setup (finds corrupt files before training).
        augment: training augmentation, built from the model's input size and normalization. The
            default is open_clip's (a random resized crop of 90-100% of the area, no flip: captions
            and reports say "left" and "right"); `enabled: false` trains on the evaluation transform.
        batch_size: training pairs per device (the loss sees batch_size * devices pairs).
        eval_batch_size: evaluation chunk size (default: `batch_size`).
        num_workers: data loading processes.
    """

    kind = "image-text pairs"

    def __init__(
        self,
        path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 42,
        image_column: str = "image",
        text_column: str = "text",
        split_column: str = "split",
        group_column: Optional[str] = None,
        label_column: Optional[str] = None,
        bad_pairs: Literal["error", "skip"] = "error",
        verify_images: bool = True,
        augment: AugmentSpec = AugmentSpec(scale=(0.9, 1.0), hflip=0.0),
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
    ) -> None:
        columns = dict(image_column=image_column, text_column=text_column, split_column=split_column,
                       group_column=group_column, label_column=label_column)
        super().__init__(path, val_path, test_path, split, seed, columns, bad_pairs, batch_size, eval_batch_size,
                         num_workers)
        self.verify_images = verify_images
        self.augment = augment if isinstance(augment, AugmentSpec) else AugmentSpec(**augment)

    def read(self, source: str) -> tuple[list[ImageText], dict[str, str]]:
        return read_pairs(source, **self.columns)

    def find_bad(self, rows: list[ImageText], bad: dict[str, str]) -> None:
        if self.verify_images:
            unreadable = find_unreadable([p.path for p in rows if p.origin not in bad], workers=max(2, self.num_workers))
            bad.update({p.origin: unreadable[p.path] for p in rows if p.path in unreadable and p.origin not in bad})

    @property
    def labels(self) -> list[str]:
        """Sorted class names found in the label column (zero-shot classes), over all splits."""
        return sorted({p.label for rows in self.splits.values() for p in rows if p.label})

    def train_transform(self):
        """The augmented transform for training; the model's own transform when augmentation is off or
        the model gives no input config."""
        config = self.preprocess.image_config
        if not self.augment.enabled or config is None:
            return self.preprocess.image
        return build_transform(config, True, self.augment)

    def dataset(self, split: str, rows: list[ImageText]) -> Dataset:
        transform = self.train_transform() if split == "train" else self.preprocess.image
        return PairDataset(rows, transform, self.preprocess.channels, self.seed)

    def collate(self, split: str) -> PairCollate:
        return PairCollate(self.preprocess.text)
